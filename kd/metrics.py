"""The numbers of an evaluation, from features already computed (no model here): top-k and mean-per-class
accuracy, retrieval recall@k ranked in blocks, the linear probe, the paired test between two models, and
the results table."""
from __future__ import annotations

import numpy as np
import torch


def topk_correct(img: torch.Tensor, cls: torch.Tensor, labels: torch.Tensor, k: int, block: int = 4096) -> np.ndarray:
    """Whether each image's label is among its k best classes, scored `block` images at a time (never an
    images x classes matrix: 231 MB for 30,000 images and 1,911 classes)."""
    out = [(img[i:i + block] @ cls.t()).topk(k, dim=1).indices for i in range(0, len(img), block)]
    top = torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)
    return (top == labels[:, None]).any(1).numpy()


def mean_per_class(correct: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 averaged per class, then over the classes present (ELEVATER's mean-per-class): an evaluation
    set that repeats a class (the demo's skin-tone variants: 58 % of its images) weighs it once."""
    labels = np.asarray(labels)
    _, inv = np.unique(labels, return_inverse=True)
    return float((np.bincount(inv, weights=np.asarray(correct, np.float64)) / np.bincount(inv)).mean())


def recall_at(img: torch.Tensor, txt: torch.Tensor, ks=(1, 5, 10), block: int = 0) -> dict:
    """Pair i's image and caption i match; captions shared by several images count any of them. Ranked a
    block of rows at a time (block x N scores, about 4M whatever N: never N x N); each row's own score is read
    from its block."""
    out = {}
    block = block or max(1, (1 << 22) // max(len(txt), 1))
    for name, a, b in (("i2t", img, txt), ("t2i", txt, img)):
        b = b.t().contiguous()
        # one score and one mask buffer, reused: a fresh block-sized temporary per block fragments the heap
        scores, above = torch.empty(min(block, len(a)), len(b.t())), torch.empty(min(block, len(a)), len(b.t()), dtype=torch.bool)
        rank = torch.empty(len(a), dtype=torch.long)
        for i in range(0, len(a), block):
            n = min(block, len(a) - i)
            s, m = scores[:n], above[:n]
            torch.mm(a[i:i + n], b, out=s)
            rows = torch.arange(n)
            torch.gt(s, s[rows, rows + i][:, None], out=m)
            rank[i:i + n] = torch.count_nonzero(m, dim=1)
        out.update({f"{name}_r@{k}": float((rank < k).float().mean()) for k in ks})
    return out


def linear_probe(train_x, train_y, test_x, test_y, max_iter: int = 300, seed: int = 0) -> dict:
    """Logistic regression on standardised features (lbfgs converges in far fewer iterations); C chosen
    on a validation split of the training features, each fit warm-started from the previous C's."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from cidistill.core.runtime import task_threads

    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    tr_x, va_x, tr_y, va_y = train_test_split(train_x, train_y, test_size=0.2, random_state=seed)
    # one thread: these fits are too small to split (warm, 2 threads: 1.5-2.0 s, 1 thread: 0.16-0.75 s, same answers)
    with task_threads(1):
        sc = StandardScaler().fit(tr_x)
        clf = LogisticRegression(max_iter=max_iter, warm_start=True)
        best = (-1.0, None)
        for c in (0.01, 0.1, 1.0):  # weak to strong: each fit starts from the last one's weights
            acc = clf.set_params(C=c).fit(sc.transform(tr_x), tr_y).score(sc.transform(va_x), va_y)
            best = max(best, (acc, c), key=lambda t: t[0])
        sc = StandardScaler().fit(train_x)
        clf = LogisticRegression(C=best[1], max_iter=max_iter).fit(sc.transform(train_x), train_y)
        top1 = float(clf.score(sc.transform(test_x), test_y))
    return {"probe_top1": top1, "probe_C": best[1], "probe_val_top1": best[0]}


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Exact McNemar test on per-image correctness of two models on the same images."""
    from scipy.stats import binomtest

    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p)}


def lookup(results: dict, dotted: str):
    """results["retrieval_en"]["i2t_r@1"] for "retrieval_en.i2t_r@1"; None when absent."""
    v = results
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def results_markdown(results: dict[str, dict]) -> str:
    cols = [("zeroshot_en_top1", "ZS EN top-1"), ("zeroshot_zh_top1", "ZS ZH top-1"), ("zeroshot_en_mpc", "ZS EN mean/class"),
            ("zeroshot_zh_mpc", "ZS ZH mean/class"), ("zeroshot_en_top5", "ZS EN top-5"),
            ("zeroshot_zh_top5", "ZS ZH top-5"), ("probe_top1", "probe top-1"), ("retrieval_en.i2t_r@1", "I→T R@1 EN"),
            ("retrieval_zh.i2t_r@1", "I→T R@1 ZH"), ("retrieval_en.t2i_r@5", "T→I R@5 EN"), ("params", "params"),
            ("image_throughput", "img/s")]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        cells = []
        for k, _ in cols:
            v = lookup(r, k)
            cells.append("–" if v is None else f"{v:,}" if k == "params" else f"{v:.0f}" if k == "image_throughput"
                         else f"{100 * v:.1f}%")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
