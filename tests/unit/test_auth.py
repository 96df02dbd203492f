"""chalicelib/auth.py: bearer tokens, and the rotation of JWT_SECRET, during which a
token signed with the previous secret is still good and one signed with neither is
not. The authorizer of app.py is walked through a rotation read from the secret."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from chalicelib import auth, config, deps
from chalicelib.secrets import Secret, SecretCache

NEW = "n" * 40
OLD = "o" * 40
OTHER = "x" * 40


def bearer(secret: str, user: str = "alice", ttl: int = 600, role: str | None = None) -> str:
    return f"Bearer {auth.issue(secret, user, ttl, role=role)}"


def test_a_token_of_the_current_secret_names_its_user_and_role() -> None:
    assert auth.identity_from_header(NEW, bearer(NEW, role=auth.OPERATOR)) == (
        "alice", auth.OPERATOR)
    assert auth.identity_from_header(NEW, bearer(NEW), previous=OLD) == ("alice", "")


def test_a_token_of_the_previous_secret_is_good_only_while_it_is_given() -> None:
    old_token = bearer(OLD, "bob")
    assert auth.username_from_header(NEW, old_token, previous=OLD) == "bob"
    with pytest.raises(auth.AuthError, match="invalid token: Signature verification failed"):
        auth.username_from_header(NEW, old_token)


def test_a_token_of_neither_secret_is_refused() -> None:
    with pytest.raises(auth.AuthError, match="Signature verification failed"):
        auth.username_from_header(NEW, bearer(OTHER), previous=OLD)


def test_the_previous_secret_does_not_lengthen_a_token_or_loosen_its_claims() -> None:
    with pytest.raises(auth.AuthError, match="expired"):
        auth.username_from_header(NEW, bearer(OLD, ttl=-10), previous=OLD)
    no_exp = jwt.encode({"sub": "alice"}, OLD, algorithm="HS256")
    with pytest.raises(auth.AuthError, match="exp"):
        auth.username_from_header(NEW, f"Bearer {no_exp}", previous=OLD)
    unsigned = jwt.encode({"sub": "alice", "exp": 2**40}, None, algorithm="none")
    with pytest.raises(auth.AuthError, match="invalid token"):
        auth.username_from_header(NEW, f"Bearer {unsigned}", previous=OLD)


# --- the authorizer, through a rotation read from the secret --------------------


class Source:
    """The stage's secret as Secrets Manager gives it, changed by the test."""

    def __init__(self) -> None:
        self.version = "v1"
        self.values = {"JWT_SECRET": OLD}

    def read(self) -> Secret:
        return Secret(self.version, dict(self.values))


@pytest.fixture
def authorizer(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Source, list[float]]]:
    source, now = Source(), [1000.0]
    deps.use(None)
    deps.use_secrets(SecretCache(source, 300, clock=lambda: now[0], min_reread_seconds=10))
    settings = config.load({"STAGE": "prod", "FUNCTION_ROLE": "authorizer",
                            "SECRET_ID": "shop-pay/prod"})
    monkeypatch.setattr(config, "get", lambda: settings)
    yield source, now
    deps.use_secrets(None)
    deps.use(None)


def authorize(header: str) -> dict[str, Any]:
    """The authorizer called as API Gateway calls it; its principal and context."""
    from app import jwt_auth

    answer = jwt_auth({"type": "TOKEN", "authorizationToken": header,
                       "methodArn": "arn:aws:execute-api:us-east-1:1:api/api/GET/cart"}, None)
    return {"principal": answer["principalId"], **answer.get("context", {})}


def test_a_rotation_keeps_signed_in_users_until_the_previous_secret_is_taken_out(
        authorizer: tuple[Source, list[float]]) -> None:
    source, now = authorizer
    signed_in = bearer(OLD, "bob")
    assert authorize(signed_in)["principal"] == "bob"
    # Rotated: the new secret signs, the old one is kept as the previous.
    source.version, source.values = "v2", {"JWT_SECRET": NEW, "JWT_PREVIOUS_SECRET": OLD}
    now[0] += 300
    assert authorize(signed_in)["principal"] == "bob"
    assert authorize(bearer(NEW, "carol"))["principal"] == "carol"
    # Once the longest token's lifetime has passed, the previous secret goes.
    source.version, source.values = "v3", {"JWT_SECRET": NEW}
    now[0] += 300
    refused = authorize(signed_in)
    assert refused["principal"] == "anonymous"
    assert "Signature verification failed" in refused["authError"]
    assert authorize(bearer(NEW, "carol"))["principal"] == "carol"
