"""chalicelib/secrets.py and its use by deps.py, on fakes: a function given
SECRET_ID takes from the secret exactly the keys its role needs, keeps them for
a warm container, reads them again after the TTL or at once when RabbitMQ refused
its user, and builds its dependencies again when the version changed. Without
SECRET_ID nothing of this runs. Secrets Manager itself: the integration test."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pika.exceptions
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from chalicelib import config, deps, secrets
from chalicelib.broker import BrokerUnavailable
from chalicelib.secrets import Secret, SecretCache, SecretInvalid, SecretUnavailable

JWT = "j" * 40
ALIPAY_KEY_PLACEHOLDER = "app-private-key"
VALUES = {"JWT_SECRET": JWT, "ALIPAY_APP_PRIVATE_KEY": ALIPAY_KEY_PLACEHOLDER,
          "RMQ_PUBLISH_URL": " amqps://api:pw1@mq:5671/%2F \n"}
PUBLIC = {"ALIPAY_APP_ID": "2021000000000000", "ALIPAY_SELLER_ID": "2088000000000000",
          "ALIPAY_GATEWAY": "https://openapi.alipay.com/gateway.do"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSource:
    """The secret as Secrets Manager would give it; `error`: raised by the next read."""

    secret_id = "shop-pay/prod"

    def __init__(self, values: dict[str, str] | None = None, version: str = "v1") -> None:
        self.values = dict(VALUES if values is None else values)
        self.version = version
        self.reads = 0
        self.error: Exception | None = None

    def read(self) -> Secret:
        self.reads += 1
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        return Secret(self.version, dict(self.values))


def on_aws(role: str, **env: str) -> config.Settings:
    """A deployed function's settings: SECRET_ID and no secret in its environment."""
    return config.load({"STAGE": "prod", "FUNCTION_ROLE": role, "SECRET_ID": "shop-pay/prod",
                        **env})


# --- resolve: the role's keys, no others ----------------------------------------


@pytest.mark.parametrize("role,taken", [
    ("api", {"alipay_app_private_key", "rmq_url"}),
    ("authorizer", {"jwt_secret"}),
    ("notify", {"rmq_url"}),
    ("sweeper", {"alipay_app_private_key", "rmq_url"}),
    ("reconciler", {"alipay_app_private_key"}),
    ("relay", {"rmq_url"}),
])
def test_each_role_takes_only_the_keys_it_needs(role: str, taken: set[str]) -> None:
    before = on_aws(role)
    after = secrets.resolve(before, Secret("v1", VALUES))
    changed = {f for f in secrets.FIELDS.values() if getattr(after, f) != getattr(before, f)}
    assert changed == taken
    if "rmq_url" in taken:
        assert after.rmq_url == "amqps://api:pw1@mq:5671/%2F"  # stripped
    if "jwt_secret" in taken:
        assert after.jwt_secret == JWT


def test_every_secret_setting_has_a_field() -> None:
    assert set(secrets.FIELDS) == set(config.SECRET_KEYS) | set(config.OPTIONAL_SECRET_KEYS)
    fields = set(config.Settings.__dataclass_fields__)
    assert set(secrets.FIELDS.values()) <= fields


def test_a_role_whose_key_is_missing_is_refused_naming_the_key_not_a_value() -> None:
    values = {k: v for k, v in VALUES.items() if k != "RMQ_PUBLISH_URL"}
    with pytest.raises(SecretInvalid, match="lacks RMQ_PUBLISH_URL") as caught:
        secrets.resolve(on_aws("api"), Secret("v7", values))
    assert "v7" in str(caught.value)
    assert ALIPAY_KEY_PLACEHOLDER not in str(caught.value)
    # the authorizer does not need it
    assert secrets.resolve(on_aws("authorizer"), Secret("v7", values)).jwt_secret == JWT


