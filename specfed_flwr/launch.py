"""Scripted, offline control of Flower's real engines (flwr 1.41/1.42) from Python.

Two stacks, both on 127.0.0.1 with free ports picked per stack (parallel stacks do not
collide), both with runtime dependency installation disabled (no ``uv sync``, no network):

* :func:`start_simulation_stack` -- ``flower-superlink --insecure --simulation`` (the
  simulation engine: virtual SuperNodes as Ray actors inside a ``flwr-simulation``
  process). The number of virtual SuperNodes and the Ray backend options are stored on
  the SuperLink with ``flwr federation simulation-config``, so a plain
  ``flwr run <app> <connection> --stream`` uses them.
* :func:`start_deployment_stack` -- ``flower-superlink --insecure`` plus N real
  ``flower-supernode`` processes (each with its own Runtime API ``--port`` and
  ``--node-config``). By default (``runtime="persistent"``) every SuperNode runs with
  ``--isolation process`` next to one ``specfed-flwr device-runtime`` (process
  ``runtime-<i>``), which serves all of that node's messages in one warm ClientApp process;
  ``runtime="stock"`` is Flower's own path (the SuperNode's ``flower-superexec`` starts a new
  ``flwr-clientapp`` per message), with the SuperExec task poll at 0.1 s on the SuperNodes.

:func:`flwr_run` runs ``flwr run <app> <connection> --stream`` against a stack, waits
until the run is finished and returns an exit code derived from the *run status*
(``flwr run`` itself exits 0 even when the ServerApp crashed).

Everything a stack writes goes to ``log_dir`` (process logs, ``run-*.log``, run-config
TOML files; also the ServerApp/ClientApp working directory unless ``cwd`` is given) and
to a work directory (``FLWR_HOME`` with ``config.toml`` and installed FABs, the SuperLink
state DB, Ray's temp dir) that is a fresh temp dir removed on :meth:`FlowerStack.stop`
unless ``work_dir``/``flwr_home`` are given. See docs/DEPLOYMENT_NOTES.md.

Process hygiene: every process is started in its own session/process group
(``start_new_session=True``) and carries the environment marker
``SPECFED_FLWR_STACK_ID=<id>``, which Flower's own children (``flower-superexec`` -- which
Flower starts in a *new session* --, ``flwr-serverapp``, ``flwr-simulation``,
``flwr-clientapp``, Ray's raylet/GCS/workers) inherit. :meth:`FlowerStack.stop` SIGTERMs
the process groups and every marked process, waits, then SIGKILLs what is left. Stacks
are stopped from an ``atexit`` hook and a SIGTERM/SIGHUP handler, and (Linux, when
started from the main thread) the direct children get ``PR_SET_PDEATHSIG=SIGTERM`` so
they go away even if the launching Python process is SIGKILLed.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "FlowerStack",
    "FlowerStackError",
    "RunResult",
    "start_simulation_stack",
    "start_deployment_stack",
    "runtime_command",
    "RUNTIMES",
    "flwr_run",
    "attach_stack",
    "stop_from_state",
    "free_port",
    "format_config_args",
    "pid_alive",
]

ENV_MARKER = "SPECFED_FLWR_STACK_ID"
LOOPBACK = "127.0.0.1"
#: Federation every run goes to on a SuperLink without accounts (flwr >= 1.26).
DEFAULT_FEDERATION_ID = "@none/default"
#: SuperExec task poll interval (seconds), Flower's default. Its latency (0..poll) is paid
#: once per run on the SuperLink and once per message on every SuperNode (deployment).
#: Lower costs idle CPU: 0.1 s made an idle 2-node deployment stack use ~24 % of a core
#: (vs ~5 % at 1.0 s) on this 2-core machine -- CPU taken from the models.
DEFAULT_SUPEREXEC_POLL_S = 1.0
#: ... and on the SuperNodes of a stock-path deployment stack, where it is paid once per message:
#: 0.1 s is the best measured there (SPEC; 0.01 s costs more CPU than it saves on 2 cores).
#: The SuperLink keeps DEFAULT_SUPEREXEC_POLL_S (paid once per run).
SUPERNODE_SUPEREXEC_POLL_S = 0.1
#: How a deployment stack runs ClientApps: ``persistent`` (``specfed-flwr device-runtime`` next to
#: a SuperNode with ``--isolation process``; the default) or ``stock`` (Flower's process per message).
RUNTIMES = ("persistent", "stock")
#: AcquireTask poll of the device runtime while idle (the SuperNode checks replies every 0.5 s).
DEFAULT_RUNTIME_POLL_S = 0.05
#: Simulation backend used when ``backend`` is None: one CPU per virtual SuperNode so
#: that two virtual clients run concurrently on a 2-core machine (Flower's default is 2).
def single_actor_backend() -> dict[str, Any]:
    """One ClientApp actor that holds every CPU Ray sees.

    Flower's simulation hands a virtual node's message to whichever actor is free, so with one
    actor per CPU a node's draft KV caches end up split over processes and the server has to send
    whole sequences every round. With one actor every virtual node keeps its draft model (loaded
    once) and its caches warm in that process; the nodes draft one after the other there, which on
    a machine whose other cores verify on the target costs no more than drafting side by side.
    """
    cpus = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    return {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}, "init_args": {"num_cpus": cpus}}


DEFAULT_SIM_BACKEND: dict[str, Any] = single_actor_backend()

_START_TIMEOUT_S = 90.0
_STOP_GRACE_S = 8.0
_PORT_RETRIES = 3


class FlowerStackError(RuntimeError):
    """A Flower process failed to start / a stack could not be brought up."""


# --------------------------------------------------------------------------- ports


_handed_out_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now.

    The kernel picks it (bind to port 0); ports already returned by this process are
    never returned again, so several stacks started from one process do not collide.
    Another process can still grab the port before the server binds it: the start
    functions retry with a new port when a process dies with "address already in use".
    """
    with _port_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOOPBACK, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise FlowerStackError("could not find a free port")


