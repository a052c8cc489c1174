"""The one stage driver. A stage is a small class: `units()` lists its units of work (download shards, or
the single unit "run" of a whole-run stage such as train), `run_unit(s)` makes missing ones (outputs written
atomically, then the unit's `_stats.json`), `finish(stats)` adds stage-level facts. `Stage.run()` skips a
finished stage whose fingerprint still matches, resumes a half-finished one, clears one whose config or
inputs changed, rolls the units' stats into `stats.json` and writes `_DONE` last.

A fingerprint is a hash of the config fields a stage reads (`reads`, minus fields that cannot change results)
and of the fingerprints its input stages (`inputs`) recorded in their own `_DONE`. Executors (in-process, Ray
tasks: `run_tasks`) are kept apart from what a stage does."""
from __future__ import annotations

import functools
import hashlib
import json
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .progress import Progress

from . import faults
from .config import Config, flat_fields
from .errors import StageError, is_write_error, raise_if_stopped
from .schema import shard_stats_name, stage_shards
from .store import DamagedFile, Store

DONE = "_DONE"
RUN = "_RUN.json"      # the fingerprint a run started with: a half-finished run of another config is not resumed
STATS = "stats.json"
WHOLE = "run"          # the unit of a whole-run stage

# fields that cannot change a stage's results: never part of a fingerprint
OPERATIONAL = frozenset({
    "ray_address", "data.thread_count", "data.shard_retries", "teacher.num_actors", "teacher.cpus_per_actor",
    "teacher.threads", "train.threads", "train.cpus_per_worker", "train.log_every", "train.ckpt_every",
    "train.loader_workers", "balance.rows_per_task",
})


def sum_counters(dicts: Iterable[dict]) -> dict:
    """Add up numeric counters (nested dicts too); the stage stats are this sum over its units."""
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
    exc: BaseException | None = None   # the task's exception (an OSError is re-raised as itself: disk full)


def task_slots(use_ray: bool) -> int:
    """How many one-CPU tasks run at once: the Ray cluster's CPUs, or 1 in this process."""
    if not use_ray:
        return 1
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1


@dataclass
class _Refused:
    message: str
    exc: BaseException | None = None  # a write error (disk full), re-raised as itself in the driver


