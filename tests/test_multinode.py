"""Two Ray nodes on 127.0.0.1 that share no disk: each has its own scratch folder (its cache), and the work
folder and the teacher's weights live only on the S3 server (moto, on loopback). `cidistill demo --small` with
its work folder on the store runs every stage across both nodes, writing nothing of the run to local disk:
download → embed → balance → cluster equal the single-node run's outputs (small_run); its 2-worker training (one
worker per node) loses node B to SIGKILL after a checkpoint, and the rerun, with node B back, resumes from the
checkpoint on the store and finishes eval, export and card there; the evaluation on the store equals the same
evaluation of a local copy.

The cluster runs in a child process: it needs its own Ray, not the test session's."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml

from cidistill.core.config import STAGES
from cidistill.core.runtime import cache_dir
from cidistill.core.store import Store

JOB = r'''
import json, os, sys, threading, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray then resolves 127.0.0.1 to itself, not the host IP
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
cfg_path, out, scratch, work = sys.argv[1:5]

def node_env(name):
    os.makedirs(f"{scratch}/{name}/cache", exist_ok=True)
    return {"CIDISTILL_CACHE": f"{scratch}/{name}/cache"}

os.environ.update(node_env("a"))  # the driver lives on node A
import fsspec
from ray.cluster_utils import Cluster
from cidistill.app.cli import main

common = dict(num_cpus=2, node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=200 << 20)
fast_death = {"health_check_period_ms": 500, "health_check_failure_threshold": 2}  # notice node B's loss in ~1 s
cluster = Cluster(initialize_head=True, head_node_args=dict(common, resources={"node_a": 1}, env_vars=node_env("a"),
                                                            _system_config=fast_death))
add_b = lambda: cluster.add_node(**dict(common, resources={"node_b": 1}, env_vars=node_env("b")))
node_b = add_b()
cluster.wait_for_nodes()
address = ["--ray-address", "127.0.0.1:" + cluster.address.rsplit(":", 1)[-1]]
demo = ["demo", "--small", "-c", cfg_path, "--workdir", work] + address

# once a training checkpoint is on the store, node B (one of the two workers) is SIGKILLed
fs = fsspec.filesystem("s3")
ckpt = work.removeprefix("s3://") + "/train/step-0000002/meta.json"
seen = {}
def kill_b():
    while not fs.exists(ckpt):
        fs.invalidate_cache()
        time.sleep(0.2)
    import ray
    seen["nodes"] = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    cluster.remove_node(node_b, allow_graceful=False)
threading.Thread(target=kill_b, daemon=True).start()
rc_killed = main(demo)
node_b = add_b()
cluster.wait_for_nodes()
rc_resumed = main(demo)
open(f"{out}/cluster.json", "w").write(json.dumps({"rc": [rc_killed, rc_resumed], "nodes": seen.get("nodes", [])}))
import ray
ray.shutdown()
cluster.shutdown()
'''


def _by_key(store: Store, cols: list[str]) -> dict:
    return {r["key"]: r for n in store.glob("0*.parquet") for r in store.read_table(n, columns=cols).to_pylist()}


def _scores(results: dict) -> dict:
    """What the evaluation measured of the student, without timings."""
    s = results["student"]
    return {k: v for k, v in s.items() if k.startswith(("zeroshot_", "probe_", "retrieval_")) and "seconds" not in k}


@pytest.mark.timeout(900)
def test_the_small_demo_on_two_nodes_without_shared_disk_matches_one_node_and_resumes_training(
        tmp_path, s3, small_run, small_data):
    fs = fsspec.filesystem("s3")
    fs.mkdir("cluster-bucket")
    teacher = small_run.teacher.pretrained.removeprefix("local-dir:")
    fs.put(teacher, "cluster-bucket/teacher", recursive=True)  # no node reads the test's own cache
    work = "s3://cluster-bucket/w"
    over = {"teacher": {"pretrained": "local-dir:s3://cluster-bucket/teacher", "num_actors": 2, "cpus_per_actor": 1.0},
            "train": {"workers": 2, "cpus_per_worker": 2.0, "threads": 1, "streams": 2, "loader_workers": 1,
                      "ckpt_every": 2, "log_every": 1,
                      "phases": [{"steps": 2, "losses": {"feature_distill": 1.0}},
                                 {"steps": 3, "losses": {"cluster": 0.5, "instance": 1.0, "align": 0.5}}]}}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(over, allow_unicode=True))
    (tmp_path / "job.py").write_text(JOB)
    scratch = tmp_path / "nodes"
    # the demo's npm packages, fetched by the session (small_data), not fetched again into node A's cache (its
    # image links are its own: links made there point into the scratch folder, gone after the test)
    (scratch / "a" / "cache" / "demo").mkdir(parents=True)
    (scratch / "a" / "cache" / "demo" / "packages").symlink_to(cache_dir() / "demo" / "packages")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tmp_before = set(os.listdir(tempfile.gettempdir()))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    job = subprocess.run([sys.executable, str(tmp_path / "job.py"), str(cfg), str(tmp_path), str(scratch), work],
                         cwd=cwd, env=env, timeout=840, capture_output=True, text=True)
    (tmp_path / "job.log").write_text(job.stdout + job.stderr)
    assert job.returncode == 0, job.stderr[-4000:]
    # joining a cluster printed Ray's INFO lines ("Connecting to existing Ray cluster at address: …") each time
    assert "Connecting to existing Ray cluster" not in job.stdout + job.stderr
    res = json.loads((tmp_path / "cluster.json").read_text())
    rc_killed, rc_resumed = res["rc"]
    assert len(res["nodes"]) == 2
    assert rc_killed != 0 and rc_resumed == 0  # losing a node fails the run; the rerun finishes it

    # every stage finished on the store; nothing of the run on local disk: not in the working directory, not
    # left in the temp folder (Ray's session folders aside)
    bucket = work.removeprefix("s3://")
    for stage in STAGES:
        assert fs.exists(f"{bucket}/{stage}/_DONE"), stage
    for obj in ("export/student/open_clip_config.json", "export/student/open_clip_model.safetensors",
                "card/card.html", "train/model.safetensors", "train/student_arch", "eval/results.json"):
        assert fs.exists(f"{bucket}/{obj}"), obj
    assert "data:image/png;base64," in fs.cat(f"{bucket}/card/card.html").decode()  # self-contained
    assert list(cwd.iterdir()) == []
    # multiprocessing's folders (`pymp-…`) of the loader processes on node B, SIGKILLed with it, stay behind
    left = {n for n in set(os.listdir(tempfile.gettempdir())) - tmp_before if not n.startswith(("ray", "pymp-"))}
    # wandb (which img2dataset imports) makes two empty temp folders at import, removed at exit: nothing else
    for n in left:
        assert "wandb" in n and not os.listdir(os.path.join(tempfile.gettempdir(), n)), n
    assert not any(fs.glob(f"{bucket}/**/*.tmp-*")) and not fs.exists(f"{bucket}/_LOCK.json")

    # each node fetched the teacher into its own scratch folder
    for node in ("a", "b"):
        assert any((scratch / node / "cache" / "store").glob("*/teacher/open_clip_config.json")), node
    ref = {s: Store(small_run.stage_dir(s)) for s in ("download", "embed", "balance", "cluster")}
    w = {s: Store(f"{work}/{s}") for s in ("download", "embed", "balance", "cluster", "train", "eval")}
    cols = ["key", "status", "caption", "sha256"]
    assert _by_key(w["download"], cols) == _by_key(ref["download"], cols)
    got, want = _by_key(w["embed"], ["key", "image_emb", "text_emb"]), _by_key(ref["embed"], ["key", "image_emb", "text_emb"])
    assert got.keys() == want.keys()
    for col in ("image_emb", "text_emb"):
        a = np.array([got[k][col] for k in sorted(got)], np.float32)
        b = np.array([want[k][col] for k in sorted(want)], np.float32)
        assert np.abs(a - b).max() < 2e-3, col
    cols = ["key", "kept", "drop_reason", "dup_of", "balance_cluster"]
    assert _by_key(w["balance"], cols) == _by_key(ref["balance"], cols)
    assert _by_key(w["cluster"], ["key", "cluster_id"]) == _by_key(ref["cluster"], ["key", "cluster_id"])

    train = w["train"].read_json("stats.json")
    assert train["steps"] == 5 and train["workers"] == 2
    assert 2 <= train["resumed_from"] < 5  # from a checkpoint written before node B died
    assert len(set(train["worker_nodes"])) == 2  # one worker per node
    log = [json.loads(ln) for ln in w["train"].read_bytes("log.jsonl").decode().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 6))  # every step once: the killed run's extra lines dropped

    # the evaluation read from the store equals the same evaluation of a local copy of its inputs
    from cidistill.app.demo import demo_config
    from kd.stages import EvalStage

    local = tmp_path / "copy"
    for stage in ("pack", "train"):
        fs.get(f"{bucket}/{stage}", str(local / stage), recursive=True)
    lcfg = demo_config(work, small=True, config_file=str(cfg))
    lcfg.dirs = {"pack": str(local / "pack"), "train": str(local / "train"), "eval": str(local / "eval")}
    EvalStage(lcfg, use_ray=False).run()
    got, want = _scores(w["eval"].read_json("results.json")), _scores(json.loads((local / "eval" / "results.json").read_text()))
    assert got == want and "zeroshot_en_top1" in got and "probe_top1" in got
