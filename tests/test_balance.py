"""The SemDeDup rule on planted data, against a direct brute-force implementation."""
import os
import shutil
import warnings

import numpy as np
import pytest

import pipeline.semdedup as semdedup
from pipeline.native import SRC, build, semdedup_lib, whole_elf

from pipeline.balance_rules import balance_decisions
from pipeline.semdedup import earlier_max, keep_order, quantise, screened_earlier_max, semdedup_reference
from pipeline.cluster import l2n, spherical_kmeans
from cidistill.core.config import BalanceConfig
from cidistill.core.errors import StageError


def planted(n_groups=40, per_group=5, d=64, spread=0.02, seed=0):
    rng = np.random.default_rng(seed)
    centres = l2n(rng.normal(size=(n_groups, d)))
    x = l2n(np.repeat(centres, per_group, 0) + spread * rng.normal(size=(n_groups * per_group, d)) / np.sqrt(d))
    singles = l2n(rng.normal(size=(60, d)))
    return np.concatenate([x, singles]), np.concatenate([np.repeat(np.arange(n_groups), per_group), -np.ones(60, int)])


@pytest.mark.parametrize("keep", ["hard", "easy", "random"])
def test_eps_rule_keeps_one_per_planted_group(keep):
    x, group = planted()
    keys = np.array([f"{i:06d}" for i in range(len(x))], dtype=object)
    bc = BalanceConfig(semantic_eps=[0.05], apply_eps=0.05, near_dup_cos=0.9999, kmeans_k=8, keep=keep)
    table, extra = balance_decisions(keys, x, np.array([""] * len(x), dtype=object), bc)
    kept = np.array(table.column("kept").to_pylist())
    dropped_truth = np.zeros(len(x), bool)
    for g in range(40):
        dropped_truth[np.flatnonzero(group == g)[1:]] = True  # all but one of each group
    assert all(kept[group == g].sum() == 1 for g in range(40))
    assert kept[group == -1].all()
    assert (~kept).sum() == dropped_truth.sum()  # precision and recall of removal both 1.0
    dup_of = table.column("dup_of").to_pylist()
    for i in np.flatnonzero(~kept):  # dup_of names the surviving member of the same group
        j = int(dup_of[i])
        assert kept[j] and group[j] == group[i]


def test_joint_rule_keeps_lookalike_images_with_different_captions():
    """`semantic_on: joint`: a planted image group whose members share a caption is still cut to one; a group
    of lookalike images each with its own caption (distinct classes that look alike) is kept whole, which
    the image-only rule would cut to one."""
    x, group = planted()
    rng = np.random.default_rng(7)
    text = l2n(rng.normal(size=(len(x), 64)))
    for g in range(20):  # groups 0-19: one caption per group; 20-39 and the singles: a caption each
        text[group == g] = text[np.flatnonzero(group == g)[0]]
    text[5] = np.nan  # a missing caption (row 5 is in group 1): never a joint duplicate
    keys = np.array([f"{i:06d}" for i in range(len(x))], dtype=object)
    no_hash = np.array([""] * len(x), dtype=object)
    kept = {}
    for mode in ("image", "joint"):
        bc = BalanceConfig(semantic_eps=[0.05], apply_eps=0.05, near_dup_cos=0.9999, kmeans_k=8, semantic_on=mode)
        table, extra = balance_decisions(keys, x, no_hash, bc, text=text)
        kept[mode] = np.array(table.column("kept").to_pylist())
        assert extra["stats"]["semantic_on"] == mode
    assert all(kept["image"][group == g].sum() == 1 for g in range(40))
    assert kept["joint"][5] and kept["joint"][group == 1].sum() == 2
    assert all(kept["joint"][group == g].sum() == 1 for g in range(20) if g != 1)
    assert all(kept["joint"][group == g].all() for g in range(20, 40)) and kept["joint"][group == -1].all()
    with pytest.raises(ValueError, match="caption embeddings"):
        balance_decisions(keys, x, no_hash, BalanceConfig(semantic_on="joint", kmeans_k=8))


