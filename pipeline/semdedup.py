"""The SemDeDup rule inside one cluster: for rows in keep order, the largest cosine to any earlier row.

`earlier_max` computes it exactly in fp32 row blocks. `screened_earlier_max` gives the same answers at
given thresholds about 3x faster than a BLAS fp32 reference on 1,000-row clusters (bench/results/balance.txt):
an int8 similarity matrix (VNNI integer matmul, lower-triangle blocks only) screens every pair, with a
per-pair error bound derived from each vector's quantisation error, and only rows whose answer the bound
leaves open are recomputed exactly. `semdedup_reference` is SemDeDup's own
formulation (full matrix, upper triangle, column max) for tests and the bench."""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 2048
INT8_BLOCK = 256            # rows per integer-matmul block: small blocks skip most of the upper triangle
EXACT_BELOW = 64            # tiny clusters: the exact kernel is as fast
_FP_SLACK = 1e-4            # fp32 rounding of the "exact" dots (BLAS order) and of the scaled integers
_NOT_EARLIER = -(2 ** 30)   # added where j >= i: below any int8 dot (|q.q| <= 127^2 * d < 2^24 for d <= 1024)


def exact_rows(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32: for the given rows (ascending), the max cosine to any strictly earlier row and which row."""
    sim = x[rows] @ x[: rows[-1] + 1].T
    sim[np.arange(sim.shape[1])[None, :] >= rows[:, None]] = -np.inf
    arg = sim.argmax(1)
    return sim[np.arange(len(rows)), arg], arg


def earlier_max(x: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """For rows in keep order: the max cosine to any earlier row and which row (-1 for the first)."""
    n = len(x)
    best = np.full(n, -np.inf, np.float32)
    arg = np.full(n, -1, np.int64)
    for a in range(1, n, block):
        rows = np.arange(a, min(n, a + block))
        best[rows], arg[rows] = exact_rows(x, rows)
    return best, arg


def semdedup_reference(x: np.ndarray, eps: float) -> np.ndarray:
    """SemDeDup's own formulation, for tests and the bench: the full similarity matrix of a cluster in
    keep order, upper triangle, column max; True = keep."""
    sim = x @ x.T
    tri = np.triu(sim, k=1)
    m = tri.max(axis=0) if len(x) > 1 else np.zeros(len(x))
    return ~(m > 1 - eps)


def keep_order(x: np.ndarray, centroid: np.ndarray, policy: str, rng: np.random.Generator) -> np.ndarray:
    if policy == "random":
        return rng.permutation(len(x))
    sim = x @ centroid
    return np.argsort(sim if policy == "hard" else -sim, kind="stable")  # hard: least similar first


def quantise(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int8 codes with one scale s per cluster, and the bound on |x_i.x_j - s^2 q_i.q_j| for unit rows:
    |x.dy| + |dx.y~| <= e_j + e_i (1 + e_j), with e the largest L2 norm of a row's quantisation error."""
    s = max(float(x.max()), -float(x.min())) / 127 or 1.0
    y = x * np.float32(1 / s)
    r = np.rint(y)
    q = r.astype(np.int8)
    r -= y                                                    # rounding error, in units of s
    e = float(np.sqrt(np.einsum("ij,ij->i", r, r).max())) * s
    return q, s, 2 * e + e * e + _FP_SLACK


def screened_earlier_max(x: np.ndarray, thresholds, block: int = INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Like `earlier_max`, exact where it decides something: for every t in `thresholds` and every row,
    (best > t) and (best >= t) equal the exact answers. Where the exact max reaches min(thresholds), `arg` is
    an earlier row and `best` its exact cosine: the exact max, unless another earlier row lies within the
    screening error of it (then `best` may sit below the max by less than that error, never across a
    threshold). Below, `best` is at most min(thresholds) (an estimate) and `arg` -1."""
    n = len(x)
    t_sorted = np.sort(np.asarray(list(thresholds), np.float32))
    t_min = float(t_sorted[0])
    if n < EXACT_BELOW or not hasattr(torch, "_int_mm"):  # tiny cluster, or a torch without int8 matmul
        best, arg = earlier_max(x)
        arg[best < t_min] = -1
        return best, arg
    x = np.ascontiguousarray(x, np.float32)
    q, s, margin = quantise(x)
    qt = torch.from_numpy(q)
    approx = np.empty(n, np.int32)
    arg = np.empty(n, np.int64)
    not_earlier = np.triu(np.full((block, block), _NOT_EARLIER, np.int32))  # j >= i inside a diagonal block
    for a in range(0, n, block):
        b = min(n, a + block)
        sim = torch._int_mm(qt[a:b], qt[:b].T).numpy()       # int32, rows a..b x columns 0..b
        diag = sim[:, a:b]
        np.add(diag, not_earlier[: b - a, : b - a], out=diag)  # one add instead of a masked copy
        arg[a:b] = sim.argmax(1)
        approx[a:b] = sim[np.arange(b - a), arg[a:b]]
    first = approx < _NOT_EARLIER // 2                        # the first row: nothing earlier
    approx = approx * np.float32(s * s)
    approx[first] = -np.inf
    best = np.minimum(approx, np.float32(t_min - 1e-3))       # rows the screen rules out: an estimate below t_min
    arg_out = np.full(n, -1, np.int64)
    cand = np.flatnonzero(approx + margin >= t_min)
    if len(cand):
        exact_at_arg = np.einsum("ij,ij->i", x[cand], x[arg[cand]])
        # undecided: some threshold lies between the exact cosine at the screen's argmax and the bound of
        # every other earlier row; those rows are recomputed exactly
        lo = np.searchsorted(t_sorted, exact_at_arg, side="left")
        hi = np.searchsorted(t_sorted, approx[cand] + margin, side="right")
        open_rows = hi > lo
        best[cand], arg_out[cand] = exact_at_arg, arg[cand]
        redo = cand[open_rows]
        for r0 in range(0, len(redo), BLOCK):
            rows = redo[r0:r0 + BLOCK]
            best[rows], arg_out[rows] = exact_rows(x, rows)
    arg_out[best < t_min] = -1
    return best, arg_out
