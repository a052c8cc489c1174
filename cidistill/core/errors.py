"""Errors a user acts on: the CLI prints them as one line (exit 2), never as a traceback."""
import errno
import threading

# an output that cannot be written (disk or quota full, read-only or unwritable folder): the CLI's exit 3
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def is_write_error(e: BaseException | None) -> bool:
    return isinstance(e, PermissionError) or (isinstance(e, OSError) and e.errno in WRITE_ERRNOS)


class StageError(RuntimeError):
    """A stage cannot do its job (missing input, bad data, wrong settings); the message says what to do."""


class ModelLoadError(StageError, ValueError):
    """A model or its weights cannot be loaded as named (unknown name, missing file, wrong shapes)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler stopping the job): the run stops as Ctrl-C stops it."""


_stop_asked = threading.Event()  # the CLI's SIGTERM handler ran during the command now running


def ask_stop() -> None:
    _stop_asked.set()


def clear_stop() -> None:
    _stop_asked.clear()


def raise_if_stopped() -> None:
    """The handler's exception can be lost (C code that checks for signals and then clears the error it got):
    the run's loops look here between steps and units, so that a stop asked for is never lost."""
    if _stop_asked.is_set():
        raise Terminated()