def test_kept_set_equals_bruteforce_semdedup_per_cluster():
    rng = np.random.default_rng(1)
    x = l2n(rng.normal(size=(600, 32)) + np.repeat(rng.normal(size=(30, 32)), 20, 0) * 2)
    cents, _ = spherical_kmeans(x, 6, seed=0)
    from pipeline.cluster import assign

    labels, _ = assign(x, cents)
    for eps in (0.05, 0.2, 0.4):
        for c in range(6):
            idx = np.flatnonzero(labels == c)
            order = idx[keep_order(x[idx], cents[c], "hard", rng)]
            best, _ = earlier_max(x[order], block=7)  # tiny blocks exercise the block boundaries
            ours = ~(best > 1 - eps)
            assert np.array_equal(ours, semdedup_reference(x[order], eps))


def test_exact_dups_and_bad_embeddings():
    x = l2n(np.random.default_rng(2).normal(size=(10, 16)))
    x[3] = np.nan
    hashes = np.array(["h"] * 2 + [f"u{i}" for i in range(8)], dtype=object)
    keys = np.array([f"k{i}" for i in range(10)], dtype=object)
    table, extra = balance_decisions(keys, x, hashes, BalanceConfig(kmeans_k=2))
    r = table.column("drop_reason").to_pylist()
    assert r[1] == "exact_dup" and table.column("dup_of")[1].as_py() == "k0"
    assert r[3] == "bad_embedding"
    assert extra["stats"]["removed_by_rule"]["exact_dup"] == 1


def test_k_larger_than_samples_is_a_clear_error():
    with pytest.raises(StageError, match="larger than the number of samples"):
        spherical_kmeans(np.ones((5, 4), np.float32), 10)


def test_two_level_kmeans_for_large_k():
    """Large k trains two-level (sqrt(k) coarse cells, then each cell's share of k): unit centroids, k of
    them, and every planted group's members land in one cluster."""
    from pipeline.cluster import assign

    x, group = planted(n_groups=60, per_group=5, spread=0.01)
    cents, info = spherical_kmeans(x, 64, niter=10, two_level_above=16)
    assert info["method"].startswith("two-level") and cents.shape == (64, x.shape[1])
    assert np.allclose(np.linalg.norm(cents, axis=1), 1, atol=1e-5)
    labels, _ = assign(x, cents)
    grouped = [labels[group == g] for g in range(60)]
    assert sum(len(set(g.tolist())) == 1 for g in grouped) >= 57


@pytest.fixture(params=["c_kernels", "torch"])
def kernel_path(request, monkeypatch):
    """Each screened-kernel test runs on both paths: the C kernels (where a compiler exists) and torch."""
    if request.param == "torch":
        monkeypatch.setattr(semdedup, "semdedup_lib", lambda: None)
    else:  # a box with a C compiler must have built them
        has_cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        assert (semdedup_lib() is not None) == bool(has_cc)
    return request.param


def test_c_kernels_fall_back_to_torch_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CIDISTILL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    semdedup_lib.cache_clear()
    try:
        with pytest.warns(UserWarning, match="using the torch path"):
            assert semdedup_lib() is None
        x = l2n(np.repeat(np.random.default_rng(5).normal(size=(40, 64)), 3, 0)
                + 0.01 * np.random.default_rng(6).normal(size=(120, 64))).astype(np.float32)
        best, _ = screened_earlier_max(x, [0.9, 0.95], screen=True)
        exact, _ = earlier_max(x)
        assert np.array_equal(best > 0.95, exact > 0.95) and (exact > 0.95).sum() == 80
    finally:
        semdedup_lib.cache_clear()


