"""``flwr_run``: ``flwr run <app> <connection> --stream`` against a stack, waited for, with an exit
code derived from the *run status* (``flwr run`` itself exits 0 even when the ServerApp crashed).

The steps: build the command (run config checked and written to a TOML file) -> start the CLI
with a thread pumping its output to the run log (and stdout) and catching the run id -> wait for
it (on timeout: ``flwr stop`` the run, end the CLI) -> poll the run's status until it is finished
-> map the status to an exit code -> record a ``RunResult`` on the stack.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from .flwr_config import format_config_args, normalize_run_config
from .processes import FlowerStackError, flower_bin, signal_group
from .spawn import flwr_cli
from .stack import FlowerStack, RunResult


def run_status(stack: FlowerStack, run_id: int) -> tuple[str | None, str | None]:
    """(status, details) of a run, from ``flwr ls --format json``; (None, None) when unknown."""
    try:
        res = flwr_cli(stack, ["ls", stack.federation, "--run-id", str(run_id), "--format", "json"],
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
    if stack._stopped:
        raise FlowerStackError("stack is stopped")
    stack.check_alive(["superlink"])  # SuperNodes/device runtimes may go away: the app copes
    app_dir = Path(app_dir).expanduser().resolve()
    if not (app_dir / "pyproject.toml").exists():
        raise FileNotFoundError(f"{app_dir}/pyproject.toml not found")
    stack._run_counter += 1
    log_path = stack.log_dir / f"run-{stack._run_counter}.log"
    cmd = _run_command(stack, app_dir, run_config, federation_config, validate_run_config)
    t0 = time.monotonic()
    run_id: list[int] = []
    with open(log_path, "w", encoding="utf-8", errors="replace") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = _start_cli(stack, cmd)
        reader = threading.Thread(target=_pump, args=(proc, out, run_id, stream), name="flwr-run-output", daemon=True)
        reader.start()
        timed_out = _wait_cli(stack, proc, run_id, timeout)
        reader.join(timeout=10)
        status, details = _final_status(stack, run_id, timed_out, None if timeout is None else t0 + timeout + 30)
        rc = _exit_code(status, timed_out, proc.returncode)
        msg = (f"[specfed_flwr.launch] run {run_id[0] if run_id else '?'} -> {status} "
               f"(rc={rc}, {time.monotonic() - t0:.1f}s){' ' + str(details) if details and details != 'N/A' else ''}\n")
        out.write(msg)
    if stream:
        sys.stdout.write(msg)
        sys.stdout.flush()
    stack.last_run = RunResult(returncode=rc, run_id=run_id[0] if run_id else None, status=status, details=details,
                               cli_returncode=proc.returncode, log_path=log_path, elapsed_s=time.monotonic() - t0)
    stack.pids()  # remember what the run spawned, for leak checks
    return rc


def _run_command(stack: FlowerStack, app_dir: Path, run_config: dict | None, federation_config: dict | None,
                 validate: bool) -> list[str]:
    """The ``flwr run`` command line; the run config goes to ``run-<n>-config.toml`` in the log dir."""
    import tomli_w

    cmd = [flower_bin("flwr"), "run", str(app_dir), stack.federation, "--stream"]
    if run_config:
        cfg = normalize_run_config(app_dir, run_config) if validate else dict(run_config)
        cfg_path = stack.log_dir / f"run-{stack._run_counter}-config.toml"
        cfg_path.write_text(tomli_w.dumps(cfg))
        cmd += ["--run-config", str(cfg_path)]
    if federation_config:
        cmd += ["--federation-config", format_config_args(federation_config)]
    return cmd


def _start_cli(stack: FlowerStack, cmd: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd, cwd=str(stack.cwd), env=stack.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, text=True, encoding="utf-8", errors="replace", bufsize=1,
    )
    stack._seen_pids.add(proc.pid)
    return proc


def _pump(proc: subprocess.Popen, out: IO[str], run_id: list[int], stream: bool) -> None:
    """The CLI's output to the run log (and stdout); the run id once the CLI names it."""
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


def _stop_run(stack: FlowerStack, run_id: list[int]) -> None:
    if run_id:
        flwr_cli(stack, ["stop", str(run_id[0]), stack.federation], timeout=30.0)


def _wait_cli(stack: FlowerStack, proc: subprocess.Popen, run_id: list[int], timeout: float | None) -> bool:
    """Wait for the CLI; True when it timed out (the run was then stopped and the CLI ended).
    Anything else that interrupts the wait (Ctrl-C) kills the CLI and stops the run, then re-raises."""
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        pass
    except BaseException:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        _stop_run(stack, run_id)
        raise
    try:
        _stop_run(stack, run_id)
    except subprocess.TimeoutExpired:
        pass
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    return True


def _final_status(stack: FlowerStack, run_id: list[int], timed_out: bool,
                  deadline: float | None) -> tuple[str | None, str | None]:
    """The run's status once finished: the log stream ends when the run is FINISHED, but the CLI may
    end early, so poll (until ``deadline``, or once after a timeout)."""
    if not run_id:
        return None, None
    while True:
        status, details = run_status(stack, run_id[0])
        if timed_out or (status or "").startswith("finished") or (
            deadline is not None and time.monotonic() > deadline
        ):
            return status, details
        stack.check_alive(["superlink"])  # SuperNodes/device runtimes may go away: the app copes
        time.sleep(0.5)


def _exit_code(status: str | None, timed_out: bool, cli_returncode: int | None) -> int:
    if timed_out:
        return 124
    if status == "finished:completed":
        return 0
    if status == "finished:stopped":
        return 2
    if status is not None and status.startswith("finished"):
        return 1
    return cli_returncode if cli_returncode else 1
