"""specfed_flwr.launch against Flower's real engines, with the tiny echo app in fixtures/.

Simulation: ``flower-superlink --insecure --simulation`` + ``flwr run``. Deployment:
``flower-superlink --insecure`` + 2 ``flower-supernode`` + ``flwr run`` on Flower's stock ClientApp
path (the default persistent runtime has tests/test_persistent_runtime.py; the launcher-death test
uses it). Each test checks
one reply per node in the JSON the ServerApp wrote, and that after ``stop()`` no process
the stack started (or Flower started for it) is alive.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from specfed_flwr.launch import (
    FlowerStack,
    flwr_run,
    format_config_args,
    free_port,
    pid_alive,
    start_deployment_stack,
    start_simulation_stack,
)

pytestmark = pytest.mark.flower

ECHO_APP = Path(__file__).parent / "fixtures" / "echo_app"
RUN_TIMEOUT = 240.0


def _assert_all_dead(stack: FlowerStack, pids: set[int]) -> None:
    assert pids, "the stack should own processes while running"
    stack.stop()
    stack.stop()  # idempotent
    alive = sorted(p for p in pids | stack.seen_pids if pid_alive(p))
    assert not alive, f"processes still alive after stop(): {alive}"
    assert all(p.poll() is not None for p in stack.processes)


def _check_replies(out: Path, engine: str, n: int) -> dict:
    data = json.loads(out.read_text())
    assert data["engine"] == engine
    assert len(data["node-ids"]) == n
    replies = data["replies"]
    assert len(replies) == n, replies
    assert all("error" not in r for r in replies), replies
    assert sorted(r["node-id"] for r in replies) == sorted(data["node-ids"])
    assert all(r["ping"] == f"hello-{r['round']}-{r['node-id']}" for r in replies)
    return data


def test_free_port_and_config_args() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert format_config_args({"a": 1, "b": "x y", "c": True, "d": 0.5}) == 'a=1 b="x y" c=true d=0.5'
    with pytest.raises(ValueError):
        format_config_args({"a": 'say "hi"'})


def test_simulation_stack_echo(tmp_path: Path) -> None:
    out = tmp_path / "sim result.json"  # a space: run_config goes through a TOML file
    stack = start_simulation_stack(2, log_dir=tmp_path / "logs")
    try:
        assert stack.kind == "simulation"
        assert stack.config_toml.read_text().count(stack.superlink_address) == 1
        assert not str(stack.flwr_home).startswith(str(Path(__file__).parents[1]))
        # Undeclared keys / wrong types are refused before anything is submitted.
        with pytest.raises(KeyError):
            flwr_run(stack, ECHO_APP, {"no-such-key": 1}, stream=False)
        with pytest.raises(TypeError):
            flwr_run(stack, ECHO_APP, {"rounds": "3"}, stream=False)

        rc = flwr_run(stack, ECHO_APP, {"out": str(out), "rounds": 1}, stream=False, timeout=RUN_TIMEOUT)
        assert rc == 0, stack.last_run.log_path.read_text()[-3000:]
        assert stack.last_run.status == "finished:completed"
        data = _check_replies(out, "simulation", 2)
        assert len(data["round-times-s"]) == 1
        run_log = stack.last_run.log_path.read_text()
        assert "[echo] wrote" in run_log  # ServerApp output is streamed by `flwr run --stream`
        assert "[echo-client]" in run_log  # ... and so is ClientApp output (Ray log_to_driver)
        # Simulated nodes get partition-id / num-partitions in their node_config.
        assert all("partition-id" in r["node-config"] for r in data["replies"])
        # The ServerApp runs with the stack's cwd (default: log_dir).
        assert Path(data["serverapp-cwd"]) == stack.cwd


        pids = stack.pids()
    finally:
        stack.stop()
    _assert_all_dead(stack, pids)


def _env_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


def test_deployment_stack_echo(tmp_path: Path) -> None:
    """Flower's stock ClientApp path (``runtime="stock"``): a flwr-clientapp process per message.
    The persistent device runtime has its own round-trip test (tests/test_persistent_runtime.py)."""
    out = tmp_path / "dep.json"
    cfgs = [{"partition-id": 0, "name": "edge a"}, {"partition-id": 1, "name": "edge b"}]
    with pytest.raises(ValueError, match="runtime must be one of"):
        start_deployment_stack(2, log_dir=tmp_path / "bad", runtime="warm")
    with start_deployment_stack(2, log_dir=tmp_path / "logs", node_configs=cfgs, runtime="stock") as stack:
        assert stack.kind == "deployment" and stack.runtime == "stock"
        assert not any(n.startswith("runtime-") for n in stack.process_names)
        assert len(stack.node_ids) == 2 and len(set(stack.supernode_ports)) == 2
        if sys.platform.startswith("linux"):  # the best stock SuperExec poll, on the SuperNodes only
            assert _env_of(stack.process("supernode-0").pid)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"
            assert _env_of(stack.process("superlink").pid)["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "1.0"
        # rounds=0: only the warm-up round (a deployment round costs seconds, see the notes)
        rc = flwr_run(stack, ECHO_APP, {"out": str(out), "rounds": 0, "mode": "push-pull"},
                      stream=False, timeout=RUN_TIMEOUT)
        assert rc == 0, stack.last_run.log_path.read_text()[-3000:]
        data = _check_replies(out, "deployment", 2)
        assert sorted(data["node-ids"]) == sorted(stack.node_ids)
        names = sorted(r["node-config"] for r in data["replies"])
        assert "edge a" in names[0] and "edge b" in names[1]
        # Deployment ClientApp output goes to the SuperNode's log, not to the run stream.
        assert "[echo-client]" not in stack.last_run.log_path.read_text()
        assert all("[echo-client]" in stack.log_path(f"supernode-{i}").read_text() for i in range(2))
        # The ClientApp ran in a flwr-clientapp process, not in the SuperNode itself.
        assert not {r["pid"] for r in data["replies"]} & {p.pid for p in stack.processes}
        # A ServerApp exception gives a failed run and a non-zero code (`flwr run` says 0).
        # (Done here, not in the simulation test: there a run always waits for Ray's start.)
        rc = flwr_run(stack, ECHO_APP, {"mode": "bogus"}, stream=False, timeout=RUN_TIMEOUT)
        assert rc == 1 and stack.last_run.status == "finished:failed", stack.last_run
        assert stack.last_run.cli_returncode == 0
        assert "unknown mode" in (stack.last_run.details or "") + stack.last_run.log_path.read_text()
        pids = stack.pids()
        assert len(pids) >= 6  # superlink + 2 supernodes + their 3 flower-superexec
    _assert_all_dead(stack, pids)


def test_stack_dies_with_killed_launcher(tmp_path: Path) -> None:
    """A launcher that is SIGKILLed leaves no SuperLink behind (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    pidfile = tmp_path / "pids.json"
    script = textwrap.dedent(
        f"""
        import json, time
        from pathlib import Path
        from specfed_flwr.launch import start_deployment_stack
        st = start_deployment_stack(1, log_dir=Path({str(tmp_path / 'logs')!r}), work_dir=Path({str(tmp_path / 'work')!r}))
        Path({str(pidfile)!r}).write_text(json.dumps(sorted(st.pids())))
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not pidfile.exists():
            assert proc.poll() is None, "launcher died"
            assert time.monotonic() < deadline, "stack did not come up"
            time.sleep(0.2)
        pids = set(json.loads(pidfile.read_text()))
        assert pids
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = sorted(p for p in pids if pid_alive(p))
        for p in alive:  # do not leak into other tests even if the assertion fails
            os.kill(p, signal.SIGKILL)
        assert not alive, f"still alive after the launcher was SIGKILLed: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
