"""The subscribers' HTTP: the only module that calls a webhook's URL.

A subscriber is anybody's server: it may hang, trickle its answer a byte at a
time, redirect somewhere else, answer with megabytes, or be a name that
resolves to an address inside our own network (the metadata service, the
broker, DynamoDB's endpoint). So:
- an attempt has one deadline for all of it (DNS, connect, TLS, send, the status
  line and headers, the body): before every blocking socket call the socket's
  timeout is set to what is left, so a trickle cannot renew a per-read timeout
  forever and a worker is never held longer than the attempt's `timeout`;
- a redirect is not followed (its status is the answer, and not a success):
  following one would let a public URL send us to an inside address;
- at most BODY_LIMIT bytes of an answer are read and KEPT characters kept: the
  delivery log is for a person, and megabytes must not cost a worker memory;
- outside the local stage a URL must be https and neither name nor resolve to a
  loopback, private, link-local, multicast or reserved address. That is checked
  when the URL is saved and again at each attempt (DNS may change meanwhile),
  and the connection goes to the very address that was checked (no second
  lookup that could answer differently), with the URL's host in the Host header
  and in TLS (SNI and the certificate's check).
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, quote, urlsplit

from chalicelib.domain.webhooks import KEPT, MAX_URL  # the log's measure, a URL's most

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger(__name__)

BODY_LIMIT = 64 * 1024  # bytes of a subscriber's answer read at most
_CHUNK = 8192  # bytes sent or read per blocking call (each one re-arms the deadline)

Resolve = Callable[[str], list[str]]

# A host whose last label is a number is an IPv4 address in one of the forms
# inet_aton takes ("127.1", "2130706433", "0x7f.0.0.1"): no TLD is numeric, so
# such a name is an address in disguise, refused rather than guessed at.
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
# Characters a request target may carry as they are (RFC 3986 pchar and query);
# anything else (non-ASCII, quotes, braces) is percent-encoded, not refused.
_TARGET_SAFE = "/?:@!$&'()*+,;=%"
# IPv6 prefixes that carry an IPv4 address inside (NAT64's well-known prefix).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@dataclass(frozen=True)
class Answer:
    """What one POST to a subscriber came to: the delivery log keeps it and a
    delivery is done only when it is `ok`."""

    status: int | None  # HTTP status, None when no (whole) answer: timeout, refused, DNS, TLS
    ms: int  # wall time of the attempt, milliseconds
    body: str  # the answer's first KEPT characters, or the error text when no answer
    error: str | None = None  # why it failed apart from its status

    @property
    def ok(self) -> bool:
        """A 2xx with nothing wrong with it (a 2xx cut at BODY_LIMIT is not: the
        subscriber did not answer as a webhook endpoint should)."""
        return self.status is not None and 200 <= self.status < 300 and self.error is None


# --- which URLs may be called ---------------------------------------------------


def _getaddrinfo(host: str) -> list[str]:
    """The host's addresses in getaddrinfo's order of preference, once each."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4, Teredo or NAT64 address carries, if any: the
    packets end up there, so it is judged too."""
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _not_public(address: str) -> str | None:
    """Why `address` is not one a webhook may reach, or None when it may."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 is 127.0.0.1 on a dual-stack socket: judged as that alone
        if ip.ipv4_mapped is not None:
            why = _not_public(str(ip.ipv4_mapped))
            return f"{ip.ipv4_mapped} ({why})" if why else None
        inner = _embedded_ipv4(ip)
        why = _not_public(str(inner)) if inner is not None else None
        if why:
            return f"an address carrying {inner} ({why})"
    for kind, flag in (("a loopback", ip.is_loopback), ("an unspecified", ip.is_unspecified),
                       ("a link-local", ip.is_link_local), ("a multicast", ip.is_multicast),
                       ("a private", ip.is_private), ("a reserved", ip.is_reserved)):
        if flag:
            return f"{kind} address"
    if not ip.is_global:  # shared (100.64/10), benchmarking, documentation...
        return "not a public address"
    return None


