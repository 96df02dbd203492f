"""Secrets Manager: the only module that talks to it.

On AWS a function is given `SECRET_ID` (the stage's secret, e.g. `shop-pay/prod`)
and no secret in its environment. Its settings are built from the environment as
everywhere (`config.load`), and then `resolve` puts in the values of the secret's
JSON that the function's role needs (`config.SECRET_KEYS` and
`config.ROLE_NEEDS`), before `config.check` (chalicelib/deps.py does both).

`SecretCache` keeps what was read for the warm container, with its VersionId, and
reads it again after `ttl_seconds`, or at once after a dependency refused a
credential (`refused`): a rotation is then seen by the VersionId changing, and
deps.py rebuilds what was built with the old values. The boto3 client is built on
first use, with short timeouts and one attempt (config.SECRETS_*); its errors
leave this module as `SecretUnavailable` (the domain's Unavailable: 503, try
again) or `SecretInvalid` (a SettingsError: the secret or the role's access to it
is wrong, and no retry mends it). No value of a secret is ever logged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from chalicelib import config
from chalicelib.config import Settings, SettingsError
from chalicelib.domain import Unavailable

log = logging.getLogger(__name__)

# The Settings field that holds each setting of config.SECRET_KEYS and
# config.OPTIONAL_SECRET_KEYS.
FIELDS: dict[str, str] = {
    "JWT_SECRET": "jwt_secret",
    "ALIPAY_APP_PRIVATE_KEY": "alipay_app_private_key",
    "RMQ_URL": "rmq_url",
    "JWT_PREVIOUS_SECRET": "jwt_previous_secret",
}
# A refusal re-reads the secret at once, but not more often than this: a user whose
# password is simply wrong must not turn each request into a read.
MIN_REREAD_SECONDS = 10.0
# Errors of Secrets Manager that no retry mends: the secret or the role is wrong.
_CONFIG_ERRORS = frozenset({"ResourceNotFoundException", "AccessDeniedException",
                            "AccessDenied", "DecryptionFailure", "InvalidParameterException",
                            "InvalidRequestException", "UnrecognizedClientException"})


class SecretUnavailable(Unavailable):
    """Secrets Manager did not answer (network, timeout, throttling, its 5xx)."""


class SecretInvalid(SettingsError):
    """The secret cannot serve: not there, not ours to read, not a JSON object of
    strings, or without a key the role needs. The message names keys, never values."""


@dataclass(frozen=True)
class Secret:
    """One version of the secret: its VersionId and its JSON's string values."""

    version_id: str
    values: Mapping[str, str] = field(repr=False)


class SecretSource(Protocol):
    def read(self) -> Secret: ...


def parse(secret_id: str, version_id: str, text: str | None) -> Secret:
    """The secret's SecretString as a Secret; SecretInvalid when it is no JSON object
    of strings."""
    if text is None:
        raise SecretInvalid(f"secret {secret_id} has no SecretString (a JSON object is needed)")
    try:
        values = json.loads(text)
    except ValueError:
        raise SecretInvalid(f"secret {secret_id}'s SecretString is not JSON") from None
    if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise SecretInvalid(f"secret {secret_id}'s SecretString is not a JSON object of "
                            "strings")
    return Secret(version_id=version_id, values=values)


class SecretsManagerSource:
    """GetSecretValue of one secret's AWSCURRENT version."""

    def __init__(self, secret_id: str, region: str, client: Any = None) -> None:
        self.secret_id = secret_id
        self.region = region
        self._client = client

    def __repr__(self) -> str:
        return f"SecretsManagerSource({self.secret_id!r}, {self.region!r})"

    @property
    def client(self) -> Any:
        """boto3's client, built on first use (AWS_ENDPOINT_URL_SECRETS_MANAGER, as
        boto3 reads it, points it elsewhere: the tests' moto server)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "secretsmanager", region_name=self.region,
                config=Config(connect_timeout=config.SECRETS_CONNECT_TIMEOUT_SECONDS,
                              read_timeout=config.SECRETS_READ_TIMEOUT_SECONDS,
                              retries={"total_max_attempts": 1, "mode": "standard"}))
        return self._client

    def read(self) -> Secret:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.get_secret_value(SecretId=self.secret_id)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _CONFIG_ERRORS:
                raise SecretInvalid(f"secret {self.secret_id} cannot be read: {code}") from None
            raise SecretUnavailable(f"Secrets Manager did not give {self.secret_id}: "
                                    f"{code or type(exc).__name__}") from None
        except BotoCoreError as exc:  # no connection, timeouts, no credentials
            raise SecretUnavailable(f"Secrets Manager unreachable for {self.secret_id}: "
                                    f"{type(exc).__name__}") from None
        return parse(self.secret_id, str(answer.get("VersionId") or ""),
                     answer.get("SecretString"))


def needed(role: str) -> dict[str, str]:
    """The settings of SECRET_KEYS the role needs -> the secret's key of each."""
    needs = set(config.ROLE_NEEDS.get(role, ()))
    return {setting: key for setting, key in config.SECRET_KEYS.items() if setting in needs}


