"""Fault injection for the reliability tests (off unless the environment asks for it).

    CIDISTILL_KILL_AT=embed:3     SIGKILL this process the 3rd time the embed stage passes a kill point
    CIDISTILL_KILL_AT=balance/rules:2   ... the 2nd time inside that stage's step `rules` (`set_phase`)
    CIDISTILL_KILL_ONCE=FILE      kill only if FILE does not exist yet (and create it): a worker that dies
                                  once, so that the retry succeeds
    CIDISTILL_FAULT_LOG=FILE      at exit, write how many kill points each stage passed (to draw points from)

Ray tasks get these variables from `ray_env()` with the stage named `STAGE@worker`, so `download@worker:1`
kills the first Ray worker to pass a download kill point and leaves the driver alone.

Kill points sit where a crash hurts most: inside every atomic write (temp file written, not yet renamed),
between training steps and checkpoint renames, and around export's folder rename."""
from __future__ import annotations

import atexit
import json
import os
import signal
from collections import Counter

_stage = os.environ.get("CIDISTILL_STAGE", "none")
_VARS = ("CIDISTILL_KILL_AT", "CIDISTILL_KILL_ONCE", "CIDISTILL_FAULT_LOG")
_phase = ""
_passed: Counter = Counter()


def set_stage(name: str) -> None:
    global _stage
    _stage = name


def set_phase(name: str) -> None:
    """A step inside the current stage: its kill points are also counted as `stage/step` (in this process)."""
    global _phase
    _phase = name


def current_stage() -> str:
    return _stage


def point() -> None:
    spec = os.environ.get("CIDISTILL_KILL_AT")
    if not spec and not os.environ.get("CIDISTILL_FAULT_LOG"):
        return
    _passed[_stage] += 1
    here = [_stage]
    if _phase:
        here.append(f"{_stage}/{_phase}")
        _passed[here[1]] += 1
    if spec:
        stage, _, n = spec.rpartition(":")
        if stage in here and _passed[stage] == int(n):
            once = os.environ.get("CIDISTILL_KILL_ONCE")
            if once:
                if os.path.exists(once):
                    return
                open(once, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def ray_env() -> dict:
    """Environment for Ray tasks: the fault variables (when set) and the stage they run for."""
    env = {k: os.environ[k] for k in _VARS if os.environ.get(k)}
    return dict(env, CIDISTILL_STAGE=f"{_stage}@worker") if env else {}  # "embed@worker:1": workers only


@atexit.register
def _write_log() -> None:
    path = os.environ.get("CIDISTILL_FAULT_LOG")
    if path and _passed:
        with open(path, "w") as f:
            json.dump(dict(_passed), f)
