"""Which URLs webhooks may call, the signature and what counts as delivered:
offline (no socket is opened; the module's sockets are replaced where a test
reaches as far as connecting, so it passes under `unshare -n`)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Any

import pytest

from chalicelib import webhook_http
from chalicelib.domain.webhooks import sign as signature
from chalicelib.webhook_http import BODY_LIMIT, KEPT, Answer, HttpSender, check_url

PUBLIC = "93.184.216.34"


def public(host: str) -> list[str]:
    return [PUBLIC]


def resolving_to(*addresses: str) -> Callable[[str], list[str]]:
    return lambda host: list(addresses)


def never_called(host: str) -> list[str]:
    raise AssertionError(f"{host} was looked up, but the URL is refused before any lookup")


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every connection the module tries is recorded and refused (no socket opens)."""
    tried: list[tuple[Any, ...]] = []

    def connect(address: tuple[str, int], timeout: float | None = None) -> Any:
        tried.append((address, timeout))
        raise ConnectionRefusedError(111, "Connection refused (test)")

    monkeypatch.setattr(webhook_http.socket, "create_connection", connect)
    monkeypatch.setattr(webhook_http.socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("the default resolver was used in an offline test")))
    return tried


# --- signature ------------------------------------------------------------------


def test_the_signature_is_stripes_shape_over_the_time_and_the_body() -> None:
    body = b'{"eventId":"EVT_x","amount":"19.90"}'
    mac = hmac.new(b"whsec_test_secret", b"1764578462." + body, hashlib.sha256).hexdigest()
    assert signature("whsec_test_secret", 1764578462, body) == f"t=1764578462,v1={mac}"


def test_the_signature_changes_with_the_time_the_body_and_the_secret() -> None:
    body = b'{"eventId":"EVT_x"}'
    base = signature("s1", 1764578462, body)
    assert signature("s1", 1764578463, body) != base
    assert signature("s1", 1764578462, body + b" ") != base
    assert signature("s2", 1764578462, body) != base


def test_the_signature_takes_a_utf8_secret() -> None:
    mac = hmac.new("clé".encode(), b"1.{}", hashlib.sha256).hexdigest()
    assert signature("clé", 1, b"{}") == f"t=1,v1={mac}"


# --- Answer.ok ------------------------------------------------------------------


@pytest.mark.parametrize("answer, ok", [
    (Answer(200, 3, "thanks"), True),
    (Answer(204, 3, ""), True),
    (Answer(299, 3, ""), True),
    (Answer(199, 3, ""), False),
    (Answer(300, 3, ""), False),
    (Answer(302, 3, "", "redirect not followed"), False),
    (Answer(200, 3, "y" * KEPT, f"answer over {BODY_LIMIT} bytes"), False),
    (Answer(404, 3, "not found"), False),
    (Answer(500, 3, "it broke"), False),
    (Answer(None, 1000, "timeout", "timeout after 1 s"), False),
    (Answer(None, 3, ""), False),
])
def test_only_a_2xx_without_an_error_is_ok(answer: Answer, ok: bool) -> None:
    assert answer.ok is ok


def test_the_limits_are_the_documented_ones() -> None:
    assert BODY_LIMIT == 65536 and KEPT == 200


# --- check_url: refusals --------------------------------------------------------


