"""Errors a user acts on: the CLI prints them as one line (exit 2), never as a traceback."""


class StageError(RuntimeError):
    """A stage cannot do its job (missing input, bad data, wrong settings); the message says what to do."""


class ModelLoadError(StageError, ValueError):
    """A model or its weights cannot be loaded as named (unknown name, missing file, wrong shapes)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler stopping the job): the run stops as Ctrl-C stops it."""
