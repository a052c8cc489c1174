"""eval: ELEVATER-style zero-shot classification with EN and ZH prompt ensembles, a scikit-learn linear
probe, and image<->text retrieval recall@k, the same way for any model (teacher, checkpoint, exported
folder, open_clip tag). The class and probe labels are columns of the pairs (`eval.class_col`, ...); the
probe is fitted on the training split only, never on the evaluation images. A task that cannot run on the
data is reported as skipped, with the reason. Demo: ~1.9k base-emoji names on the held-out artist style,
subgroup probe.

Everything streams from the packed splits (pipeline/pack.py): images are decoded a batch at a time and only
their features are kept (N x D floats); retrieval ranks in blocks of rows, never an N x N matrix."""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cidistill.core.config import Config, EvalConfig
from cidistill.core.errors import StageError
from cidistill.core.images import decode_rgb
from cidistill.core.models import LoadedModel, autocast, channels_last, count_params, create, local_dir
from cidistill.core.text_ops import encode_text
from cidistill.core.packed import image_member, iter_tar_samples, sample_fields, split_shards
from cidistill.core.runtime import cache_dir, embed_precision, resolve_precision
from cidistill.core.schema import has_holdout
from cidistill.core.store import Store
from .data import normalise
from .metrics import linear_probe, mean_per_class, recall_at, topk_correct

def load_for_eval(cfg: Config, spec: str) -> LoadedModel:
    """The model `spec` names, set to run in `eval.precision`."""
    if spec == "student":
        from .export import load_trained_student

        lm = load_trained_student(cfg)
    elif spec == "teacher":
        lm = create(cfg.teacher.model, cfg.teacher.pretrained, cfg.teacher.model_config)
    elif spec.startswith("local-dir:"):
        lm = create(spec)
    else:
        name, _, tag = spec.partition("/")  # open_clip tag: MODEL/PRETRAINED
        lm = create(name, tag)
    return dataclasses.replace(lm, precision=cfg.eval.precision)


def image_size(lm: LoadedModel) -> int:
    s = lm.model_cfg["vision_cfg"]["image_size"]
    return s if isinstance(s, int) else s[0]


EVAL_VERSION = 6  # part of the teacher's cache key: raise it when a metric's computation changes


def label_columns(ec: EvalConfig) -> dict[str, str]:
    """What the evaluation reads from each pair's metadata: role -> column (only the roles configured)."""
    cols = {"class": ec.class_col, "name": ec.class_name_col, "name_zh": ec.class_name_zh_col,
            "probe": ec.probe_col or ec.class_col}
    return {role: c for role, c in cols.items() if c}