@pytest.mark.parametrize("url, says", [
    ("", "empty"),
    ("http://shop.example/hook", "must be https"),
    ("ftp://shop.example/hook", "must be https"),
    ("shop.example/hook", "must be https"),
    ("https:///hook", "no host"),
    ("https://user:pw@shop.example/hook", "credentials"),
    ("https://user@shop.example/hook", "credentials"),
    ("https://shop.example/hook#part", "fragment"),
    ("https://shop.example/hook#", "fragment"),
    ("https://shop.example/" + "x" * 2048, "longer than 2048"),
    ("https://shop.example/ho ok", "spaces or control"),
    ("https://shop.example/ho\nok", "spaces or control"),
    ("https://shop.example:99999/hook", "not a URL"),
    ("https://[::1/hook", "not a URL"),
    ("https://localhost/hook", "names this machine"),
    ("https://LocalHost./hook", "names this machine"),
    ("https://api.localhost/hook", "names this machine"),
    ("https://127.0.0.1/hook", "loopback"),
    ("https://127.9.9.9:8443/hook", "loopback"),
    ("https://10.0.0.8/hook", "private"),
    ("https://172.16.0.1/hook", "private"),
    ("https://192.168.1.1/hook", "private"),
    ("https://169.254.169.254/latest/meta-data", "link-local"),
    ("https://0.0.0.0/hook", "unspecified"),
    ("https://224.0.0.1/hook", "multicast"),
    ("https://240.0.0.1/hook", "private|reserved"),
    ("https://100.64.0.1/hook", "not a public address"),
    ("https://[::1]/hook", "loopback"),
    ("https://[::]/hook", "unspecified"),
    ("https://[fe80::1]/hook", "link-local"),
    ("https://[fd00::1]/hook", "private"),
    ("https://[ff02::1]/hook", "multicast"),
    ("https://[::ffff:127.0.0.1]/hook", "127.0.0.1 \\(a loopback"),
    ("https://[::ffff:a9fe:a9fe]/hook", "169.254.169.254 \\(a link-local"),
    ("https://[::ffff:10.1.2.3]/hook", "10.1.2.3 \\(a private"),
    ("https://[2002:7f00:1::]/hook", "carrying 127.0.0.1"),
    ("https://[64:ff9b::a00:1]/hook", "carrying 10.0.0.1"),
    ("https://127.1/hook", "unusual form"),
    ("https://2130706433/hook", "unusual form"),
    ("https://0x7f000001/hook", "unusual form"),
])
def test_outside_local_a_url_is_refused_with_its_reason(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_url(url, local=False, resolve=never_called if "example" not in url else public)


@pytest.mark.parametrize("inside", ["127.0.0.1", "10.0.0.5", "172.31.255.1", "192.168.0.10",
                                    "169.254.169.254", "::1", "fd12:3456::1", "fe80::1%eth0",
                                    "::ffff:192.168.0.1", "0.0.0.0", "239.1.1.1"])
def test_a_name_that_resolves_inside_is_refused(inside: str) -> None:
    with pytest.raises(ValueError, match=rf"'inside.example' \(resolves to {inside}\)"):
        check_url("https://inside.example/hook", local=False, resolve=resolving_to(inside))


def test_any_inside_address_among_a_names_addresses_refuses_it() -> None:
    # the resolver's order is the name owner's to choose: the last one counts as the first
    with pytest.raises(ValueError, match=r"resolves to 127.0.0.1"):
        check_url("https://mixed.example/hook", local=False,
                  resolve=resolving_to(PUBLIC, "2606:2800:220:1::1", "127.0.0.1"))


def test_a_name_that_does_not_resolve_is_refused() -> None:
    def nowhere(host: str) -> list[str]:
        raise OSError(-2, "Name or service not known")

    with pytest.raises(ValueError, match="does not resolve.*not known"):
        check_url("https://nowhere.example/hook", local=False, resolve=nowhere)
    with pytest.raises(ValueError, match="does not resolve"):
        check_url("https://empty.example/hook", local=False, resolve=resolving_to())


def test_the_resolver_is_asked_about_the_urls_host() -> None:
    asked: list[str] = []

    def recording(host: str) -> list[str]:
        asked.append(host)
        return [PUBLIC]

    check_url("https://Hooks.Shop.example:8443/in?x=1", local=False, resolve=recording)
    assert asked == ["hooks.shop.example"]


# --- check_url: acceptances -----------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://shop.example/hooks?x=1",
    "https://shop.example:8443/hooks",
    "https://shop.example",
    "https://93.184.216.34/hook",
    "https://[2606:2800:220:1:248:1893:25c8:1946]/hook",
    "https://shop.example/" + "x" * (2048 - len("https://shop.example/")),
])
def test_outside_local_a_public_https_url_is_taken(url: str) -> None:
    assert check_url(url, local=False, resolve=public) == url


def test_the_url_is_stripped_and_otherwise_kept() -> None:
    assert check_url("  https://shop.example/hooks?x=1\n", local=False,
                     resolve=public) == "https://shop.example/hooks?x=1"


def test_a_name_resolving_only_to_public_addresses_is_taken() -> None:
    assert check_url("https://shop.example/h", local=False,
                     resolve=resolving_to(PUBLIC, "2606:2800:220:1::1")) == "https://shop.example/h"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9000/hook",
    "http://localhost:9000/hook",
    "https://10.0.0.8/hook",
    "http://[::1]:9000/hook",
    "http://subscriber/hook",  # the local stack's container names do not resolve here
])
def test_the_local_stage_takes_any_http_or_https_url_with_a_host(url: str) -> None:
    assert check_url(url, local=True, resolve=never_called) == url