def test_c_kernels_build_once_per_source(tmp_path, monkeypatch):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:  # nothing to build with: the fallback test above covers this box
        assert semdedup_lib() is None
        return
    monkeypatch.setenv("CIDISTILL_CACHE", str(tmp_path))
    first = build(cc=cc)
    stamp = first.stat().st_mtime_ns
    assert build(cc=cc) == first and first.stat().st_mtime_ns == stamp   # cached, not rebuilt
    changed = tmp_path / "semdedup_kernels.c"
    changed.write_text(SRC.read_text() + "\n/* changed */\n")
    assert build(changed, cc=cc) != first and sorted(p.suffix for p in first.parent.iterdir()) == [".so", ".so"]
    whole = first.read_bytes()
    first.write_bytes(whole[:len(whole) - 100])  # cut short in the cache: loading it killed the process (SIGBUS)
    semdedup_lib.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert semdedup_lib() is not None and whole_elf(first) and first.stat().st_size == len(whole)
    finally:
        semdedup_lib.cache_clear()


def test_int8_screen_agrees_with_exact_kernel_at_every_threshold(kernel_path):
    """Many pairs within the screen's error band of the thresholds: the screened kernel must still give the
    exact kernel's answer at each threshold and, where the max reaches the lowest one, an `arg` whose exact
    cosine is `best`, within the screening error below the max (near-ties may pick another earlier row)."""
    rng = np.random.default_rng(3)
    base = l2n(rng.normal(size=(150, 512)))
    noise = rng.uniform(0.1, 0.6, size=(600, 1)) * rng.normal(size=(600, 512)) / np.sqrt(512)
    x = l2n(np.repeat(base, 4, 0) + noise)
    thresholds = [0.9, 0.95, 0.98]
    # pairs built at cosine t + delta, |delta| <= 0.004: inside int8 rounding, so only the error bound saves them
    u = l2n(rng.normal(size=(300, 512)))
    v = rng.normal(size=(300, 512))
    v = l2n(v - (v * u).sum(1, keepdims=True) * u)
    cos = np.repeat(thresholds, 100) + rng.uniform(-0.004, 0.004, 300)
    near = cos[:, None] * u + np.sqrt(1 - cos[:, None] ** 2) * v
    x = np.concatenate([x, u, near]).astype(np.float32)[rng.permutation(1200)]
    exact, _ = earlier_max(x)
    best, arg = screened_earlier_max(x, thresholds, block=64, screen=True)
    for t in thresholds:
        assert np.array_equal(best > t, exact > t) and np.array_equal(best >= t, exact >= t)
    hit = exact >= 0.9
    assert 300 < hit.sum() < 1200 and ((exact > 0.87) & (exact < 0.93)).sum() > 20  # the band is populated
    margin = quantise(x)[2]
    assert (best[hit] <= exact[hit] + 1e-5).all() and (exact[hit] - best[hit] < margin).all()
    assert np.median(exact[hit] - best[hit]) < 1e-6 and (arg[~hit] == -1).all()  # near-ties are rare
    assert (arg[hit] < np.flatnonzero(hit)).all()
    assert np.allclose(np.einsum("ij,ij->i", x[hit], x[arg[hit]]), best[hit], atol=1e-5)
    # the stage's path: rows of a larger matrix gathered inside (into reused buffers), default block size
    pool = np.concatenate([l2n(rng.normal(size=(500, 512))).astype(np.float32), x])
    rows = 500 + np.arange(len(x))
    best_r, arg_r = screened_earlier_max(pool, thresholds, rows=rows, screen=True)
    for t in thresholds:
        assert np.array_equal(best_r > t, exact > t) and np.array_equal(best_r >= t, exact >= t)
    assert np.array_equal(arg_r == -1, arg == -1)
    # without the screen (CPUs with no int8 dot instructions: int8_pays() False) the same decisions
    best_e, arg_e = screened_earlier_max(pool, thresholds, rows=rows, screen=False)
    for t in thresholds:
        assert np.array_equal(best_e > t, exact > t) and np.array_equal(best_e >= t, exact >= t)
    assert np.array_equal(arg_e == -1, arg == -1)