def _port_open(port: int, host: str = LOOPBACK, timeout: float = 0.25) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie.

    Zombies count as dead: in containers whose PID 1 does not reap orphans, killed
    grandchildren (e.g. ``[flwr-serverapp] <defunct>``) stay in the table forever.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        state = stat[stat.rindex(")") + 2]
        return state not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return True


def _marked_pids(stack_id: str) -> set[int]:
    """PIDs of live processes whose environment carries this stack's marker (Linux)."""
    needle = f"{ENV_MARKER}={stack_id}".encode()
    found: set[int] = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    me = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.add(int(entry))
    return {p for p in found if pid_alive(p)}


def _descendants(roots: Iterable[int]) -> set[int]:
    """All live descendants of ``roots`` (via /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return set()
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return {p for p in out if pid_alive(p)}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return "\n".join(text.splitlines()[-lines:])


# Started through this shim on Linux when launched from the main thread: the child asks
# the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG survives exec).
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _use_pdeathsig() -> bool:
    return sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()


def _bin(name: str) -> str:
    """Path of a Flower console script, preferring the running interpreter's bin dir."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FlowerStackError(f"`{name}` not found (is flwr installed in this environment?)")
    return found


# ------------------------------------------------------------------------- registry


_live_stacks: dict[str, "FlowerStack"] = {}
_registry_lock = threading.Lock()
_handlers_installed = False


def _stop_all_live_stacks() -> None:
    with _registry_lock:
        stacks = list(_live_stacks.values())
    for stack in stacks:
        try:
            stack.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _install_handlers() -> None:
    global _handlers_installed
    with _registry_lock:
        if _handlers_installed:
            return
        _handlers_installed = True
    atexit.register(_stop_all_live_stacks)
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
            _stop_all_live_stacks()
            if callable(_previous):
                _previous(signum, frame)
            else:  # SIG_DFL / None: die from the same signal
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        try:
            signal.signal(sig, _handler)
        except (ValueError, OSError):
            pass


# ---------------------------------------------------------------------------- stack


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
        found = set(roots) | _descendants(roots) | _marked_pids(self.stack_id)
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
                    f"last log lines of {self.log_path(name)}:\n{_tail(self.log_path(name))}"
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
        _signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return proc.pid

    def restart(self, name: str, *, ready_timeout: float = _START_TIMEOUT_S) -> int:
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
        proc = _popen(cmd, name=name, stack=self, env=env)
        if name.startswith("runtime-"):
            _wait_runtime_ready(self, name, proc, ready_timeout)
        return proc.pid

    def stop(self, grace: float = _STOP_GRACE_S) -> None:
        """Stop everything this stack started (SIGTERM, then SIGKILL). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._terminate(grace)
        finally:
            with _registry_lock:
                _live_stacks.pop(self.stack_id, None)
            for d in self._cleanup_dirs:
                shutil.rmtree(d, ignore_errors=True)

    def _terminate(self, grace: float) -> None:
        targets = self.pids()
        # SuperNodes first (they would otherwise log reconnect noise), then all at once.
        for proc in self.processes:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        for pid in targets:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for proc in self.processes:
                proc.poll()
            if not any(pid_alive(p) for p in targets | _marked_pids(self.stack_id)):
                break
            time.sleep(0.1)
        # Anything left (including processes spawned during shutdown): SIGKILL.
        for _ in range(3):
            left = {p for p in targets if pid_alive(p)} | _marked_pids(self.stack_id)
            for proc in self.processes:
                if proc.poll() is None:
                    _signal_group(proc.pid, signal.SIGKILL)
            if not left:
                break
            self._seen_pids |= left
            for pid in left:
                _signal_pid(pid, signal.SIGKILL)
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


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ config helpers


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    raise TypeError(f"unsupported config value {value!r} ({type(value).__name__})")


def format_config_args(config: Mapping[str, Any]) -> str:
    """Format ``{"k": v}`` as Flower's ``'k1=v1 k2="s"'`` string (``--node-config``).

    Flower splits on whitespace outside quotes; strings must not contain a double quote.
    """
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"invalid config key {key!r}")
        if isinstance(value, str) and '"' in value:
            raise ValueError(f"config string values may not contain '\"': {key}={value!r}")
        parts.append(f"{key}={_toml_value(value)}")
    return " ".join(parts)


def _write_flower_config(flwr_home: Path, name: str, address: str) -> Path:
    """Add connection ``name`` to ``$FLWR_HOME/config.toml`` (keeps other connections)."""
    import tomli  # flwr dependency
    import tomli_w  # flwr dependency

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data: dict[str, Any] = {}
    if path.exists():
        data = tomli.loads(path.read_text())
    superlink = data.setdefault("superlink", {})
    superlink.setdefault("default", name)
    superlink[name] = {"address": address, "insecure": True}
    path.write_text(tomli_w.dumps(data))
    return path


def _base_env(stack_id: str, flwr_home: Path, poll_s: float) -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):  # never inherit another stack's marker / Flower home
        if k in (ENV_MARKER, "FLWR_HOME"):
            env.pop(k)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # flower-superexec is run by name
    env.update(
        {
            ENV_MARKER: stack_id,
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(poll_s),
            "PYTHONUNBUFFERED": "1",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        }
    )
    return env


def _prepare_dirs(
    log_dir: Path, flwr_home: Path | None, work_dir: Path | None, cwd: Path | None
) -> tuple[Path, Path, Path, Path, list[Path]]:
    log_dir = Path(log_dir).expanduser().resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    cleanup: list[Path] = []
    if work_dir is None:
        work_dir = Path(tempfile.mkdtemp(prefix="sf-flwr-"))
        cleanup.append(work_dir)
    else:
        work_dir = Path(work_dir).expanduser().resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = Path(flwr_home).expanduser().resolve() if flwr_home else work_dir / "flwr_home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    cwd = Path(cwd).expanduser().resolve() if cwd else log_dir
    cwd.mkdir(parents=True, exist_ok=True)
    return log_dir, flwr_home, work_dir, cwd, cleanup


def _popen(cmd: list[str], *, name: str, stack: FlowerStack, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` as stack process ``name`` (own session, log file, the stack's environment
    unless ``env`` is given), remembering how, so that :meth:`FlowerStack.restart` can redo it."""
    env = stack.env if env is None else env
    log_path = stack.log_path(name)
    full = list(cmd)
    if _use_pdeathsig():
        full = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *full]
    with open(log_path, "ab") as log:
        log.write(f"### {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(stack.cwd),
            env=env,
            start_new_session=True,
        )
    stack._launch[name] = (list(cmd), env)
    stack.processes.append(proc)
    stack.process_names.append(name)
    stack._seen_pids.add(proc.pid)
    return proc


