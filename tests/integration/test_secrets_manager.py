"""chalicelib/secrets.py on moto's Secrets Manager (the session's moto server, as
test_archive.py uses its S3: `mock_aws` would reset that server's tables when it
stops): AWSCURRENT is read with its VersionId, a new version is seen as a
rotation, a function with SECRET_ID is built from the secret, and Secrets Manager
missing or silent leaves as our errors, never boto's."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from chalicelib import config, deps, secrets
from chalicelib.secrets import SecretCache, SecretInvalid, SecretsManagerSource, SecretUnavailable

JWT = "integration-jwt-secret-0123456789abcdef"
VALUES = {"JWT_SECRET": JWT, "ALIPAY_APP_PRIVATE_KEY": "k",
          "RMQ_PUBLISH_URL": "amqps://api:pw1@mq:5671/%2F"}


@pytest.fixture
def secret_id(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_server)
    name = f"shop-pay/test-{uuid.uuid4().hex[:8]}"
    client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_server)
    client.create_secret(Name=name, SecretString=json.dumps(VALUES))
    yield name
    client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)


def _put(moto_server: str, name: str, values: dict[str, str]) -> str:
    client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_server)
    return str(client.put_secret_value(SecretId=name, SecretString=json.dumps(values))
               ["VersionId"])


def test_awscurrent_is_read_with_its_version(secret_id: str) -> None:
    got = SecretsManagerSource(secret_id, "us-east-1").read()
    assert got.version_id
    assert dict(got.values) == VALUES


def test_a_new_version_is_seen_as_a_rotation(secret_id: str, moto_server: str) -> None:
    now = [0.0]
    cache = SecretCache(SecretsManagerSource(secret_id, "us-east-1"), 300,
                        clock=lambda: now[0])
    first = cache.get()
    now[0] = 300
    assert cache.refresh() is False  # nothing changed
    new_version = _put(moto_server, secret_id, {**VALUES, "RMQ_PUBLISH_URL": "amqps://x:pw2@mq/"})
    now[0] = 600
    assert cache.refresh() is True
    assert cache.get().version_id == new_version != first.version_id
    assert cache.get().values["RMQ_PUBLISH_URL"] == "amqps://x:pw2@mq/"


def test_a_function_with_secret_id_is_built_from_it(secret_id: str) -> None:
    deps.use_secrets(None)
    try:
        built = deps.build(config.load({"STAGE": "prod", "FUNCTION_ROLE": "authorizer",
                                        "SECRET_ID": secret_id,
                                        "AWS_DEFAULT_REGION": "us-east-1"}))
        assert built.settings.jwt_secret == JWT
        assert built.settings.rmq_url == ""  # not the authorizer's to hold
    finally:
        deps.use_secrets(None)


def test_a_secret_that_is_not_there_is_a_settings_error(moto_server: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_server)
    with pytest.raises(SecretInvalid, match="ResourceNotFoundException"):
        SecretsManagerSource("shop-pay/no-such-secret", "us-east-1").read()


def test_secrets_manager_not_answering_is_unavailable_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens there: one attempt, no retry, our error (the domain's 503)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", "http://127.0.0.1:9")  # refused
    source = SecretsManagerSource("shop-pay/prod", "us-east-1")
    started = time.monotonic()
    with pytest.raises(SecretUnavailable, match="unreachable") as caught:
        source.read()
    assert time.monotonic() - started < config.SECRETS_READ_SECONDS
    assert caught.value.__cause__ is None
    assert isinstance(caught.value, secrets.Unavailable)


def test_the_role_only_gets_its_keys_from_the_real_answer(secret_id: str) -> None:
    got: Any = SecretsManagerSource(secret_id, "us-east-1").read()
    api = secrets.resolve(config.load({"STAGE": "prod", "FUNCTION_ROLE": "api",
                                       "SECRET_ID": secret_id}), got)
    assert (api.jwt_secret, api.rmq_url) == ("", "amqps://api:pw1@mq:5671/%2F")
