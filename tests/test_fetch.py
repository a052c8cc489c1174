"""The per-URL fetch that img2dataset calls (pipeline/fetch.py), against real servers on 127.0.0.1: a redirect
to another scheme is refused before any connection, an address that is not public (directly, by a redirect or
through a proxy) is never connected to, a trickling server meets the deadline, a huge response the size cap,
and failures are sorted into transient and permanent."""
import http.server
import socket
import threading
import time

import pytest

from pipeline import fetch as fetch_module
from pipeline.fetch import (DEADLINE, NOT_PUBLIC, REDIRECT_REJECTED, TOO_LARGE, as_sent, is_public, is_transient,
                           make_fetcher)


class _Handler(http.server.BaseHTTPRequestHandler):
    ftp_port = 0
    seen: list = []       # every request's path, in order (a proxy's requests carry the whole URL)

    def do_GET(self):  # noqa: N802
        _Handler.seen.append(self.path)
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
        elif self.path.startswith("/to/"):         # /to/HOST:PORT: a redirect there
            self.send_response(302)
            self.send_header("Location", f"http://{self.path[4:]}/ok")
            self.end_headers()
        elif self.path.endswith("/ok"):
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
    key, body, err = _get(make_fetcher(["http", "https"], 30, 1 << 20, allow_private=True), f"{base}/redirect")
    assert key == 7 and body is None and err.startswith(REDIRECT_REJECTED) and "ftp://" in err
    with pytest.raises(socket.timeout):
        ftp.accept()          # nothing ever connected to the "FTP server"
    assert not is_transient(err)


def test_deadline_and_size_cap(site):
    base, _ = site
    fetch = make_fetcher(["http"], 1.5, 1 << 20, allow_private=True)
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
    fetch = make_fetcher(["http"], 30, 1 << 20, allow_private=True)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                                           # nothing listens there: connection refused
    assert is_transient(_get(fetch, f"http://127.0.0.1:{port}/x.png")[2])
    assert is_transient(_get(fetch, f"{base}/503")[2])
    err404 = _get(fetch, f"{base}/missing.png")[2]
    assert "404" in err404 and not is_transient(err404)
    assert not is_transient("Use of image disallowed by X-Robots-Tag directive")


def test_an_address_that_is_not_public_is_never_connected_to(site, monkeypatch):
    """A URL list from the web may name a cloud node's metadata service (169.254.169.254: its credentials),
    loopback or hosts inside the cluster's network, directly, by a redirect, or by a name that resolves there.
    By default none is connected to: a permanent failure naming `data.allow_private_addresses`."""
    base, _ = site
    port = int(base.rsplit(":", 1)[1])
    for a in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
              "224.0.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254"):
        assert not is_public(a), a
    assert is_public("93.184.216.34") and is_public("2606:2800:220:1:248:1893:25c8:1946")
    fetch = make_fetcher(["http", "https"], 30, 1 << 20)
    _Handler.seen.clear()
    for url in (f"{base}/ok", f"http://localhost:{port}/ok", f"http://[::ffff:127.0.0.1]:{port}/ok",
                f"https://127.0.0.1:{port}/ok", "http://169.254.169.254/latest/meta-data/iam/"):
        t0 = time.time()
        key, body, err = _get(fetch, url)
        assert body is None and err.startswith(NOT_PUBLIC) and "data.allow_private_addresses" in err, (url, err)
        assert not is_transient(err) and time.time() - t0 < 2, url   # refused at once, never retried
    assert "169.254.169.254" in err and _Handler.seen == []          # the server saw no request
    assert make_fetcher(["http"], 30, 1 << 20, allow_private=True)((7, f"{base}/ok"), 5, "", None)[1].read() == b"hello"

    # a redirect to a private address: 127.0.0.1 plays a public host here, 127.0.0.2 a private one
    monkeypatch.setattr(fetch_module, "is_public", lambda a: a == "127.0.0.1")
    inner = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Handler)
    threading.Thread(target=inner.serve_forever, daemon=True).start()
    try:
        _Handler.seen.clear()
        _, body, err = _get(make_fetcher(["http"], 30, 1 << 20), f"{base}/to/127.0.0.2:{inner.server_address[1]}")
        assert body is None and err == f"{NOT_PUBLIC}: 127.0.0.2 (data.allow_private_addresses)"
        assert _Handler.seen == [f"/to/127.0.0.2:{inner.server_address[1]}"]   # the inner server saw nothing
    finally:
        inner.shutdown()
        inner.server_close()

    # through a proxy (http_proxy): the socket goes to the proxy, so the URL's own host is checked
    for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", base)
    proxied = make_fetcher(["http"], 30, 1 << 20)
    _Handler.seen.clear()
    _, body, err = _get(proxied, "http://10.1.2.3/x.png")
    assert body is None and err == f"{NOT_PUBLIC}: 10.1.2.3 (data.allow_private_addresses)" and _Handler.seen == []
    _, body, err = _get(proxied, "http://127.0.0.1:1/ok")              # "public" here: fetched via the proxy
    assert err is None and body.read() == b"hello" and _Handler.seen == ["http://127.0.0.1:1/ok"]


def test_a_url_with_spaces_or_non_ascii_is_sent_as_a_browser_sends_it(site):
    """A Chinese site's image path, a space, an accented query, an internationalised host: urllib refused each
    ("URL can't contain control characters", "'ascii' codec can't encode"), a permanent failure, so a
    bilingual list lost such pairs. They are percent-encoded as UTF-8 (the host in IDNA), as browsers do."""
    base, _ = site
    _Handler.seen.clear()
    _, body, err = _get(make_fetcher(["http"], 30, 1 << 20, allow_private=True), f"{base}/图片 1/ok")
    assert err is None and body.read() == b"hello" and _Handler.seen == ["/%E5%9B%BE%E7%89%87%201/ok"]
    assert as_sent("http://例子.测试/a b.png?q=ü&r=%20#top") == "http://xn--fsqu00a.xn--0zwm56d/a%20b.png?q=%C3%BC&r=%20"
    assert as_sent(" https://a.com/x.png?s=1&t=%2F ") == "https://a.com/x.png?s=1&t=%2F"   # ASCII: as it is
    assert as_sent('http://user@bücher.de:8080/"x"') == "http://user@xn--bcher-kva.de:8080/%22x%22"
