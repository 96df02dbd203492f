"""The broker's users: the API's and the worker's, each with only what it needs.

Why a module of its own: one definition of the two users serves the operator's
command (`python -m chalicelib.cli broker-users`), `make run` and the compose
file, whether the broker is a local node (`rabbitmqctl`), a cluster of one's own
or Amazon MQ (definitions imported through the management UI or API). The
permissions themselves are topology.API_PERMISSIONS and WORKER_PERMISSIONS.

A user's name, password and vhost come from the URL that service connects with
(RMQ_URL for the API, RMQ_WORKER_URL for the worker), so the users made are
exactly the ones the services use.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from chalicelib.broker.connection import broker_urls
from chalicelib.broker.topology import API_PERMISSIONS, WORKER_PERMISSIONS, Permissions

logger = logging.getLogger(__name__)

API_ROLE = "api"
WORKER_ROLE = "worker"
ADMIN_PERMISSIONS = Permissions(configure=".*", write=".*", read=".*")

@dataclass(frozen=True)
class BrokerUser:
    role: str
    name: str
    password: str = field(repr=False)
    vhost: str
    permissions: Permissions
    tags: tuple[str, ...] = ()


def credentials(url: str) -> tuple[str, str, str]:
    """(user, password, vhost) of an amqp(s) URL; the first node's of a comma-separated list."""
    parts = urlsplit(broker_urls(url)[0])
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an amqp:// or amqps:// URL: {parts.scheme}://...")
    if not parts.username or not parts.password:
        raise ValueError(f"no user and password in the URL of {parts.hostname or '?'}")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) if path else "/"
    return unquote(parts.username), unquote(parts.password), vhost


def service_users(api_url: str, worker_url: str) -> list[BrokerUser]:
    """The API's and the worker's users, from the URLs they connect with.

    ValueError when they are one user (nothing would be separated), a URL has
    no credentials, or the two URLs name different vhosts.
    """
    api = credentials(api_url)
    worker = credentials(worker_url)
    if api[0] == worker[0]:
        raise ValueError(
            f"the API and the worker both connect as {api[0]!r}: set RMQ_URL (the API's "
            "user) and RMQ_WORKER_URL (the worker's) to two different users"
        )
    if api[2] != worker[2]:
        raise ValueError(f"RMQ_URL names vhost {api[2]!r}, RMQ_WORKER_URL {worker[2]!r}")
    return [
        BrokerUser(API_ROLE, api[0], api[1], api[2], API_PERMISSIONS),
        BrokerUser(WORKER_ROLE, worker[0], worker[1], worker[2], WORKER_PERMISSIONS),
    ]


def rabbitmqctl_commands(users: Sequence[BrokerUser]) -> list[str]:
    """Shell lines that make `users` on a node, idempotently (a user that exists gets
    its password set again). They hold the passwords."""
    lines: list[str] = []
    for vhost in dict.fromkeys(u.vhost for u in users):
        if vhost != "/":
            lines.append(shlex.join(["rabbitmqctl", "add_vhost", vhost]))
    for user in users:
        password = shlex.quote(user.password)
        name = shlex.quote(user.name)
        # The password goes on stdin, so that it is not in the process list.
        lines.append(
            f"printf '%s' {password} | rabbitmqctl add_user {name}"
            f" || printf '%s' {password} | rabbitmqctl change_password {name}"
        )
        p = user.permissions
        lines.append(shlex.join(["rabbitmqctl", "set_permissions", "-p", user.vhost, user.name,
                                 p.configure, p.write, p.read]))
        lines.append(shlex.join(["rabbitmqctl", "set_user_tags", user.name, *user.tags]))
    return lines


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def definitions(users: Sequence[BrokerUser]) -> dict[str, Any]:
    """RabbitMQ definitions (users with hashed passwords, vhosts, permissions) for
    `load_definitions` at boot, `rabbitmqctl import_definitions`, or the management
    UI's and Amazon MQ's "Import definitions"."""
    return {
        "users": [
            {
                "name": u.name,
                "password_hash": password_hash(u.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": list(u.tags),
            }
            for u in users
        ],
        "vhosts": [{"name": v} for v in dict.fromkeys(u.vhost for u in users)],
        "permissions": [
            {
                "user": u.name,
                "vhost": u.vhost,
                "configure": u.permissions.configure,
                "write": u.permissions.write,
                "read": u.permissions.read,
            }
            for u in users
        ],
    }


Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def apply(
    users: Sequence[BrokerUser],
    *,
    rabbitmqctl: Sequence[str] = ("rabbitmqctl",),
    run: Runner = subprocess.run,
) -> None:
    """Make `users` on the node `rabbitmqctl` reaches (idempotent); RuntimeError on failure."""

    def ctl(*args: str, stdin: str | None = None, exists_ok: bool = False) -> None:
        # A password goes on stdin: an argument would show in the process list.
        done = run([*rabbitmqctl, *args], input=stdin, capture_output=True, text=True,
                   timeout=60, check=False)
        said = (done.stderr or done.stdout).strip()
        if done.returncode != 0:
            if exists_ok and "already exists" in said:
                raise FileExistsError(said)
            raise RuntimeError(f"rabbitmqctl {' '.join(args[:2])} ... failed "
                               f"({done.returncode}): {said}. Amazon MQ has no "
                               "rabbitmqctl: print the definitions (broker-users "
                               "--definitions) and import them in the broker's RabbitMQ "
                               "web console (Overview, Import definitions) or POST them "
                               "to its management API's /api/definitions")

    for vhost in dict.fromkeys(u.vhost for u in users):
        if vhost != "/":
            ctl("add_vhost", vhost)
    for user in users:
        try:
            ctl("add_user", user.name, stdin=user.password, exists_ok=True)
        except FileExistsError:
            ctl("change_password", user.name, stdin=user.password)
        p = user.permissions
        ctl("set_permissions", "-p", user.vhost, user.name, p.configure, p.write, p.read)
        ctl("set_user_tags", user.name, *user.tags)
        logger.info("RabbitMQ user %s (%s) ready in vhost %s", user.name, user.role, user.vhost)