@pytest.mark.parametrize("url, says", [
    ("ftp://127.0.0.1/hook", "http or https"),
    ("http:///hook", "no host"),
    ("http://u:p@127.0.0.1/hook", "credentials"),
    ("http://127.0.0.1/hook#x", "fragment"),
    ("http://127.0.0.1/" + "x" * 2048, "longer than"),
])
def test_the_local_stage_still_refuses_what_is_not_a_webhook_url(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_url(url, local=True, resolve=never_called)


def test_the_senders_check_url_applies_its_stage() -> None:
    assert HttpSender(local=True).check_url("http://127.0.0.1/h") == "http://127.0.0.1/h"
    with pytest.raises(ValueError, match="must be https"):
        HttpSender(local=False, resolve=public).check_url("http://shop.example/h")


# --- post: checks at send time (nothing reaches the network) ---------------------


def test_a_post_to_an_inside_literal_is_refused_without_a_lookup_or_a_connection(
        no_sockets: list[tuple[Any, ...]]) -> None:
    answer = HttpSender(local=False, resolve=never_called).post(
        "https://10.0.0.8/hook", b"{}", {}, timeout=1)
    assert answer.status is None and not answer.ok
    assert answer.error is not None and answer.error.startswith("address refused")
    assert "private" in answer.error and answer.body == answer.error
    assert no_sockets == []


def test_dns_that_changed_since_the_url_was_saved_is_caught_at_send_time(
        no_sockets: list[tuple[Any, ...]]) -> None:
    answers = [[PUBLIC], ["10.0.0.9"]]  # when saved, then when sent

    def rebinding(host: str) -> list[str]:
        return answers.pop(0)

    sender = HttpSender(local=False, resolve=rebinding)
    assert sender.check_url("https://rebind.example/hook") == "https://rebind.example/hook"
    answer = sender.post("https://rebind.example/hook", b"{}", {}, timeout=1)
    assert answer.status is None and "resolves to 10.0.0.9" in (answer.error or "")
    assert no_sockets == []


def test_the_connection_goes_to_the_checked_address_not_to_a_new_lookup(
        no_sockets: list[tuple[Any, ...]]) -> None:
    answer = HttpSender(local=False, resolve=resolving_to(PUBLIC, "2606:2800:220:1::1")).post(
        "https://shop.example:8443/hook", b"{}", {}, timeout=2)
    # each checked address in the resolver's order, with at most what is left of 2 s
    assert [address for address, _ in no_sockets] == [(PUBLIC, 8443),
                                                      ("2606:2800:220:1::1", 8443)]
    assert all(0 < timeout <= 2 for _, timeout in no_sockets)
    assert answer.status is None and not answer.ok
    assert "Connection refused" in (answer.error or "")
    assert "2606:2800:220:1::1" in (answer.error or "")  # the last one tried says why


class FakeTLSSocket:
    """A connected TLS socket as the module uses one, answering `reply`."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sent = bytearray()
        self.timeouts: list[float | None] = []
        self.closed = False

    def settimeout(self, timeout: float | None) -> None:
        self.timeouts.append(timeout)

    def sendall(self, data: Any) -> None:
        self.sent += bytes(data)

    def recv_into(self, buffer: Any) -> int:
        n = min(len(buffer), len(self.reply), 7)  # a few bytes at a time, as a network does
        buffer[:n] = self.reply[:n]
        self.reply = self.reply[n:]
        return n

    def close(self) -> None:
        self.closed = True


def test_https_goes_to_the_checked_address_with_the_urls_host_for_sni_and_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTLSSocket(b"HTTP/1.1 202 Accepted\r\nContent-Length: 6\r\n\r\nthanks")
    connected: list[tuple[str, int]] = []
    wrapped: list[str | None] = []

    def connect(address: tuple[str, int], timeout: float | None = None) -> Any:
        connected.append(address)
        return fake

    class Context:
        def wrap_socket(self, sock: Any, server_hostname: str | None = None) -> Any:
            wrapped.append(server_hostname)
            return sock

    monkeypatch.setattr(webhook_http.socket, "create_connection", connect)
    sender = HttpSender(local=False, resolve=public)
    monkeypatch.setattr(sender, "_tls_context", Context)
    answer = sender.post("https://Shop.example/hooks/in?shop=7", b'{"a":1}',
                         {"Content-Type": "application/json", "Content-Length": "999",
                          "Host": "evil.example"}, timeout=2)
    assert answer == Answer(202, answer.ms, "thanks", None) and answer.ok
    assert connected == [(PUBLIC, 443)] and wrapped == ["shop.example"]
    head, _, body = bytes(fake.sent).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /hooks/in?shop=7 HTTP/1.1"
    assert sorted(lines[1:]) == ["Connection: close", "Content-Length: 7",
                                 "Content-Type: application/json", "Host: shop.example"]
    assert body == b'{"a":1}'
    # every blocking call had a timeout, none longer than the attempt, and the socket is closed
    assert fake.timeouts and all(t is not None and 0 < t <= 2 for t in fake.timeouts)
    assert fake.closed


def test_a_url_refused_by_its_shape_is_an_answer_not_an_exception() -> None:
    answer = HttpSender(local=True).post("gopher://127.0.0.1/x", b"{}", {}, timeout=1)
    assert answer.status is None and "http or https" in (answer.error or "")


def test_a_lookup_slower_than_the_deadline_ends_the_attempt_at_the_deadline() -> None:
    import threading

    release = threading.Event()

    def hanging(host: str) -> list[str]:
        release.wait(5)
        return [PUBLIC]

    try:
        answer = HttpSender(local=False, resolve=hanging).post(
            "https://slow-dns.example/hook", b"{}", {}, timeout=0.3)
    finally:
        release.set()
    assert answer.status is None and "timeout" in (answer.error or "")
    assert 250 <= answer.ms < 1500
