"""Supervision of the Flower processes a federation starts: none may outlive it.

Every child starts in its own session (so a terminal's Ctrl-C reaches only
fedmeta, which then stops them in order) and asks the kernel to send it
SIGTERM if fedmeta dies without cleaning up. Flower's own helpers
(SuperExec, flwr-serverapp, flwr-clientapp) may start further sessions, so
stopping kills every descendant found under each child, not just its group.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from fedmeta.errors import FedmetaError

HOST = "127.0.0.1"
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log levels
_PR_SET_PDEATHSIG = 1
MARK = "FEDMETA_SUPERVISOR"  # environment variable naming the Supervisor a process descends from
GRACE_S = 3.0  # seconds a stopped process may take to leave cleanly before SIGKILL


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the parent exits (Linux), whatever the reason."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc Linux: the explicit stop still runs
        pass


def check_port(port: int, what: str) -> None:
    """Refuse, in one line, a port that another process holds, before any child starts. SO_REUSEADDR, as the
    SuperLink's own gRPC server binds: a port left in TIME_WAIT by the previous stage's federation is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise FedmetaError(
                f"federation.flower.port: {what} port {port} on {HOST} cannot be bound ({exc.strerror}); "
                "free it or choose another port"
            ) from None


def free_port() -> int:
    """A port on HOST that nothing listens on now (for a SuperNode's local API, which only its ClientApps use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Supervisor:
    """Starts named processes, logs each to its own file, and stops all of them."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        # every process started here, and whatever they start, inherits the mark: `stop_all` finds by it those
        # that a dead parent left to init (a SuperNode killed mid-round orphans its flwr-clientapp)
        self.mark = f"{os.getpid()}-{id(self)}-{time.monotonic_ns()}"
        self.logs, self.env = logs, {**env, MARK: self.mark}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str) -> str:
        """What a one-line error can quote from a process's log: Flower's last ERROR and the lines explaining it
        (a SuperNode refused by the SuperLink logs its reason there, then shuts down politely), else the last
        line."""
        path = self.logs / f"{name}.log"
        text = ANSI.sub("", path.read_text(errors="replace")) if path.exists() else ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [i for i, line in enumerate(lines) if line.startswith("ERROR")]
        if errors:
            first = errors[-1]
            reason = [lines[first].removeprefix("ERROR").lstrip(" :"), *lines[first + 1 : first + 4]]
            return " ".join(line for line in reason if not line.startswith(("INFO", "For more information")))
        return lines[-1] if lines else "no output"

    def wait_listening(self, name: str, port: int, timeout: float, host: str = HOST) -> None:
        """Until `host:port` accepts connections; a child that exits or never listens is an error naming it."""

        def listening() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                return s.connect_ex((host, port)) == 0

        self._wait(name, listening, f"listening on {host}:{port}", timeout)

    def wait_file(self, name: str, path: Path, timeout: float) -> None:
        """Until `path` exists (a worker's socket, made once it has loaded); exiting first is an error naming it."""
        self._wait(name, path.exists, f"creating {path}", timeout)

    def _wait(self, name: str, ready: Callable[[], bool], what: str, timeout: float) -> None:
        proc, deadline = self.procs[name], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FedmetaError(f"{name} exited with code {proc.returncode} before {what}: {self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.1)
        raise FedmetaError(f"{name} did not finish {what} within {timeout:.0f} s: {self.log_tail(name)}")

    def stop(self, name: str, sig: signal.Signals = signal.SIGTERM, grace: float = GRACE_S) -> None:
        """Signal a child and all its descendants, then SIGKILL whatever is left after `grace` seconds."""
        self._stop([name], sig, grace)

    def stop_all(self, grace: float = GRACE_S) -> None:
        """Every child at once (SuperNodes first, then the SuperLink they report to), one grace period for all,
        and any orphan of theirs."""
        self._stop(list(reversed(list(self.procs))), signal.SIGTERM, grace, self.mark)

    def _stop(self, names: list[str], sig: signal.Signals, grace: float, mark: str | None = None) -> None:
        procs = [p for p in (self.procs.pop(n, None) for n in names) if p is not None]
        family: list[psutil.Process] = []
        for proc in procs:  # descendants are listed before any is signalled: a dying parent orphans them
            try:
                root = psutil.Process(proc.pid)
                family += [root, *root.children(recursive=True)] if proc.poll() is None else []
            except psutil.NoSuchProcess:
                pass
        if mark is not None:
            known = {p.pid for p in family}
            family += [p for p in marked(mark) if p.pid not in known]
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5.0)
        for proc in procs:
            proc.wait()


def marked(mark: str) -> list[psutil.Process]:
    """The processes that carry `mark` in their environment (this user's; others' cannot be read)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARK) == mark:
                found.append(p)
        except (psutil.Error, OSError):
            pass
    return found


def pids_alive(pids: Sequence[int]) -> list[int]:
    """Which of `pids` still run (zombies count as gone): what tests check after a federation stops."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def pid_tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def terminate_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`, DVC) as SystemExit, so the `finally` that stops children runs;
    only when nobody installed a handler of their own."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
