"""The streaming trainer and evaluation on the packed dataset, from a finished demo work folder:

(a) training samples/s streaming from the packed shards (loader processes decoding, augmenting, tokenising)
    divided by the same student's samples/s on batches already in memory (the anchor): same process, same
    batch, same threads, the two modes interleaved in short blocks (the loaders paused during the in-memory
    ones), five untimed steps first: a long run pays the loaders' start once. Goal >= 0.95: loading is hidden.
(b) peak RSS of the whole process tree (the `cidistill run` process and every child: loader processes) of the
    train stage on a pack of N pairs and on one of 4N (the demo's shards replicated under new keys).
(c) the same for the eval stage (student and teacher on the replicated eval split, probes on the replicated
    train split; the teacher's evaluation is cached in a folder of the bench's own, so each size computes it).

    python bench/bench_train_stream.py --workdir runs/demo --copies 2     # N = 2 x the demo's kept pairs
"""
import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cidistill.core.runtime import quiet_logs, set_env_defaults  # noqa: E402

set_env_defaults()  # as the CLI does, before torch loads (OpenMP's spin count: cidistill/core/runtime.py)

from cidistill.core.config import Config, load_config, to_dict  # noqa: E402
from cidistill.core.packed import SPLITS, iter_tar_samples, shard_file, split_shards, tar_bytes  # noqa: E402
from cidistill.core.store import Store  # noqa: E402


def replicate(src: str, dst: Path, copies: int) -> int:
    """`copies` x every shard of src, keys prefixed with the copy number; returns the training pairs."""
    s, out = Store(src), Store(str(dst))
    for split in SPLITS:
        j = 0
        for c in range(copies):
            for name, _ in split_shards(s, split):
                samples = [dict(x, __key__=f"c{c}x{x['__key__']}") for x in iter_tar_samples(s, name)]
                out.write_bytes(f"{split}/{shard_file(j)}.tar", tar_bytes(samples))
                out.write_json(f"{split}/{shard_file(j)}_stats.json",
                               dict(s.read_json(name.removesuffix(".tar") + "_stats.json"), samples=len(samples)))
                j += 1
        import pyarrow as pa
        import pyarrow.parquet as pq

        m = pq.read_table(Path(src) / split / "manifest.parquet")
        parts = [m.set_column(m.column_names.index("key"), "key",
                              pa.array([f"c{c}x{k}" for k in m.column("key").to_pylist()])) for c in range(copies)]
        pq.write_table(pa.concat_tables(parts), dst / split / "manifest.parquet")
    # the source's done-marker: the same pack config and inputs, so the train and eval stages take the copy
    # as their finished, up-to-date pack (the stage driver refuses a marker of another fingerprint)
    out.write_json("_DONE", s.read_json("_DONE"))
    return sum(n for _, n in split_shards(out, "train"))


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def peak_rss_of(cmd: list[str], env: dict) -> tuple[int, float, str]:
    """Run cmd; (peak RSS of its process tree in bytes, seconds, output tail), sampled every 0.1 s."""
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    proc, peak, out = psutil.Process(p.pid), 0, []
    reader = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    reader.start()
    while p.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.1)
    reader.join()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(out)[-3000:]}")
    return peak, time.time() - t0, "".join(out)[-400:]


def stage_config(cfg: Config, tmp: Path, tag: str, pack: Path, stage: str, steps: int) -> Path:
    d = to_dict(cfg)
    d["dirs"] = {"pack": str(pack), "cluster": cfg.stage_dir("cluster"),  # eval: the student trained on N
                 "train": str(tmp / f"train-{tag if stage == 'train' else 'N'}"), "eval": str(tmp / f"eval-{tag}")}
    d["stages"] = [stage]
    d["train"]["phases"] = [{"steps": steps, "losses": p.losses} for p in cfg.train.phases[-1:]]
    d["train"]["ckpt_every"] = steps
    d["eval"]["probe_max_iter"] = 50
    path = tmp / f"{tag}-{stage}.yaml"
    path.write_text(yaml.safe_dump(d, allow_unicode=True))
    return path


