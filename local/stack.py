"""`make run`: the whole local stack on this machine, one child process per part.

moto's DynamoDB server (also the local S3, where the bills bucket
shop-local-bills is made), the Alipay sandbox (today's bill served too), the API
(chalice local) and the bridge; RabbitMQ is the machine's own. Ctrl-C (or
SIGTERM) stops every child.

RabbitMQ users: unless RMQ_URL (or RMQ_URL_FILE) is set in the environment, the
API connects as `shop-api` (it may only publish) and the bridge as `shop-worker`,
with passwords made by the first `make run` in local/.keys/ (ignored by git);
`make run` creates or updates both users with rabbitmqctl
(chalicelib.broker.users) and declares the queues as the worker. The commands
run beside it (`python -m local bridge`, `parked`, ...) use the same users once
their passwords exist. With RMQ_URL set, that URL serves both, as it is.

`python -m local.stack compose-broker DIR` makes the same for the compose file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

PROJECT_DIR = Path(__file__).resolve().parent.parent
RUN_DIR = PROJECT_DIR / "local" / ".run"
KEYS_DIR = PROJECT_DIR / "local" / ".keys"

log = logging.getLogger("local.stack")

# The local stage's RabbitMQ users (chalicelib/broker/users.py gives them their rights).
API_USER = "shop-api"
WORKER_USER = "shop-worker"
ADMIN_USER = "shop-admin"  # compose only: the management UI's login

# goods id, name, price (fen), stock: some with little stock, to see 409s.
CATALOGUE = [
    ("tea-cup", "Celadon tea cup", 1990, 200),
    ("teapot", "Yixing clay teapot", 5990, 50),
    ("tea-tray", "Bamboo tea tray", 12900, 20),
    ("longjing", "Longjing green tea 250g", 8800, 5),
    ("puer-1999", "Pu'er cake, 1999 harvest", 99900, 1),
]

# Where the local stack keeps the raw bills the reconciliation downloads (moto's S3).
LOCAL_BILLS_BUCKET = "shop-local-bills"

# The demo flash sale: sale id, goods id, name, price (fen), stock, hours open.
DEMO_SALE = ("teapot-flash", "teapot", "Yixing clay teapot, flash sale", 990, 100, 24)


def seed_sale(force: bool = False) -> bool:
    """The demo flash sale, open from now on; (re)made when missing or over. True if made."""
    from datetime import UTC, datetime, timedelta

    from chalicelib import config
    from chalicelib.domain import Sale
    from chalicelib.store import Store

    store = Store.from_settings(config.get())
    sale_id, goods_id, name, price, stock, hours = DEMO_SALE
    now = datetime.now(UTC)
    current = store.get_sale(sale_id, consistent=True)
    if current is not None and current.end_time > now and not force:
        return False
    store.put_sale(Sale(sale_id, goods_id, name, price, stock, now, now + timedelta(hours=hours)))
    return True


def local_environment() -> dict[str, str]:
    """The local stage's settings, with the environment winning, and the ports applied."""
    config = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())
    env = {**config.get("environment_variables", {}),
           **config["stages"]["local"]["environment_variables"]}
    api_port = os.environ.get("API_PORT", "8000")
    sandbox_port = os.environ.get("SANDBOX_PORT", "8001")
    dynamodb_port = os.environ.get("DYNAMODB_PORT", "8002")
    env["AWS_ENDPOINT_URL_DYNAMODB"] = f"http://127.0.0.1:{dynamodb_port}"
    # moto's server serves S3 beside DynamoDB (its fault front passes S3 through
    # untouched): the raw bills go to its bucket. The DynamoDB endpoint as it will
    # be once the environment wins, so the compose file's (http://dynamodb:8002)
    # serves both too.
    env["AWS_ENDPOINT_URL_S3"] = os.environ.get("AWS_ENDPOINT_URL_DYNAMODB",
                                                env["AWS_ENDPOINT_URL_DYNAMODB"])
    env["BILLS_BUCKET"] = LOCAL_BILLS_BUCKET
    env["ALIPAY_GATEWAY"] = f"http://127.0.0.1:{sandbox_port}/gateway.do"
    env["ALIPAY_NOTIFY_URL"] = f"http://127.0.0.1:{api_port}/alipay/notify"
    env["ALIPAY_RETURN_URL"] = f"http://127.0.0.1:{api_port}/alipay/return"
    for key in ("ALIPAY_APP_PRIVATE_KEY_FILE", "ALIPAY_PUBLIC_KEY_FILE"):
        env[key] = str(PROJECT_DIR / env[key])
    env.update({"API_PORT": api_port, "SANDBOX_PORT": sandbox_port,
                "DYNAMODB_PORT": dynamodb_port})
    if os.environ.get("RMQ_URL_FILE"):
        # The compose file's API: its URL in a file of a volume only it mounts. Set
        # here, so that chalice local does not put the stage's RMQ_URL in its place.
        env["RMQ_URL"] = Path(os.environ["RMQ_URL_FILE"]).read_text().strip()
    stored = {user: _stored(KEYS_DIR, user) for user in (API_USER, WORKER_USER)}
    if local_users_wanted() and all(stored.values()):
        base = env["RMQ_URL"]
        env["RMQ_URL"] = with_user(base, API_USER, stored[API_USER])
        env["RMQ_WORKER_URL"] = with_user(base, WORKER_USER, stored[WORKER_USER])
    merged = {**env, **os.environ}  # the environment wins
    merged["PYTHONUNBUFFERED"] = "1"
    return merged


