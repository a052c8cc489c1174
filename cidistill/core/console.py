"""The console outlives its reader: a closed pipe (`cidistill run … | head`, a `tee` that died) or a terminal
that went away (EIO) stops the console output, never the job: its results and stats are on disk."""
from __future__ import annotations

import errno
import os
import sys

GONE = {errno.EPIPE, errno.EIO, errno.ENXIO, errno.EBADF}


class Console:
    """A text stream that turns silent when a write or flush finds its reader gone, after one line on the
    other stream (stderr for stdout) when that one still has a reader."""

    def __init__(self, stream, name: str, other=None):
        self._stream, self._name, self._other, self.gone = stream, name, other, False

    def write(self, text: str) -> int:
        return self._guard(self._stream.write, text) or len(text)

    def flush(self) -> None:
        self._guard(self._stream.flush)

    def _guard(self, op, *args):
        if self.gone:
            return None
        try:
            return op(*args)
        except OSError as e:
            if e.errno not in GONE:
                raise
            self.gone = True
            if self._other is not None and not getattr(self._other, "gone", False):
                try:
                    self._other.write(f"cidistill: the {self._name} reader went away ({e.strerror}); the run goes on "
                                      "without console output\n")
                    self._other.flush()
                except OSError:
                    pass
            return None

    def __getattr__(self, name):  # isatty, fileno, encoding, …: the stream's own
        return getattr(self._stream, name)


def shows_unicode(stream) -> bool:
    """Whether a text stream's encoding is UTF-8 (it can show every character)."""
    return (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "").replace("_", "") == "utf8"


def guard_console():
    """Wrap sys.stdout and sys.stderr; returns what to restore. On a console that cannot show every character
    (a non-UTF-8 locale: LC_ALL=C with Python's UTF-8 mode off, Latin-1), the ones it lacks (Chinese captions,
    →, ε) are written as escapes, never a UnicodeEncodeError that ends the run."""
    before = sys.stdout, sys.stderr
    for stream in before:
        if stream is not None and hasattr(stream, "reconfigure") and not shows_unicode(stream):
            stream.reconfigure(errors="backslashreplace")
    if sys.stderr is not None and not isinstance(sys.stderr, Console):
        sys.stderr = Console(sys.stderr, "stderr")
    if sys.stdout is not None and not isinstance(sys.stdout, Console):
        sys.stdout = Console(sys.stdout, "console", other=sys.stderr)
    return before


def release_console(before) -> None:
    """The streams from before guard_console. A stream whose reader went away gets /dev/null on its file
    descriptor: the interpreter's last flush of it would print a BrokenPipeError at exit."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, Console) and stream.gone:
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass
    sys.stdout, sys.stderr = before
