"""Start and stop a private, throwaway RabbitMQ node for `make run` and the test suite."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType

# The scripts behind Debian's /usr/sbin wrappers. The wrappers `su` to the `rabbitmq` user when
# run as root (dropping our environment and needing dirs it owns) and refuse anyone else; the
# scripts themselves run as whoever calls them, so one code path works for root and normal users.
SERVER_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL_SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
INSTALL_COMMAND = "apt-get update && apt-get install -y rabbitmq-server"

HOST = "127.0.0.1"
# Erlang distribution (node <-> rabbitmqctl) stays on loopback too; the cookie is not enough.
_LOOPBACK_DIST_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"
AMQP_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
# An AMQP 0-9-1 server answers the header with a method frame (type 1): Connection.Start.
_FRAME_METHOD = b"\x01"
# Set on every process we start for a node, so stop() can find strays by their environment.
_NODE_MARKER = "ONEBRIDGE_DEVBROKER_NODE"
URL_ENV = "BRIDGE_BROKER__URL"

_POLL_INTERVAL_SECONDS = 0.1
_LOG_TAIL_LINES = 40


class BrokerError(RuntimeError):
    """The local broker could not be installed, started, driven or stopped."""


class PortBusyError(BrokerError):
    """The requested AMQP port is already taken on the loopback address."""


class LocalBroker:
    """One private RabbitMQ node on loopback; all its state lives under `base_dir`."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        port: int = 0,
        *,
        start_timeout_seconds: float = 90.0,
        stop_timeout_seconds: float = 30.0,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
    ) -> None:
        self.host = HOST
        self.port = port
        self.dist_port = 0
        self.epmd_port = 0
        # An amqps listener beside the plain one, when given a certificate and its key.
        self.tls_port = 0
        # The certificate is also what a client of the listener trusts (SSL_CERT_FILE).
        self.tls_cert_file = tls_cert_file if tls_key_file else None
        self._tls_key_file = tls_key_file
        # Unique per process and call, so nodes of parallel runs never share a name or a data dir.
        short_name = f"onebridge-{os.getpid()}-{secrets.token_hex(3)}"
        self.node_name = f"{short_name}@localhost"
        self.node_dir = Path(base_dir).resolve() / short_name
        self.startup_seconds: float | None = None
        self._start_timeout_seconds = start_timeout_seconds
        self._stop_timeout_seconds = stop_timeout_seconds
        self._env: dict[str, str] = {}
        self._epmd: subprocess.Popen[bytes] | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._keep_files = False

    @property
    def url(self) -> str:
        """AMQP URL; `guest` may log in because the node is only reached over loopback."""
        return f"amqp://guest:guest@{self.host}:{self.port}/"

    @property
    def tls_url(self) -> str:
        """amqps URL of the TLS listener (only with tls_cert_file and tls_key_file)."""
        return f"amqps://guest:guest@{self.host}:{self.tls_port}/"

    @property
    def log_path(self) -> Path:
        return self.node_dir / "log" / "rabbit.log"

    @property
    def is_running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    # -- startup ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the node and return once its AMQP port answers the protocol header."""
        if self._server is not None:
            raise BrokerError(f"{self.node_name} is already started")
        require_installed()
        started_at = time.monotonic()
        self._pick_ports()
        try:
            self._prepare_node_dir()
            self._start_epmd()
            self._start_server()
            self._wait_until(self.is_answering, self._start_timeout_seconds, "answer AMQP")
        except BaseException as exc:
            # Keep the files of a failed start, its log is the only clue; not after a Ctrl-C.
            self._keep_files = isinstance(exc, Exception)
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started_at

    def _pick_ports(self) -> None:
        if self.port and not is_port_free(self.port):
            raise PortBusyError(f"port {self.port} on {HOST} is busy (another RabbitMQ running?)")
        # One candidate per port; the kernel may offer an explicit port too.
        picked = [port for port in free_ports(4) if port != self.port]
        if not self.port:
            self.port = picked.pop()
        self.dist_port, self.epmd_port, self.tls_port = picked[:3]

    def _prepare_node_dir(self) -> None:
        log_dir = self.node_dir / "log"
        log_dir.mkdir(parents=True, exist_ok=True)
        # An empty plugin list skips the management plugin: faster start, no extra port.
        (self.node_dir / "enabled_plugins").write_text("[].\n")
        # Our own (near-empty) config and env files, so nothing in /etc/rabbitmq leaks in.
        (self.node_dir / "rabbitmq.conf").write_text(self._config_text())
        (self.node_dir / "rabbitmq-env.conf").write_text("")
        self._write_cookie()
        self._env = self._node_env()

    def _config_text(self) -> str:
        lines = ["# private dev/test node: defaults only"]
        if self.tls_cert_file is not None:
            lines += [
                f"listeners.ssl.default = {HOST}:{self.tls_port}",
                f"ssl_options.certfile = {self.tls_cert_file}",
                f"ssl_options.keyfile = {self._tls_key_file}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        return "\n".join(lines) + "\n"

    def _write_cookie(self) -> None:
        # Erlang reads the cookie from $HOME; a fresh one per node keeps other nodes (and the
        # system service) out. It must be private or Erlang refuses it.
        cookie = self.node_dir / ".erlang.cookie"
        cookie.unlink(missing_ok=True)
        fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(20))

    def _node_env(self) -> dict[str, str]:
        # Drop inherited RABBITMQ_*/ERL_* settings: they would point the node somewhere else.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        node_dir = self.node_dir
        env.update(
            {
                "HOME": str(node_dir),
                "LANG": "C.UTF-8",
                "LC_ALL": "C.UTF-8",  # rabbitmqctl (Elixir) warns on a latin1 VM
                "ERL_EPMD_ADDRESS": HOST,
                "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_CRASH_DUMP": str(node_dir / "log" / "erl_crash.dump"),
                "RABBITMQ_NODENAME": self.node_name,
                "RABBITMQ_NODE_IP_ADDRESS": HOST,
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(node_dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node_dir / "log"),
                "RABBITMQ_LOGS": str(self.log_path),
                "RABBITMQ_PID_FILE": str(node_dir / "rabbitmq.pid"),
                "RABBITMQ_FEATURE_FLAGS_FILE": str(node_dir / "feature_flags"),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(node_dir / "plugins-expand"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node_dir / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(node_dir / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(node_dir / "advanced.config"),
                "RABBITMQ_CONF_ENV_FILE": str(node_dir / "rabbitmq-env.conf"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": _LOOPBACK_DIST_ARGS,
                "RABBITMQ_CTL_ERL_ARGS": _LOOPBACK_DIST_ARGS,
                _NODE_MARKER: self.node_name,
            }
        )
        return env

    def _start_epmd(self) -> None:
        # Our own epmd on a private port, in the foreground as our child: the node would otherwise
        # spawn a daemonised one on 4369, shared with every other Erlang node and never stopped.
        epmd = shutil.which("epmd", path=self._env.get("PATH")) or "/usr/bin/epmd"
        self._epmd = self._spawn([epmd, "-port", str(self.epmd_port), "-address", HOST], "epmd.log")
        self._wait_until(
            lambda: _accepts_tcp(self.epmd_port), 10.0, f"start epmd on port {self.epmd_port}"
        )

    def _start_server(self) -> None:
        # A new session (see _spawn) means the terminal's Ctrl-C does not hit the node directly:
        # stop() shuts it down in order after the program using it has finished.
        self._server = self._spawn([str(SERVER_SCRIPT)], "stdout.log")

    def _spawn(self, command: list[str], output_name: str) -> subprocess.Popen[bytes]:
        with open(self.node_dir / "log" / output_name, "ab") as output:
            return subprocess.Popen(
                command,
                env=self._env,
                cwd=self.node_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def is_answering(self, timeout_seconds: float = 2.0) -> bool:
        """Whether the AMQP port answers the protocol header with Connection.Start."""
        try:
            with socket.create_connection((HOST, self.port), timeout=timeout_seconds) as sock:
                sock.sendall(AMQP_PROTOCOL_HEADER)
                return sock.recv(1) == _FRAME_METHOD
        except OSError:
            return False

    def _wait_until(self, is_done: Callable[[], bool], timeout_seconds: float, what: str) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not is_done():
            if self._server is not None and self._server.poll() is not None:
                raise self._failure(
                    f"exited with code {self._server.returncode} before it could {what}"
                )
            if time.monotonic() > deadline:
                raise self._failure(f"did not {what} within {timeout_seconds:.0f} s")
            time.sleep(_POLL_INTERVAL_SECONDS)

    def _failure(self, problem: str) -> BrokerError:
        tails = [_tail(self.node_dir / "log" / "stdout.log"), _tail(self.log_path)]
        logs = "\n".join(tail for tail in tails if tail) or "(no log output)"
        where = f"files in {self.node_dir}"
        return BrokerError(f"RabbitMQ node {self.node_name} {problem}; {where}\n{logs}")

    # -- control ---------------------------------------------------------------------------------

    def ctl(self, *args: str, timeout_seconds: float = 60.0) -> str:
        """Run `rabbitmqctl -n NODE ARGS...` against this node and return its stdout."""
        if not self._env:
            raise BrokerError("the broker was never started")
        what = "rabbitmqctl " + " ".join(args)
        command = [str(CTL_SCRIPT), "-n", self.node_name, *args]
        process = subprocess.Popen(
            command,
            env=self._env,
            cwd=self.node_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.communicate()
            raise BrokerError(f"{what} took over {timeout_seconds:.0f} s") from None
        if process.returncode != 0:
            detail = (stderr or stdout).decode(errors="replace").strip()
            raise BrokerError(f"{what} failed ({process.returncode}): {detail}")
        return stdout.decode(errors="replace")

    def stop_app(self, timeout_seconds: float = 60.0) -> None:
        """Stop the RabbitMQ application (the VM stays up) and wait until AMQP no longer answers."""
        self.ctl("stop_app", timeout_seconds=timeout_seconds)
        self._wait_until(lambda: not self.is_answering(), timeout_seconds, "close its AMQP port")

    def start_app(self, timeout_seconds: float = 60.0) -> None:
        """Start the RabbitMQ application again and wait until AMQP answers."""
        self.ctl("start_app", timeout_seconds=timeout_seconds)
        self._wait_until(self.is_answering, timeout_seconds, "answer AMQP again")

    # -- shutdown --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the node and its epmd, leave no process behind; safe to call more than once."""
        server, self._server = self._server, None
        if server is not None:
            if server.poll() is None:
                self._ctl_stop()
            # `rabbitmqctl stop PIDFILE` returns once the VM is gone, so a short grace is enough.
            _end_process(server, grace_seconds=5.0)
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            _end_process(epmd, grace_seconds=0.0)
        self._kill_strays()
        if not self._keep_files:
            shutil.rmtree(self.node_dir, ignore_errors=True)

    def _ctl_stop(self) -> None:
        # The graceful path; if it fails, _end_process falls back to signals.
        pid_file = str(self.node_dir / "rabbitmq.pid")
        try:
            self.ctl("stop", pid_file, timeout_seconds=self._stop_timeout_seconds)
        except BrokerError:
            pass

    def pids(self) -> list[int]:
        """Live processes that belong to this node (found by the marker in their environment)."""
        marker = f"{_NODE_MARKER}={self.node_name}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def _kill_strays(self) -> None:
        # erl_child_setup runs in a session of its own, and a hung rabbitmqctl might linger:
        # neither is in the node's process group, so find them by their environment.
        deadline = time.monotonic() + 5.0
        while (strays := self.pids()) and time.monotonic() < deadline:
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(_POLL_INTERVAL_SECONDS)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# -- helpers -------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports; another process may still take one before it is bound."""
    sockets: list[socket.socket] = []
    try:
        # Hold all sockets open until every port is known, so none is handed out twice.
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port in TIME_WAIT is free for a listener, only a live socket blocks it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _end_process(process: subprocess.Popen[bytes], grace_seconds: float) -> None:
    """Reap a process that leads its own group: wait `grace_seconds`, then TERM, then KILL."""
    steps = ((None, grace_seconds), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0))
    for signum, wait_seconds in steps:
        if signum is not None:
            _signal_group(process, signum)
        try:
            process.wait(timeout=wait_seconds)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; anything left in its group (beam under the shell script) goes too.
        _signal_group(process, signal.SIGKILL)
        return


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = text.splitlines()[-lines:]
    return f"--- {path} (last {len(kept)} lines)\n" + "\n".join(kept) if kept else ""


def require_installed() -> None:
    if not SERVER_SCRIPT.exists():
        raise BrokerError(f"rabbitmq-server is not installed; as root run: {INSTALL_COMMAND}")


def ensure_installed() -> None:
    """Install Debian's rabbitmq-server when missing (root only) without leaving its service up."""
    if SERVER_SCRIPT.exists():
        return
    if os.geteuid() != 0:
        require_installed()
    _say("installing rabbitmq-server with apt-get ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "rabbitmq-server"]):
        try:
            subprocess.run(command, env=env, stdin=subprocess.DEVNULL, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise BrokerError(f"{' '.join(command)} failed: {exc}") from exc
    stop_system_service()


def stop_system_service() -> None:
    """Stop the package's own service if its install started one: it would hold 5672 and 4369."""
    if Path("/run/systemd/system").is_dir():  # systemd is PID 1
        _run_quietly(["systemctl", "disable", "--now", "rabbitmq-server.service"])
        return
    # Judge by the init script's pid file: its `status` runs rabbitmqctl, which would itself
    # leave a daemonised epmd behind when no service is running.
    if _is_pid_file_alive(Path("/var/run/rabbitmq/pid")):
        _run_quietly(["/etc/init.d/rabbitmq-server", "stop"])
        # The service's node started a daemonised epmd; `-kill` refuses while nodes still use it.
        _run_quietly(["epmd", "-kill"])


def _is_pid_file_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def _run_quietly(command: list[str]) -> int:
    try:
        return subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        ).returncode
    except (OSError, subprocess.TimeoutExpired):
        return -1


# -- command line --------------------------------------------------------------------------------


class _Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while the broker was starting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _say(message: str) -> None:
    print(f"devbroker: {message}", file=sys.stderr, flush=True)


def _exit_code(returncode: int) -> int:
    # A child killed by signal N reports -N; shells report that as 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    # Ignore repeats: a second Ctrl-C must not cut short the cleanup this one starts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Interrupted(signum)


def run_child(command: Sequence[str], env: dict[str, str]) -> int:
    """Run a command to completion, forwarding SIGINT/SIGTERM (and SIGHUP as SIGTERM) to it."""
    child: subprocess.Popen[bytes] | None = None
    pending: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        signum = signal.SIGTERM if signum == signal.SIGHUP else signum
        if child is None:
            pending.append(signum)
        else:
            # A no-op once the child is reaped, so late signals are harmless.
            child.send_signal(signum)

    # Installed before the child exists so no signal is lost, and left installed until the
    # caller has stopped the broker: a stray Ctrl-C must not cut that short.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        # Its own process group, so a terminal Ctrl-C reaches it once (forwarded by us), not twice:
        # the bridge treats a second signal as "force".
        child = subprocess.Popen(list(command), env=env, process_group=0)
    except OSError as exc:
        _say(f"cannot run {command[0]}: {exc}")
        return 127
    for pending_signum in pending:
        child.send_signal(pending_signum)
    return _exit_code(child.wait())


def run_with_broker(base_dir: Path, port: int, command: Sequence[str]) -> int:
    """Start a broker unless one is configured, run `command` against it, stop it; exit code."""
    if os.environ.get(URL_ENV):
        _say(f"{URL_ENV} is set; not starting RabbitMQ")
        return run_child(command, dict(os.environ))
    ensure_installed()
    if port and not is_port_free(port):  # say so before "starting ..."
        raise PortBusyError(f"port {port} on {HOST} is busy (another RabbitMQ running?)")
    broker = LocalBroker(base_dir, port)
    _say(f"starting RabbitMQ on {HOST}:{port or '(free port)'} ...")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
    try:
        broker.start()
    except _Interrupted as interrupted:
        _say("interrupted while starting; RabbitMQ stopped")
        return 128 + interrupted.signum
    try:
        _say(f"RabbitMQ ready on {HOST}:{broker.port} in {broker.startup_seconds or 0:.1f} s")
        return run_child(command, {**os.environ, URL_ENV: broker.url})
    except _Interrupted as interrupted:  # arrived before run_child took over the signals
        return 128 + interrupted.signum
    finally:
        _say("stopping RabbitMQ ...")
        broker.stop()
        _say("RabbitMQ stopped")


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.devbroker",
        description="Run a command against a private, throwaway RabbitMQ node.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        usage="%(prog)s [--dir DIR] [--port PORT] -- COMMAND [ARG ...]",
        help=f"start RabbitMQ, run COMMAND with {URL_ENV} set, stop RabbitMQ",
    )
    run.add_argument("--dir", type=Path, default=Path(".run/rabbitmq"), help="state directory")
    run.add_argument("--port", type=int, default=5672, help="AMQP port; 0 picks a free one")
    commands.add_parser("install", help="install rabbitmq-server with apt-get if missing (root)")
    return parser, run


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` belongs to the command, options included.
    split_at = args.index("--") if "--" in args else len(args)
    own_args, command = args[:split_at], args[split_at + 1 :]
    parser, run_parser = _parser()
    options = parser.parse_args(own_args)
    try:
        if options.command == "install":
            if SERVER_SCRIPT.exists():
                _say(f"rabbitmq-server is installed ({SERVER_SCRIPT})")
            ensure_installed()
            return 0
        if not command:
            run_parser.error("run needs a command after --")
        return run_with_broker(options.dir, options.port, command)
    except PortBusyError as exc:
        _say(
            f"{exc}; pick another with --port (`make run AMQP_PORT=0`: any free port),"
            f" or set {URL_ENV} to use a running broker"
        )
        return 2
    except BrokerError as exc:
        _say(str(exc))
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
