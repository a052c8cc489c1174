"""What every stage shares: a folder on any fsspec filesystem, shards as units of work and of resume,
atomic writes, per-shard stats files written after a shard's outputs, one `stats.json` per stage and a
`_DONE` marker written last. Executors (in-process, Ray tasks) are separate from what a stage does."""
from __future__ import annotations

import json
import os
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from . import faults

DONE = "_DONE"
STATS = "stats.json"


class StageError(RuntimeError):
    pass


class Store:
    """A folder on a local path or any fsspec URI (s3://, gs://, memory://)."""

    def __init__(self, root: str):
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.uri = str(root)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def url(self, name: str) -> str:
        """Path usable by other libraries (pyarrow, img2dataset): the URI form for remote stores."""
        return self.path(name) if self._local else f"{self.fs.unstrip_protocol(self.path(name))}"

    @property
    def _local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to the folder) matching pattern, sorted."""
        root = self.root.rstrip("/")
        return sorted(p[len(root) + 1:] for p in self.fs.glob(f"{root}/{pattern}"))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic: write under a temporary name in the same folder, then rename into place."""
        final = self.path(name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)  # `--force` may have removed the folder
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
                if self._local:
                    f.flush()
                    os.fsync(f.fileno())
            faults.point()  # a crash here leaves only the temp file, which the next run removes
            self.fs.mv(tmp, final)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=1, sort_keys=True, default=_json_default).encode())

    def read_json(self, name: str) -> Any:
        with self.fs.open(self.path(name), "rb") as f:
            return json.load(f)

    def write_table(self, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        try:
            with self.fs.open(self.path(name), "rb") as f:
                return pq.read_table(f, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise StageError(f"{self.url(name)}: not a readable parquet file ({e})") from e

    def clean_temps(self) -> int:
        """Remove temp files a killed run left behind."""
        tmps = self.glob("*.tmp-*")
        for t in tmps:
            self.fs.rm(self.path(t), recursive=True)  # a folder too (a checkpoint being written)
        return len(tmps)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def shard_stats_name(shard: str) -> str:
    return f"{shard}_stats.json"


def sum_counters(dicts: Iterable[dict]) -> dict:
    """Add up numeric counters (nested dicts too); the stage stats are this sum over its shards."""
    total: dict = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
            elif isinstance(v, dict):
                total[k] = sum_counters([total.get(k, {}), v])
    return total


@dataclass
class TaskResult:
    item: Any
    ok: bool
    value: Any = None
    error: str = ""


def run_tasks(fn: Callable, items: list, *, use_ray: bool, retries: int = 2, desc: str = "",
              num_cpus: float = 1, **ray_options) -> list[TaskResult]:
    """Run fn(item) for every item: one Ray task each (retried on worker death and on exceptions),
    or in this process. A task that still fails is reported with its error; the others finish."""
    results: list[TaskResult] = []
    bar = tqdm(total=len(items), desc=desc, unit="shard", leave=False, disable=not items)
    if not use_ray:
        for it in items:
            try:
                results.append(TaskResult(it, True, fn(it)))
            except Exception as e:  # counted and reported, the stage goes on
                results.append(TaskResult(it, False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
            bar.update()
        bar.close()
        return results
    import ray

    if faults.ray_env():  # reliability tests: kill points fire in the workers too
        job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars", {})
        ray_options["runtime_env"] = {"env_vars": dict(job_env, **faults.ray_env())}
    remote = ray.remote(fn).options(max_retries=retries, retry_exceptions=True, num_cpus=num_cpus, **ray_options)
    pending = {remote.remote(it): it for it in items}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            it = pending.pop(ref)
            try:
                results.append(TaskResult(it, True, ray.get(ref)))
            except Exception as e:
                results.append(TaskResult(it, False, error=f"{type(e).__name__}: {str(e)[-2000:]}"))
            bar.update()
    bar.close()
    return results


@dataclass
class Stage:
    """A stage: `shards()` lists the units, `run_shards(pending)` makes the missing ones (each writes its
    outputs atomically, then its `_stats.json`), `finish(stats)` does stage-level work. `run()` is the
    resumable driver: a finished stage is skipped, a half-finished one only redoes missing shards."""

    name: str = "stage"
    out_dir: str = ""
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out = Store(self.out_dir)

    # -- what a stage implements
    def shards(self) -> list[str]:
        raise NotImplementedError

    def run_shards(self, pending: list[str]) -> dict[str, str]:
        """Make the pending shards; return {shard: error} for those that failed for good."""
        raise NotImplementedError

    def finish(self, stats: dict) -> dict:
        return stats

    # -- the shared driver
    def is_done(self) -> bool:
        return self.out.exists(DONE)

    def shard_done(self, shard: str) -> bool:
        return self.out.exists(shard_stats_name(shard))

    def run(self, force: bool = False) -> dict:
        if self.is_done() and not force:
            stats = self.out.read_json(STATS)
            print(f"[{self.name}] already done ({self.out.uri}); nothing to do")
            return stats
        if force:
            for n in self.out.glob("*"):
                self.out.fs.rm(self.out.path(n), recursive=True)
        t0 = time.time()
        removed = self.out.clean_temps()
        shards = self.shards()
        pending = [s for s in shards if not self.shard_done(s)]
        resumed = len(shards) - len(pending)
        if resumed:
            print(f"[{self.name}] resuming: {resumed}/{len(shards)} shards already done")
        failures = self.run_shards(pending) if pending else {}
        shard_stats = {s: self.out.read_json(shard_stats_name(s)) for s in shards if self.shard_done(s)}
        stats = sum_counters(shard_stats.values())
        stats.update(shards=len(shards), shards_done=len(shard_stats), shards_resumed=resumed,
                     temp_files_removed=removed,
                     failed_shards={s: e for s, e in failures.items()},
                     started=t0, seconds=round(time.time() - t0, 3))
        stats = self.finish(stats)
        self.out.write_json(STATS, stats)
        if failures:
            raise StageError(f"[{self.name}] {len(failures)} shard(s) failed after retries: "
                             + "; ".join(f"{s}: {e.splitlines()[0] if e else '?'}" for s, e in failures.items())
                             + " -- rerun to retry them; finished shards are kept")
        self.out.write_json(DONE, {"stage": self.name, "finished": time.time(), "config": self.config})
        print(f"[{self.name}] done: {self.summary(stats)} in {stats['seconds']:.1f}s")
        return stats

    def summary(self, stats: dict) -> str:
        return f"{stats['shards_done']} shards"


def join_on_key(left: pa.Table, right: pa.Table, key: str = "key") -> pa.Table:
    """Inner join by key that keeps left's order (Arrow's hash join cannot carry fixed-size-list columns)."""
    pos = {k: i for i, k in enumerate(right.column(key).to_pylist())}
    li, ri = [], []
    for i, k in enumerate(left.column(key).to_pylist()):
        j = pos.get(k)
        if j is not None:
            li.append(i)
            ri.append(j)
    lt = left.take(pa.array(li, pa.int64()))
    rt = right.take(pa.array(ri, pa.int64())).drop([key])
    for name in rt.column_names:
        lt = lt.append_column(rt.schema.field(name), rt.column(name))
    return lt


def already_done(out: Store, name: str, result: str = STATS, force: bool = False):
    """The skip check of stages that are one global step (train, eval, export): their result, or None."""
    if out.exists(DONE) and not force:
        print(f"[{name}] already done ({out.uri}); nothing to do")
        return out.read_json(result)
    out.clean_temps()  # what a killed run left half-written
    return None


def holdout_mask(holdout: str, table: pa.Table) -> "pa.Array":
    """Which rows of a download table belong to the held-out evaluation split (`data.holdout` = COL=VALUE)."""
    import pyarrow.compute as pc

    if not holdout:
        return pa.array([False] * table.num_rows)
    col, _, value = holdout.partition("=")
    if col not in table.column_names:
        raise StageError(f"data.holdout: column {col!r} is not in the download table "
                         f"(columns: {table.column_names}); add it to data.extra_cols")
    return pc.fill_null(pc.equal(table.column(col), value), False)
