"""``FlowerStack``: a running SuperLink (+ SuperNodes) on 127.0.0.1 and the processes it owns
(addresses, liveness checks, kill/restart of one process for fault injection, stop), the result of
one ``flwr run`` on it, and the registry that stops every live stack at exit or on SIGTERM/SIGHUP."""

from __future__ import annotations

import atexit
import os
import signal
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .defaults import DEFAULT_FEDERATION_ID, START_TIMEOUT_S, STOP_GRACE_S
from .processes import FlowerStackError, descendants, marked_pids, pid_alive, signal_group, signal_pid, tail
from .spawn import popen, wait_runtime_ready

live_stacks: dict[str, "FlowerStack"] = {}
registry_lock = threading.Lock()
_handlers_installed = False


def stop_all_live_stacks() -> None:
    with registry_lock:
        stacks = list(live_stacks.values())
    for stack in stacks:
        try:
            stack.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def install_handlers() -> None:
    global _handlers_installed
    with registry_lock:
        if _handlers_installed:
            return
        _handlers_installed = True
    atexit.register(stop_all_live_stacks)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous = signal.getsignal(sig)
        except (ValueError, OSError):
            continue
        if previous is signal.SIG_IGN:
            continue

        def _handler(signum, frame, _previous=previous):  # noqa: ANN001
            stop_all_live_stacks()
            if callable(_previous):
                _previous(signum, frame)
            else:  # SIG_DFL / None: die from the same signal
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        try:
            signal.signal(sig, _handler)
        except (ValueError, OSError):
            pass


def register(stack: "FlowerStack") -> None:
    """Stop ``stack`` at exit or on SIGTERM/SIGHUP unless it was stopped before."""
    install_handlers()
    with registry_lock:
        live_stacks[stack.stack_id] = stack


@dataclass
class RunResult:
    """Outcome of one :func:`flwr_run` (also kept as ``stack.last_run``)."""

    returncode: int
    run_id: int | None
    status: str | None  # e.g. "finished:completed", "finished:failed"
    details: str | None
    cli_returncode: int | None
    log_path: Path
    elapsed_s: float


