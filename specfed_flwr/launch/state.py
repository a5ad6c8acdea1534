"""A kept stack shared between launchers: the state file a ``--keep --state FILE`` launcher writes,
a handle on that stack for ``flwr_run`` (``attach_stack``), and stopping it (``stop_from_state``)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from .defaults import DEFAULT_SUPEREXEC_POLL_S, STOP_GRACE_S
from .processes import FlowerStackError, marked_pids, pid_alive, signal_pid
from .stack import FlowerStack
from .starters import base_env


def write_state(stack: FlowerStack, path: Path) -> None:
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
        env=base_env(state["stack_id"] + "-cli", flwr_home, DEFAULT_SUPEREXEC_POLL_S),
        stack_id=state["stack_id"] + "-cli", node_ids=list(state.get("node_ids") or []),
        node_configs=list(state.get("node_configs") or []),
        runtime=state.get("runtime"), runtime_app=state.get("runtime_app"),
        _run_counter=len(list(Path(state["log_dir"]).glob("run-*.log"))) + 100,
    )


def stop_from_state(state_file: Path, grace: float = STOP_GRACE_S + 4) -> list[int]:
    """Stop a stack kept up by a background launcher: SIGTERM the launcher (it stops its
    stack), then SIGKILL any process of that stack still alive (recorded PIDs and the
    stack's environment marker). Returns the PIDs that had to be SIGKILLed."""
    path = Path(state_file)
    state = json.loads(path.read_text())
    launcher = int(state["launcher_pid"])
    recorded = {int(p) for p in state.get("pids") or []} | {int(p) for p in (state.get("processes") or {}).values()}
    signal_pid(launcher, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (pid_alive(launcher) or any(pid_alive(p) for p in recorded)):
        time.sleep(0.2)
    left = {p for p in recorded | {launcher} if pid_alive(p)} | marked_pids(state["stack_id"])
    for pid in left:
        signal_pid(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return sorted(left)
