"""A private RabbitMQ node for the tests that stop or kill a broker.

The machine's RabbitMQ (127.0.0.1:5672) is shared with other tests and
benchmarks, so it is never stopped or killed here. This starts a node of its
own: its own name, AMQP and distribution ports, data and log directories, an
empty plugin list (no management listener on 15672, no prometheus) and its own
Erlang cookie in a HOME of its own, so that `rabbitmqctl -n NODE` from this
module reaches it and nothing else does. It runs as the current user, straight
from the Debian package's scripts (/usr/lib/rabbitmq/bin) rather than the
wrappers in /usr/sbin, which switch to the rabbitmq user.

`kill()` is a SIGKILL of that node's beam.smp (its pid from the pid file), as a
crashed broker; `start()` again reuses the same data directory, so durable
queues and persistent messages come back as after a real crash.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    A node keeps its ports across a kill and a restart. A port the kernel handed
    out (bind to 0) is an ephemeral one, and while the node is down any outgoing
    connection on this busy machine may take it as its source port; the restart
    then fails on eaddrinuse. Ports below the range are never handed out that way.
    """
    low = _ephemeral_low()
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below {low}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def available() -> str | None:
    """None when a private node can be started here, else why not."""
    for script in ("rabbitmq-server", "rabbitmqctl"):
        if not (SCRIPTS / script).exists():
            return f"{SCRIPTS / script} is missing (Debian's rabbitmq-server package)"
    return None


class PrivateRabbit:
    def __init__(self, base: Path, *, cookie: str | None = None, name: str | None = None) -> None:
        """`cookie`: the Erlang cookie (nodes that cluster share one); `name`: the
        node's name (`rel-<random>@localhost` when None)."""
        self.base = base
        self.name = name or f"rel-{secrets.token_hex(4)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        home = base / "home"
        for sub in ("home", "mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        cookie_file = home / ".erlang.cookie"
        if not cookie_file.exists():
            cookie_file.write_text(cookie or secrets.token_hex(16).upper())
            cookie_file.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's NODENAME=rabbit
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "log.console = false\n"
            "log.file.level = warning\n"
        )
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_PID_FILE": str(base / "pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> str:
        done = subprocess.run([str(SCRIPTS / "rabbitmqctl"), "-n", self.name, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.name}: "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def start(self, timeout: float = 90.0) -> float:
        """Start the node (again) and wait until it serves AMQP; returns the seconds it took."""
        began = time.monotonic()
        pid_file = self.base / "pid"
        self._launch()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                # the node gave up (a port still held, epmd slow after a kill):
                # the tail of server.out says why; try again while there is time
                log.warning("private RabbitMQ %s exited with %s while starting: %s", self.name,
                            self._proc.returncode, self._tail())
                time.sleep(2)
                self._launch()
                continue
            done = subprocess.run([str(SCRIPTS / "rabbitmqctl"), "-q", "-n", self.name,
                                   "await_startup", "--timeout", "10"], env=self.env,
                                  capture_output=True, timeout=30, check=False)
            if done.returncode == 0 and self._port_open():
                self.pid = int(pid_file.read_text().strip())
                return time.monotonic() - began
            time.sleep(0.3)
        raise TimeoutError(f"private RabbitMQ {self.name} did not start in {timeout:.0f} s: "
                           f"{self.base / 'server.out'} ends with: {self._tail()}")

    def _launch(self) -> None:
        (self.base / "pid").unlink(missing_ok=True)
        with open(self.base / "server.out", "ab") as out:
            self._proc = subprocess.Popen(
                [str(SCRIPTS / "rabbitmq-server")], env=self.env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=self.base)

    def _tail(self, lines: int = 15) -> str:
        """The last lines the node wrote, for an error message CI keeps."""
        text = ""
        for f in (self.base / "server.out", *sorted((self.base / "log").glob("*.log"))):
            try:
                text += "".join(f.read_text(errors="replace").splitlines(keepends=True)[-lines:])
            except OSError:
                pass
        return text.strip()[-3000:] or "(nothing)"

    def _reap(self) -> None:
        """Collect the started script (it exec's into beam.smp, or waits for it)."""
        if self._proc is not None:
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                log.warning("rabbitmq-server script %d still running", self._proc.pid)
            self._proc = None

    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def kill(self) -> None:
        """SIGKILL the node's beam.smp: a crash, no clean shutdown."""
        assert self.pid is not None, "not started"
        pid, self.pid = self.pid, None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        self._reap()
        log.info("private RabbitMQ %s (pid %d) killed", self.name, pid)

    def stop(self) -> None:
        """Stop the node for good and remove its files."""
        if self.pid is not None:
            try:
                self.ctl("stop", timeout=60, check=False)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.1)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        self._reap()
        shutil.rmtree(self.base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child still answers kill 0; /proc tells
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
