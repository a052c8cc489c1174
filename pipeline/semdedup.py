"""The SemDeDup rule inside one cluster: for rows in keep order, the largest cosine to any earlier row.

`earlier_max` computes it exactly in fp32 row blocks. `screened_earlier_max` gives the same answers at
given thresholds, on CPUs with int8 dot-product instructions (`int8_pays`; the exact kernel elsewhere)
~5x faster than a BLAS fp32 reference on 1,000-row clusters (bench/results/balance.txt):
an int8 similarity matrix (VNNI integer matmul, lower-triangle row blocks) screens every pair, with a
per-pair error bound derived from each vector's quantisation error, and only rows whose answer the bound
leaves open are recomputed exactly. The passes around the matmul (quantise the cluster's rows where they
lie, each row's max and index below the diagonal, the exact dots) are C kernels (semdedup_kernels.c,
built by native.py); without a compiler the same steps run in torch (~1.3x slower). Buffers are reused
from cluster to cluster: fresh pages cost more than the arithmetic at this size. `semdedup_reference` is
SemDeDup's own formulation (full matrix, upper triangle, column max) for tests and the bench."""
from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np
import torch

from .native import semdedup_lib

BLOCK = 2048
EXACT_BELOW = 64            # tiny clusters: the exact kernel is as fast
_FP_SLACK = 1e-4            # fp32 rounding of the "exact" dots (BLAS order) and of the scaled integers


def int8_pays() -> bool:
    """The int8 screen pays only where the CPU has int8 dot-product instructions (VNNI, AMX): elsewhere
    torch's `_int_mm` runs a generic loop, measured 28x slower than fp32 BLAS on a 2-core AVX2 EPYC
    (1024 x 1024 x 512: 0.33 s vs 0.012 s), and the exact fp32 kernel reaches the same decisions sooner.
    CIDISTILL_SEMDEDUP=int8 or =exact overrides."""
    forced = os.environ.get("CIDISTILL_SEMDEDUP", "")
    return forced == "int8" if forced else _cpu_has_int8_dot()


