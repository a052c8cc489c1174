"""The per-URL fetch that img2dataset calls (pipeline/fetch.py), against real servers on 127.0.0.1: a redirect
to another scheme is refused before any connection, a trickling server meets the deadline, a huge response
the size cap, and failures are sorted into transient and permanent."""
import http.server
import socket
import threading
import time

import pytest

from pipeline.fetch import DEADLINE, REDIRECT_REJECTED, TOO_LARGE, is_transient, make_fetcher


class _Handler(http.server.BaseHTTPRequestHandler):
    ftp_port = 0

    def do_GET(self):  # noqa: N802
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", f"ftp://127.0.0.1:{self.ftp_port}/x.png")
            self.end_headers()
        elif self.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(40):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.25)
        elif self.path.startswith("/big"):
            self.send_response(200)
            if self.path == "/big":
                self.send_header("Content-Length", str(300 << 20))
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * (64 << 10))
            except OSError:
                return
        elif self.path == "/503":
            self.send_error(503)
        elif self.path == "/ok":
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture()
def site():
    ftp = socket.socket()
    ftp.bind(("127.0.0.1", 0))
    ftp.listen(1)
    ftp.settimeout(0.2)
    _Handler.ftp_port = ftp.getsockname()[1]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", ftp
    srv.shutdown()
    srv.server_close()
    ftp.close()


def _get(fetch, url):
    return fetch((7, url), 5, "cidistill", None)


def test_redirect_to_another_scheme_is_refused_before_connecting(site):
    base, ftp = site
    key, body, err = _get(make_fetcher(["http", "https"], 30, 1 << 20), f"{base}/redirect")
    assert key == 7 and body is None and err.startswith(REDIRECT_REJECTED) and "ftp://" in err
    with pytest.raises(socket.timeout):
        ftp.accept()          # nothing ever connected to the "FTP server"
    assert not is_transient(err)


def test_deadline_and_size_cap(site):
    base, _ = site
    fetch = make_fetcher(["http"], 1.5, 1 << 20)
    t0 = time.time()
    _, body, err = _get(fetch, f"{base}/trickle")           # 1 byte every 0.25 s: each read is in time
    assert body is None and err.startswith(DEADLINE) and time.time() - t0 < 4 and is_transient(err)
    _, body, err = _get(fetch, f"{base}/big")               # declared 300 MB: refused unread
    assert body is None and err.startswith(TOO_LARGE) and "314572800" in err and not is_transient(err)
    _, body, err = _get(fetch, f"{base}/big-chunked")       # no length: cut at the cap
    assert body is None and err.startswith(TOO_LARGE)
    _, body, err = _get(fetch, f"{base}/ok")
    assert err is None and body.read() == b"hello"


def test_transient_and_permanent_failures(site):
    base, _ = site
    fetch = make_fetcher(["http"], 30, 1 << 20)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                                           # nothing listens there: connection refused
    assert is_transient(_get(fetch, f"http://127.0.0.1:{port}/x.png")[2])
    assert is_transient(_get(fetch, f"{base}/503")[2])
    err404 = _get(fetch, f"{base}/missing.png")[2]
    assert "404" in err404 and not is_transient(err404)
    assert not is_transient("Use of image disallowed by X-Robots-Tag directive")
