"""SIGKILL every stage at seeded random kill points (pipeline/faults.py), rerun, and compare every output
with an uninterrupted run: same tables, same images, same weights, same counts, no temp files left."""
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cidistill.core.config import to_dict
from cidistill.app.demo import demo_config
from cidistill.app.demo_data import write_urls
from forkrun import ForkRunner

KILLED = ("download", "embed", "balance", "cluster", "pack", "train", "export")
VOLATILE = {"seconds", "attempts", "started", "finished", "time", "shards_resumed", "temp_files_removed", "duration",
            "start_time", "end_time", "samples_per_s", "wait_seconds", "step_seconds", "eval_seconds", "image_throughput", "throughput_ratio",
            "resumed_from"}


def _cfg_file(tmp_path, workdir, urls, teacher) -> Path:
    cfg = demo_config(str(workdir), small=True)
    cfg.data.urls = str(urls)
    cfg.teacher.pretrained = teacher
    cfg.stages = list(KILLED) + ["eval"]
    # the embed stage on one thread, training on the process's own: a rerun that starts at train must train as
    # the uninterrupted run did after its in-process embed (whose thread count once stayed set for the training)
    cfg.teacher.threads = 1
    cfg.train.ckpt_every = 2
    cfg.train.log_every = 1
    cfg.train.phases[0].steps, cfg.train.phases[1].steps = 3, 4
    cfg.eval.tasks = ["zeroshot", "retrieval"]
    p = tmp_path / f"{workdir.name}.yaml"
    p.write_text(yaml.safe_dump(to_dict(cfg), allow_unicode=True))
    return p


def _run(runner: ForkRunner, cfg: Path, kill_at: str = "", log: Path | None = None) -> subprocess.CompletedProcess:
    """`cidistill run CFG --no-ray` in a fresh child (forked: the nine runs share their imports)."""
    env = dict(os.environ, CIDISTILL_KILL_AT=kill_at)
    if log:
        env["CIDISTILL_FAULT_LOG"] = str(log)
    return runner.run(["run", str(cfg), "--no-ray"], env)


def _strip(o, root: str):
    """Drop timings, name the work folder WORKDIR, and order rows by key (download threads finish in any order)."""
    if isinstance(o, dict):
        return {k: _strip(v, root) for k, v in o.items() if k not in VOLATILE}
    if isinstance(o, list):
        o = [_strip(v, root) for v in o]
        return sorted(o, key=lambda r: str(r["key"])) if o and all(isinstance(r, dict) and "key" in r for r in o) else o
    if isinstance(o, str):
        return o.replace(root, "WORKDIR")
    return o


def _content(path: Path, root: str):
    """What a file holds, minus run-specific timings and paths."""
    if path.suffix == ".parquet":
        return _strip(pq.read_table(path).to_pylist(), root)
    if path.suffix == ".tar":
        with tarfile.open(path) as t:
            return sorted((m.name, t.extractfile(m).read()) for m in t if m.isfile())
    if path.suffix == ".json" or path.name == "_DONE":
        return _strip(json.loads(path.read_text()), root)
    if path.suffix == ".jsonl":
        return [_strip(json.loads(ln), root) for ln in path.read_text().splitlines()]
    if path.name == "state.pt":
        return None  # optimizer state: its weights' effect is compared through model.safetensors
    if path.name == "results.md":
        return None  # a rendering of results.json (compared above, minus timings) with measured img/s cells
    if path.name == "README.md":
        return None  # model card names its own folder
    return path.read_bytes()


def _outputs(workdir: Path) -> dict:
    return {str(p.relative_to(workdir)): _content(p, str(workdir)) for p in sorted(workdir.rglob("*"))
            if p.is_file() and p.parts[-2] != "_ray"}


@pytest.mark.timeout(900)
def test_sigkill_each_stage_then_resume_equals_uninterrupted(tmp_path, small_run, small_data, server):
    urls = tmp_path / "urls.parquet"
    write_urls(small_data, server.base_url, urls)
    ref_cfg = _cfg_file(tmp_path, tmp_path / "ref", urls, small_run.teacher.pretrained)
    (tmp_path / "logs").mkdir()
    with ForkRunner(Path(__file__).parents[1], tmp_path / "logs") as runner:
        _kill_each_stage(runner, tmp_path, urls, ref_cfg, small_run.teacher.pretrained)
    ref, got = _outputs(tmp_path / "ref"), _outputs(tmp_path / "killed")
    assert not [n for n in got if ".tmp" in n], "temp files left behind"
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name] == ref[name], name


def _kill_each_stage(runner, tmp_path, urls, ref_cfg, teacher) -> None:
    r = _run(runner, ref_cfg, log=tmp_path / "points.json")
    assert r.returncode == 0, r.stderr[-3000:]
    points = json.loads((tmp_path / "points.json").read_text())

    cfg = _cfg_file(tmp_path, tmp_path / "killed", urls, teacher)
    rng = random.Random(0)
    for stage in KILLED:  # each attempt resumes the earlier stages' leftovers, then dies inside `stage`
        n = rng.randint(1, points[stage])
        r = _run(runner, cfg, kill_at=f"{stage}:{n}")
        assert r.returncode == -9, f"not killed at {stage}:{n}: {r.stderr[-3000:]}"
    r = _run(runner, cfg)
    assert r.returncode == 0, r.stderr[-3000:]
