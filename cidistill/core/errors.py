"""Errors a user acts on: the CLI prints them as one line (exit 2), never as a traceback."""
import errno

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
