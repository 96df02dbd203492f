"""Which URLs webhooks may call, and the signature: offline (no socket is opened)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from chalicelib.domain.webhooks import sign
from chalicelib.webhook_http import Answer, HttpSender, check_url


def public(host: str) -> list[str]:
    return ["93.184.216.34"]


@pytest.mark.parametrize("url, says", [
    ("http://shop.example/hook", "https"),
    ("ftp://shop.example/hook", "https"),
    ("https:///hook", "no host"),
    ("https://user:pw@shop.example/hook", "user or password"),
    ("https://shop.example/hook#part", "fragment"),
    ("https://shop.example/ho ok", "spaces"),
    ("https://127.0.0.1/hook", "not a public address"),
    ("https://10.0.0.8/hook", "not a public address"),
    ("https://192.168.1.1/hook", "not a public address"),
    ("https://169.254.169.254/latest/meta-data", "not a public address"),
    ("https://[::1]/hook", "not a public address"),
    ("https://[::ffff:127.0.0.1]/hook", "not a public address"),
    ("https://[fd00::1]/hook", "not a public address"),
    ("https://0.0.0.0/hook", "not a public address"),
    ("https://localhost/hook", "this machine"),
    ("https://shop.example:99999/hook", "not a URL"),
    ("https://shop.example/" + "x" * 2100, "longer than"),
])
def test_outside_local_a_url_is_refused_with_its_reason(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        check_url(url, local=False, resolve=public)


def test_a_name_that_resolves_inside_is_refused_and_one_that_does_not_resolve() -> None:
    with pytest.raises(ValueError, match=r"resolves to\) 10.0.0.5"):
        check_url("https://inside.example/hook", local=False, resolve=lambda h: ["10.0.0.5"])
    with pytest.raises(ValueError, match=r"resolves to\) 127.0.0.1"):  # any of them
        check_url("https://mixed.example/hook", local=False,
                  resolve=lambda h: ["93.184.216.34", "127.0.0.1"])

    def nowhere(host: str) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(ValueError, match="does not resolve"):
        check_url("https://nowhere.example/hook", local=False, resolve=nowhere)


def test_a_public_https_url_is_taken_and_local_takes_http_to_this_machine() -> None:
    assert check_url(" https://shop.example/hooks?x=1 ", local=False,
                     resolve=public) == "https://shop.example/hooks?x=1"
    assert check_url("http://127.0.0.1:9000/hook", local=True) == "http://127.0.0.1:9000/hook"
    with pytest.raises(ValueError, match="http or https"):
        check_url("ftp://127.0.0.1/hook", local=True)


def test_a_post_to_a_refused_url_answers_why_without_connecting() -> None:
    def boom(host: str) -> list[str]:
        raise AssertionError("the address is checked before any lookup of a literal")

    answer = HttpSender(local=False, resolve=boom).post("https://10.0.0.8/hook", b"{}", {},
                                                        timeout=1)
    assert answer.status is None and not answer.ok
    assert answer.error is not None and "not a public address" in answer.error


def test_only_a_2xx_without_error_is_ok() -> None:
    assert Answer(200, 3, "").ok and Answer(204, 3, "").ok
    assert not Answer(302, 3, "", "redirect not followed").ok
    assert not Answer(200, 3, "", "answer over 65536 bytes").ok
    assert not Answer(500, 3, "").ok and not Answer(None, 3, "").ok


def test_the_signature_is_hmac_sha256_of_the_time_and_the_body() -> None:
    body = b'{"eventId":"EVT_x"}'
    mac = hmac.new(b"whsec_test_secret", b"1764578462." + body, hashlib.sha256).hexdigest()
    assert sign("whsec_test_secret", 1764578462, body) == f"t=1764578462,v1={mac}"
    assert sign("whsec_test_secret", 1764578463, body) != sign("whsec_test_secret",
                                                               1764578462, body)
    assert sign("whsec_other_secret", 1764578462, body) != f"t=1764578462,v1={mac}"
