"""`cidistill compare`: the ablation table. The same student, data, batch and number of steps under each
training recipe, evaluated the same way on the held-out split, with the teacher as reference:

  clip            plain CLIP loss, student alone (EN + ZH captions): the from-scratch baseline (a text
                  tower cut from the teacher keeps its shape but starts from random weights)
  instance        instance discrimination only (feature distillation + interactive contrastive)
  cid             CLIP-CID: cluster discrimination + instance discrimination, on the balanced data
  cid_unbalanced  the same on the data before balancing (pseudo-labels re-clustered on it too)
  dcclip          DC-CLIP two-stage: feature distillation, then student image-text alignment
  config          the config's own schedule (the train stage's student; reused when it is done)

Each variant trains into COMPARE_DIR/<name>/ with the train stage's own skip/resume; results are cached
per variant. Paired McNemar tests on per-image zero-shot correctness compare each recipe with `clip`."""
from __future__ import annotations

import dataclasses
import io
import time

import numpy as np

from cidistill.core.config import Config, ConfigError, PhaseConfig
from cidistill.core.store import Store, join
from kd.evaluate import evaluate, load_for_eval
from kd.metrics import lookup, paired_test
from cidistill.core.stage import DONE
from .registry import make_stage, run_stage

VARIANTS = ("config", "clip", "cid", "instance", "dcclip", "cid_unbalanced")  # cheapest evidence first
CLUSTER_W, INSTANCE_W = 0.5, 1.0


def variant_config(cfg: Config, name: str, root: str) -> Config:
    """The config of one recipe: same student/batch/steps as `cfg.train`, only the losses (and data) differ."""
    total = sum(p.steps for p in cfg.train.phases)
    stage1 = cfg.train.phases[0].steps if len(cfg.train.phases) > 1 else total // 5
    phases = {
        "clip": [PhaseConfig(total, {"clip": 1.0})],
        "instance": [PhaseConfig(total, {"instance": INSTANCE_W})],
        "cid": [PhaseConfig(total, {"cluster": CLUSTER_W, "instance": INSTANCE_W})],
        "cid_unbalanced": [PhaseConfig(total, {"cluster": CLUSTER_W, "instance": INSTANCE_W})],
        "dcclip": [PhaseConfig(stage1, {"feature_distill": 1.0}), PhaseConfig(total - stage1, {"align": 1.0})],
    }
    if name == "config":
        return cfg
    if name not in phases:
        raise ConfigError(f"compare: unknown variant {name!r}; known: {' '.join(VARIANTS)}")
    dirs = dict(cfg.dirs, train=join(root, name, "train"))
    train = dataclasses.replace(cfg.train, phases=phases[name])
    student = dataclasses.replace(cfg.student, text_init="random") if name == "clip" else cfg.student
    cluster = cfg.cluster
    if name == "cid_unbalanced":
        train = dataclasses.replace(train, use_balanced=False)
        cluster = dataclasses.replace(cfg.cluster, use_balanced=False)
        dirs["cluster"] = join(root, name, "cluster")
        dirs["pack"] = join(root, name, "pack")
    return dataclasses.replace(cfg, dirs=dirs, train=train, cluster=cluster, student=student)


