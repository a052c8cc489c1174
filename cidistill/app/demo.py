"""`cidistill demo`: the emoji data from registry packages, served on 127.0.0.1, through every stage.

The demo's teacher is a LiT model (pretrained MiniLM text tower, locked; small ResNet image tower trained
with the `clip` loss on the training styles). It is trained once and cached by its config and data."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from cidistill.core import faults
from cidistill.core.config import STAGES, Config, load_config, merge
from cidistill.core.lock import work_lock
from cidistill.core.models import ModelLoadError, check_weights, create, demo_teacher_config
from cidistill.core.runtime import cache_dir, cache_lock, resolve_precision
from cidistill.core.errors import StageError
from cidistill.core.stage import DONE, RUN
from cidistill.core.store import Store, StoreError, join, use_storage_options
from kd.checkpoint import latest_checkpoint, load_weights
from kd.export import export_local_dir
from kd.train import train
from pipeline.pack import Sources, pack_dataset
from .demo_data import LoopbackServer, build_demo_data, urls_port, write_urls
from .registry import checked_stages, run_stages

DEMO = {
    "data": {"samples_per_shard": 1000, "image_size": 64, "holdout": "vendor=twitter",
             "allow_private_addresses": True,  # its images are served on 127.0.0.1
             # base emoji + its EN/ZH names: the zero-shot classes; subgroup: the linear-probe label
             "extra_cols": ["caption_zh", "emoji", "base", "base_name", "base_name_zh", "group", "subgroup", "vendor"]},
    "teacher": {"model": "cid-demo-teacher", "batch_size": 256, "threads": 2},  # reads finish early: use both cores
    "balance": {"near_dup_cos": 0.99, "semantic_eps": [0.01, 0.02, 0.05, 0.1], "apply_eps": 0.05, "keep": "hard"},
    "cluster": {"k": 300},
    "pack": {"samples_per_shard": 256},
    # text tower: 3 of the teacher's 6 MiniLM layers + a corpus vocabulary with the Chinese characters
    # (kd/text_tower.py); image tower: a small ResNet [1,2,2,1] x 24 (cid-tiny-rn-deep)
    "student": {"model": "cid-tiny-rn-deep", "context_length": 64, "text_from_teacher": 3, "text_lr_scale": 0.1},
    # style_augment: like the teacher, the student is evaluated on an artist style it never saw
    # zero-shot over the base emoji's EN/ZH names with emoji prompts; the probe predicts the subgroup
    "eval": {"class_col": "base", "class_name_col": "base_name", "class_name_zh_col": "base_name_zh",
             "probe_col": "subgroup",
             "templates_en": ["{}", "an emoji of {}.", "a {} emoji.", "an icon showing {}."],
             "templates_zh": ["{}", "{}的表情符号。", "一个{}表情。", "显示{}的图标。"]},
    "train": {"batch_size": 128, "lr": 2e-3, "ckpt_every": 100, "style_augment": True,
              # ~0.8 s a step at batch 128 on 2 cores (text tower run without its padding): 400 steps ~5 min
              "phases": [{"steps": 50, "losses": {"feature_distill": 1.0}},
                         {"steps": 350, "losses": {"cluster": 0.5, "instance": 1.0, "align": 0.5}}]},
}
SMALL = {
    "data": {"samples_per_shard": 100},
    "balance": {"near_dup_cos": 0.995, "semantic_eps": [0.002, 0.005, 0.01], "apply_eps": 0.005},
    "cluster": {"k": 20},
    "pack": {"samples_per_shard": 64},
    # every loss at test size: the tests check what the stages do, no goal reads these numbers
    "train": {"batch_size": 32, "ckpt_every": 5, "log_every": 5,
              "phases": [{"steps": 5, "losses": {"feature_distill": 1.0}},
                         {"steps": 10, "losses": {"cluster": 0.5, "instance": 1.0, "align": 0.5}}]},
    # test-size throughput (no goal reads it): ~1 s instead of ~8 s of each evaluation's teacher and student
    "eval": {"probe_max_iter": 100, "throughput_batch": 32, "throughput_reps": 2},
}
TEACHER_STEPS = {False: 350, True: 40}
TEACHER_BATCH = {False: 128, True: 32}  # small: 200 training pairs, 6 epochs


def demo_config(workdir: str, small: bool, overrides: list[str] | None = None, config_file: str | None = None) -> Config:
    base = merge(DEMO, SMALL) if small else dict(DEMO)
    base = merge(base, {"workdir": workdir, "data": {"urls": join(workdir, "urls.parquet")}})
    return load_config(config_file, overrides, base=base)


def teacher_recipe(cfg: Config, small: bool) -> tuple[Config, Path]:
    """The demo teacher's training config and its cache folder, keyed by what shapes the teacher (not by
    every train field, so that new unrelated options keep the cache). Its seed is fixed: the student's
    `train.seed` varies the student against the same teacher."""
    tcfg = dataclasses.replace(
        cfg, student=dataclasses.replace(cfg.student, model=cfg.teacher.model, trim_vocab=False, pretrained="",
                                         text_from_teacher=0),
        train=dataclasses.replace(cfg.train, phases=[dataclasses.replace(cfg.train.phases[0], steps=TEACHER_STEPS[small],
                                                                         losses={"clip": 1.0})],
                                  lr=1e-3, batch_size=TEACHER_BATCH[small], use_balanced=False, workers=1, ckpt_every=50, seed=0,
                                  style_augment=True))  # it is evaluated on an artist style it never saw
    t = tcfg.train
    recipe = {k: getattr(t, k) for k in ("batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip", "precision",
                                         "seed", "augment", "style_augment", "use_balanced", "streams", "shuffle_block")}
    recipe["pack"] = dataclasses.asdict(cfg.pack)
    recipe["phases"] = [dataclasses.asdict(p) for p in t.phases]
    recipe["precision"] = resolve_precision(t.precision, "cuda" if t.use_gpu else "cpu")  # what it trains in
    arch = demo_teacher_config() or {}
    arch = dict(arch, text_cfg={k: v for k, v in arch.get("text_cfg", {}).items() if not k.endswith("_name")})
    digest_src = json.dumps({"data_path": "packed-stream", "train": recipe, "holdout": cfg.data.holdout, "model": tcfg.student.model, "arch": arch,
                             "data": Store(cfg.stage_dir("download")).read_json("stats.json").get("successes"),
                             "small": small}, sort_keys=True)
    key = hashlib.sha256(digest_src.encode()).hexdigest()[:12]
    return tcfg, cache_dir() / "teachers" / f"{cfg.teacher.model}-{key}"


def ensure_teacher(cfg: Config, small: bool, use_ray: bool = True) -> str:
    """Train (once) and cache the demo's LiT teacher; returns its `local-dir:` path. One process of the node
    trains a given teacher: another demo that needs it at the same time waits, then finds it cached."""
    tcfg, final = teacher_recipe(cfg, small)
    with cache_lock(final.with_name(f".{final.name}.lock"), "training the same demo teacher"):
        return _ensure_teacher(cfg, tcfg, final, small, use_ray)


def _ensure_teacher(cfg: Config, tcfg: Config, final: Path, small: bool, use_ray: bool) -> str:
    if (final / "open_clip_config.json").exists():  # written last
        try:
            check_weights(f"local-dir:{final}", "")
            print(f"[teacher] cached: {final}")
            return f"local-dir:{final}"
        except ModelLoadError as e:  # damaged after it was written (a disk error, a cut copy): made again
            print(f"[teacher] the cached teacher is damaged ({e}); training it again")
            shutil.rmtree(final)
    work = Store(join(cfg.workdir, "teacher_train"))
    faults.set_stage("teacher")
    start = time.perf_counter()
    print(f"[teacher] training the demo LiT teacher ({TEACHER_STEPS[small]} steps, locked MiniLM text tower)")
    packed = Store(work.url("pack"))  # the downloaded training pairs (no embeddings yet: this teacher makes them)
    if not packed.exists("train/manifest.parquet"):
        pack_dataset(tcfg, packed, Sources(tcfg, teacher=False, balanced=False, clusters=False), use_ray=use_ray)
    train(tcfg, work.uri, data=packed.uri, use_ray=use_ray, lock_text=True, chinese=False)
    lm = create(cfg.teacher.model)
    lm.model.load_state_dict(load_weights(work, latest_checkpoint(work)))
    final.parent.mkdir(parents=True, exist_ok=True)
    export_local_dir(lm, final, "# cidistill demo teacher\n\nLiT: all-MiniLM-L6-v2 (locked) + ModifiedResNet image tower "
                                "trained with the CLIP loss on the demo's apple+google emoji.\n")
    work.fs.rm(work.root, recursive=True)
    print(f"[teacher] done: {final} in {time.perf_counter() - start:.1f}s")
    faults.set_stage("none")
    return f"local-dir:{final}"


def demo_run_config(args) -> Config:
    """The config of a demo that has downloaded (its teacher trained once and cached)."""
    workdir = args.workdir or ("runs/demo-small" if args.small else "runs/demo")
    cfg = demo_config(workdir, args.small, list(args.overrides), args.config)
    use_storage_options(cfg.storage_options)
    if args.ray_address:
        cfg.ray_address = args.ray_address
    if not cfg.teacher.pretrained:
        cfg.teacher.pretrained = ensure_teacher(cfg, args.small, use_ray=not args.no_ray)
    return cfg


def _demo_stages(args, cfg: Config, stages: list[str]) -> dict:
    use_ray = not args.no_ray
    data = build_demo_data(args.small)
    urls = cfg.data.urls
    print(f"[demo] {data.table.num_rows} emoji pairs (3 artist styles, EN+ZH captions) -> {cfg.workdir}")
    out = {}
    with LoopbackServer(data.root, port=urls_port(urls)) as srv:
        write_urls(data, srv.base_url, urls)
        if "download" in stages:
            out.update(run_stages(cfg, ["download"], force=args.force, use_ray=use_ray))
    rest = [s for s in stages if s != "download"]
    if rest and not cfg.teacher.pretrained:
        cfg.teacher.pretrained = ensure_teacher(cfg, args.small, use_ray=use_ray)
    if rest:
        out.update(run_stages(cfg, rest, force=args.force, use_ray=use_ray))
    return out


def check_demo_folder(cfg: Config) -> None:
    """The demo redoes a work folder whose run differs from it, as any changed config does; a run on another
    URL list there is a user's own work (`workdir` left at its default, runs/demo): refused, never replaced."""
    download = Store(cfg.stage_dir("download"))
    ours = (cfg.data.extra_cols, DEMO["data"]["extra_cols"])  # the demo's columns, wherever its folder lies
    for name in (DONE, RUN):
        try:
            fields = download.read_json(name).get("fields", {}) if download.exists(name) else None
        except StoreError:  # a damaged marker: the stage checks its shards again
            continue
        if fields is not None and fields.get("data.extra_cols") not in ours:
            raise StageError(f"{cfg.workdir} holds a run on another URL list ({fields.get('data.urls')}): the demo "
                             "would replace it; give the demo a folder of its own (--workdir) or remove that run")


def run_demo(args) -> dict:
    stages = checked_stages(args.stages or list(STAGES))  # before the demo data is built
    workdir = args.workdir or ("runs/demo-small" if args.small else "runs/demo")
    cfg = demo_config(workdir, args.small, list(args.overrides), args.config)
    if args.ray_address:
        cfg.ray_address = args.ray_address
    use_storage_options(cfg.storage_options)
    check_demo_folder(cfg)
    with work_lock(cfg.workdir):
        out = _demo_stages(args, cfg, stages)
    made = [f"{what} in {join(cfg.stage_dir(stage), name)}" for what, stage, name in
            (("results", "eval", "results.md"), ("card", "card", "card.html"), ("student", "export", "student"))
            if stage in stages]  # only what this run made (`--stages download` makes none of them)
    print(f"[demo] done: {', '.join(made) or ' '.join(stages) + ' in ' + cfg.workdir}")
    return out