def local_users_wanted() -> bool:
    """Whether the local stack uses its two RabbitMQ users: no RMQ_URL was given."""
    return not {"RMQ_URL", "RMQ_URL_FILE"} & set(os.environ)


def _stored(directory: Path, user: str) -> str:
    file = directory / f"rabbitmq-{user}.password"
    return file.read_text().strip() if file.exists() else ""


def password(directory: Path, user: str) -> str:
    """The user's password from `directory`, made (random, owner-only) on first use."""
    file = directory / f"rabbitmq-{user}.password"
    if not file.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(24))
    return file.read_text().strip()


def with_user(url: str, user: str, secret: str) -> str:
    """`url` (amqp://guest:guest@host:port/vhost) with another user and password."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user, safe='')}:{quote(secret, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def broker_users(env: dict[str, str]) -> list[Any]:
    """The API's and the worker's users of `env`; none when one URL serves both."""
    from chalicelib.broker import users

    worker = env.get("RMQ_WORKER_URL", "")
    if not worker or worker == env["RMQ_URL"]:
        return []
    return users.service_users(env["RMQ_URL"], worker)


def compose_broker(root: Path, host: str = "rabbitmq") -> None:
    """The compose file's broker users, on first start: `root/api/url` (the API's URL,
    RMQ_URL_FILE), `root/worker/url` (the worker's, RMQ_WORKER_URL_FILE) and
    `root/rabbitmq/definitions.json` (loaded by RabbitMQ at boot: the two users, and
    shop-admin for the management UI, its password in `root/rabbitmq`). Each
    directory is a volume of its own, mounted only where it is needed."""
    from chalicelib.broker import users

    base = f"amqp://guest:guest@{host}:5672/%2F"
    urls = {}
    for role, user in (("api", API_USER), ("worker", WORKER_USER)):
        file = root / role / "url"
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(with_user(base, user, secrets.token_urlsafe(24)))
        urls[role] = file.read_text().strip()
    made = users.service_users(urls["api"], urls["worker"])
    admin = users.BrokerUser("admin", ADMIN_USER, password(root / "rabbitmq", ADMIN_USER), "/",
                             users.ADMIN_PERMISSIONS, ("administrator",))
    definitions = root / "rabbitmq" / "definitions.json"
    definitions.write_text(json.dumps(users.definitions([*made, admin]), indent=2))
    # RabbitMQ (its own user) reads the definitions; the services (uid 10001) their URL.
    for file in (definitions, root / "api" / "url", root / "worker" / "url"):
        file.chmod(0o644)


def apply_local_environment() -> dict[str, str]:
    """For commands run beside the stack (token, sweep, bridge, parked, bench)."""
    env = local_environment()
    os.environ.update(env)
    return env


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None,
                  ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeedRefused(RuntimeError):
    """The demo seed was pointed at a stage that is not local, and not named."""


def check_seed_stage(stage: str, force_stage: str | None = None) -> None:
    """The demo seed writes the demo catalogue and flash sale over what is there (a
    forced seed resets their stock): on a local stage only, unless `force_stage`
    names this very stage (`python -m local seed --force-stage prod`)."""
    from chalicelib import config

    if stage in config.LOCAL_STAGES or (force_stage is not None and force_stage == stage):
        return
    hint = (f" (--force-stage names {force_stage!r})" if force_stage else "")
    raise SeedRefused(
        f"refusing to seed stage {stage!r}{hint}: the demo seed overwrites the catalogue "
        f"and resets its stock and the demo sale's, which is only for the local stages "
        f"({', '.join(config.LOCAL_STAGES)}). To seed {stage!r} all the same, say so: "
        f"--force-stage {stage}")


def seed(force: bool = False, force_stage: str | None = None) -> int:
    """Creates the tables and, on first start, the catalogue. Returns goods added.
    SeedRefused outside the local stages unless `force_stage` names the stage."""
    from chalicelib import config
    from chalicelib.domain import Goods
    from chalicelib.store import Store

    settings = config.get()
    check_seed_stage(settings.stage, force_stage)
    store = Store.from_settings(settings)
    store.create_tables()
    create_bills_bucket(settings.bills_bucket, settings.aws_region)
    seed_sale(force)
    if store.list_goods() and not force:
        return 0
    for gid, name, price, stock in CATALOGUE:
        store.put_goods(Goods(gid, name, price, stock))
    return len(CATALOGUE)


def create_bills_bucket(bucket: str, region: str) -> bool:
    """The bills bucket on the local S3 (AWS_ENDPOINT_URL_S3), unless it is there or
    none is named. True if made. Never against AWS: a deployed stage's bucket is
    the template's (versioned, encrypted, private)."""
    if not bucket:
        return False
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3", "")
    if not endpoint:
        raise RuntimeError(f"BILLS_BUCKET {bucket} is made on the local S3 only, not on "
                           "AWS: set AWS_ENDPOINT_URL_S3 to moto's server")
    import boto3
    from botocore.config import Config

    s3 = boto3.session.Session().client(
        "s3", region_name=region, endpoint_url=endpoint,
        config=Config(s3={"addressing_style": "path"}, connect_timeout=3, read_timeout=30))
    try:
        s3.head_bucket(Bucket=bucket)
        return False
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
    kwargs: dict[str, Any] = {}
    if region != "us-east-1":  # S3 wants the region named, except for its first one
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    s3.create_bucket(Bucket=bucket, **kwargs)
    return True


class Stack:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        RUN_DIR.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
        logfile = open(RUN_DIR / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(args, cwd=PROJECT_DIR, env=env or self.env, stdout=logfile,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append((name, proc))
        return proc

    def stop(self) -> None:
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, proc in reversed(self.children):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say(part: str, text: str) -> None:
    sys.stdout.write(f"{part:<10} {text}\n")
    sys.stdout.flush()


def run() -> int:
    if local_users_wanted():
        for user in (API_USER, WORKER_USER):
            password(KEYS_DIR, user)
    env = local_environment()
    os.environ.update(env)
    py = sys.executable
    api_port, sandbox_port, dynamodb_port = (int(env[k]) for k in
                                             ("API_PORT", "SANDBOX_PORT", "DYNAMODB_PORT"))
    for port in (api_port, sandbox_port, dynamodb_port):
        if not port_is_free(port):
            _say("error", f"port {port} is taken: another stack running? (set API_PORT, "
                          "SANDBOX_PORT or DYNAMODB_PORT to move it)")
            return 1
    from chalicelib.broker import Broker, declare_at, safe_url

    made = broker_users(env)
    if made:
        from chalicelib.broker import users

        try:
            users.apply(made)
        except (OSError, RuntimeError) as exc:
            _say("rabbitmq", f"cannot make the users {API_USER} and {WORKER_USER}: {exc}")
            _say("", "make them as RabbitMQ's admin: python -m local.stack broker-users | sudo sh"
                     " (or set RMQ_URL to run everything as one user)")
            return 1
    delay = int(env["ORDER_CHECK_DELAY_SECONDS"])
    queue_type = env.get("RMQ_QUEUE_TYPE", "classic")
    try:
        # As the worker, so that the API (which may not declare) can publish at once.
        declare_at(env.get("RMQ_WORKER_URL") or env["RMQ_URL"], delay, queue_type)
        Broker(env["RMQ_URL"], delay, queue_type, declare=False).ping()
    except Exception as exc:  # noqa: BLE001 - reported, then we stop
        _say("rabbitmq", f"not reachable at {safe_url(env['RMQ_URL'])}: {exc}")
        _say("", "start it with: rabbitmq-server -detached")
        return 1
    who = f" (users {API_USER}, {WORKER_USER})" if made else ""
    _say("rabbitmq", f"{safe_url(env['RMQ_URL'])}{who}")

    from local.alipay_sandbox.keys import ensure_keys

    ensure_keys(KEYS_DIR)
    stack = Stack(env)
    with _stop_on_signals():
        try:
            moto = stack.start("dynamodb", [py, "-m", "local", "dynamodb", "--port",
                                            str(dynamodb_port)])
            wait_for_port(dynamodb_port, proc=moto)
            added = seed()
            _say("dynamodb", f"{env['AWS_ENDPOINT_URL_DYNAMODB']} (moto; "
                             f"{'seeded ' + str(added) + ' goods' if added else 'tables ready'})")
            bills = (f"bills kept in s3://{env['BILLS_BUCKET']}" if env.get("BILLS_BUCKET")
                     else "BILLS_BUCKET empty: no bill is kept")
            _say("s3", f"{env['AWS_ENDPOINT_URL_S3']} (moto, the same server; {bills})")
            _say_faults("dynamodb", env, ("DYNAMODB_FAULT_RATE", "DYNAMODB_FAULTS",
                                          "DYNAMODB_SLOW_MS"))
            # Today's bill too (Alipay serves past days only), so that a payment made
            # on the local stack can be reconciled at once; the environment wins.
            sandbox_env = {"SANDBOX_BILLS_TODAY": "1", **env}
            sandbox = stack.start("sandbox", [py, "-m", "local.alipay_sandbox", "--port",
                                              str(sandbox_port), "--keys", str(KEYS_DIR)],
                                  sandbox_env)
            wait_for_port(sandbox_port, proc=sandbox)
            _say("alipay", f"{env['ALIPAY_GATEWAY']} (local sandbox, app_id "
                           f"{env['ALIPAY_APP_ID']}, seller_id {env['ALIPAY_SELLER_ID']})")
            _say_faults("alipay", env, ("SANDBOX_FAULT_RATE", "SANDBOX_FAULTS",
                                        "SANDBOX_SLOW_SECONDS", "SANDBOX_NOTIFY_DELAY_SECONDS"))
            # The API gets only its own RabbitMQ user's URL.
            api_env = {k: v for k, v in env.items() if k != "RMQ_WORKER_URL"}
            api = stack.start("api", [py, "-m", "local", "api", "--port", str(api_port)],
                              api_env)
            wait_for_port(api_port, proc=api, timeout=60)
            _say("api", f"http://127.0.0.1:{api_port} (chalice local, stage local)")
            # And the bridge only the worker's.
            bridge_env = {**env, "RMQ_URL": env.get("RMQ_WORKER_URL") or env["RMQ_URL"]}
            bridge = stack.start("bridge", [py, "-m", "local", "bridge"], bridge_env)
            time.sleep(1.0)
            if bridge.poll() is not None:
                raise RuntimeError(f"the bridge exited with {bridge.returncode}: "
                                   f"see {RUN_DIR / 'bridge.log'}")
            _say("bridge", "consuming queue.order.check, queue.order.pay and queue.order.seckill "
                           f"({env.get('SECKILL_ORDERS_PER_SECOND', '200')} orders/s); "
                           "relaying order events to exchange.order.events "
                           "(python -m local events tail) and delivering webhooks")
            _wait_healthy(api_port)
            from chalicelib import auth

            token = auth.issue(env["JWT_SECRET"], "demo")
            _say("token", f"demo: {token}")
            _say("logs", str(RUN_DIR))
            _say("ready", f"http://127.0.0.1:{api_port}  (Ctrl-C stops everything)")
            while True:
                for name, proc in stack.children:
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}: "
                                           f"see {RUN_DIR / (name + '.log')}")
                time.sleep(0.5)
        except KeyboardInterrupt:
            _say("stopping", "…")
            return 0
        except (RuntimeError, TimeoutError) as exc:
            _say("error", str(exc))
            return 1
        finally:
            stack.stop()
            _say("stopped", "every child process")


def _say_faults(part: str, env: dict[str, str], names: tuple[str, ...]) -> None:
    """The fault settings `make run` hands its children (they read them from the
    environment: DYNAMODB_FAULT_RATE=0.1 make run), when any is set."""
    given = [f"{name}={env[name]}" for name in names if env.get(name)]
    if given:
        _say(part, "faults: " + " ".join(given))


def _wait_healthy(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise RuntimeError(f"/health did not turn ok: {last}")


def main(argv: list[str]) -> int:
    """`compose-broker DIR`: compose_broker; `broker-users`: the rabbitmqctl lines that
    make the local stack's users (for a node only root or rabbitmq may administer)."""
    if argv[:1] == ["compose-broker"] and len(argv) == 2:
        compose_broker(Path(argv[1]))
        return 0
    if argv == ["broker-users"]:
        from chalicelib.broker import users

        for user in (API_USER, WORKER_USER):
            password(KEYS_DIR, user)
        for line in users.rabbitmqctl_commands(broker_users(local_environment())):
            sys.stdout.write(line + "\n")
        return 0
    sys.stderr.write("usage: python -m local.stack compose-broker DIR | broker-users\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
