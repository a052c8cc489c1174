"""How one image is fetched, in place of img2dataset's `download_image` (same signature and return value):
redirects are checked against `data.allowed_schemes`, only public addresses are connected to (unless
`data.allow_private_addresses`), each URL has a wall-clock deadline and a size cap, and every failure is
classified as transient (refused, reset, timeout, DNS, 5xx: worth another attempt) or permanent (4xx, opted
out, too large, a disallowed scheme, an address that is not public)."""
from __future__ import annotations

import http.client
import io
import ipaddress
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

TRANSIENT = re.compile(
    r"refused|reset|timed? ?out|timeout|temporary failure|name or service not known|nodename nor servname|"
    r"no route to host|network is unreachable|remote end closed|connection aborted|broken pipe|eof occurred|"
    r"incompleteread|http error 5\d\d|http error 429|errno (101|104|110|111|113)", re.I)
REDIRECT_REJECTED = "redirect to a disallowed scheme"
TOO_LARGE = "response larger than data.max_bytes"
DEADLINE = "deadline exceeded (data.deadline)"
NOT_PUBLIC = "address not public"


def is_transient(error: str | None) -> bool:
    """A failure worth another attempt later; the rest (4xx, not an image, opted out, limits) are final."""
    return bool(error) and not error.startswith((REDIRECT_REJECTED, TOO_LARGE, NOT_PUBLIC)) and \
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


class NotPublic(OSError):
    """A URL whose host is (or resolves to) a loopback, private, link-local or other non-global address."""


def is_public(address: str) -> bool:
    """A globally routable unicast address: not loopback, private, link-local (169.254.169.254, a cloud node's
    metadata and credentials), carrier-grade NAT, reserved or multicast; IPv4-mapped IPv6 as its IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _public_addresses(host: str, port) -> list:
    """getaddrinfo's answers for host, refused (NotPublic) if any of them is not public."""
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    for info in infos:
        address = info[4][0]
        if not is_public(address):
            named = address if host.strip("[]") == address else f"{host} is {address}"
            raise NotPublic(f"{NOT_PUBLIC}: {named} (data.allow_private_addresses)")
    return infos


def _connect_public(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
    """socket.create_connection to the addresses checked: the name is looked up once, so a second lookup
    cannot turn it private (DNS rebinding), and nothing is sent to an address that is not public."""
    err: OSError | None = None
    for family, kind, proto, _, sockaddr in _public_addresses(*address):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise err or OSError(f"getaddrinfo returned nothing for {address[0]}")


class _PublicSockets:
    """http.client connections whose sockets come from _connect_public (http.client sets the factory per instance)."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = _connect_public


class _PublicHTTPConnection(_PublicSockets, http.client.HTTPConnection):
    pass


class _PublicHTTPSConnection(_PublicSockets, http.client.HTTPSConnection):
    pass


def _connection(public, plain, req):
    """The connection class for req. Through a proxy (http_proxy, https_proxy) the socket goes to the proxy,
    so the URL's own host is checked by a lookup here instead (the proxy looks it up again)."""
    if req.has_proxy() or getattr(req, "_tunnel_host", None):
        _public_addresses(urllib.parse.urlsplit(req.full_url).hostname or "", None)
        return plain
    return public


class _PublicHTTP(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_connection(_PublicHTTPConnection, http.client.HTTPConnection, req), req)


class _PublicHTTPS(urllib.request.HTTPSHandler):
    def https_open(self, req):
        tls = {"context": self._context}
        if getattr(self, "_check_hostname", None) is not None:  # Python < 3.12
            tls["check_hostname"] = self._check_hostname
        return self.do_open(_connection(_PublicHTTPSConnection, http.client.HTTPSConnection, req), req, **tls)


_URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"<>`{}')


def as_sent(url: str) -> str:
    """The URL as a browser sends it: an internationalised host in IDNA, and spaces, quotes and non-ASCII in
    the path and query percent-encoded as UTF-8 (urllib refuses them: "URL can't contain control characters",
    "'ascii' codec can't encode"); escapes already there are kept, an ASCII URL is left as it is."""
    url = url.strip()
    if all(c in _URL_SAFE for c in url):
        return url
    p = urllib.parse.urlsplit(url)
    netloc = p.netloc
    if not netloc.isascii():
        user, at, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":")  # an IPv6 literal is ASCII: never here
        netloc = f"{user}{at}{host.encode('idna').decode('ascii')}{colon}{port}"
    path, query = (urllib.parse.quote(x, safe=_URL_SAFE) for x in (p.path, p.query))
    return urllib.parse.urlunsplit((p.scheme, netloc, path, query, ""))


def make_fetcher(allowed_schemes, deadline: float, max_bytes: int, allow_private: bool = False):
    """A `download_image(row, timeout, user_agent_token, disallowed_header_directives)` for img2dataset."""
    from img2dataset.downloader import is_disallowed

    handlers = [_SchemeCheckingRedirects({s.lower() for s in allowed_schemes})]
    if not allow_private:  # every connection, redirects included
        handlers += [_PublicHTTP(), _PublicHTTPS()]
    opener = urllib.request.build_opener(*handlers)

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):
        key, url = row
        agent = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
        if user_agent_token:
            agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
        start = time.monotonic()
        try:
            request = urllib.request.Request(as_sent(url), data=None, headers={"User-Agent": agent})
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
            reason = err if isinstance(err, NotPublic) else getattr(err, "reason", None)
            own = isinstance(reason, NotPublic) or isinstance(reason, str) and REDIRECT_REJECTED in reason
            text = str(reason) if own else str(err)
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