def _split(url: str, *, local: bool) -> SplitResult:
    """The URL's parts when its shape is acceptable (no DNS); ValueError says why not."""
    if not url:
        raise ValueError("the URL is empty")
    if len(url) > MAX_URL:
        raise ValueError(f"the URL is longer than {MAX_URL} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        # urlsplit would drop tabs and newlines silently: refuse what it would change
        raise ValueError("the URL must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the URL must be {'http or https' if local else 'https'}, "
                         f"not {parts.scheme or 'without a scheme'}")
    if not local and parts.scheme != "https":
        raise ValueError("the URL must be https (plain http only on the local stage)")
    if "@" in parts.netloc:
        raise ValueError("the URL must not carry credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if "#" in url:
        raise ValueError("the URL must not have a fragment (#...)")
    return parts


def _addresses(host: str, resolve: Resolve) -> list[str]:
    """The addresses to connect to for `host`, every one of them public; ValueError
    says why not. Any inside address refuses the host, not only the first: the
    resolver's order is the subscriber's to choose."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        raise ValueError(f"the host {host!r} names this machine")
    literal = True
    try:
        addresses = [str(ipaddress.ip_address(host.split("%", 1)[0]))]
    except ValueError:
        literal = False
        if _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):
            raise ValueError(f"the host {host!r} is an address in an unusual form; "
                             "write it as a.b.c.d") from None
        try:
            addresses = resolve(host)
        except TimeoutError:
            raise  # the attempt's deadline, not an answer about the name
        except (OSError, UnicodeError) as exc:
            raise ValueError(f"the host {host!r} does not resolve: {exc}") from exc
        if not addresses:
            raise ValueError(f"the host {host!r} does not resolve") from None
    for address in addresses:
        why = _not_public(address)
        if why:
            shown = host if literal else f"{host!r} (resolves to {address})"
            raise ValueError(f"the host {shown} is {why}; webhooks call public addresses only")
    return addresses


def check_url(url: str, *, local: bool, resolve: Resolve | None = None) -> str:
    """The URL, normalised (stripped); raises ValueError with a reason a person
    can read when it is not acceptable: not http/https, no host, credentials in it
    (user:pass@), a fragment, over 2048 characters. Outside the local stage
    (local=False) the scheme must be https, and the host must not be, or resolve
    to, a loopback, private, link-local, multicast, reserved or unspecified address
    (IPv4 and IPv6, IPv4-mapped included), nor 'localhost'; `resolve(host)` answers
    the host's addresses (default: socket.getaddrinfo), and a host that does not
    resolve is refused. On the local stage anything http(s) with a host is allowed.

    Called when a subscription is saved, so that a shop hears at once why its URL
    will never be called (HttpSender.post checks again at every attempt)."""
    url = url.strip()
    parts = _split(url, local=local)
    if not local:
        _addresses(str(parts.hostname), resolve or _getaddrinfo)
    return url


# --- one attempt ----------------------------------------------------------------


class _Attempt:
    """One attempt's deadline and the step it is at (for the error a person reads)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.step = "starting"
        self.status: int | None = None  # once the status line has been read

    def ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def left(self) -> float:
        """Seconds left, for the next blocking call; TimeoutError when none are."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the attempt's deadline passed")
        return remaining


class _DeadlineReader(io.RawIOBase):
    """The answer's bytes for http.client: each recv first gets what is left of the
    deadline as its timeout, so the status line, the headers and a chunked body
    (all read line by line) are bounded as the body is."""

    def __init__(self, sock: socket.socket, attempt: _Attempt) -> None:
        super().__init__()
        self._sock = sock
        self._attempt = attempt

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._sock.settimeout(self._attempt.left())
        return self._sock.recv_into(buffer)


class _DeadlineSocket:
    """The connected socket as http.client sees it: sendall in chunks, each with
    what is left of the deadline (a subscriber that reads slowly cannot stretch
    the send), and makefile reading through _DeadlineReader. Closing it is left
    to HttpSender.post: http.client closes its socket as soon as the answer says
    `Connection: close`, before the body has been read."""

    def __init__(self, sock: socket.socket, attempt: _Attempt) -> None:
        self._sock = sock
        self._attempt = attempt

    def sendall(self, data: ReadableBuffer) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _CHUNK):
            self._sock.settimeout(self._attempt.left())
            self._sock.sendall(view[start:start + _CHUNK])

    def makefile(self, mode: str = "rb", *args: object, **kwargs: object) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._attempt), _CHUNK)

    def close(self) -> None:
        pass


class _Connection(http.client.HTTPConnection):
    """http.client's connection to addresses already checked (not a second lookup
    of the host), TLS with SNI and the certificate's check on the URL's host, and
    every blocking call within the attempt's deadline."""

    def __init__(self, host: str, port: int, *, addresses: list[str],
                 tls: ssl.SSLContext | None, attempt: _Attempt) -> None:
        super().__init__(host, port)
        self.default_port = 443 if tls else 80  # the Host header names the port otherwise
        self._addresses = addresses
        self._tls = tls
        self._attempt = attempt
        self.raw: socket.socket | None = None  # closed by HttpSender.post

    def connect(self) -> None:
        attempt = self._attempt
        failure: OSError | None = None
        for address in self._addresses:  # the next one when one refuses or is unreachable
            attempt.step = f"connect to {address}"
            try:
                self.raw = socket.create_connection((address, self.port), attempt.left())
                break
            except TimeoutError:
                raise
            except OSError as exc:
                failure = exc
        if self.raw is None:
            raise failure or OSError("no address to connect to")
        if self._tls is not None:
            attempt.step = "TLS handshake"
            self.raw.settimeout(attempt.left())  # CPython's handshake keeps it as a deadline
            self.raw = self._tls.wrap_socket(self.raw, server_hostname=self.host)
        self.sock = _DeadlineSocket(self.raw, attempt)  # type: ignore[assignment]


def _without(headers: Mapping[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in names}


def _resolve_within(resolve: Resolve, host: str, attempt: _Attempt) -> list[str]:
    """resolve(host) within the deadline: getaddrinfo has no timeout of its own, and
    the subscriber's DNS servers are the subscriber's (the lookup thread is let go
    when the deadline passes; the resolver's own timeouts end it)."""
    answer: list[list[str] | BaseException] = []

    def look_up() -> None:
        try:
            answer.append(resolve(host))
        except BaseException as exc:  # handed to the caller, raised there
            answer.append(exc)

    finder = threading.Thread(target=look_up, name=f"webhook dns {host}", daemon=True)
    finder.start()
    finder.join(attempt.left())
    if not answer:
        raise TimeoutError(f"{host} did not resolve in time")
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]


class HttpSender:
    """The webhook port (chalicelib.ports.WebhookSender) over http.client.

    `local` is the local stage's rules: http and any host, this machine included
    (the local stack's subscribers are on it); elsewhere only public https."""

    def __init__(self, *, local: bool, resolve: Resolve | None = None) -> None:
        self.local = local
        self._resolve = resolve or _getaddrinfo
        self._tls: ssl.SSLContext | None = None

    def check_url(self, url: str) -> str:
        """check_url with this sender's rules (what the subscriptions' routes call)."""
        return check_url(url, local=self.local, resolve=self._resolve)

    def _tls_context(self) -> ssl.SSLContext:
        """The default context (certificates verified, the host name checked), made
        once: loading the CA bundle per attempt would cost more than the attempt."""
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def post(self, url: str, body: bytes, headers: Mapping[str, str], *,
             timeout: float) -> Answer:
        """One POST. Never raises for anything the subscriber or the network does:
        it answers an Answer (a worker must go on to the next delivery).

        `timeout` is a deadline for the whole attempt (DNS, connect, TLS, send, the
        status line, reading the body), so a subscriber that trickles bytes cannot
        hold it longer. Redirects are not followed (a 3xx is an Answer with that
        status and error "redirect not followed"). At most BODY_LIMIT bytes of the
        answer are read; more than that: error "answer over 65536 bytes" (a 2xx with
        such a body is not ok). Outside local, the resolved addresses are checked
        again at send time (DNS may change after the URL was saved) and the
        connection goes to a checked address, the Host header, SNI and the
        certificate's check being for the URL's host name.
        """
        attempt = _Attempt(timeout)
        try:
            parts = _split(url.strip(), local=self.local)
            host = str(parts.hostname)
            if self.local:
                addresses = [host]  # create_connection looks the name up itself
            else:
                attempt.step = f"resolve {host}"
                addresses = _addresses(host, lambda h: _resolve_within(self._resolve, h,
                                                                      attempt))
        except TimeoutError:
            return self._no_answer(url, attempt, f"timeout after {timeout:g} s "
                                                 f"({attempt.step})")
        except ValueError as exc:
            log.warning("webhook to %s not sent: %s", url, exc)
            return self._no_answer(url, attempt, f"address refused: {exc}")
        https = parts.scheme == "https"
        conn: _Connection | None = None
        try:
            conn = _Connection(host, parts.port or (443 if https else 80), addresses=addresses,
                               tls=self._tls_context() if https else None, attempt=attempt)
            return self._exchange(conn, parts, body, headers, attempt)
        except TimeoutError:
            error = f"timeout after {timeout:g} s ({attempt.step})"
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # ssl.SSLError and CertificateError are OSErrors; ValueError: a header
            # http.client will not send, a host it cannot encode
            error = f"{attempt.step}: {type(exc).__name__}: {exc}"
        finally:
            if conn is not None:
                conn.close()
                if conn.raw is not None:
                    conn.raw.close()
        if attempt.status is not None:
            error = f"{error} (after status {attempt.status})"
        return self._no_answer(url, attempt, error)

    def _exchange(self, conn: _Connection, parts: SplitResult, body: bytes,
                  headers: Mapping[str, str], attempt: _Attempt) -> Answer:
        """The request and its answer, on a connection not yet open."""
        conn.connect()
        target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                       safe=_TARGET_SAFE)
        attempt.step = "send"
        conn.putrequest("POST", target, skip_accept_encoding=True)
        for name, value in _without(headers, "host", "content-length", "connection").items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Connection", "close")  # one attempt, one connection: nothing to reuse
        conn.endheaders()
        conn.send(body)
        attempt.step = "waiting for the status line"
        response = conn.getresponse()
        attempt.status = response.status
        attempt.step = "reading the body"
        read = bytearray()
        while len(read) <= BODY_LIMIT:
            attempt.left()  # a chunk already buffered must not outlive the deadline either
            chunk = response.read1(min(_CHUNK, BODY_LIMIT + 1 - len(read)))
            if not chunk:
                break
            read += chunk
        # enough bytes for KEPT characters of up to 4 bytes each, and a cut one
        text = read[:KEPT * 4 + 4].decode("utf-8", errors="replace")[:KEPT]
        error = None
        if len(read) > BODY_LIMIT:
            error = f"answer over {BODY_LIMIT} bytes"
        elif 300 <= response.status < 400:
            error = "redirect not followed"
        log.debug("webhook to %s answered %s in %d ms%s", conn.host, response.status,
                  attempt.ms(), f" ({error})" if error else "")
        return Answer(response.status, attempt.ms(), text, error)

    @staticmethod
    def _no_answer(url: str, attempt: _Attempt, error: str) -> Answer:
        log.debug("webhook to %s: no answer: %s", url, error)
        return Answer(None, attempt.ms(), error[:KEPT], error)