def test_only_the_authorizer_takes_the_previous_jwt_secret_and_only_while_it_is_there(
) -> None:
    previous = "p" * 40
    rotating = Secret("v8", {**VALUES, "JWT_PREVIOUS_SECRET": previous})
    taken = secrets.resolve(on_aws("authorizer"), rotating)
    assert (taken.jwt_secret, taken.jwt_previous_secret) == (JWT, previous)
    for role in ("api", "notify", "sweeper", "reconciler", "relay"):
        assert secrets.resolve(on_aws(role), rotating).jwt_previous_secret == "", role
    # Taken out of the secret when the rotation is over: gone from the settings too,
    # also where the environment had set one.
    done = secrets.resolve(on_aws("authorizer", JWT_PREVIOUS_SECRET=previous),
                           Secret("v9", VALUES))
    assert (done.jwt_secret, done.jwt_previous_secret) == (JWT, "")


def test_resolved_settings_pass_the_check_that_the_environment_alone_fails() -> None:
    bare = on_aws("api", **PUBLIC, ALIPAY_PUBLIC_KEY="alipay-public")
    with pytest.raises(config.SettingsError, match="ALIPAY_APP_PRIVATE_KEY, RMQ_URL"):
        config.check(bare)
    assert config.check(secrets.resolve(bare, Secret("v1", VALUES))).function_role == "api"


@pytest.mark.parametrize("text,why", [
    (None, "no SecretString"), ("not json", "not JSON"), ("[1, 2]", "not a JSON object"),
    (json.dumps({"JWT_SECRET": 42}), "not a JSON object of strings"),
])
def test_a_secret_that_is_no_json_object_of_strings_is_refused(text: str | None,
                                                               why: str) -> None:
    with pytest.raises(SecretInvalid, match=why):
        secrets.parse("shop-pay/prod", "v1", text)


def test_settings_read_the_secret_id_and_its_refresh() -> None:
    got = config.load({"SECRET_ID": " shop-pay/prod ", "SECRET_REFRESH_SECONDS": "60"})
    assert (got.secret_id, got.secret_refresh_seconds) == ("shop-pay/prod", 60.0)
    assert config.load({}).secret_id == ""  # local: the environment holds the secrets
    assert config.load({}).secret_refresh_seconds == 300.0


# --- Secrets Manager's errors become ours ---------------------------------------


class FakeClient:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.asked: list[dict[str, Any]] = []

    def get_secret_value(self, **kwargs: Any) -> Any:
        self.asked.append(kwargs)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}}, "GetSecretValue")


@pytest.mark.parametrize("error,kind", [
    (_client_error("ResourceNotFoundException"), SecretInvalid),
    (_client_error("AccessDeniedException"), SecretInvalid),
    (_client_error("DecryptionFailure"), SecretInvalid),
    (_client_error("ThrottlingException"), SecretUnavailable),
    (_client_error("InternalServiceError"), SecretUnavailable),
    (EndpointConnectionError(endpoint_url="https://secretsmanager"), SecretUnavailable),
])
def test_secrets_managers_errors_leave_as_settings_or_unavailable(error: Exception,
                                                                  kind: type) -> None:
    source = secrets.SecretsManagerSource("shop-pay/prod", "us-east-1",
                                          client=FakeClient(error))
    with pytest.raises(kind) as caught:
        source.read()
    assert caught.value.__cause__ is None  # no boto exception rides along
    assert not isinstance(caught.value, (ClientError, EndpointConnectionError))


def test_the_source_reads_awscurrent_with_its_version() -> None:
    client = FakeClient({"VersionId": "v9", "SecretString": json.dumps(VALUES)})
    got = secrets.SecretsManagerSource("shop-pay/prod", "us-east-1", client=client).read()
    assert (got.version_id, dict(got.values)) == ("v9", VALUES)
    assert client.asked == [{"SecretId": "shop-pay/prod"}]
    assert JWT not in repr(got)


def test_the_client_is_built_on_first_use_with_short_timeouts_and_one_attempt() -> None:
    source = secrets.SecretsManagerSource("shop-pay/prod", "us-east-1")
    assert source._client is None
    built = source.client.meta.config
    assert built.connect_timeout == config.SECRETS_CONNECT_TIMEOUT_SECONDS
    assert built.read_timeout == config.SECRETS_READ_TIMEOUT_SECONDS
    assert built.retries["total_max_attempts"] == 1