def run_tasks(fn: Callable, items: list, *, use_ray: bool, retries: int = 2, desc: str = "",
              num_cpus: float = 1, **ray_options) -> list[TaskResult]:
    """Run fn(item) for every item: one Ray task each (retried on worker death and on exceptions),
    or in this process. A task that still fails is reported with its error; the others finish."""
    results: list[TaskResult] = []
    bar = Progress(len(items), desc, unit="shard")
    if not use_ray:
        for it in items:
            try:
                results.append(TaskResult(it, True, fn(it)))
            except Exception as e:  # counted and reported, the stage goes on
                results.append(TaskResult(it, False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}", exc=e))
            bar.update()
        bar.close()
        return results
    import ray

    if faults.ray_env():  # reliability tests: kill points fire in the workers too
        job_env = (ray.get_runtime_context().runtime_env or {}).get("env_vars", {})
        ray_options["runtime_env"] = {"env_vars": dict(job_env, **faults.ray_env())}
    from .runtime import task_threads

    @functools.wraps(fn)  # Ray's log prefixes and dashboard name the task by its function
    def refusing(item):
        try:
            with task_threads(num_cpus):
                return fn(item)
        except StageError as e:  # our own verdict on the data: no retry would change it, no traceback
            return _Refused(str(e))
        except OSError as e:
            if is_write_error(e):  # a full disk or an unwritable folder: no retry would change it either
                return _Refused(f"{type(e).__name__}: {e}", e)
            raise

    remote = ray.remote(refusing).options(max_retries=retries, retry_exceptions=True, num_cpus=num_cpus, **ray_options)
    pending = {remote.remote(it): it for it in items}
    while pending:
        raise_if_stopped()
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            it = pending.pop(ref)
            try:
                out = ray.get(ref)
                if isinstance(out, _Refused):
                    raise out.exc or StageError(out.message)
                results.append(TaskResult(it, True, out))
            except Exception as e:  # a RayTaskError's own text is the task's name and pid in colour codes
                cause = getattr(e, "cause", None)
                err = cause if isinstance(cause, BaseException) else e
                results.append(TaskResult(it, False, error=f"{type(err).__name__}: {str(err)[-2000:]}", exc=err))
            bar.update()
    bar.close()
    return results


class Stage:
    """Subclasses set `name`, `inputs`, `reads` and implement `units` / `run_units` (or `run_unit`)."""

    name = "stage"
    inputs: tuple[str, ...] = ()     # stages whose outputs this one reads
    reads: tuple[str, ...] = ()      # config fields or sections that shape its outputs
    ignores: tuple[str, ...] = ()    # fields under `reads` that this stage does not use
    shard_input: tuple[str, str] | None = None  # (input stage, file extension): its shards are this one's units

    def __init__(self, cfg: Config, use_ray: bool = True):
        self.cfg, self.use_ray = cfg, use_ray
        self.out = Store(cfg.stage_dir(self.name), create=False)  # made when the stage runs
        self.redone = False  # set by run(): whether it did work
        self._damaged: set[str] = set()  # markers found damaged (said once)

    # -- what a stage implements
    def units(self) -> list[str]:
        return [WHOLE]

    def run_units(self, pending: list[str]) -> dict[str, str]:
        """Make the pending units; return {unit: error} for those that failed for good."""
        for u in pending:
            raise_if_stopped()
            self.out.write_json(shard_stats_name(u), self.run_unit(u))
        return {}

    def run_unit(self, unit: str) -> dict:
        raise NotImplementedError

    def finish(self, stats: dict) -> dict:
        return stats

    def summary(self, stats: dict) -> str:
        return f"{stats.get('shards_done', 0)} shards"

    def extra_inputs(self) -> dict:
        """Inputs from outside the work folder (the URL list): part of the fingerprint."""
        return {}

    def unit_done(self, unit: str) -> bool:
        return self.out.exists(shard_stats_name(unit))

    def input_store(self, stage: str) -> Store:
        return Store(self.cfg.stage_dir(stage), create=False)

    def check_config(self) -> None:
        """Settings this stage will use that can be checked without its inputs (a model's name, weights and
        files): a run checks them for every stage it will work in before the first one starts."""

    def check_inputs(self) -> None:
        """Fails when the inputs cannot serve this run (one missing, a setting they cannot fill): called before
        the stage's last outputs are cleared, so that a run that cannot start deletes nothing."""
        if self.shard_input:
            self.input_shards()

    def input_shards(self) -> list[str]:
        stage, ext = self.shard_input
        return stage_shards(self.require(stage), ext)

    def require(self, stage: str) -> Store:
        """An input stage's folder; an error naming it when that stage has not finished."""
        st = self.input_store(stage)
        if not st.exists(DONE):
            raise StageError(f"{self.name} needs a finished {stage} stage in {st.uri}: run `cidistill {stage}` first")
        return st

    # -- fingerprints
    def fields(self) -> dict:
        skip = OPERATIONAL | set(self.ignores)
        return {k: v for k, v in flat_fields(self.cfg, self.reads).items() if k not in skip}

    def recorded(self, stage: str) -> str | None:
        st = self.input_store(stage)
        return st.read_json(DONE).get("fingerprint") if st.exists(DONE) else None

    def fingerprint(self, inputs: dict[str, str | None] | None = None) -> dict:
        """{"fields", "inputs", "fingerprint"}; `inputs` overrides the input stages' recorded fingerprints
        (the plan of a multi-stage run uses the ones they will have)."""
        given = inputs or {}
        ins = {s: given[s] if s in given else self.recorded(s) for s in self.inputs}
        ins.update(self.extra_inputs())
        fields = self.fields()
        blob = json.dumps({"stage": self.name, "fields": fields, "inputs": ins}, sort_keys=True, default=str)
        return {"fields": fields, "inputs": ins, "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16]}

    def status(self, fp: dict) -> tuple[str, str]:
        """("done" | "new" | "resume" | "changed", why) of this stage's folder against fingerprint fp. A damaged
        marker counts as absent: the stage then checks its units again (each kept unit is read back)."""
        if (prev := self._marker(DONE)) is not None:
            if prev.get("fingerprint") == fp["fingerprint"]:
                return "done", ""
            return "changed", why_changed(prev, fp)
        if (prev := self._marker(RUN)) is not None:
            if prev.get("fingerprint") != fp["fingerprint"]:
                return "changed", why_changed(prev, fp)
            return "resume", ""
        return "new", ""

    def _marker(self, name: str) -> dict | None:
        if not self.out.exists(name):
            return None
        try:
            return self.out.read_json(name)
        except DamagedFile:
            if name not in self._damaged:
                self._damaged.add(name)
                print(f"[{self.name}] its {name} marker is damaged: checking its units again")
            return None

    # -- the driver
    def run(self, force: bool = False) -> dict:
        fp = self.fingerprint()
        state, why = self.status(fp)
        self.redone = force or state != "done"
        if not self.redone:
            print(f"[{self.name}] already done ({self.out.uri}); nothing to do")
            return self.out.read_json(STATS)
        self._check_owned()
        self.check_inputs()  # before this stage's last outputs are cleared
        self.check_config()
        if force or state == "changed":
            self.out.clear()
        self.out.fs.makedirs(self.out.root, exist_ok=True)
        if not self.out.exists(RUN):
            self.out.write_json(RUN, {"stage": self.name, **fp})  # its fields: a rerun says what changed
        t0 = time.time()
        removed = self.out.clean_temps()
        units = self.units()
        pending = [u for u in units if not self.unit_done(u)]
        resumed = len(units) - len(pending)
        if resumed:
            print(f"[{self.name}] resuming: {resumed}/{len(units)} units already done")
        failures = self.run_units(pending) if pending else {}
        stats = self._rolled_up(units)
        stats.update(shards=len(units), shards_done=sum(self.unit_done(u) for u in units),
                     shards_resumed=resumed, temp_files_removed=removed, failed_shards=dict(failures),
                     seconds=round(time.time() - t0, 3))
        stats = self.finish(stats)
        self.out.write_json(STATS, stats)
        if failures:
            raise StageError(f"[{self.name}] {len(failures)} unit(s) failed: "
                             + "; ".join(f"{s}: {e.splitlines()[0] if e else '?'}" for s, e in failures.items())
                             + " -- rerun to retry them; finished units are kept")
        self.check(stats)
        self.out.write_json(DONE, {"stage": self.name, "finished": time.time(), **fp})
        print(f"[{self.name}] done: {self.summary(stats)} in {stats['seconds']:.1f}s")
        return stats

    def _check_owned(self) -> None:
        """A stage writes into, and clears, only an empty folder or its own: `dirs.card: ~/Documents` with
        --force (or two stages given one folder) would otherwise delete what is there."""
        fs = self.out.fs
        names = [n for n in self.out.glob("*")  # empty folders (a stage's constructor makes its scratch ones) aside
                 if not (fs.isdir(self.out.path(n)) and not fs.ls(self.out.path(n)))]
        if not names:
            return
        for marker in (RUN, DONE):
            if marker in names:
                owner = self.out.read_json(marker).get("stage")
                if owner in (self.name, None):  # None: a marker written before markers named their stage
                    return
                raise StageError(f"{self.out.uri} holds the {owner} stage's outputs: give {self.name} a folder "
                                 f"of its own (dirs.{self.name})")
        raise StageError(f"{self.out.uri} is not empty and holds no {self.name} outputs (e.g. {names[0]!r}): "
                         f"refusing to write or clear there; give dirs.{self.name} an empty or new folder")

    def check(self, stats: dict) -> None:
        """Refuse to mark done an outcome nothing downstream can use (stats.json is written already)."""

    def _rolled_up(self, units: list[str]) -> dict:
        done = [self.out.read_json(shard_stats_name(u)) for u in units if self.out.exists(shard_stats_name(u))]
        if units == [WHOLE]:
            return dict(done[0]) if done else {}
        return sum_counters(done)


def why_changed(prev: dict, fp: dict) -> str:
    """One phrase: which config fields changed (old → new), else which inputs."""
    if "fields" not in prev:
        return "a half-finished run of another config"
    old, new = prev["fields"], fp["fields"]
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k} {_short(old.get(k))} → {_short(new.get(k))}" for k in diff[:3])
        return f"config changed ({shown}{', …' if len(diff) > 3 else ''})"
    ins = [s for s in sorted(set(prev.get("inputs", {})) | set(fp["inputs"]))
           if prev.get("inputs", {}).get(s) != fp["inputs"].get(s)]
    return f"input changed ({', '.join(ins)})" if ins else "made by an older version"


def _short(v) -> str:
    s = "unset" if v is None else json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:37] + "…"


