"""One run per work folder: `WORKDIR/_LOCK.json` names the holder (host, pid, start). A second run refuses at
once; a lock whose process is gone (same host, pid not running) is taken over. Nested use in one process is fine."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from .errors import StageError
from .store import DamagedFile, Store, open_checked

LOCK = "_LOCK.json"
_held: dict[str, int] = {}   # work folder -> nesting depth in this process


class WorkdirBusy(StageError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def _claim(store: Store, me: dict) -> dict | None:
    """Write the lock if nobody holds it; else return the holder. Atomic and whole: on a local folder the lock
    is written under a temporary name and hard-linked into place (a link fails when the lock exists; O_EXCL
    where links are not allowed); on an object store a create-only PUT."""
    body = json.dumps(me).encode()
    if store.local:
        tmp = store.path(f"{LOCK}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(body)
        try:
            os.link(tmp, store.path(LOCK))
        except FileExistsError:
            return _holder(store)
        except OSError:  # a filesystem without hard links: create-exclusive, then write
            try:
                fd = os.open(store.path(LOCK), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return _holder(store)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
        finally:
            os.unlink(tmp)
        return None
    try:  # an object store: a conditional PUT (If-None-Match), refused when the lock object exists
        store.fs.pipe_file(store.path(LOCK), body, mode="create")
    except FileExistsError:
        return _holder(store)
    return None


def _holder(store: Store) -> dict:
    """The lock's holder; {"damaged": True} for a lock that stays unreadable (empty or cut short: a run killed
    as it wrote it, before locks were written whole), which no run holds."""
    for wait in (0.5, 1.0, 0.0):
        try:
            return store.read_json(LOCK)
        except DamagedFile:
            time.sleep(wait)  # a run writing it this moment (create-exclusive, then write)
        except FileNotFoundError:  # released meanwhile: as if held (the caller tries again only once)
            return {"damaged": True}
    return {"damaged": True}


@contextlib.contextmanager
def work_lock(workdir: str):
    if _held.get(workdir):
        _held[workdir] += 1
        try:
            yield
        finally:
            _held[workdir] -= 1
        return
    store = open_checked(workdir)  # the first contact with the store: bad credentials fail here, in one line
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    holder = _claim(store, me)
    if holder is not None:
        damaged = holder.get("damaged", False)
        stale = damaged or holder.get("host") == me["host"] and not _alive(int(holder.get("pid", 0)))
        if not stale:
            raise WorkdirBusy(f"{workdir} is in use by another run (host {holder.get('host')}, pid {holder.get('pid')}, "
                              f"started {holder.get('started')}); wait for it, or remove {LOCK} there if it is gone")
        print("[cidistill] taking over a damaged lock (empty or cut short: a run killed as it took it)" if damaged else
              f"[cidistill] taking over the lock of a run that is gone (pid {holder.get('pid')}, "
              f"started {holder.get('started')})")
        store.rm(LOCK)
        if _claim(store, me) is not None:
            raise WorkdirBusy(f"{workdir}: another run took the lock first")
    _held[workdir] = 1
    try:
        yield
    finally:
        _held.pop(workdir, None)
        store.rm(LOCK)