def loading_hidden(cfg: Config, pack: Path, steps: int, block: int = 5, warmup: int = 5) -> dict:
    """(a): one student trained on streamed batches and on batches held in memory, the two modes interleaved
    in blocks of `block` steps (ABBA order) for `steps` timed steps each, so that this box's drift in speed
    (+-15 % within a minute) falls on both alike. The in-memory blocks re-use `block` batches taken from the
    stream, and the loader processes are paused (SIGSTOP) meanwhile: they neither prefetch ahead of the
    streamed blocks nor take CPU from the in-memory ones. Returns samples/s per mode and the per-pair ratios."""
    import signal

    import torch

    from kd import train as T
    from kd.stream import worker_batches

    cfg = dataclasses.replace(cfg, dirs=dict(cfg.dirs, pack=str(pack)))
    job = {"config": to_dict(cfg), "out": tempfile.mkdtemp(), "data": str(pack)}
    phase, lr = cfg.train.phases[-1], cfg.train.lr
    torch.manual_seed(0)
    w = T.setup(job)
    stream = worker_batches(w.spec, w.make, 0, 1, 0, cfg.train.loader_workers)
    for step in range(warmup):  # the loaders' start and first prefetch
        T.train_step(w, step, phase, lr, next(stream))
    held = [next(stream) for _ in range(block)]  # trained on again and again: the same cost each time
    loaders = psutil.Process().children()
    seconds = {"memory": [], "stream": []}
    try:
        for pair in range(-(-steps // block)):
            for mode in ("memory", "stream") if pair % 2 == 0 else ("stream", "memory"):
                for p in loaders:
                    p.send_signal(signal.SIGSTOP if mode == "memory" else signal.SIGCONT)
                t = time.perf_counter()
                for batch in held if mode == "memory" else (next(stream) for _ in range(block)):
                    T.train_step(w, batch["step"], phase, lr, batch)
                seconds[mode].append(time.perf_counter() - t)
    finally:
        for p in loaders:
            p.send_signal(signal.SIGCONT)
    stream.close()
    per = block * cfg.train.batch_size
    ratios = sorted(m / s for m, s in zip(seconds["memory"], seconds["stream"]))
    return {m: per * len(v) / sum(v) for m, v in seconds.items()} | \
        {"pairs": len(ratios), "pair_ratio_quartiles": [round(ratios[int(q * (len(ratios) - 1))], 3) for q in (0.25, 0.5, 0.75)]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo", help="a finished demo run (its pack, cluster and teacher)")
    ap.add_argument("--copies", type=int, default=2, help="N = copies x the demo's packed pairs")
    ap.add_argument("--steps", type=int, default=20, help="(b), (c): training steps; (a): timed steps per mode x 3")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_stream.txt"))
    ap.add_argument("--parts", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    ap.add_argument("--small", action="store_true", help="the work folder is a `cidistill demo --small` run "
                    "(without it: when its name says so)")
    a = ap.parse_args(argv)
    quiet_logs()
    done = Store(str(Path(a.workdir) / "embed")).read_json("_DONE")
    cfg = load_config(str(Path(a.workdir) / "_bench_cfg.yaml")) if (Path(a.workdir) / "_bench_cfg.yaml").exists() \
        else _demo_cfg(a.workdir, done["fields"]["teacher.pretrained"], a.small or "small" in Path(a.workdir).name)
    tmp = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    env = dict(os.environ, CIDISTILL_CACHE=str(tmp / "cache"))  # no cached teacher evaluation of a bench pack kept
    lines = [f"bench_train_stream: {a.workdir}, batch {cfg.train.batch_size}, threads {cfg.train.threads or 'all'}, "
             f"loader processes {cfg.train.loader_workers}, streams {cfg.train.streams}, {psutil.cpu_count()} CPUs"]
    try:
        n1 = replicate(cfg.stage_dir("pack"), tmp / "pack-N", a.copies)
        n4 = replicate(cfg.stage_dir("pack"), tmp / "pack-4N", 4 * a.copies)
        lines.append(f"packs: N = {n1} training pairs, 4N = {n4}")
        rates = loading_hidden(cfg, tmp / "pack-N", 3 * a.steps) if "a" in a.parts else None
        lines += [] if rates is None else [f"(a) samples/s: streamed {rates['stream']:.1f}, in memory {rates['memory']:.1f} -> "
                     f"ratio {rates['stream'] / rates['memory']:.3f} (goal >= 0.95); {rates['pairs']} pairs of 5-step blocks, "
                     f"ratio quartiles {rates['pair_ratio_quartiles']}"]
        if "c" in a.parts and "b" not in a.parts:  # (c) evaluates the student that (b) trains on N
            subprocess.run([sys.executable, "-m", "cidistill", "run", str(stage_config(cfg, tmp, "N", tmp / "pack-N",
                            "train", a.steps)), "--no-ray"], cwd=ROOT, check=True, capture_output=True, env=env)
        for stage in [s for s, part in (("train", "b"), ("eval", "c")) if part in a.parts]:
            rss = {}
            for tag, pack in (("N", tmp / "pack-N"), ("4N", tmp / "pack-4N")):
                path = stage_config(cfg, tmp, tag, pack, stage, a.steps)
                peak, secs, _ = peak_rss_of([sys.executable, "-m", "cidistill", "run", str(path), "--no-ray"], env)
                rss[tag] = peak
                lines.append(f"    {stage} on {tag}: peak RSS (process tree) {peak / 2**20:,.0f} MiB, {secs:.0f} s")
            lines.append(f"({'b' if stage == 'train' else 'c'}) {stage} RSS(4N) / RSS(N) = {rss['4N'] / rss['N']:.3f} "
                         f"(goal <= 1.2)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    Path(a.out).write_text(text)


def _demo_cfg(workdir: str, teacher: str, small: bool) -> Config:
    from cidistill.app.demo import demo_config

    cfg = demo_config(workdir, small=small)
    cfg.teacher.pretrained = teacher
    return cfg


if __name__ == "__main__":
    main()