def _save_npz(store: Store, name: str, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    store.write_bytes(name, buf.getvalue())


def _load_npz(store: Store, name: str) -> dict:
    with store.fs.open(store.path(name), "rb") as f:
        return dict(np.load(io.BytesIO(f.read())))


def run_variant(cfg: Config, name: str, root: str, use_ray: bool, force: bool = False) -> tuple[dict, dict]:
    """Train (skipped when done) and evaluate one recipe. The evaluation is cached in ROOT/<name>/ under a key:
    the eval stage's fingerprint for this config with the recipe's trained student as its input, so another
    config, teacher, held-out split or eval setting is measured again, never read from an earlier run."""
    out, ev = Store(join(root, name)), make_stage("eval", cfg, use_ray=False)
    spec = "teacher" if name == "teacher" else "student"
    if name in ("teacher", "config") and not force and ev.status(ev.fingerprint())[0] == "done":
        res = ev.out.read_json("results.json")[spec]
        if name == "config":
            tstats = Store(cfg.stage_dir("train")).read_json("stats.json")
            res.update(train_seconds=tstats.get("seconds"), train_pairs=tstats.get("pairs"), steps=tstats.get("steps"))
        return res, _load_npz(ev.out, f"{spec}_correct.npz")  # the eval stage measured these for this config
    vcfg, tstats = cfg, {}
    if name != "teacher":
        vcfg = variant_config(cfg, name, root)
        if not vcfg.cluster.use_balanced:
            run_stage("cluster", vcfg, force=force, use_ray=use_ray)
            run_stage("pack", vcfg, force=force, use_ray=use_ray)
        # compare retrains only the recipes it trains itself; the config's own student is the train stage's
        tstats = run_stage("train", vcfg, force=force and name != "config", use_ray=use_ray)
    trained = "teacher" if name == "teacher" else Store(vcfg.stage_dir("train")).read_json(DONE)["fingerprint"]
    key = ev.fingerprint({"train": trained})["fingerprint"]
    if not force and out.exists("eval.json") and (cached := out.read_json("eval.json")).get("key") == key:
        return cached, _load_npz(out, "correct.npz")
    t0 = time.time()
    res, per = evaluate(cfg, load_for_eval(vcfg, spec))  # every recipe on the same pairs
    if name != "teacher":
        res.update(train_seconds=tstats.get("seconds"), train_pairs=tstats.get("pairs"), steps=tstats.get("steps"),
                   losses={f"phase{i}": p.losses for i, p in enumerate(vcfg.train.phases)})
    res["eval_seconds"] = round(time.time() - t0, 1)
    res["key"] = key
    _save_npz(out, "correct.npz", per)
    out.write_json("eval.json", res)  # last: marks the variant done
    return res, per


def table_markdown(results: dict[str, dict], tests: dict[str, dict]) -> str:
    cols = [("zeroshot_en_top1", "ZS EN"), ("zeroshot_zh_top1", "ZS ZH"), ("zeroshot_en_mpc", "EN /class"),
            ("zeroshot_zh_mpc", "ZH /class"), ("probe_top1", "probe"),
            ("retrieval_en.i2t_r@1", "I→T R@1 EN"), ("retrieval_zh.i2t_r@1", "I→T R@1 ZH"),
            ("retrieval_en.t2i_r@5", "T→I R@5 EN")]
    head = ["recipe"] + [c[1] for c in cols] + ["EN vs clip (p)", "ZH vs clip (p)", "params", "img/s", "train s", "pairs"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in results.items():
        cells = [name]
        for k, _ in cols:
            v = lookup(r, k)
            cells.append("–" if v is None else f"{100 * v:.1f}")
        for lang in ("en", "zh"):
            t = tests.get(name, {}).get(lang)
            cells.append("–" if t is None else f"{100 * t['delta']:+.1f} ({t['p_value']:.2g})")
        cells += [f"{r['params']:,}", f"{r['image_throughput']:.0f}",
                  "–" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f}", str(r.get("train_pairs", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(cfg: Config, variants: list[str] | None = None, use_ray: bool = True, out_dir: str = "",
            force: bool = False) -> dict:
    """The table of `variants` (default: all). `force`: every recipe evaluated again and the ones compare
    trains (its own folders) trained again; the config's own train stage is redone by `cidistill train --force`."""
    root = out_dir or join(cfg.workdir, "compare")
    names = list(variants or VARIANTS)
    if bad := [n for n in names if n not in VARIANTS + ("teacher",)]:  # before any variant trains
        raise ConfigError(f"compare: unknown variant(s) {bad}; known: {' '.join(VARIANTS)}")
    if cfg.teacher.pretrained:
        names = ["teacher"] + [n for n in names if n != "teacher"]
    results, per = {}, {}
    for name in names:
        print(f"[compare] {name}")
        results[name], per[name] = run_variant(cfg, name, root, use_ray, force)
    tests = {}
    if "clip" in per:
        for name in names:
            if name in ("clip", "teacher"):
                continue
            tests[name] = {}
            for lang in ("en", "zh"):
                a, b = per[name].get(f"zeroshot_{lang}"), per["clip"].get(f"zeroshot_{lang}")
                if a is not None and b is not None:
                    tests[name][lang] = dict(paired_test(a.astype(bool), b.astype(bool)),
                                             delta=float(a.mean() - b.mean()))
    md = (f"# Ablations: same student ({cfg.student.model}), batch {cfg.train.batch_size}, "
          f"{sum(p.steps for p in cfg.train.phases)} steps\n\n"
          "Zero-shot top-1 (%) on the held-out split; `vs clip`: difference in points and the exact McNemar "
          "p-value on the same images.\n\n" + table_markdown(results, tests))
    store = Store(str(root))
    store.write_bytes("results.md", md.encode())
    store.write_json("results.json", {"results": results, "paired_vs_clip": tests})
    print(md)
    print(f"[compare] done: {len(names)} recipes -> {join(root, 'results.md')}")
    return {"results": results, "paired_vs_clip": tests}
