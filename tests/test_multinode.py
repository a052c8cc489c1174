"""Two Ray nodes on 127.0.0.1 (ray.cluster_utils.Cluster, each with its own resources) run download → embed →
balance → cluster → a short 2-worker train; the data outputs equal the single-node run's (small_run).

The cluster runs in a child process: it needs its own Ray, not the test session's."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cidistill.core.config import to_dict

JOB = r'''
import json, os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray then resolves 127.0.0.1 to itself, not the host IP
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from pathlib import Path
from ray.cluster_utils import Cluster
from cidistill.app.demo_data import LoopbackServer, build_demo_data, write_urls
from cidistill.app.cli import main

cfg_path, out = sys.argv[1], Path(sys.argv[2])
common = dict(num_cpus=2, node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=200 << 20)
cluster = Cluster(initialize_head=True, head_node_args=dict(common, resources={"node_a": 1}))
cluster.add_node(**dict(common, resources={"node_b": 1}))
cluster.wait_for_nodes()
data = build_demo_data(small=True)
with LoopbackServer(data.root) as srv:
    import yaml
    cfg = yaml.safe_load(open(cfg_path))
    write_urls(data, srv.base_url, Path(cfg["data"]["urls"]))
    rc = main(["run", cfg_path, "--ray-address", "127.0.0.1:" + cluster.address.rsplit(":", 1)[-1]])
import ray
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
(out / "cluster.json").write_text(json.dumps({"rc": rc, "nodes": nodes}))
ray.shutdown()
cluster.shutdown()
'''


def _by_key(path: Path, cols: list[str]) -> dict:
    rows = [r for p in sorted(path.glob("0*.parquet")) for r in pq.read_table(p, columns=cols).to_pylist()]
    return {r["key"]: r for r in rows}


@pytest.mark.timeout(600)
def test_two_node_cluster_matches_single_node(tmp_path, small_run):
    d = to_dict(small_run)
    d.update(workdir=str(tmp_path / "w"), stages=["download", "embed", "balance", "cluster", "pack", "train"], dirs={})
    d["data"]["urls"] = str(tmp_path / "w" / "urls.parquet")
    d["teacher"].update(num_actors=2, cpus_per_actor=1.0)
    d["train"].update(workers=2, cpus_per_worker=2.0, threads=1, batch_size=32, streams=2, loader_workers=1,
                      phases=[{"steps": 2, "losses": {"feature_distill": 1.0}},
                              {"steps": 2, "losses": {"cluster": 0.5, "instance": 1.0, "align": 0.5}}])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(d, allow_unicode=True))
    (tmp_path / "job.py").write_text(JOB)
    subprocess.run([sys.executable, str(tmp_path / "job.py"), str(cfg), str(tmp_path)], check=True,
                   cwd=Path(__file__).parents[1], timeout=540)
    res = json.loads((tmp_path / "cluster.json").read_text())
    assert res["rc"] == 0 and len(res["nodes"]) == 2

    w, ref = tmp_path / "w", {s: Path(small_run.stage_dir(s)) for s in ("download", "embed", "balance", "cluster")}
    cols = ["key", "status", "caption", "sha256"]
    assert _by_key(w / "download", cols) == _by_key(ref["download"], cols)
    got, want = _by_key(w / "embed", ["key", "image_emb", "text_emb"]), _by_key(ref["embed"], ["key", "image_emb", "text_emb"])
    assert got.keys() == want.keys()
    for col in ("image_emb", "text_emb"):
        a = np.array([got[k][col] for k in sorted(got)], np.float32)
        b = np.array([want[k][col] for k in sorted(want)], np.float32)
        assert np.abs(a - b).max() < 2e-3, col
    cols = ["key", "kept", "drop_reason", "dup_of"]
    assert _by_key(w / "balance", cols) == _by_key(ref["balance"], cols)
    assert _by_key(w / "cluster", ["key", "cluster_id"]) == _by_key(ref["cluster"], ["key", "cluster_id"])

    train = json.loads((w / "train" / "stats.json").read_text())
    assert train["steps"] == 4 and train["workers"] == 2
    assert sorted(set(train["worker_nodes"])) == sorted(res["nodes"])  # one Ray Train worker on each node