def _wait_until(
    predicate, *, proc: subprocess.Popen, name: str, stack: FlowerStack, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc.poll() is not None:
            raise FlowerStackError(
                f"{name} (pid {proc.pid}) exited with code {proc.returncode} while waiting for "
                f"{what}; last log lines of {stack.log_path(name)}:\n{_tail(stack.log_path(name))}"
            )
        if time.monotonic() > deadline:
            raise FlowerStackError(
                f"timeout ({timeout:.0f}s) waiting for {name} {what}; last log lines of "
                f"{stack.log_path(name)}:\n{_tail(stack.log_path(name))}"
            )
        time.sleep(0.1)


def _address_in_use(stack: FlowerStack, name: str) -> bool:
    text = _tail(stack.log_path(name), 80).lower()
    return "address already in use" in text or "errno 98" in text


def _start_with_port_retry(stack: FlowerStack, name: str, make_cmd, ready, what: str) -> int:
    """Start ``make_cmd(port)`` and wait for ``ready(port)``; new port on EADDRINUSE."""
    last: Exception | None = None
    for _attempt in range(_PORT_RETRIES):
        port = free_port()
        proc = _popen(make_cmd(port), name=name, stack=stack)
        try:
            _wait_until(lambda: ready(port), proc=proc, name=name, stack=stack,
                        timeout=_START_TIMEOUT_S, what=what)
            return port
        except FlowerStackError as err:
            last = err
            if proc.poll() is not None and _address_in_use(stack, name):
                idx = stack.processes.index(proc)
                stack.processes.pop(idx)
                stack.process_names.pop(idx)
                continue
            raise
    raise FlowerStackError(f"could not start {name} after {_PORT_RETRIES} attempts: {last}")


def _new_stack(kind: str, num_supernodes: int, log_dir: Path, flwr_home: Path | None,
               work_dir: Path | None, cwd: Path | None, poll_s: float) -> FlowerStack:
    if num_supernodes < 1:
        raise ValueError("num_supernodes must be >= 1")
    log_dir, flwr_home, work_dir, cwd, cleanup = _prepare_dirs(log_dir, flwr_home, work_dir, cwd)
    stack_id = uuid.uuid4().hex[:12]
    stack = FlowerStack(
        kind=kind,
        processes=[],
        process_names=[],
        flwr_home=flwr_home,
        federation=f"specfed-{kind[:3]}-{stack_id[:6]}",
        superlink_host=LOOPBACK,
        superlink_port=0,
        log_dir=log_dir,
        work_dir=work_dir,
        cwd=cwd,
        env=_base_env(stack_id, flwr_home, poll_s),
        stack_id=stack_id,
        num_supernodes=num_supernodes,
        _cleanup_dirs=cleanup,
    )
    _install_handlers()
    with _registry_lock:
        _live_stacks[stack_id] = stack
    return stack


def _start_superlink(stack: FlowerStack, *, simulation: bool) -> None:
    db = stack.work_dir / "superlink-state.db"

    def make_cmd(port: int) -> list[str]:
        cmd = [_bin("flower-superlink"), "--insecure"]
        if simulation:
            cmd.append("--simulation")
        cmd += ["--disable-runtime-dependency-installation", "--host", LOOPBACK,
                "--port", str(port), "--database", str(db)]
        return cmd

    def ready(port: int) -> bool:
        # uvicorn binds the port only after the FastAPI lifespan startup has completed
        return _port_open(port)

    if db.exists():
        db.unlink()
    stack.superlink_port = _start_with_port_retry(stack, "superlink", make_cmd, ready, "HTTP port")
    _write_flower_config(stack.flwr_home, stack.federation, stack.superlink_address)


def _flwr_cli(stack: FlowerStack, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_bin("flwr"), *args],
        cwd=str(stack.cwd),
        env=stack.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


def _sim_config_flags(num_supernodes: int, backend: Mapping[str, Any] | None) -> list[str]:
    """Map a Flower ``backend_config`` dict to ``flwr federation simulation-config`` flags."""
    flags = ["--num-supernodes", str(int(num_supernodes))]
    backend = dict(backend or {})
    unknown = set(backend) - {"name", "client_resources", "init_args", "verbose"}
    if unknown:
        raise ValueError(f"unsupported simulation backend keys: {sorted(unknown)}")
    if "name" in backend:
        flags += ["--backend-name", str(backend["name"])]
    if backend.get("verbose"):
        flags.append("--verbose")
    cres = dict(backend.get("client_resources") or {})
    bad = set(cres) - {"num_cpus", "num_gpus"}
    if bad:
        raise ValueError(f"unsupported client_resources keys: {sorted(bad)}")
    if cres.get("num_cpus") is not None:
        flags += ["--client-resources-num-cpus", str(int(cres["num_cpus"]))]
    if cres.get("num_gpus") is not None:
        flags += ["--client-resources-num-gpus", str(float(cres["num_gpus"]))]
    init = dict(backend.get("init_args") or {})
    init.pop("include_dashboard", None)  # Flower's Ray backend already sets False
    init.pop("ignore_reinit_error", None)
    bad = set(init) - {"num_cpus", "num_gpus", "logging_level", "log_to_driver"}
    if bad:
        raise ValueError(f"unsupported init_args keys (not settable via the SuperLink): {sorted(bad)}")
    if init.get("num_cpus") is not None:
        flags += ["--init-args-num-cpus", str(int(init["num_cpus"]))]
    if init.get("num_gpus") is not None:
        flags += ["--init-args-num-gpus", str(int(init["num_gpus"]))]
    if init.get("logging_level") is not None:
        flags += ["--init-args-logging-level", str(init["logging_level"])]
    if init.get("log_to_driver") is not None:
        flags += ["--init-args-log-to-driver", "true" if init["log_to_driver"] else "false"]
    return flags


# ------------------------------------------------------------------ public starters


def start_simulation_stack(
    num_supernodes: int = 2,
    *,
    log_dir: Path,
    backend: dict | None = None,
    flwr_home: Path | None = None,
    work_dir: Path | None = None,
    cwd: Path | None = None,
    superexec_poll_s: float = DEFAULT_SUPEREXEC_POLL_S,
) -> FlowerStack:
    """Start ``flower-superlink --insecure --simulation`` and configure its federation.

    ``backend`` uses Flower's ``backend_config`` shape, e.g.
    ``{"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": 2, "logging_level": "WARNING", "log_to_driver": True}}``
    (default :data:`DEFAULT_SIM_BACKEND`). It is stored on the SuperLink with
    ``flwr federation simulation-config @none/default <connection> ...``.
    ``cwd`` is the working directory of the SuperLink and so of the ServerApp and the
    ClientApps (default ``log_dir``).
    """
    stack = _new_stack("simulation", num_supernodes, log_dir, flwr_home, work_dir, cwd,
                       superexec_poll_s)
    try:
        ray_tmp = stack.work_dir / "ray"
        if len(str(ray_tmp)) > 40:  # Ray's AF_UNIX socket paths must stay < 108 chars
            ray_tmp = Path(tempfile.mkdtemp(prefix="sf-ray-"))
            stack._cleanup_dirs.append(ray_tmp)
        ray_tmp.mkdir(parents=True, exist_ok=True)
        stack.env["RAY_TMPDIR"] = str(ray_tmp)
        stack.backend = dict(backend) if backend is not None else dict(DEFAULT_SIM_BACKEND)
        flags = _sim_config_flags(num_supernodes, stack.backend)
        _start_superlink(stack, simulation=True)
        res = _flwr_cli(stack, ["federation", "simulation-config", stack.federation_id,
                                stack.federation, *flags])
        with open(stack.log_path("flwr-cli"), "a") as fh:
            fh.write(f"$ flwr federation simulation-config ... {' '.join(flags)}\n{res.stdout}{res.stderr}\n")
        if res.returncode != 0:
            raise FlowerStackError(
                f"`flwr federation simulation-config` failed ({res.returncode}):\n{res.stdout}{res.stderr}"
            )
        stack.check_alive()
        stack.pids()
        return stack
    except BaseException:
        stack.stop(grace=3.0)
        raise


def _start_all_with_port_retry(stack: FlowerStack, names: list[str], make_cmd, what: str,
                               started: list[subprocess.Popen] | None = None,
                               ports: list[int] | None = None, env: dict[str, str] | None = None) -> list[int]:
    """Start ``make_cmd(i, port)`` for every name at once (start-up is CPU bound), then wait
    for each port; a process that lost its port to another process is restarted on a new
    one. ``started``/``ports``: processes already started with :func:`_popen` (wait only).
    ``env``: their environment (default: the stack's)."""
    ports = list(ports) if ports is not None else [free_port() for _ in names]
    procs = list(started) if started is not None else [
        _popen(make_cmd(i, ports[i]), name=name, stack=stack, env=env) for i, name in enumerate(names)]
    for i, name in enumerate(names):
        for attempt in range(_PORT_RETRIES):
            try:
                _wait_until(lambda: _port_open(ports[i]), proc=procs[i], name=name, stack=stack,
                            timeout=_START_TIMEOUT_S, what=what)
                break
            except FlowerStackError:
                if attempt + 1 < _PORT_RETRIES and procs[i].poll() is not None \
                        and _address_in_use(stack, name):
                    idx = stack.processes.index(procs[i])
                    stack.processes.pop(idx)
                    stack.process_names.pop(idx)
                    ports[i] = free_port()
                    procs[i] = _popen(make_cmd(i, ports[i]), name=name, stack=stack, env=env)
                    continue
                raise
    return ports


def _package_root() -> str:
    """The directory this ``specfed_flwr`` package was imported from (a checkout or site-packages)."""
    return str(Path(__file__).resolve().parents[1])


def runtime_command(runtime_api_address: str, *, app: str | None = None,
                    poll_s: float = DEFAULT_RUNTIME_POLL_S) -> list[str]:
    """``python -m specfed_flwr.cli device-runtime --runtime-api-address HOST:PORT --insecure ...``.

    Run with this interpreter and (see :func:`start_deployment_stack`) this package on
    ``PYTHONPATH``, so the runtime is the launcher's own code, not whatever ``specfed-flwr`` script
    comes first on ``PATH``."""
    cmd = [sys.executable, "-m", "specfed_flwr.cli", "device-runtime", "--runtime-api-address",
           runtime_api_address, "--insecure", "--poll-interval", repr(float(poll_s))]
    if app:
        cmd += ["--app", app]
    return cmd


_RUNTIME_READY = re.compile(r"device runtime \(pid (\d+)\) serving")


def _wait_runtime_ready(stack: FlowerStack, name: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until the device runtime logs that it serves (it checked the Flower version, the options and
    imported ``--app``); a runtime that exits instead fails the stack with its log tail."""
    def ready() -> bool:
        return any(int(m.group(1)) == proc.pid for m in _RUNTIME_READY.finditer(_tail(stack.log_path(name), 400)))

    _wait_until(ready, proc=proc, name=name, stack=stack, timeout=timeout, what="to serve its SuperNode")


def start_deployment_stack(
    num_supernodes: int = 2,
    *,
    log_dir: Path,
    node_configs: list[dict] | None = None,
    flwr_home: Path | None = None,
    work_dir: Path | None = None,
    cwd: Path | None = None,
    superexec_poll_s: float = DEFAULT_SUPEREXEC_POLL_S,
    runtime: str = "persistent",
    app: str | None = None,
    supernode_superexec_poll_s: float = SUPERNODE_SUPEREXEC_POLL_S,
    runtime_poll_s: float = DEFAULT_RUNTIME_POLL_S,
    runtime_threads: int | None = 0,
) -> FlowerStack:
    """Start ``flower-superlink --insecure`` and N ``flower-supernode`` processes.

    ``node_configs[i]`` becomes ``--node-config`` of SuperNode i (default
    ``{"partition-id": i, "num-partitions": N}``, like the simulation engine). Returns
    once every SuperNode has registered (its log shows ``SuperNode ID: <id>``) and, with the
    persistent runtime, every device runtime serves; the ids are in ``stack.node_ids``.

    ``runtime="persistent"`` (default): every SuperNode runs with ``--isolation process`` and gets
    one ``specfed-flwr device-runtime`` (process ``runtime-<i>``, this package's code, on its
    Runtime API port, AcquireTask poll ``runtime_poll_s``), which runs all of that node's
    ClientApp tasks in one process -- ``app`` (``module:attr``) if given, else each run's ClientApp
    from its FAB. ``runtime="stock"``: Flower's own path, the SuperNode's ``flower-superexec``
    starts a new ``flwr-clientapp`` per message; its task poll is ``supernode_superexec_poll_s``
    (0.1 s, the best measured) on the SuperNodes, ``superexec_poll_s`` on the SuperLink. Every
    process is stopped with the stack, by PID.

    ``runtime_threads``: intra-op threads (``OMP_NUM_THREADS``) of each device runtime. All the
    "devices" of a loopback stack share this machine's cores and draft at the same time, so the
    default 0 gives each ``max(1, cores // N)``; None leaves torch's default (all cores each).
    """
    if node_configs is not None and len(node_configs) != num_supernodes:
        raise ValueError("len(node_configs) must equal num_supernodes")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if app is not None and runtime != "persistent":
        raise ValueError("app= selects the ClientApp of the persistent device runtime; the stock path always "
                         "loads each run's ClientApp from its FAB")
    for label, value in (("superexec_poll_s", superexec_poll_s), ("supernode_superexec_poll_s", supernode_superexec_poll_s),
                         ("runtime_poll_s", runtime_poll_s)):
        if not 0.01 <= float(value) <= 60.0:  # Flower's own bounds for the SuperExec poll
            raise ValueError(f"{label} must be in [0.01, 60] seconds, got {value!r}")
    if runtime_threads is not None and (isinstance(runtime_threads, bool) or int(runtime_threads) < 0):
        raise ValueError(f"runtime_threads must be >= 1, 0 (auto) or None, got {runtime_threads!r}")
    threads = None if runtime_threads is None else (
        int(runtime_threads) or max(1, (os.cpu_count() or 1) // max(1, num_supernodes)))
    stack = _new_stack("deployment", num_supernodes, log_dir, flwr_home, work_dir, cwd,
                       superexec_poll_s)
    stack.runtime, stack.runtime_app = runtime, app
    try:
        configs = [dict(c) for c in node_configs] if node_configs else [
            {"partition-id": i, "num-partitions": num_supernodes} for i in range(num_supernodes)
        ]
        _start_superlink(stack, simulation=False)
        stack.node_configs = [dict(c) for c in configs]
        names = [f"supernode-{i}" for i in range(num_supernodes)]
        supernode_env = dict(stack.env, FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(float(supernode_superexec_poll_s)))

        def make_cmd(i: int, port: int) -> list[str]:
            cmd = [_bin("flower-supernode"), "--insecure", "--superlink",
                   stack.superlink_address, "--host", LOOPBACK, "--port", str(port)]
            if runtime == "persistent":
                cmd += ["--isolation", "process"]
            if configs[i]:
                cmd += ["--node-config", format_config_args(configs[i])]
            return cmd

        # Each SuperNode needs its own Runtime API port (--port).
        stack.supernode_ports = _start_all_with_port_retry(stack, names, make_cmd, "Runtime API port",
                                                           env=supernode_env)
        runtime_procs: list[tuple[str, subprocess.Popen]] = []
        if runtime == "persistent":
            runtime_env = dict(stack.env)
            if threads is not None:
                runtime_env["OMP_NUM_THREADS"] = runtime_env["MKL_NUM_THREADS"] = str(threads)
            runtime_env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_package_root(), runtime_env.get("PYTHONPATH", "")) if p)
            for i, port in enumerate(stack.supernode_ports):  # started now: imports overlap the registration
                cmd = runtime_command(f"{LOOPBACK}:{port}", app=app, poll_s=runtime_poll_s)
                runtime_procs.append((f"runtime-{i}", _popen(cmd, name=f"runtime-{i}", stack=stack, env=runtime_env)))
        node_ids: dict[str, int] = {}
        deadline = time.monotonic() + _START_TIMEOUT_S
        for name in names:
            proc = stack.process(name)

            def registered(name=name) -> bool:
                m = re.search(r"SuperNode ID: (\d+)", _tail(stack.log_path(name), 400))
                if m:
                    node_ids[name] = int(m.group(1))
                return m is not None

            _wait_until(registered, proc=proc, name=name, stack=stack,
                        timeout=max(1.0, deadline - time.monotonic()), what="registration at the SuperLink")
        for name, proc in runtime_procs:
            _wait_runtime_ready(stack, name, proc, max(1.0, deadline - time.monotonic()))
        stack.node_ids = [node_ids[n] for n in names]
        stack.check_alive()
        stack.pids()
        return stack
    except BaseException:
        stack.stop(grace=3.0)
        raise


# ----------------------------------------------------------------------------- runs


def _app_config_defaults(app_dir: Path) -> dict[str, Any]:
    import tomli

    from flwr.common.config import flatten_dict

    data = tomli.loads((app_dir / "pyproject.toml").read_text())
    return flatten_dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _normalize_run_config(app_dir: Path, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten, type-check against the app's ``[tool.flwr.app.config]`` defaults."""
    from flwr.common.config import flatten_dict

    defaults = _app_config_defaults(app_dir)
    flat = flatten_dict(dict(run_config))
    unknown = sorted(k for k in flat if k not in defaults)
    if unknown:
        raise KeyError(
            f"run_config keys not declared in {app_dir / 'pyproject.toml'} "
            f"[tool.flwr.app.config]: {unknown} (Flower would fail the run with "
            f"\"Key '...' is not present in the main dictionary\")"
        )
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, Path):
            value = str(value)
        elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # numpy scalar
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"run_config[{key!r}] must be bool/int/float/str, got {type(value).__name__}")
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # Flower does not coerce: keep the declared type
        elif type(value) is not type(default) and not (
            isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool)
            and not isinstance(default, bool)
        ):
            raise TypeError(
                f"run_config[{key!r}]={value!r} ({type(value).__name__}) does not match the type of "
                f"its default {default!r} ({type(default).__name__}); Flower passes it through as is"
            )
        out[key] = value
    return out