# --- the cache: TTL, refusal, rotation ------------------------------------------


def test_the_cache_reads_once_then_again_after_its_ttl() -> None:
    source, clock = FakeSource(), Clock()
    cache = SecretCache(source, 300, clock=clock)
    assert not cache.due()  # nothing read yet: nothing to refresh
    assert cache.get().version_id == "v1" and cache.get() is cache.get()
    assert source.reads == 1
    clock.now += 299
    assert not cache.due()
    clock.now += 1
    assert cache.due()
    assert cache.refresh() is False  # same version
    assert source.reads == 2 and not cache.due()
    source.version = "v2"
    clock.now += 300
    assert cache.refresh() is True
    assert cache.get().version_id == "v2"


def test_a_refusal_makes_it_due_at_once_but_not_twice_in_a_row() -> None:
    source, clock = FakeSource(), Clock()
    cache = SecretCache(source, 300, clock=clock, min_reread_seconds=10)
    cache.get()
    clock.now += 3
    cache.refused()
    assert not cache.due()  # read 3 s ago: not before 10 s
    clock.now += 7
    assert cache.due()
    cache.refresh()
    cache.refused()
    assert not cache.due()  # a password simply wrong: one read per 10 s, not per request
    clock.now += 10
    assert cache.due()


def test_a_failed_refresh_keeps_the_secret_in_hand_and_tries_again_soon() -> None:
    source, clock = FakeSource(), Clock()
    cache = SecretCache(source, 300, clock=clock, min_reread_seconds=10)
    cache.get()
    clock.now += 300
    source.error = SecretUnavailable("Secrets Manager unreachable")
    assert cache.refresh() is False
    assert cache.get().version_id == "v1"
    assert not cache.due()
    clock.now += 10
    assert cache.due()


# --- deps: built with the secret, built again on a rotation ----------------------


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    from Cryptodome.PublicKey import RSA

    app, alipay = RSA.generate(1024), RSA.generate(1024)
    return {"app": app.export_key().decode(),
            "alipay": alipay.publickey().export_key().decode()}


@pytest.fixture
def source(keys: dict[str, str]) -> Iterator[FakeSource]:
    fake = FakeSource({**VALUES, "ALIPAY_APP_PRIVATE_KEY": keys["app"]})
    clock = Clock()
    deps.use_secrets(SecretCache(fake, 300, clock=clock, min_reread_seconds=10))
    fake.clock = clock  # type: ignore[attr-defined]
    yield fake
    deps.use_secrets(None)
    deps.use(None)


def test_a_function_with_secret_id_is_built_from_the_secret(source: FakeSource,
                                                            keys: dict[str, str]) -> None:
    built = deps.build(on_aws("api", **PUBLIC, ALIPAY_PUBLIC_KEY=keys["alipay"]))
    assert built.settings.rmq_url == "amqps://api:pw1@mq:5671/%2F"
    assert built.settings.alipay_app_private_key == keys["app"]
    assert built.settings.jwt_secret == ""  # the API is not given the JWT secret
    assert built.gateway is not None
    assert built.gateway.timeout == config.ALIPAY_SHORT_TIMEOUT_SECONDS  # type: ignore
    assert isinstance(built.broker, deps.RefusalWatch)
    assert source.reads == 1


def test_without_secret_id_nothing_reads_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    deps.use_secrets(None)

    def never(*args: Any) -> None:
        raise AssertionError("Secrets Manager asked without SECRET_ID")

    monkeypatch.setattr(secrets.SecretsManagerSource, "__init__", never)
    built = deps.build(config.load({"STAGE": "test", "FUNCTION_ROLE": "authorizer",
                                    "JWT_SECRET": JWT}))
    assert built.settings.jwt_secret == JWT
    assert not isinstance(built.broker, deps.RefusalWatch)
    assert deps._secrets is None


def _settings_for(role: str, keys: dict[str, str]) -> config.Settings:
    return on_aws(role, **PUBLIC, ALIPAY_PUBLIC_KEY=keys["alipay"])


