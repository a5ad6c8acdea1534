"""Starting a stack's processes: each in its own session with a log file and the stack's
environment, remembered so it can be restarted; waiting until a port opens, a log line appears or
the process dies (with its log tail); a new port when another process took the one picked; the
``flwr`` CLI against a stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .defaults import PORT_RETRIES, START_TIMEOUT_S
from .processes import PDEATHSIG_SHIM, FlowerStackError, flower_bin, free_port, port_open, tail, use_pdeathsig

if TYPE_CHECKING:
    from .stack import FlowerStack


def popen(cmd: list[str], *, name: str, stack: FlowerStack, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``cmd`` as stack process ``name`` (own session, log file, the stack's environment
    unless ``env`` is given), remembering how, so that :meth:`FlowerStack.restart` can redo it."""
    env = stack.env if env is None else env
    log_path = stack.log_path(name)
    full = list(cmd)
    if use_pdeathsig():
        full = [sys.executable, "-c", PDEATHSIG_SHIM, str(os.getpid()), *full]
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


def wait_until(
    predicate, *, proc: subprocess.Popen, name: str, stack: FlowerStack, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc.poll() is not None:
            raise FlowerStackError(
                f"{name} (pid {proc.pid}) exited with code {proc.returncode} while waiting for "
                f"{what}; last log lines of {stack.log_path(name)}:\n{tail(stack.log_path(name))}"
            )
        if time.monotonic() > deadline:
            raise FlowerStackError(
                f"timeout ({timeout:.0f}s) waiting for {name} {what}; last log lines of "
                f"{stack.log_path(name)}:\n{tail(stack.log_path(name))}"
            )
        time.sleep(0.1)


def address_in_use(stack: FlowerStack, name: str) -> bool:
    text = tail(stack.log_path(name), 80).lower()
    return "address already in use" in text or "errno 98" in text


def start_with_port_retry(stack: FlowerStack, name: str, make_cmd, ready, what: str) -> int:
    """Start ``make_cmd(port)`` and wait for ``ready(port)``; new port on EADDRINUSE."""
    last: Exception | None = None
    for _attempt in range(PORT_RETRIES):
        port = free_port()
        proc = popen(make_cmd(port), name=name, stack=stack)
        try:
            wait_until(lambda: ready(port), proc=proc, name=name, stack=stack,
                        timeout=START_TIMEOUT_S, what=what)
            return port
        except FlowerStackError as err:
            last = err
            if proc.poll() is not None and address_in_use(stack, name):
                idx = stack.processes.index(proc)
                stack.processes.pop(idx)
                stack.process_names.pop(idx)
                continue
            raise
    raise FlowerStackError(f"could not start {name} after {PORT_RETRIES} attempts: {last}")


def start_all_with_port_retry(stack: FlowerStack, names: list[str], make_cmd, what: str,
                               started: list[subprocess.Popen] | None = None,
                               ports: list[int] | None = None, env: dict[str, str] | None = None) -> list[int]:
    """Start ``make_cmd(i, port)`` for every name at once (start-up is CPU bound), then wait
    for each port; a process that lost its port to another process is restarted on a new
    one. ``started``/``ports``: processes already started with :func:`popen` (wait only).
    ``env``: their environment (default: the stack's)."""
    ports = list(ports) if ports is not None else [free_port() for _ in names]
    procs = list(started) if started is not None else [
        popen(make_cmd(i, ports[i]), name=name, stack=stack, env=env) for i, name in enumerate(names)]
    for i, name in enumerate(names):
        for attempt in range(PORT_RETRIES):
            try:
                wait_until(lambda: port_open(ports[i]), proc=procs[i], name=name, stack=stack,
                            timeout=START_TIMEOUT_S, what=what)
                break
            except FlowerStackError:
                if attempt + 1 < PORT_RETRIES and procs[i].poll() is not None \
                        and address_in_use(stack, name):
                    idx = stack.processes.index(procs[i])
                    stack.processes.pop(idx)
                    stack.process_names.pop(idx)
                    ports[i] = free_port()
                    procs[i] = popen(make_cmd(i, ports[i]), name=name, stack=stack, env=env)
                    continue
                raise
    return ports


_RUNTIME_READY = re.compile(r"device runtime \(pid (\d+)\) serving")


def wait_runtime_ready(stack: FlowerStack, name: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until the device runtime logs that it serves (it checked the Flower version, the options and
    imported ``--app``); a runtime that exits instead fails the stack with its log tail."""
    def ready() -> bool:
        return any(int(m.group(1)) == proc.pid for m in _RUNTIME_READY.finditer(tail(stack.log_path(name), 400)))

    wait_until(ready, proc=proc, name=name, stack=stack, timeout=timeout, what="to serve its SuperNode")


def flwr_cli(stack: FlowerStack, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [flower_bin("flwr"), *args],
        cwd=str(stack.cwd),
        env=stack.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
