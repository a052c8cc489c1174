"""The out-of-core balance stage (scan, exact, sample, assign, rules, write as separate tasks over parts on
the store) against the in-memory reference rule, on planted embed-stage shards; its kills and resumes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cidistill.core.config import load_config
from cidistill.core.schema import embed_schema, holdout_mask
from pipeline.balance import BalanceStage
from pipeline.balance_rules import balance_decisions
from pipeline.cluster import l2n

D = 32


def planted_embed(folder: Path, shards: int = 4, per: int = 150, seed: int = 0) -> dict:
    """Embed shards of groups of near copies (cosine ~0.9998, spread over shards), exact pixel copies, a few
    rows without a caption and one NaN embedding; returns the arrays in dataset order and each row's group."""
    rng = np.random.default_rng(seed)
    n = shards * per
    n_groups = n // 6
    centres = l2n(rng.normal(size=(n_groups, D)) + np.repeat(rng.normal(size=(6, D)) * 1.5, -(-n_groups // 6), 0)[:n_groups])
    group = rng.integers(0, n_groups, n)
    group[rng.random(n) < 0.3] = -1                                   # singles
    x = np.where(group[:, None] >= 0, centres[np.maximum(group, 0)], l2n(rng.normal(size=(n, D))))
    x = l2n(x + 0.01 * rng.normal(size=(n, D)) / np.sqrt(D))
    hashes = np.array([f"h{i}" for i in range(n)], dtype=object)
    copies = rng.choice(n, 20, replace=False)
    hashes[copies[10:]] = hashes[copies[:10]]                         # ten exact pixel copies
    x[copies[10:]] = x[copies[:10]]
    text = l2n(rng.normal(size=(n, D)))
    no_caption = np.zeros(n, bool)
    no_caption[rng.choice(n, 5, replace=False)] = True
    x[7] = np.nan
    keys = np.array([f"{i // per:05d}{i % per:04d}" for i in range(n)], dtype=object)
    folder.mkdir(parents=True)

    def col(a):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.astype(np.float16).reshape(-1), pa.float16()), D)

    for s in range(shards):
        r = slice(s * per, (s + 1) * per)
        t = pa.table({"key": keys[r].tolist(), "image_emb": col(x[r]),
                      "text_emb": pa.array([None if nc else v for nc, v in zip(no_caption[r], text[r].astype(np.float16).tolist())],
                                           embed_schema(D).field("text_emb").type),
                      "text_emb_zh": pa.nulls(per, embed_schema(D).field("text_emb_zh").type),
                      "image_hash": hashes[r].tolist()}, schema=embed_schema(D))
        pq.write_table(t, folder / f"{s:05d}.parquet")
    (folder / "_DONE").write_text(json.dumps({"fingerprint": "planted"}))
    # what the stage sees: float16 embeddings
    x16 = x.astype(np.float16).astype(np.float32)
    return {"keys": keys, "x": x16, "hashes": hashes, "no_caption": no_caption,
            "text": text.astype(np.float16).astype(np.float32), "group": group,
            "copies": copies.reshape(2, 10)}


def _cfg(tmp_path: Path, out: str, *extra: str):
    return load_config(None, [f"workdir={tmp_path}", f"dirs.embed={tmp_path / 'embed'}", f"dirs.balance={tmp_path / out}",
                              "balance.kmeans_k=6", "balance.max_cluster_size=40", "balance.rows_per_task=120",
                              "balance.semantic_eps=[0.02,0.05]", *extra])


def _table(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("0*.parquet"))]).sort_by("key")


def test_out_of_core_stage_equals_in_memory_rule_and_splits_big_clusters(tmp_path):
    """Several hash ranges and cluster groups, clusters above max_cluster_size split: the stage's decisions
    (kept, drop_reason, dup_of, balance_cluster) equal the in-memory reference row for row; no final cluster
    exceeds the cap; planted groups of near copies keep one each."""
    p = planted_embed(tmp_path / "embed")
    cfg = _cfg(tmp_path, "balance")
    st = BalanceStage(cfg, use_ray=False).run()
    got = _table(tmp_path / "balance")
    held = holdout_mask(cfg, pa.table({"key": p["keys"].tolist()})).to_numpy(zero_copy_only=False)
    assert 0 < held.sum() < len(held)  # the default held-out fraction: those rows take part in no rule
    ref, extra = balance_decisions(p["keys"], p["x"], p["hashes"], cfg.balance, held_out=held, no_caption=p["no_caption"])
    ref = ref.sort_by("key")
    for col in ("key", "kept", "drop_reason", "dup_of", "balance_cluster"):
        assert got.column(col).to_pylist() == ref.column(col).to_pylist(), col
    assert st["removed_by_rule"] == extra["stats"]["removed_by_rule"]
    assert st["eps_sweep"] == extra["stats"]["eps_sweep"]
    usable = ~np.isnan(p["x"]).any(1) & ~p["no_caption"] & ~held
    assert st["removed_by_rule"]["exact_dup"] == int((usable[p["copies"][0]] & usable[p["copies"][1]]).sum()) > 0
    assert st["removed_by_rule"]["bad_embedding"] == 1 - held[7] and st["removed_by_rule"]["no_caption"] > 0
    sizes = json.loads((tmp_path / "balance" / "cluster_sizes.json").read_text())
    assert sizes == {"sizes_before": extra["sizes_before"], "sizes_after": extra["sizes_after"]}
    assert st["clusters"] > 6 and max(sizes["sizes_before"]) <= 40           # split, and under the cap
    cl = np.array(got.column("balance_cluster").to_pylist())
    assert np.bincount(cl[cl >= 0]).max() <= 40
    kept = np.array(got.column("kept").to_pylist())
    one = [kept[(p["group"] == g) & usable].sum() == 1 for g in np.unique(p["group"][p["group"] >= 0])
           if ((p["group"] == g) & usable).any()]
    assert np.mean(one) >= 0.9  # a sub-k-means boundary can cut a planted group in two (at this tiny cap)
    assert not (tmp_path / "balance" / "_work").exists()