def optional(role: str) -> dict[str, str]:
    """The settings of OPTIONAL_SECRET_KEYS the role takes when the secret has them."""
    takes = set(config.ROLE_MAY_TAKE.get(role, ()))
    return {s: key for s, key in config.OPTIONAL_SECRET_KEYS.items() if s in takes}


def resolve(settings: Settings, secret: Secret) -> Settings:
    """`settings` with the values of the secret that its role needs or may take, and
    no other (the API never holds the JWT secret, nor the authorizer Alipay's key).
    An optional key the secret no longer has is emptied: the previous JWT secret
    taken out of the secret stops being accepted at the next read."""
    role = settings.function_role
    changes = {FIELDS[setting]: secret.values.get(key, "")
               for setting, key in optional(role).items()}
    missing = []
    for setting, key in needed(role).items():
        if getattr(settings, FIELDS[setting]) and settings.stage not in config.LOCAL_STAGES:
            log.warning("%s is in the environment too: the secret's value is used; take it "
                        "out of the function's environment", setting)
        value = secret.values.get(key, "")
        if setting == "RMQ_URL":
            value = value.strip()
        if not value:
            missing.append(key)
        changes[FIELDS[setting]] = value
    if missing:
        raise SecretInvalid(f"secret {settings.secret_id} (version {secret.version_id}) lacks "
                            f"{', '.join(missing)}, which {settings.function_role or 'the worker'} "
                            "needs")
    return replace(settings, **changes)


class SecretCache:
    """The secret as last read, for a warm container; read again when `due`.

    `get` reads it on first use. `due` is true `ttl_seconds` after the last read,
    and at once after `refused` (yet not within MIN_REREAD_SECONDS of the last
    read). `refresh` reads again and tells whether the VersionId changed; a read
    that fails keeps the secret in hand and is tried again MIN_REREAD_SECONDS later.
    """

    def __init__(self, source: SecretSource, ttl_seconds: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 min_reread_seconds: float = MIN_REREAD_SECONDS) -> None:
        self.source = source
        self.ttl_seconds = ttl_seconds
        self.min_reread_seconds = min_reread_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._secret: Secret | None = None
        self._read_at = 0.0  # the clock's time of the last read
        self._next_read = 0.0  # and of the next

    def _keep(self, secret: Secret) -> None:
        self._secret = secret
        self._read_at = self._clock()
        self._next_read = self._read_at + self.ttl_seconds

    def get(self) -> Secret:
        with self._lock:
            if self._secret is None:
                self._keep(self.source.read())
                assert self._secret is not None
                log.info("secret %s read", self.source, extra={
                    "secretVersion": self._secret.version_id})
            return self._secret

    def due(self) -> bool:
        return self._secret is not None and self._clock() >= self._next_read

    def refused(self) -> None:
        """A dependency refused a credential of the secret: read it again at once."""
        with self._lock:
            if self._secret is None:
                return
            soonest = max(self._clock(), self._read_at + self.min_reread_seconds)
            if soonest < self._next_read:
                self._next_read = soonest
                log.warning("a credential was refused: the secret is read again",
                            extra={"secretVersion": self._secret.version_id})

    def refresh(self) -> bool:
        """Reads the secret again; True when its VersionId changed (a rotation)."""
        with self._lock:
            old = self._secret
            try:
                fresh = self.source.read()
            except (SecretUnavailable, SecretInvalid) as exc:
                self._next_read = self._clock() + self.min_reread_seconds
                log.warning("secret not read again, the one in hand is kept: %s", exc)
                return False
            self._keep(fresh)
            changed = old is None or fresh.version_id != old.version_id
            if changed:
                log.info("secret rotated", extra={
                    "secretVersion": fresh.version_id,
                    "previousVersion": old.version_id if old else None})
            return changed
