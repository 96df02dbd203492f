"""The subscribers' HTTP: the only module that calls a webhook's URL.

A subscriber is anybody's server: it may hang, trickle its answer a byte at a
time, redirect to somewhere else, answer with megabytes, or be a name that
resolves to an address inside our own network. So:
- an attempt has one deadline for all of it (connect, send, the status line,
  the body), not a timeout per read that a trickle could renew forever;
- a redirect is not followed (its status is the answer);
- at most BODY_LIMIT bytes of an answer are read, and KEPT characters kept;
- outside the local stage a URL must be https and neither name nor resolve to a
  loopback, private, link-local or reserved address, checked when it is saved
  and again at each attempt (a name may resolve elsewhere later), and the
  connection goes to the address that was checked.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

log = logging.getLogger(__name__)

BODY_LIMIT = 64 * 1024  # bytes of an answer read at most
KEPT = 200  # characters of an answer kept in the delivery log
MAX_URL = 2048
_CHUNK = 8192

Resolve = Callable[[str], list[str]]


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (timeout, refused, DNS, TLS)
    ms: int
    body: str  # the answer's first KEPT characters, or why there was none
    error: str | None = None  # why it failed apart from its status

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and self.error is None


def _resolve(host: str) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None,
                                                                   type=socket.SOCK_STREAM)})


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified or not ip.is_global)


def _parts(url: str, *, local: bool) -> SplitResult:
    if len(url) > MAX_URL:
        raise ValueError(f"longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be http or https" if local else "must be https")
    if not local and parts.scheme != "https":
        raise ValueError("must be https outside the local stage")
    if not parts.hostname:
        raise ValueError("has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user or password")
    if parts.fragment:
        raise ValueError("must not have a fragment")
    if any(c.isspace() for c in url):
        raise ValueError("must not contain spaces")
    return parts


def _checked_address(host: str, resolve: Resolve) -> str:
    """The address to connect to: the host itself when it is an address, else the
    first it resolves to; ValueError when any of them is not a public address."""
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        raise ValueError("must not name this machine")
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        addresses = []
    if not addresses:
        try:
            addresses = resolve(host)
        except OSError as exc:
            raise ValueError(f"host {host!r} does not resolve: {exc}") from exc
        if not addresses:
            raise ValueError(f"host {host!r} does not resolve")
    for address in addresses:
        if not _public(address):
            raise ValueError(f"host {host!r} is (or resolves to) {address}, not a public "
                             "address")
    return addresses[0]


def check_url(url: str, *, local: bool, resolve: Resolve | None = None) -> str:
    """The URL, stripped; ValueError with a reason a person can read when webhooks
    may not call it (see the module's docstring)."""
    url = url.strip()
    parts = _parts(url, local=local)
    if not local:
        _checked_address(str(parts.hostname), resolve or _resolve)
    return url


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with SNI and the certificate for the URL's host."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class HttpSender:
    """The webhook port over http.client."""

    def __init__(self, *, local: bool, resolve: Resolve | None = None) -> None:
        self.local = local
        self._resolve = resolve or _resolve

    def check_url(self, url: str) -> str:
        return check_url(url, local=self.local, resolve=self._resolve)

    def post(self, url: str, body: bytes, headers: Mapping[str, str], *,
             timeout: float) -> Answer:
        """One POST; never raises for what the subscriber or the network does."""
        started = time.monotonic()
        deadline = started + timeout

        def ms() -> int:
            return int((time.monotonic() - started) * 1000)

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no whole answer within {timeout:g} s")
            return remaining

        try:
            parts = _parts(url, local=self.local)
            host = str(parts.hostname)
            address = host if self.local else _checked_address(host, self._resolve)
        except ValueError as exc:
            return Answer(None, ms(), "", f"refused: {exc}")
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        kind = _PinnedHTTPS if https else _PinnedHTTP
        conn = kind(host, address, port, timeout=left())
        try:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for name, value in {**headers, "Content-Length": str(len(body)),
                                "Connection": "close"}.items():
                conn.putheader(name, value)
            conn.endheaders()
            # the response reads through this socket after the connection lets go of it
            sock = conn.sock
            assert sock is not None
            sock.settimeout(left())
            conn.send(body)
            sock.settimeout(left())
            response = conn.getresponse()
            read = b""
            while len(read) <= BODY_LIMIT:
                sock.settimeout(left())
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                read += chunk
            text = read[:BODY_LIMIT].decode("utf-8", errors="replace")[:KEPT]
            error = None
            if len(read) > BODY_LIMIT:
                error = f"answer over {BODY_LIMIT} bytes"
            elif 300 <= response.status < 400:
                error = "redirect not followed"
            return Answer(response.status, ms(), text, error)
        except TimeoutError as exc:
            return Answer(None, ms(), "", f"timed out after {timeout:g} s ({exc})")
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            return Answer(None, ms(), "", f"no answer: {exc!r}"[:KEPT])
        finally:
            conn.close()