def _run_stage(tmp_path: Path, out: str, kill_at: str = "", log: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, CIDISTILL_KILL_AT=kill_at)
    if log:
        env["CIDISTILL_FAULT_LOG"] = str(log)
    code = ("import sys; from cidistill.core import faults; from cidistill.core.config import load_config; "
            "from pipeline.balance import BalanceStage; faults.set_stage('balance'); "
            "BalanceStage(load_config(None, sys.argv[1:]), use_ray=False).run()")
    args = [f"workdir={tmp_path}", f"dirs.embed={tmp_path / 'embed'}", f"dirs.balance={tmp_path / out}",
            "balance.kmeans_k=6", "balance.max_cluster_size=40", "balance.rows_per_task=120"]
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True)


def _files(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.suffix == ".parquet":
            out[f.name] = pq.read_table(f).to_pylist()
        elif f.suffix == ".json" or f.name == "_DONE":
            out[f.name] = {k: v for k, v in json.loads(f.read_text()).items()
                           if k not in ("seconds", "finished", "shards_resumed", "temp_files_removed", "step_seconds")}
            out[f.name].get("kmeans", {}).pop("seconds", None)
    return out


def test_sigkill_in_scatter_rules_and_gather_resumes_to_identical_outputs(tmp_path):
    """SIGKILL halfway through the scan scatter, the cluster scatter, the per-cluster rules and the gather
    (each run resuming the last one's leftovers); the final rerun's files equal an uninterrupted run's."""
    planted_embed(tmp_path / "embed")
    r = _run_stage(tmp_path, "ref", log=tmp_path / "points.json")
    assert r.returncode == 0, r.stderr[-2000:]
    points = json.loads((tmp_path / "points.json").read_text())
    for phase in ("scan", "assign", "rules", "write"):
        n = max(1, points[f"balance/{phase}"] // 2)
        r = _run_stage(tmp_path, "killed", kill_at=f"balance/{phase}:{n}")
        assert r.returncode == -9, f"not killed in {phase}: {r.stderr[-2000:]}"
        assert (tmp_path / "killed" / "_work").exists()
    r = _run_stage(tmp_path, "killed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    ref, got = _files(tmp_path / "ref"), _files(tmp_path / "killed")
    assert sorted(got) == sorted(ref) and not [f for f in (tmp_path / "killed").rglob("*.tmp-*")]
    for name in ref:
        assert got[name] == ref[name], name


def test_cluster_fits_on_a_seeded_sample_and_assigns_every_kept_pair(tmp_path):
    """The pseudo-label k-means trains on k x max_points_per_centroid sampled rows (reported, with the
    objective on a held-aside sample) and assigns every kept pair; with the sample as large as the data it
    is the k-means of all kept rows in shard order (what the stage did in one process)."""
    from pipeline.cluster import ClusterStage, kept_embeddings, spherical_kmeans

    planted_embed(tmp_path / "embed")
    BalanceStage(_cfg(tmp_path, "balance"), use_ray=False).run()
    kept = _table(tmp_path / "balance").filter(pc.field("kept"))
    cfg = _cfg(tmp_path, "balance", f"dirs.cluster={tmp_path / 'c1'}", "cluster.k=5", "cluster.max_points_per_centroid=20")
    st = ClusterStage(cfg, use_ray=False).run()
    km = st["kmeans"]
    assert km["sample_of"] == kept.num_rows and 60 <= km["sample"] <= 150 and km["aside"] > 0
    assert 0 < km["aside_mean_cos"] <= 1
    got = _table(tmp_path / "c1")
    assert got.column("key").to_pylist() == kept.column("key").to_pylist()
    assert set(got.column("cluster_id").to_pylist()) <= set(range(5)) and not (tmp_path / "c1" / "_work").exists()

    cfg = _cfg(tmp_path, "balance", f"dirs.cluster={tmp_path / 'c2'}", "cluster.k=5")
    st = ClusterStage(cfg, use_ray=False).run()
    assert st["kmeans"]["sample"] == kept.num_rows and "aside" not in st["kmeans"]
    x = np.concatenate([kept_embeddings(cfg, f"{s:05d}", False)[1] for s in range(4)])
    cents, _ = spherical_kmeans(x, 5, seed=cfg.cluster.seed)
    assert np.array_equal(np.load(tmp_path / "c2" / "centroids.npy"), cents)


def test_null_free_reads_the_footer_and_says_no_when_it_cannot_tell(tmp_path):
    """The scan skips decoding the caption vectors of a shard only when the footer proves none is missing."""
    from cidistill.core.store import Store, null_free

    emb = pa.array([[0.5, 0.5], None], pa.list_(pa.float16(), 2))
    pq.write_table(pa.table({"e": emb}), tmp_path / "some_null.parquet")
    pq.write_table(pa.table({"e": emb[:1]}), tmp_path / "none_null.parquet")
    pq.write_table(pa.table({"e": emb[:1]}), tmp_path / "no_stats.parquet", write_statistics=False)
    s = Store(str(tmp_path))

    def footer_says(name: str, column: str) -> bool:
        with s.parquet(name) as pf:
            return null_free(pf.metadata, column)

    assert not footer_says("some_null.parquet", "e")
    assert footer_says("none_null.parquet", "e")
    assert not footer_says("no_stats.parquet", "e")        # no counts: read the column
    assert not footer_says("none_null.parquet", "missing")


def test_embed_shards_without_a_pair_are_one_line_not_an_index_error(tmp_path):
    """Every download failed or no image decoded: the embed shards are empty tables. Balance says so (it
    raised `IndexError: arrays used as indices must be of integer (or boolean) type` from each task)."""
    import pytest

    from cidistill.core.errors import StageError

    (tmp_path / "embed").mkdir()
    for s in range(2):
        pq.write_table(embed_schema(D).empty_table(), tmp_path / "embed" / f"{s:05d}.parquet")
    (tmp_path / "embed" / "_DONE").write_text(json.dumps({"fingerprint": "planted"}))
    with pytest.raises(StageError, match=r"balance: the embed stage's 2 shard\(s\) hold no pair"):
        BalanceStage(_cfg(tmp_path, "balance"), use_ray=False).run()
    assert not (tmp_path / "balance" / "_DONE").exists()


def test_a_shard_with_no_pair_to_hash_or_cluster_beside_others_changes_nothing(tmp_path):
    """An embed shard without a pair (a download shard whose every URL failed), or whose pairs are all held
    out, beside ordinary ones: its scan and assignment parts had untyped (null) columns, and the exact-
    duplicate step failed with `ArrowInvalid: Schema at index 2 was different`. The decisions equal the
    run without it."""
    planted_embed(tmp_path / "embed")
    want = BalanceStage(_cfg(tmp_path, "balance"), use_ray=False).run()
    pq.write_table(embed_schema(D).empty_table(), tmp_path / "embed" / "00004.parquet")
    got = BalanceStage(_cfg(tmp_path, "balance2"), use_ray=False).run()
    assert _table(tmp_path / "balance2").equals(_table(tmp_path / "balance"))
    assert got["removed_by_rule"] == want["removed_by_rule"] and got["kept_samples"] == want["kept_samples"]
    st = BalanceStage(_cfg(tmp_path, "balance3", "data.holdout_fraction=0.99"), use_ray=False).run()
    assert st["held_out"] + st["kept"] == 600 and st["held_out"] > 580 and st["removed"] == st["held_out"]
    assert BalanceStage.summary(None, st) == f"kept {st['kept']}/600, {st['held_out']} held out for evaluation; " \
                                             f"removed none; {st['clusters']} clusters"


def test_holdout_compares_the_text_of_any_plain_column():
    """`data.holdout: group=1` on an integer column holds out group 1 (it crashed balance's scan: no kernel
    for int64 == string); a list column is a one-line error; no rows gives an empty boolean mask."""
    import pytest

    from cidistill.core.errors import StageError

    t = pa.table({"key": ["a", "b", "c", "d"], "group": pa.array([1, 2, None, 1], pa.int64()),
                  "ok": [True, False, True, False], "tags": [["x"], [], ["y"], None]})
    assert holdout_mask(load_config(None, ["data.holdout=group=1", "data.extra_cols=[group]"]), t).to_pylist() == \
        [True, False, False, True]
    assert holdout_mask(load_config(None, ["data.holdout=ok=true", "data.extra_cols=[ok]"]), t).to_pylist() == \
        [True, False, True, False]
    with pytest.raises(StageError, match="data.holdout: column 'tags' holds list<item: string> values"):
        holdout_mask(load_config(None, ["data.holdout=tags=x", "data.extra_cols=[tags]"]), t)
    empty = holdout_mask(load_config(None, []), t.slice(0, 0))
    assert empty.type == pa.bool_() and len(empty) == 0
