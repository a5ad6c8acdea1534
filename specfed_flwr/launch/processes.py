"""Process tracking on Linux: free ports, live PIDs (zombies count as dead), the processes that
carry a stack's environment marker or descend from its roots, log tails, signals, and the shim that
makes a child die with its launcher (``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Iterable

from .defaults import ENV_MARKER, LOOPBACK


class FlowerStackError(RuntimeError):
    """A Flower process failed to start / a stack could not be brought up."""


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


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.25) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


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


def marked_pids(stack_id: str) -> set[int]:
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


def descendants(roots: Iterable[int]) -> set[int]:
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


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return "\n".join(text.splitlines()[-lines:])


# Started through this shim on Linux when launched from the main thread: the child asks
# the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG survives exec).
PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def use_pdeathsig() -> bool:
    return sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()


def flower_bin(name: str) -> str:
    """Path of a Flower console script, preferring the running interpreter's bin dir."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FlowerStackError(f"`{name}` not found (is flwr installed in this environment?)")
    return found


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