@dataclass
class SplitView:
    """One pass over a packed split: image features and each pair's captions and metadata (no images)."""
    img: torch.Tensor                            # (N, D) L2-normalised
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    captions_zh: list[str] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    stored_txt: list = field(default_factory=list)      # with `stored`: each pair's stored EN / ZH caption
    stored_txt_zh: list = field(default_factory=list)   # features (None where the sample has none)

    def column(self, role: str) -> list:
        return [m.get(role) for m in self.meta]

    def not_labels(self, role: str, ec: EvalConfig) -> str | None:
        """Why a label column's values cannot be classes (lists, mappings), or None."""
        odd = next((type(v).__name__ for v in self.column(role) if isinstance(v, (list, dict))), None)
        return f"{label_columns(ec)[role]!r} holds {odd} values, not class labels (strings or numbers)" if odd else None

    def labelled(self, role: str) -> np.ndarray:
        """The rows that have a value for `role` (a null or empty one is no label)."""
        return np.array([i for i, v in enumerate(self.column(role)) if v is not None and v != ""], np.int64)

    def missing(self, role: str, ec: EvalConfig) -> str | None:
        """Why a label column cannot be used (None: some pair has a value; the others are left out)."""
        col = label_columns(ec).get(role)
        if why := self.not_labels(role, ec):
            return why
        if not self.keys or len(self.labelled(role)):
            return None if self.keys else "no pairs"
        return f"none of the {len(self.keys)} pairs has a {col!r} value; carry the column with data.extra_cols" \
            if col else "no column configured"

    def partial(self, role: str, task: str, ec: EvalConfig, res: dict) -> np.ndarray:
        """The rows a task scores: every labelled one; a note in `res` when some pairs have no label."""
        rows = self.labelled(role)
        if len(rows) < len(self.keys):
            res.setdefault("notes", {})[task] = (f"on the {len(rows)} of {len(self.keys)} images with a "
                                                 f"{label_columns(ec)[role]!r} value")
        return rows

    def texts(self, zh: bool = False) -> list[str]:
        """Each pair's caption in that language (None or empty where it has none)."""
        return self.captions_zh if zh else self.captions

    def captioned(self, zh: bool = False) -> np.ndarray:
        """The rows with a usable caption in that language (not empty or blank, as the embed stage counts
        them): a pair without one cannot be retrieved by it, so it takes no part in that retrieval (an English
        caption standing in for a missing Chinese one would score English retrieval as Chinese)."""
        return np.array([i for i, t in enumerate(self.texts(zh)) if t and t.strip()], np.int64)

    def caption_features(self, lm: LoadedModel, zh: bool = False, rows=None) -> torch.Tensor:
        """Caption features of `rows` (default all): the stored ones when every such pair has them, else
        computed by the model."""
        rows = range(len(self.keys)) if rows is None else rows
        texts = self.texts(zh)
        stored = self.stored_txt_zh if zh else self.stored_txt
        if stored and all(stored[i] is not None for i in rows):
            return F.normalize(torch.from_numpy(np.stack([stored[i] for i in rows]).astype(np.float32)), dim=-1)
        return text_features(lm, [texts[i] for i in rows])


def run_in(lm: LoadedModel):
    """The autocast of the model's forward passes (lm.precision; the scores after them stay float32)."""
    return autocast(lm.precision, next(lm.model.parameters()).device)


@torch.no_grad()
def encode_images(lm: LoadedModel, images_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2)
    with run_in(lm):
        out = lm.model.encode_image(normalise(x, lm.preprocess_cfg.get("mean"), lm.preprocess_cfg.get("std")))
    return out.float().clone()  # a copy: the output may be a view that keeps the whole last activation alive


def split_view(lm: LoadedModel, root: str, split: str, ec: EvalConfig, stored: bool = False,
               caption_features: bool = True) -> SplitView:
    """Stream a packed split shard by shard: decode `batch` images, keep their features, drop the pixels.
    With `stored` (the teacher that embedded them) and samples that carry the embed stage's features, those
    are used instead (float16 in the shards; the same model on the same decoded pixels), nothing decoded; the
    caption features too unless `caption_features` is off (a split used for its images only)."""
    store, size, batch, labels = Store(root), image_size(lm), ec.batch_size, label_columns(ec)
    view, feats, pending = SplitView(torch.empty(0)), [], []

    def flush():
        x = np.stack(pending)
        feats.append(torch.from_numpy(x.astype(np.float32)) if stored else encode_images(lm, x))
        pending.clear()

    for name, _ in split_shards(store, split):
        for s in iter_tar_samples(store, name):
            f = sample_fields(s)
            if not view.keys:
                stored = stored and "t_img" in f
            view.keys.append(f["key"])
            view.captions.append(f["caption"])
            view.captions_zh.append(f["caption_zh"])
            view.meta.append({role: f["meta"].get(col) for role, col in labels.items()})
            if stored:
                if "t_img" not in f:
                    raise StageError(f"packed sample {f['key']} in {name} has no teacher image embedding "
                                     "while others do: rerun `cidistill pack --force`")
                pending.append(f["t_img"])
                if caption_features:
                    view.stored_txt.append(f.get("t_txt"))
                    view.stored_txt_zh.append(f.get("t_txt_zh"))
            else:
                pending.append(decode_rgb(image_member(s), size))
            if len(pending) == batch:
                flush()
    if pending:
        flush()
    if not feats:
        raise StageError(f"no packed {split} pairs in {root}: run `cidistill pack` (it holds out data.holdout's pairs)")
    view.img = F.normalize(torch.cat(feats), dim=-1)
    feats.clear()
    release_freed_memory()  # the decoded batches' pages
    return view