def _run_status(stack: FlowerStack, run_id: int) -> tuple[str | None, str | None]:
    try:
        res = _flwr_cli(stack, ["ls", stack.federation, "--run-id", str(run_id), "--format", "json"],
                        timeout=60.0)
    except subprocess.TimeoutExpired:
        return None, None
    text = res.stdout
    try:
        data = json.loads(text[text.index("{"):])
        run = data["runs"][0]
        return str(run.get("status")), run.get("status-details")
    except (ValueError, KeyError, IndexError, TypeError):
        return None, None


def flwr_run(
    stack: FlowerStack,
    app_dir: Path,
    run_config: dict | None = None,
    *,
    stream: bool = True,
    timeout: float | None = None,
    federation_config: dict | None = None,
    validate_run_config: bool = True,
) -> int:
    """``flwr run <app_dir> <stack.federation> --stream [--run-config <toml>]``; wait for it.

    Output (Flower CLI lines plus the ServerApp's streamed logs) is always written to
    ``stack.log_dir/run-<n>.log`` and, when ``stream``, echoed to stdout. The return code
    is 0 iff the run finished with status ``finished:completed``; 1 for
    ``finished:failed``, 2 for ``finished:stopped``, 124 on ``timeout`` (the run is then
    stopped with ``flwr stop``), or the CLI's own non-zero code if the run never started.
    Details are in ``stack.last_run`` (:class:`RunResult`).

    ``run_config`` values are written to a TOML file (so strings with spaces/quotes are
    safe); keys must exist in the app's ``[tool.flwr.app.config]`` and keep the type of
    their defaults (checked here when ``validate_run_config``; ints are promoted to float
    for float defaults). ``federation_config`` (simulation only) overrides the stored
    simulation config for this run, e.g. ``{"num-supernodes": 3}``.
    """
    import tomli_w

    if stack._stopped:
        raise FlowerStackError("stack is stopped")
    stack.check_alive(["superlink"])  # SuperNodes/device runtimes may go away: the app copes
    app_dir = Path(app_dir).expanduser().resolve()
    if not (app_dir / "pyproject.toml").exists():
        raise FileNotFoundError(f"{app_dir}/pyproject.toml not found")
    stack._run_counter += 1
    n = stack._run_counter
    log_path = stack.log_dir / f"run-{n}.log"
    cmd = [_bin("flwr"), "run", str(app_dir), stack.federation, "--stream"]
    if run_config:
        cfg = _normalize_run_config(app_dir, run_config) if validate_run_config else dict(run_config)
        cfg_path = stack.log_dir / f"run-{n}-config.toml"
        cfg_path.write_text(tomli_w.dumps(cfg))
        cmd += ["--run-config", str(cfg_path)]
    if federation_config:
        cmd += ["--federation-config", format_config_args(federation_config)]

    t0 = time.monotonic()
    run_id: list[int] = []
    out = open(log_path, "w", encoding="utf-8", errors="replace")
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    proc = subprocess.Popen(
        cmd,
        cwd=str(stack.cwd),
        env=stack.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    stack._seen_pids.add(proc.pid)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            if not run_id:
                m = re.search(r"Successfully started run (\d+)", line)
                if m:
                    run_id.append(int(m.group(1)))
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, name="flwr-run-output", daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    except BaseException:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        if run_id:
            _flwr_cli(stack, ["stop", str(run_id[0]), stack.federation], timeout=30.0)
        raise
    if timed_out:
        if run_id:
            try:
                _flwr_cli(stack, ["stop", str(run_id[0]), stack.federation], timeout=30.0)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=10)

    status = details = None
    if run_id:
        # The log stream ends when the run is FINISHED; poll in case the CLI ended early.
        deadline = None if timeout is None else t0 + timeout + 30
        while True:
            status, details = _run_status(stack, run_id[0])
            if timed_out or (status or "").startswith("finished") or (
                deadline is not None and time.monotonic() > deadline
            ):
                break
            stack.check_alive(["superlink"])  # SuperNodes/device runtimes may go away: the app copes
            time.sleep(0.5)

    if timed_out:
        rc = 124
    elif status == "finished:completed":
        rc = 0
    elif status == "finished:stopped":
        rc = 2
    elif status is not None and status.startswith("finished"):
        rc = 1
    else:
        rc = proc.returncode if proc.returncode else 1
    msg = (f"[specfed_flwr.launch] run {run_id[0] if run_id else '?'} -> {status} "
           f"(rc={rc}, {time.monotonic() - t0:.1f}s){' ' + str(details) if details and details != 'N/A' else ''}\n")
    out.write(msg)
    out.close()
    if stream:
        sys.stdout.write(msg)
        sys.stdout.flush()
    stack.last_run = RunResult(
        returncode=rc,
        run_id=run_id[0] if run_id else None,
        status=status,
        details=details,
        cli_returncode=proc.returncode,
        log_path=log_path,
        elapsed_s=time.monotonic() - t0,
    )
    stack.pids()  # remember what the run spawned, for leak checks
    return rc