@functools.cache
def _cpu_has_int8_dot() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def exact_rows(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32: for the given rows (ascending), the max cosine to any strictly earlier row and which row (the
    first such row on ties). The product runs in torch (its BLAS uses every core)."""
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    r = torch.from_numpy(np.ascontiguousarray(rows, np.int64))
    sim = torch.index_select(xt, 0, r) @ xt[: rows[-1] + 1].T
    sim.masked_fill_(torch.arange(sim.shape[1])[None, :] >= r[:, None], -np.inf)
    sim = sim.numpy()
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


class _Workspace(threading.local):
    """Flat buffers reused across clusters: fresh multi-MB arrays per cluster cost more in page faults than
    the arithmetic they hold (measured 9x on 1,000 x 512 elementwise ops)."""

    def take(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buf = getattr(self, name, None)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1 << 20), dtype=dtype)
            setattr(self, name, buf)
        return buf[:numel].view(shape)


_WORK = _Workspace()


def gather(x, rows: np.ndarray, name: str = "rows") -> torch.Tensor:
    """x[rows] into a reused buffer (valid until the next gather of that name in this thread); torch's
    index_select runs on every core, numpy's fancy indexing on one and into fresh pages."""
    x = torch.as_tensor(x)
    out = _WORK.take(name, (len(rows),) + tuple(x.shape[1:]), x.dtype)
    return torch.index_select(x, 0, torch.as_tensor(rows, dtype=torch.int64), out=out)


def screen_bound(e: float) -> float:
    """The bound on |x_i.x_j - s^2 q_i.q_j| for unit rows: |x.dy| + |dx.y~| <= e_j + e_i (1 + e_j), with e
    the largest L2 norm of a row's quantisation error, plus float slack."""
    return 2 * e + e * e + _FP_SLACK


def quantise(x) -> tuple[torch.Tensor, float, float]:
    """int8 codes with one scale s per cluster, s, and `screen_bound`. The codes live in a reused buffer:
    valid until the next call in this thread."""
    x = torch.as_tensor(x)
    lo, hi = torch.aminmax(x)
    s = max(float(hi), -float(lo)) / 127 or 1.0
    y = torch.mul(x, 1 / s, out=_WORK.take("scaled", x.shape, torch.float32))
    r = torch.round(y, out=_WORK.take("rounded", x.shape, torch.float32))
    q = _WORK.take("codes", x.shape, torch.int8).copy_(r)
    e = float(torch.linalg.vector_norm(r.sub_(y), dim=1).max()) * s   # rounding error, in units of s -> cosine
    return q, s, screen_bound(e)


def quantise_native(lib, x: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, float, float]:
    """`quantise(x[rows])` in one C pass that reads the rows in place (same scale rule, same bound)."""
    q = _WORK.take("codes", (len(rows), x.shape[1]), torch.int8)
    out = np.empty(2)
    lib.quantise_rows(x.ctypes.data, x.shape[1], rows.ctypes.data, len(rows), q.data_ptr(), out.ctypes.data)
    s, e = float(out[0]), float(out[1])
    return q, s, screen_bound(e)


def int8_earlier_max(q: torch.Tensor, block: int | None = None, lib=None, thr: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest integer dot with an earlier row and which row, from lower-triangle row blocks
    (block rows x all columns up to the block's end). torch path: inside the diagonal block j >= i is zeroed,
    not masked to a large negative, so a row with no positive earlier dot reads 0 (and an `arg` that is not
    earlier), which the caller never treats as a candidate because it screens only for thresholds above the
    margin. C path (`lib`): masked by the loop bound; `arg` is searched for only where the max is >= thr."""
    n = len(q)
    block = block or min(1024, -(-n // 48) * 16)   # about n/3: three matmuls cover 2/3 of the square
    vals = np.empty(n, np.int32)
    args = np.empty(n, np.int64)
    for a in range(0, n, block):
        b = min(n, a + block)
        sim = torch._int_mm(q[a:b], q[:b].T, out=_WORK.take("sim", (b - a, b), torch.int32))  # rows a..b x cols 0..b
        if lib is not None:
            lib.row_max(sim.data_ptr(), b - a, b, a, thr, vals[a:].ctypes.data, args[a:].ctypes.data)
        else:
            sim[:, a:].tril_(-1)
            torch.max(sim, 1, out=(torch.from_numpy(vals[a:b]), torch.from_numpy(args[a:b])))
    return vals, args


def screened_earlier_max(x: np.ndarray, thresholds, block: int | None = None,
                         rows: np.ndarray | None = None, screen: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like `earlier_max` on x (or on x[rows]), exact where it decides something: for every t in `thresholds`
    and every row, (best > t) and (best >= t) equal the exact answers. Where the exact max reaches
    min(thresholds), `arg` is an earlier row and `best` its exact cosine: the exact max, unless another
    earlier row lies within the screening error of it (then `best` may sit below the max by less than that
    error, never across a threshold). Below, `best` is at most min(thresholds) (an estimate) and `arg` -1.
    Uses the C kernels (pipeline/native.py) when they build, torch otherwise: the same answers."""
    x = np.ascontiguousarray(x, np.float32)
    rows = np.arange(len(x), dtype=np.int64) if rows is None else np.ascontiguousarray(rows, np.int64)
    n = len(rows)
    t_sorted = np.sort(np.asarray(list(thresholds), np.float32))
    t_min = float(t_sorted[0])
    screen = n >= EXACT_BELOW and hasattr(torch, "_int_mm") and (int8_pays() if screen is None else screen)
    lib = semdedup_lib() if screen else None
    xt = gather(x, rows) if screen and lib is None else None    # C reads rows in place; torch works on a copy
    if screen:
        q, s, margin = quantise_native(lib, x, rows) if lib is not None else quantise(xt)
    if not screen or t_min <= margin:
        # tiny cluster, a torch without int8 matmul, or thresholds so low the screen cannot rule rows out
        best, arg = earlier_max(x[rows])
        arg[best < t_min] = -1
        return best, arg
    thr = math.floor((t_min - margin) / (s * s)) - 1              # integer form of the candidate test, a bit wide
    thr = min(thr, 2 ** 31 - 1)                                   # an int32 for the C kernel
    vals, arg = int8_earlier_max(q, block, lib, thr)
    approx = vals * np.float32(s * s)
    best = np.minimum(approx, np.float32(t_min - 1e-3))       # rows the screen rules out: an estimate below t_min
    arg_out = np.full(n, -1, np.int64)
    cand = np.flatnonzero(approx + margin >= t_min)
    if len(cand):
        at = np.maximum(arg[cand], 0)
        if lib is not None:
            exact_at_arg = np.empty(len(cand), np.float32)
            gi, gj = rows[cand], rows[at]
            lib.pair_dots(x.ctypes.data, x.shape[1], gi.ctypes.data, gj.ctypes.data, len(cand), exact_at_arg.ctypes.data)
        else:
            exact_at_arg = gather(xt, cand, "cand").mul_(gather(xt, at, "cand_arg")).sum(1).numpy()
        exact_at_arg[arg[cand] < 0] = -np.inf                 # no index found (cannot happen): recomputed below
        # undecided: some threshold lies between the exact cosine at the screen's argmax and the bound of
        # every other earlier row; those rows are recomputed exactly
        lo = np.searchsorted(t_sorted, exact_at_arg, side="left")
        hi = np.searchsorted(t_sorted, approx[cand] + margin, side="right")
        open_rows = hi > lo
        best[cand], arg_out[cand] = exact_at_arg, arg[cand]
        redo = cand[open_rows]
        if len(redo):
            xr = x[rows]
            for r0 in range(0, len(redo), BLOCK):
                rows_ = redo[r0:r0 + BLOCK]
                best[rows_], arg_out[rows_] = exact_rows(xr, rows_)
    arg_out[best < t_min] = -1
    return best, arg_out
