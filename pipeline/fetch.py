"""How one image is fetched, in place of img2dataset's `download_image` (same signature and return value):
redirects are checked against `data.allowed_schemes`, each URL has a wall-clock deadline and a size cap, and
every failure is classified as transient (refused, reset, timeout, DNS, 5xx: worth another attempt) or
permanent (4xx, opted out, too large, a disallowed scheme)."""
from __future__ import annotations

import io
import re
import socket
import time
import urllib.error
import urllib.request

TRANSIENT = re.compile(
    r"refused|reset|timed? ?out|timeout|temporary failure|name or service not known|nodename nor servname|"
    r"no route to host|network is unreachable|remote end closed|connection aborted|broken pipe|eof occurred|"
    r"incompleteread|http error 5\d\d|http error 429|errno (101|104|110|111|113)", re.I)
REDIRECT_REJECTED = "redirect to a disallowed scheme"
TOO_LARGE = "response larger than data.max_bytes"
DEADLINE = "deadline exceeded (data.deadline)"


def is_transient(error: str | None) -> bool:
    """A failure worth another attempt later; the rest (4xx, not an image, opted out, limits) are final."""
    return bool(error) and not error.startswith((REDIRECT_REJECTED, TOO_LARGE)) and \
        (error.startswith(DEADLINE) or bool(TRANSIENT.search(error)))


class _SchemeCheckingRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allowed: set[str]):
        super().__init__()
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in self.allowed:
            raise urllib.error.URLError(f"{REDIRECT_REJECTED} ({scheme}://)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def make_fetcher(allowed_schemes, deadline: float, max_bytes: int):
    """A `download_image(row, timeout, user_agent_token, disallowed_header_directives)` for img2dataset."""
    from img2dataset.downloader import is_disallowed

    opener = urllib.request.build_opener(_SchemeCheckingRedirects({s.lower() for s in allowed_schemes}))

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
        if user_agent_token:
            agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
        start = time.monotonic()
        try:
            request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
            with opener.open(request, timeout=timeout) as r:
                if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                                  disallowed_header_directives):
                    return key, None, "Use of image disallowed by X-Robots-Tag directive"
                size = r.headers.get("Content-Length")
                if size and size.isdigit() and int(size) > max_bytes:
                    return key, None, f"{TOO_LARGE} ({int(size)} > {max_bytes} bytes)"
                return key, _read_capped(r, start, deadline, max_bytes), None
        except _Refused as e:
            return key, None, str(e)
        except Exception as err:  # noqa: BLE001  (img2dataset's contract: every failure is a message)
            reason = getattr(err, "reason", None)
            text = str(reason) if isinstance(reason, str) and REDIRECT_REJECTED in reason else str(err)
            return key, None, text

    return download_image


class _Refused(Exception):
    pass


def _read_capped(r, start: float, deadline: float, max_bytes: int) -> io.BytesIO:
    """The body in chunks: past max_bytes or past the deadline (a server that trickles) it is refused."""
    buf = io.BytesIO()
    while True:
        if time.monotonic() - start > deadline:
            raise _Refused(f"{DEADLINE}: {deadline:g} s")
        try:  # read1: whatever one receive brings, so a server that trickles bytes meets the deadline
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
        except socket.timeout:
            raise _Refused(f"{DEADLINE}: {deadline:g} s") from None
        if not chunk:
            break
        buf.write(chunk)
        if buf.tell() > max_bytes:
            raise _Refused(f"{TOO_LARGE} (over {max_bytes} bytes)")
    buf.seek(0)
    return buf
