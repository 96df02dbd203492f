"""Bearer JWTs: HS256 with JWT_SECRET, `sub` is the username, `exp` required.

While JWT_SECRET is rotated, a token signed with the previous secret
(JWT_PREVIOUS_SECRET) is still accepted, so that nobody signed in is turned away;
tokens are only ever issued with the current one."""

from __future__ import annotations

import re
import time

import jwt

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


class AuthError(Exception):
    """The token is missing, malformed, expired or not signed by us."""


OPERATOR = "operator"  # the `role` claim of the people who run the shop


def issue(secret: str, username: str, ttl_seconds: int = 3600 * 12,
          role: str | None = None) -> str:
    if not USERNAME_RE.fullmatch(username):
        raise ValueError(f"not a username: {username!r}")
    now = int(time.time())
    claims: dict[str, object] = {"sub": username, "iat": now, "exp": now + ttl_seconds}
    if role:
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm="HS256")


def username_from_header(secret: str, header: str | None, previous: str = "") -> str:
    return identity_from_header(secret, header, previous)[0]


def _decode(token: str, secret: str, previous: str) -> dict[str, object]:
    """The claims of a token signed with `secret`, or else with `previous` (when set)."""
    options = {"require": ["exp", "sub"]}
    try:
        return dict(jwt.decode(token, secret, algorithms=["HS256"], options=options))
    except jwt.InvalidSignatureError:
        if not previous:
            raise
    return dict(jwt.decode(token, previous, algorithms=["HS256"], options=options))


def identity_from_header(secret: str, header: str | None,
                         previous: str = "") -> tuple[str, str]:
    """(username, role) of a valid bearer token; role "" when it has none.
    `previous`: the JWT secret being rotated out, whose tokens are still good."""
    if not secret:
        raise AuthError("the service has no JWT_SECRET")
    if not header:
        raise AuthError("no Authorization header")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization must be 'Bearer <token>'")
    try:
        claims = _decode(token.strip(), secret, previous)
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("the token has expired") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USERNAME_RE.fullmatch(sub):
        raise AuthError("the token names no valid user")
    role = claims.get("role")
    return sub, role if isinstance(role, str) else ""
