"""The stage registry: the nine stages by name, in run order, and the multi-stage runner that says which
finished stages it redoes and why before it starts."""
from __future__ import annotations

import time

from cidistill.core import faults
from cidistill.core.config import STAGES, Config, ConfigError
from cidistill.core.errors import StageError, raise_if_stopped
from cidistill.core.lock import work_lock
from cidistill.core.runtime import init_ray
from cidistill.core.stage import Stage, check_configs, plan, states
from cidistill.core.store import use_storage_options
from data_cards.render import CardStage
from kd.stages import EvalStage, ExportStage, TrainStage
from pipeline.balance import BalanceStage
from pipeline.cluster import ClusterStage
from pipeline.download import DownloadStage
from pipeline.embed import EmbedStage
from pipeline.pack import PackStage

STAGE_CLASSES: dict[str, type[Stage]] = {c.name: c for c in (
    DownloadStage, EmbedStage, BalanceStage, ClusterStage, PackStage, TrainStage, EvalStage, ExportStage, CardStage)}
assert tuple(STAGE_CLASSES) == STAGES


def make_stage(name: str, cfg: Config, use_ray: bool = True) -> Stage:
    return STAGE_CLASSES[name](cfg, use_ray=use_ray)


def run_stage(name: str, cfg: Config, force: bool = False, use_ray: bool = True) -> dict:
    faults.set_stage(name)
    return make_stage(name, cfg, use_ray).run(force=force)


def checked_stages(stages: list[str]) -> list[str]:
    """`stages` in pipeline order; a name that is no stage is a one-line error."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"unknown stage(s) {bad}; known: {' '.join(STAGES)}")
    return sorted(stages, key=STAGES.index)


def run_stages(cfg: Config, stages: list[str], force: bool = False, use_ray: bool = True) -> dict:
    """Run `stages` in pipeline order: finished ones whose fingerprint still matches are skipped, the others
    (and what depends on them) are redone, with one line per cause first."""
    stages = checked_stages(stages)
    if use_ray:
        check_shared(cfg, stages)
    use_storage_options(cfg.storage_options)
    with work_lock(cfg.workdir):
        if use_ray:
            init_ray(cfg.ray_address or None)
        objs = [make_stage(s, cfg, use_ray) for s in stages]
        check_upstream(cfg, stages)
        found = list(states(objs))  # each stage's fingerprint once (the download's lists the URL files)
        check_configs(found, force)
        if not force:
            for line in plan(objs, found):
                print(f"[cidistill] {line}")
        t0, out = time.time(), {}
        for st in objs:
            raise_if_stopped()
            faults.set_stage(st.name)
            out[st.name] = st.run(force=force)
        faults.set_stage("none")  # not on an error: the CLI names the stage that failed
    print(closing_line([st.name for st in objs if st.redone], len(objs), time.time() - t0))
    return out


def closing_line(ran: list[str], total: int, seconds: float) -> str:
    """Names only the stages that did work (it listed the skipped ones as finished too)."""
    if not ran:
        return f"[cidistill] nothing to redo: the {total} stage(s) were done ({seconds:.1f}s)"
    were_done = f"; {total - len(ran)} were done" if len(ran) < total else ""
    return f"[cidistill] {len(ran)} stage(s) {', '.join(ran)} finished in {seconds:.1f}s{were_done}"


def check_shared(cfg: Config, stages: list[str]) -> None:
    """Ray workers write the stages' folders from other processes: a folder only this process can see
    (fsspec's memory://) would fail inside every task with a traceback."""
    for key, root in [("workdir", cfg.workdir)] + [(f"dirs.{s}", cfg.dirs[s]) for s in stages if s in cfg.dirs]:
        if str(root).startswith("memory://"):
            raise ConfigError(f"{key}: {root} is fsspec's in-memory filesystem, which this process alone sees; the "
                              "stages run in Ray workers too: use a local folder or object storage (or --no-ray)")


def check_upstream(cfg: Config, stages: list[str]) -> None:
    """A stage run without the stages it reads from (`cidistill eval`) refuses finished inputs that the
    config would now make differently (another data.holdout, balance setting, ...): it would read stale
    outputs. Those are redone by a run that includes them."""
    todo = [i for s in stages for i in STAGE_CLASSES[s].inputs if i not in stages]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        st = make_stage(name, cfg, use_ray=False)
        try:
            state, why = st.status(st.fingerprint())
        except (StageError, OSError):  # an input it cannot judge (the URL list moved away): the stage's own checks
            continue
        if state == "changed":
            need = STAGES[STAGES.index(name):STAGES.index(stages[-1]) + 1]
            raise StageError(f"{stages[0]} reads {name}, which is out of date: {why}; "
                             f"run `cidistill run CONFIG --stages {' '.join(need)}`")
        todo += [i for i in st.inputs if i not in stages]