def plan(stages: list[Stage], found: list | None = None) -> list[str]:
    """Lines saying which finished stages a run redoes and why, one per stage whose own config or outside
    inputs changed: "balance: config changed (balance.apply_eps 0.05 → 0.1); redoing balance, cluster, …".
    `stages` in run order; each one's inputs that run before it get the fingerprint it will have (or `found`:
    `states(stages)` already taken)."""
    origin: dict[str, str] = {}                        # a redone stage -> the stage whose change causes it
    roots: dict[str, tuple[str, list[str]]] = {}       # that stage -> (why, every stage it redoes)
    for st, state, why in found if found is not None else states(stages):
        if state != "changed":
            continue
        upstream = [origin[s] for s in st.inputs if s in origin]
        root = upstream[0] if upstream and why.startswith("input changed") else st.name
        origin[st.name] = root
        roots.setdefault(root, (why, []))[1].append(st.name)
    return [f"{root}: {why}; redoing {', '.join(names)}" for root, (why, names) in roots.items()]


def states(stages: list[Stage]):
    """(stage, state, why) for `stages` in run order, as a run would find them: each one's inputs that run
    before it get the fingerprint it will have."""
    expected: dict[str, str] = {}
    for st in stages:
        fp = st.fingerprint({s: expected[s] for s in st.inputs if s in expected})
        expected[st.name] = fp["fingerprint"]
        yield (st, *st.status(fp))


def check_configs(found: list, force: bool) -> None:
    """Every later stage this run will work in checks its settings before the first one starts: a mistyped
    teacher or student was otherwise found after the download (days at web scale). The first stage checks its
    inputs, then its settings, when it runs (a stage run alone before its inputs says what to run first)."""
    for i, (st, state, _) in enumerate(found):  # found: states(the run's stages)
        if i and (force or state != "done"):
            st.check_config()