def test_a_rotation_builds_the_dependencies_again_after_the_ttl(
        source: FakeSource, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "get", lambda: _settings_for("sweeper", keys))
    first = deps.get()
    assert deps.get() is first
    source.clock.now += 300  # type: ignore[attr-defined]
    assert deps.get() is first  # read again, same version: kept
    assert source.reads == 2
    closed: list[bool] = []
    monkeypatch.setattr(first.broker, "close", lambda: closed.append(True), raising=False)
    source.values["RMQ_PUBLISH_URL"] = "amqps://api:pw2@mq:5671/%2F"
    source.version = "v2"
    source.clock.now += 300  # type: ignore[attr-defined]
    second = deps.get()
    assert second is not first
    assert second.settings.rmq_url == "amqps://api:pw2@mq:5671/%2F"
    assert closed == [True]  # the old connection goes


def _refused() -> BrokerUnavailable:
    """What the broker raises when RabbitMQ refuses the user (pika's error as cause)."""
    closed = pika.exceptions.ConnectionClosedByBroker(
        403, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN")
    cause = pika.exceptions.ProbableAuthenticationError(repr(closed))
    try:
        raise BrokerUnavailable(f"cannot connect to RabbitMQ at amqps://mq:5671/: {cause!r}") \
            from cause
    except BrokerUnavailable as exc:
        return exc


def test_a_refused_user_is_told_apart_from_a_broker_that_is_down() -> None:
    assert deps.credential_refused(_refused())
    down = BrokerUnavailable("cannot connect to RabbitMQ at amqps://mq:5671/: "
                             "AMQPConnectionWorkflowFailed(...)")
    assert not deps.credential_refused(down)
    assert not deps.credential_refused(ValueError("no access"))


def failing_publish(d: Any, monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    """The broker inside d's RefusalWatch raises `exc` on every publish_pay."""
    inner = d.broker._broker

    def publish_pay(msg: Any) -> None:
        raise exc

    monkeypatch.setattr(inner, "publish_pay", publish_pay)
    monkeypatch.setattr(inner, "close", lambda: None)


def test_rabbitmq_refusing_the_user_reads_the_secret_again_and_rebuilds(
        source: FakeSource, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "get", lambda: _settings_for("sweeper", keys))
    first = deps.get()
    failing_publish(first, monkeypatch, _refused())
    source.values["RMQ_PUBLISH_URL"] = "amqps://api:pw2@mq:5671/%2F"
    source.version = "v2"  # rotated meanwhile
    source.clock.now += 10  # type: ignore[attr-defined]
    with pytest.raises(BrokerUnavailable):
        first.broker.publish_pay({"orderId": "o"})  # this request fails (503 / failure)
    second = deps.get()  # the next one reads the secret at once, and has the new user
    assert second is not first
    assert second.settings.rmq_url == "amqps://api:pw2@mq:5671/%2F"
    assert source.reads == 2


def test_a_broker_that_is_merely_down_reads_no_secret(
        source: FakeSource, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "get", lambda: _settings_for("sweeper", keys))
    first = deps.get()
    failing_publish(first, monkeypatch,
                    BrokerUnavailable("cannot connect to RabbitMQ at amqps://mq:5671/: timed out"))
    source.clock.now += 10  # type: ignore[attr-defined]
    with pytest.raises(BrokerUnavailable):
        first.broker.publish_pay({"orderId": "o"})
    assert deps.get() is first
    assert source.reads == 1


def test_a_rotated_secret_that_cannot_serve_keeps_what_was_built(
        source: FakeSource, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "get", lambda: _settings_for("api", keys))
    first = deps.get()
    del source.values["RMQ_PUBLISH_URL"]
    source.version = "v2"
    source.clock.now += 300  # type: ignore[attr-defined]
    assert deps.get() is first  # logged as an error; the old user may still serve


def test_a_secret_left_in_the_environment_is_overridden_and_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="chalicelib.secrets"):
        got = secrets.resolve(on_aws("authorizer", JWT_SECRET="old-" + JWT), Secret("v1", VALUES))
    assert got.jwt_secret == JWT
    assert "JWT_SECRET is in the environment too" in caplog.text
    assert JWT not in caplog.text