# ------------------------------------------------------------------------------ CLI


def _write_state(stack: FlowerStack, path: Path) -> None:
    """What ``run``/``down`` need to use a stack started by another (background) launcher."""
    state = {
        "launcher_pid": os.getpid(),
        "stack_id": stack.stack_id,
        "kind": stack.kind,
        "federation": stack.federation,
        "superlink_address": stack.superlink_address,
        "flwr_home": str(stack.flwr_home),
        "work_dir": str(stack.work_dir),
        "log_dir": str(stack.log_dir),
        "cwd": str(stack.cwd),
        "node_ids": stack.node_ids,
        "node_configs": stack.node_configs,
        "runtime": stack.runtime,
        "runtime_app": stack.runtime_app,
        "processes": {name: proc.pid for name, proc in zip(stack.process_names, stack.processes)},
        "pids": sorted(stack.pids()),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def attach_stack(state_file: Path) -> FlowerStack:
    """A handle on a stack another launcher keeps up (``--keep --state FILE``), for
    :func:`flwr_run`. It owns no processes: stop that stack with :func:`stop_from_state`."""
    state = json.loads(Path(state_file).read_text())
    if not pid_alive(int(state["launcher_pid"])):
        raise FlowerStackError(f"the launcher of {state_file} (pid {state['launcher_pid']}) is not running")
    host, port = state["superlink_address"].rsplit(":", 1)
    flwr_home = Path(state["flwr_home"])
    return FlowerStack(
        kind=state["kind"], processes=[], process_names=[], flwr_home=flwr_home,
        federation=state["federation"], superlink_host=host, superlink_port=int(port),
        log_dir=Path(state["log_dir"]), work_dir=Path(state["work_dir"]), cwd=Path(state["cwd"]),
        env=_base_env(state["stack_id"] + "-cli", flwr_home, DEFAULT_SUPEREXEC_POLL_S),
        stack_id=state["stack_id"] + "-cli", node_ids=list(state.get("node_ids") or []),
        node_configs=list(state.get("node_configs") or []),
        runtime=state.get("runtime"), runtime_app=state.get("runtime_app"),
        _run_counter=len(list(Path(state["log_dir"]).glob("run-*.log"))) + 100,
    )


def stop_from_state(state_file: Path, grace: float = _STOP_GRACE_S + 4) -> list[int]:
    """Stop a stack kept up by a background launcher: SIGTERM the launcher (it stops its
    stack), then SIGKILL any process of that stack still alive (recorded PIDs and the
    stack's environment marker). Returns the PIDs that had to be SIGKILLed."""
    path = Path(state_file)
    state = json.loads(path.read_text())
    launcher = int(state["launcher_pid"])
    recorded = {int(p) for p in state.get("pids") or []} | {int(p) for p in (state.get("processes") or {}).values()}
    _signal_pid(launcher, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (pid_alive(launcher) or any(pid_alive(p) for p in recorded)):
        time.sleep(0.2)
    left = {p for p in recorded | {launcher} if pid_alive(p)} | _marked_pids(state["stack_id"])
    for pid in left:
        _signal_pid(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return sorted(left)


def main(argv: list[str] | None = None) -> int:
    """``python -m specfed_flwr.launch {simulation,deployment,run,down} [options]``.

    ``simulation`` / ``deployment``: start a stack, run ``flwr run`` once with streamed
    logs, stop the stack and exit with :func:`flwr_run`'s code. ``--runtime`` (deployment) picks
    how ClientApps run: ``persistent`` (default; one ``specfed-flwr device-runtime`` per SuperNode,
    one warm process for all messages) or ``stock`` (Flower's new process per message). ``--keep``
    leaves the stack up until Ctrl-C/SIGTERM (``--no-run``: start only) and, with ``--state FILE``,
    records it so that ``run --state FILE`` runs the app against it and ``down --state FILE`` stops it.
    """
    import argparse

    from flwr.common.config import parse_config_args

    ap = argparse.ArgumentParser(prog="python -m specfed_flwr.launch", description=main.__doc__)
    ap.add_argument("engine", choices=["simulation", "deployment", "run", "down"])
    ap.add_argument("--app", type=Path, default=Path("."), help="Flower app dir (default: .)")
    ap.add_argument("-n", "--num-supernodes", type=int, default=2)
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="logs + ServerApp cwd (default: a new temp dir)")
    ap.add_argument("-c", "--run-config", action="append", default=[],
                    help="'k1=v1 k2=\"s\"' (TOML values), repeatable")
    ap.add_argument("--client-cpus", type=int, default=1, help="simulation: CPUs per virtual SuperNode")
    ap.add_argument("--runtime", choices=RUNTIMES, default="persistent",
                    help="deployment: persistent = one `specfed-flwr device-runtime` per SuperNode (--isolation "
                         "process; the ClientApp process lives for the whole run; default), stock = Flower's "
                         "flwr-clientapp process per message")
    ap.add_argument("--runtime-app", default=None, metavar="MODULE:ATTR",
                    help="deployment, persistent runtime: ClientApp to serve (default: each run's, from its FAB)")
    ap.add_argument("--runtime-threads", type=int, default=0, metavar="N",
                    help="deployment, persistent runtime: torch/OpenMP threads per device runtime (default 0: "
                         "this machine's cores / SuperNodes, as the devices share them; -1: torch's default)")
    ap.add_argument("--node-config", action="append", default=[],
                    help="extra node_config for every SuperNode, 'k=v ...' (TOML values), repeatable")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the stack running after the run")
    ap.add_argument("--no-run", action="store_true", help="start the stack only (implies --keep)")
    ap.add_argument("--state", type=Path, default=None,
                    help="state file of a kept stack: written by --keep, read by run/down")
    args = ap.parse_args(argv)
    run_config = parse_config_args(args.run_config) if args.run_config else None

    if args.engine == "down":
        if args.state is None or not args.state.exists():
            print(f"[specfed_flwr.launch] no state file {args.state}: nothing to stop", flush=True)
            return 0
        killed = stop_from_state(args.state)
        print(f"[specfed_flwr.launch] stack stopped" + (f" (SIGKILLed {killed})" if killed else ""), flush=True)
        return 0
    if args.engine == "run":
        if args.state is None:
            ap.error("run needs --state FILE (from `deployment --keep --state FILE`)")
        stack = attach_stack(args.state)
        return flwr_run(stack, args.app, run_config, stream=True, timeout=args.timeout)

    keep = args.keep or args.no_run
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="specfed-flwr-logs-"))
    if args.engine == "simulation":
        backend = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0}}
        stack = start_simulation_stack(args.num_supernodes, log_dir=log_dir, backend=backend)
    else:
        extra = parse_config_args(args.node_config) if args.node_config else {}
        configs = [{"partition-id": i, "num-partitions": args.num_supernodes, **extra}
                   for i in range(args.num_supernodes)]
        try:
            stack = start_deployment_stack(args.num_supernodes, log_dir=log_dir, node_configs=configs,
                                           runtime=args.runtime, app=args.runtime_app,
                                           runtime_threads=None if args.runtime_threads == -1 else args.runtime_threads)
        except ValueError as exc:  # a bad option: nothing was started
            ap.error(str(exc))
    rc = 0
    with stack:
        print(f"[specfed_flwr.launch] {stack.kind} SuperLink at {stack.superlink_address}, "
              f"connection '{stack.federation}', logs in {stack.log_dir}"
              + (f", ClientApps: {stack.runtime} runtime" if stack.kind == "deployment" else ""),
              flush=True)
        if args.state is not None:
            _write_state(stack, args.state)
        if not args.no_run:
            rc = flwr_run(stack, args.app, run_config, stream=True, timeout=args.timeout)
        if keep:
            print(f"[specfed_flwr.launch] stack kept up (launcher pid {os.getpid()}); in a shell:\n"
                  f"  {stack.shell_env()}\n"
                  f"  flwr run {Path(args.app).resolve()} {stack.federation} --stream\n"
                  + (f"  python -m specfed_flwr.launch run --state {args.state}\n"
                     f"  python -m specfed_flwr.launch down --state {args.state}\n" if args.state else "")
                  + "Ctrl-C (or SIGTERM) to stop.", flush=True)
            try:
                while True:
                    stack.check_alive(["superlink"])
                    time.sleep(1.0)
            except KeyboardInterrupt:
                pass
    if args.state is not None and args.state.exists():
        try:
            if json.loads(args.state.read_text()).get("launcher_pid") == os.getpid():
                args.state.unlink()
        except (OSError, ValueError):
            pass
    return rc


if __name__ == "__main__":
    sys.exit(main())
