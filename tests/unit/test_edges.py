"""The public edges' settings that no request would show: the authorizer's cache."""

from __future__ import annotations

from typing import Any

from chalice.deploy.swagger import CFNSwaggerGenerator


def test_the_authorizer_caches_nothing() -> None:
    """API Gateway keeps an authorizer's answer 300 s unless told otherwise: a token
    would work up to five minutes past its `exp`. Tokens are issued with any
    lifetime (`python -m local token --ttl`), so no cache length is safe but 0."""
    from app import app, jwt_auth

    assert [(a.name, a.ttl_seconds) for a in app.builtin_auth_handlers] == [("jwt_auth", 0)]
    assert jwt_auth.config.ttl_seconds == 0
    # What `chalice package` writes into the API's definition: 0 is written (None
    # would leave API Gateway's default of 300).
    swagger: dict[str, Any] = CFNSwaggerGenerator().generate_swagger(app)
    authorizer = swagger["securityDefinitions"]["jwt_auth"]["x-amazon-apigateway-authorizer"]
    assert authorizer["authorizerResultTtlInSeconds"] == 0