@torch.no_grad()
def text_features(lm: LoadedModel, texts: list[str], batch: int = 512) -> torch.Tensor:
    if not texts:
        return torch.empty(0, lm.embed_dim)
    tokens = torch.cat([lm.tokenizer(texts[i:i + 4096]) for i in range(0, len(texts), 4096)])
    # sorted by length over all texts, batches of ~`batch` rows each cut to its longest
    with run_in(lm):
        out = encode_text(lm.model, tokens, chunks=-(-len(texts) // batch))
    return F.normalize(out.float(), dim=-1)


def classifier(lm: LoadedModel, names: list[str], temps: list[str]) -> torch.Tensor:
    """Prompt ensemble: each class's text embeddings averaged over templates, then normalised."""
    feats = text_features(lm, [t.format(n) for n in names for t in temps]).view(len(names), len(temps), -1)
    return F.normalize(feats.mean(1), dim=-1)


@torch.no_grad()
def throughput(lm: LoadedModel, batch: int = 128, reps: int = 5) -> float:
    """Images/s of the image tower on random input (in lm.precision): the fastest of `reps` timed batches after
    a warm-up, so that another process's burst on a shared box does not decide a ratio."""
    s = image_size(lm)
    channels_last(lm.model)
    x = torch.randn(batch, 3, s, s)
    best = float("inf")
    with run_in(lm):
        lm.model.encode_image(x)
        for _ in range(reps):
            t = time.perf_counter()
            lm.model.encode_image(x)
            best = min(best, time.perf_counter() - t)
    return batch / best


def class_names(views: list[SplitView]) -> dict[str, tuple[str, str | None]]:
    """The zero-shot classes over every split seen: class -> (EN name, ZH name or None). A class's EN name
    is its value when no name column is configured; a class without a ZH name uses its EN name."""
    names: dict[str, tuple[str, str | None]] = {}
    for v in views:
        for m in v.meta:
            c = m.get("class")
            if c is not None and c != "" and c not in names:
                en = str(m.get("name") or c)
                names[c] = (en, m.get("name_zh") or en)
    return names


def zeroshot(lm: LoadedModel, test: SplitView, names: dict, ec: EvalConfig, res: dict, per: dict) -> None:
    """Top-1/top-5 and mean per class over the classes in `names`, in EN, and in ZH when Chinese names are
    configured; on the test images that have a class."""
    classes = sorted(names, key=str)
    index = {c: i for i, c in enumerate(classes)}
    rows = test.partial("class", "zeroshot", ec, res)
    column = test.column("class")
    labels = torch.tensor([index[column[i]] for i in rows])
    img = test.img[torch.from_numpy(rows)] if len(rows) < len(test.keys) else test.img
    res["zeroshot_classes"] = len(classes)
    per["zeroshot_label"] = labels.numpy()   # saved with the correctness: any re-weighting can be redone
    per["zeroshot_rows"] = rows               # which of the images (per["keys"]) those are
    langs = [("en", ec.templates_en)] + ([("zh", ec.templates_zh)] if ec.class_name_zh_col else [])
    for li, (lang, temps) in enumerate(langs):
        cls = classifier(lm, [names[c][li] for c in classes], temps)
        per[f"zeroshot_{lang}"] = topk_correct(img, cls, labels, 1)
        res[f"zeroshot_{lang}_top1"] = float(per[f"zeroshot_{lang}"].mean())
        res[f"zeroshot_{lang}_mpc"] = mean_per_class(per[f"zeroshot_{lang}"], labels.numpy())
        if len(classes) > 5:  # with five classes or fewer every image is right within five
            res[f"zeroshot_{lang}_top5"] = float(topk_correct(img, cls, labels, 5).mean())


def retrieval(lm: LoadedModel, test: SplitView, res: dict, skipped: dict) -> None:
    """Recall@k both ways per language, over the pairs that have a caption (a note says on how many)."""
    for lang, zh in (("en", False), ("zh", True)):
        if zh and not any(test.captions_zh):
            continue
        rows, what = test.captioned(zh), "Chinese caption" if zh else "caption"
        if not len(rows):
            skipped[f"retrieval_{lang}"] = f"none of the {len(test.keys)} pairs has a {what}"
            continue
        if len(rows) < len(test.keys):
            res.setdefault("notes", {})[f"retrieval_{lang}"] = f"on the {len(rows)} of {len(test.keys)} images with a {what}"
        res[f"retrieval_{lang}"] = recall_at(test.img[rows], test.caption_features(lm, zh, rows))
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc keeps them otherwise, so the process's RSS only ever
    grows from one phase of the evaluation to the next)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


PARTS = ("features", "zeroshot", "linear_probe", "retrieval", "throughput")  # what `done` hears of, in order


def evaluate(cfg: Config, lm: LoadedModel, tasks=None, stored: bool = False, done=lambda part: None
             ) -> tuple[dict, dict]:
    """Returns (metrics, per-image correctness arrays for paired tests, with the images' keys). Reads the
    pack stage's `eval` split (the held-out pairs, or every pair when there is no held-out split) and, for
    the probe and the zero-shot class list, its `train` split. `stored`: `lm` is the teacher whose features
    the packed samples carry (see split_view). `done(part)` is called as each of PARTS ends (progress)."""
    tasks, ec = tasks or cfg.eval.tasks, cfg.eval
    channels_last(lm.model).eval()
    root, held = cfg.stage_dir("pack"), has_holdout(cfg)
    test = split_view(lm, root, "eval", ec, stored)
    skipped = {}
    if "zeroshot" in tasks and (why := test.missing("class", ec)):
        skipped["zeroshot"] = why
    if "zeroshot" in tasks and "zeroshot" not in skipped and not ec.class_name_zh_col:
        skipped["zeroshot_zh"] = "no Chinese class names (eval.class_name_zh_col)"
    if "linear_probe" in tasks and (why := "no held-out split to fit it apart from" if not held
                                    else test.missing("probe", ec)):
        skipped["linear_probe"] = why
    need_train = held and any(t in tasks and t not in skipped for t in ("zeroshot", "linear_probe"))
    train = split_view(lm, root, "train", ec, stored, caption_features=False) if need_train else None
    for task, role in (("zeroshot", "class"), ("linear_probe", "probe")):  # the training pairs' labels too
        if train is not None and task in tasks and task not in skipped and (why := train.not_labels(role, ec)):
            skipped[task] = why
    done("features")
    res, per = {"params": count_params(lm.model), "eval_images": len(test.keys)}, {"keys": np.array(test.keys)}
    if test.stored_txt:
        res["features"] = "stored"  # the embed stage's, as packed with the samples
    if "zeroshot" in tasks and "zeroshot" not in skipped:
        zeroshot(lm, test, class_names([test] + ([train] if train else [])), ec, res, per)
        release_freed_memory()
    done("zeroshot")
    fit = train.labelled("probe") if train is not None else []
    if "linear_probe" in tasks and "linear_probe" not in skipped and not len(fit):
        skipped["linear_probe"] = f"no training pair has a {label_columns(ec)['probe']!r} label"
    if "linear_probe" in tasks and "linear_probe" not in skipped:  # unlabelled training pairs take no part
        rows = test.partial("probe", "linear_probe", ec, res)
        labels, seen = test.column("probe"), {train.meta[i]["probe"] for i in fit}
        if unseen := sum(labels[i] not in seen for i in rows):  # scored wrong whatever the features
            notes = res.setdefault("notes", {})
            notes["linear_probe"] = "; ".join(filter(None, [notes.get("linear_probe"),
                                                          f"{unseen} of {len(rows)} images have a label no training pair has"]))
        res.update(linear_probe(train.img.numpy()[fit], [train.meta[i]["probe"] for i in fit],
                                test.img.numpy()[rows], [labels[i] for i in rows], ec.probe_max_iter))
    del train  # the training split's features and fields are not needed past here
    release_freed_memory()
    done("linear_probe")
    if "retrieval" in tasks:
        retrieval(lm, test, res, skipped)
    done("retrieval")
    res["image_throughput"] = throughput(lm, ec.throughput_batch, ec.throughput_reps)
    done("throughput")
    if skipped:
        res["skipped"] = skipped
    return res, per


def teacher_evaluation(cfg: Config, lm: LoadedModel, done=lambda part: None) -> tuple[dict, dict]:
    """The teacher's scores depend only on its weights, the packed splits and the eval settings: computed once
    per combination and kept in this node's cache, since a student's retraining, `compare`'s variants and a
    resumed run all evaluate the same teacher on the same pairs. Its image throughput is measured again each
    time, beside the student's, so that their ratio is taken under the same load."""
    folder = cache_dir() / "teacher_eval" / teacher_eval_key(cfg)
    if cached := _cached_scores(folder):
        res, per = cached
        for part in PARTS[:-1]:
            done(part)
        res["image_throughput"] = throughput(lm, cfg.eval.throughput_batch, cfg.eval.throughput_reps)
        done(PARTS[-1])
        return res, per
    res, per = evaluate(cfg, lm, stored=True, done=done)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.savez(tmp / "correct.npz", **per)
    (tmp / "results.json").write_text(json.dumps(res), encoding="utf-8")  # written last: a folder without it is never read
    try:
        tmp.rename(folder)
    except OSError:  # another process cached the same evaluation first
        shutil.rmtree(tmp, ignore_errors=True)
    return res, per


def _cached_scores(folder: Path) -> tuple[dict, dict] | None:
    """A cached teacher evaluation, or None: none there, or one damaged after it was written (then removed,
    to be computed again)."""
    if not (folder / "results.json").is_file():
        return None
    try:
        res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        with np.load(folder / "correct.npz") as z:
            return res, {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        print(f"[eval] the cached teacher evaluation in {folder} is damaged ({type(e).__name__}); computing it again")
        shutil.rmtree(folder, ignore_errors=True)
        return None


BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def teacher_eval_key(cfg: Config) -> str:
    """Weights (an open_clip tag, or the files' names, sizes and times), the eval settings, and the packed
    splits by content: each split's manifest (every pair's key, captions, shard and row) and its shards' sizes."""
    t = cfg.teacher
    h = hashlib.sha256(json.dumps({"version": EVAL_VERSION, "model": t.model, "pretrained": t.pretrained,
                                   "model_config": t.model_config,
                                   # the throughput is measured again each time: its settings shape no score
                                   "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items()
                                            if not k.startswith("throughput_")},
                                   # what its features were computed in: by the embed stage, then here
                                   "precision": [embed_precision(t.precision, "cuda" if t.gpus_per_actor else "cpu"),
                                                 resolve_precision(cfg.eval.precision, "cpu")],
                                   "held_out": has_holdout(cfg),
                                   # the probe's lbfgs rounds as OpenBLAS's kernel does: one forced by these
                                   # moved the small demo's probe by an image of 100
                                   "blas": {k: os.environ.get(k) for k in BLAS_ENV}}, sort_keys=True, default=str).encode())
    for p in _weight_files(t.pretrained):
        st = p.stat()
        h.update(f"{p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    pack = Store(cfg.stage_dir("pack"), create=False)
    for split in ("eval", "train"):
        if pack.exists(f"{split}/manifest.parquet"):
            h.update(pack.read_bytes(f"{split}/manifest.parquet"))
        for name in pack.glob(f"{split}/shard-*.tar"):
            h.update(f"{name}|{pack.fs.size(pack.path(name))}".encode())
    return h.hexdigest()[:20]


def _weight_files(pretrained: str) -> list[Path]:
    """The local files behind `teacher.pretrained` (a checkpoint file or a `local-dir:` folder); none for a tag."""
    if not pretrained:
        return []
    path = local_dir(pretrained) if pretrained.startswith("local-dir:") else Path(pretrained)
    if path.is_dir():
        return [p for p in sorted(path.rglob("*")) if p.is_file()]
    return [path] if path.is_file() else []
