"""Alipay's RSA2 signing rule, done with ``cryptography`` (not python-alipay-sdk).

The string to sign: the parameters, empty values left out, sorted by key,
``key=value`` joined by ``&``, UTF-8. RSA2 is SHA256withRSA (PKCS#1 v1.5), the
signature base64 without line breaks. Which parameters: Alipay's notify and
return parameters are signed without ``sign`` and ``sign_type``; a merchant's
request is signed without ``sign`` only (``sign_type`` is covered, which is what
python-alipay-sdk and Alipay's own SDKs do).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

EXCLUDED_FROM_SIGNATURE = frozenset({"sign", "sign_type"})
EXCLUDED_FROM_REQUEST_SIGNATURE = frozenset({"sign"})
ALIPAY_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def _shanghai() -> tzinfo:
    try:
        return ZoneInfo("Asia/Shanghai")
    except ZoneInfoNotFoundError:  # no tz database: China has had no DST since 1991
        return timezone(timedelta(hours=8), "CST")


SHANGHAI = _shanghai()


def unsigned_string(
    params: Mapping[str, str], excluded: frozenset[str] = EXCLUDED_FROM_SIGNATURE
) -> str:
    items = sorted((k, v) for k, v in params.items() if k not in excluded and v != "")
    return "&".join(f"{k}={v}" for k, v in items)


def sign_content(content: str, private_key: rsa.RSAPrivateKey) -> str:
    signature = private_key.sign(content.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode("ascii")


def verify_content(content: str, sign: str, public_key: rsa.RSAPublicKey) -> bool:
    try:
        signature = base64.b64decode(sign, validate=True)
        public_key.verify(signature, content.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True


def sign_params(params: Mapping[str, str], private_key: rsa.RSAPrivateKey) -> dict[str, str]:
    """A copy of ``params`` with ``sign_type=RSA2`` and ``sign`` added."""
    signed = {k: v for k, v in params.items() if k not in EXCLUDED_FROM_SIGNATURE}
    signed["sign"] = sign_content(unsigned_string(signed), private_key)
    signed["sign_type"] = "RSA2"
    return signed


def verify_params(params: Mapping[str, str], public_key: rsa.RSAPublicKey) -> bool:
    """True when ``params`` carry a valid RSA2 ``sign`` (a missing or other type fails)."""
    sign = params.get("sign")
    if not sign or params.get("sign_type") != "RSA2":
        return False
    return verify_content(unsigned_string(params), sign, public_key)


def verify_request(params: Mapping[str, str], public_key: rsa.RSAPublicKey) -> bool:
    """True when a merchant's request carries a valid RSA2 ``sign`` over every
    other parameter, ``sign_type`` included."""
    sign = params.get("sign")
    if not sign or params.get("sign_type") != "RSA2":
        return False
    return verify_content(
        unsigned_string(params, EXCLUDED_FROM_REQUEST_SIGNATURE), sign, public_key
    )


def alipay_time(moment: datetime) -> str:
    """``yyyy-MM-dd HH:mm:ss`` in Asia/Shanghai, Alipay's wire format."""
    if moment.tzinfo is None:
        raise ValueError("alipay_time needs an aware datetime")
    return moment.astimezone(SHANGHAI).strftime(ALIPAY_TIME_FORMAT)


def alipay_time_ms(moment: datetime) -> str:
    """``yyyy-MM-dd HH:mm:ss.SSS`` in Asia/Shanghai: how Alipay writes ``gmt_refund``."""
    if moment.tzinfo is None:
        raise ValueError("alipay_time_ms needs an aware datetime")
    local = moment.astimezone(SHANGHAI)
    return f"{local.strftime(ALIPAY_TIME_FORMAT)}.{local.microsecond // 1000:03d}"


def parse_alipay_time(value: str) -> datetime:
    """Alipay's ``yyyy-MM-dd HH:mm:ss`` (Asia/Shanghai) as an aware UTC datetime."""
    return datetime.strptime(value, ALIPAY_TIME_FORMAT).replace(tzinfo=SHANGHAI).astimezone(UTC)


def money(value: Decimal) -> str:
    """Two decimals, never a float: ``Decimal("59.9")`` -> ``"59.90"``."""
    return f"{value.quantize(Decimal('0.01')):f}"