@dataclass
class FlowerStack:
    """A running SuperLink (+ SuperNodes) on 127.0.0.1; use as a context manager."""

    kind: str  # "simulation" | "deployment"
    processes: list[subprocess.Popen]
    process_names: list[str]
    flwr_home: Path
    federation: str  # name of the SuperLink connection in $FLWR_HOME/config.toml
    superlink_host: str
    superlink_port: int
    log_dir: Path
    work_dir: Path
    cwd: Path
    env: dict[str, str]
    stack_id: str
    federation_id: str = DEFAULT_FEDERATION_ID
    num_supernodes: int = 0
    supernode_ports: list[int] = field(default_factory=list)
    node_ids: list[int] = field(default_factory=list)
    node_configs: list[dict] = field(default_factory=list)
    #: deployment: ``persistent`` or ``stock`` (see :data:`RUNTIMES`)
    runtime: str | None = None
    #: deployment, persistent runtime: the ClientApp reference each device runtime serves (None:
    #: each run's ClientApp from its FAB)
    runtime_app: str | None = None
    backend: dict | None = None
    last_run: RunResult | None = None
    _cleanup_dirs: list[Path] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _seen_pids: set[int] = field(default_factory=set, repr=False)
    _run_counter: int = field(default=0, repr=False)
    #: name -> (command, environment) each started process was started with (for :meth:`restart`)
    _launch: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict, repr=False)

    # -- addresses -----------------------------------------------------------------
    @property
    def superlink_address(self) -> str:
        """``host:port`` of the SuperLink's single HTTP port (Control, Fleet, Runtime API)."""
        return f"{self.superlink_host}:{self.superlink_port}"

    @property
    def control_address(self) -> str:
        return self.superlink_address

    @property
    def fleet_address(self) -> str:
        return self.superlink_address

    @property
    def config_toml(self) -> Path:
        return self.flwr_home / "config.toml"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def shell_env(self) -> str:
        """``export`` line to reproduce the CLI environment in a shell."""
        keys = ("FLWR_HOME", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")
        return "export " + " ".join(f"{k}={self.env[k]}" for k in keys if k in self.env)

    # -- processes -----------------------------------------------------------------
    def pids(self) -> set[int]:
        """Live PIDs belonging to this stack (started processes, descendants, marked)."""
        roots = [p.pid for p in self.processes if p.poll() is None]
        found = set(roots) | descendants(roots) | marked_pids(self.stack_id)
        self._seen_pids |= found
        return {p for p in found if pid_alive(p)}

    @property
    def seen_pids(self) -> set[int]:
        """Every PID this stack was ever seen to own (for leak checks after stop())."""
        return set(self._seen_pids)

    def check_alive(self, names: Iterable[str] | None = None) -> None:
        """Raise FlowerStackError (with the log tail) if a started process has exited.

        ``names``: only check these processes (e.g. ``["superlink"]`` while a run may lose
        SuperNodes or device runtimes on purpose)."""
        wanted = None if names is None else set(names)
        for proc, name in zip(self.processes, self.process_names):
            if wanted is not None and name not in wanted:
                continue
            if proc.poll() is not None:
                raise FlowerStackError(
                    f"{name} (pid {proc.pid}) exited with code {proc.returncode}; "
                    f"last log lines of {self.log_path(name)}:\n{tail(self.log_path(name))}"
                )

    def process(self, name: str) -> subprocess.Popen:
        """The started process called ``name`` (``superlink``, ``supernode-<i>``, ``runtime-<i>``)."""
        for proc, pname in zip(self.processes, self.process_names):
            if pname == name:
                return proc
        raise KeyError(f"no process {name!r} in this stack (have {self.process_names})")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the process group of one started process (fault injection).

        Returns its pid. Flower's own children of a SuperNode (its SuperExec, a running
        ``flwr-clientapp``) are in that group too and go with it; everything stays in the
        stack's PID bookkeeping, so :meth:`stop` still reaps whatever is left."""
        proc = self.process(name)
        self.pids()  # remember its children before they are orphaned
        signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return proc.pid

    def restart(self, name: str, *, ready_timeout: float = START_TIMEOUT_S) -> int:
        """Start the process called ``name`` again, with the command and environment it was first
        started with (after :meth:`kill`, or after it died), and return its new pid. A device runtime
        (``runtime-<i>``) is waited for until it serves its SuperNode again. The old pid stays in
        the stack's bookkeeping; the new process is stopped with the stack like every other."""
        if self._stopped:
            raise FlowerStackError("stack is stopped")
        old = self.process(name)
        if old.poll() is None:
            raise FlowerStackError(f"{name} (pid {old.pid}) is still running: kill it first")
        if name not in self._launch:
            raise FlowerStackError(f"{name} cannot be restarted (its command was not recorded)")
        cmd, env = self._launch[name]
        idx = self.process_names.index(name)
        self.processes.pop(idx)
        self.process_names.pop(idx)
        proc = popen(cmd, name=name, stack=self, env=env)
        if name.startswith("runtime-"):
            wait_runtime_ready(self, name, proc, ready_timeout)
        return proc.pid

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop everything this stack started (SIGTERM, then SIGKILL). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._terminate(grace)
        finally:
            with registry_lock:
                live_stacks.pop(self.stack_id, None)
            for d in self._cleanup_dirs:
                shutil.rmtree(d, ignore_errors=True)

    def _terminate(self, grace: float) -> None:
        targets = self.pids()
        # SuperNodes first (they would otherwise log reconnect noise), then all at once.
        for proc in self.processes:
            if proc.poll() is None:
                signal_group(proc.pid, signal.SIGTERM)
        for pid in targets:
            signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for proc in self.processes:
                proc.poll()
            if not any(pid_alive(p) for p in targets | marked_pids(self.stack_id)):
                break
            time.sleep(0.1)
        # Anything left (including processes spawned during shutdown): SIGKILL.
        for _ in range(3):
            left = {p for p in targets if pid_alive(p)} | marked_pids(self.stack_id)
            for proc in self.processes:
                if proc.poll() is None:
                    signal_group(proc.pid, signal.SIGKILL)
            if not left:
                break
            self._seen_pids |= left
            for pid in left:
                signal_pid(pid, signal.SIGKILL)
            time.sleep(0.2)
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def __enter__(self) -> "FlowerStack":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort; stop() is idempotent
        try:
            if not self._stopped and self.processes:
                self.stop(grace=2.0)
        except Exception:  # noqa: BLE001
            pass
