"""Starting the two kinds of stack: ``start_simulation_stack`` (a SuperLink with the simulation
engine and its stored backend config) and ``start_deployment_stack`` (a SuperLink, N SuperNodes
and, with the persistent runtime, one ``specfed-flwr device-runtime`` per SuperNode)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .defaults import (
    DEFAULT_RUNTIME_POLL_S,
    DEFAULT_SIM_BACKEND,
    DEFAULT_SUPEREXEC_POLL_S,
    ENV_MARKER,
    LOOPBACK,
    RUNTIMES,
    START_TIMEOUT_S,
    SUPERNODE_SUPEREXEC_POLL_S,
)
from .flwr_config import format_config_args, sim_config_flags, write_flower_config
from .processes import FlowerStackError, flower_bin, port_open, tail
from .spawn import flwr_cli, popen, start_all_with_port_retry, start_with_port_retry, wait_runtime_ready, wait_until
from .stack import FlowerStack, register


def base_env(stack_id: str, flwr_home: Path, poll_s: float) -> dict[str, str]:
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
        env=base_env(stack_id, flwr_home, poll_s),
        stack_id=stack_id,
        num_supernodes=num_supernodes,
        _cleanup_dirs=cleanup,
    )
    register(stack)
    return stack


def _start_superlink(stack: FlowerStack, *, simulation: bool) -> None:
    db = stack.work_dir / "superlink-state.db"

    def make_cmd(port: int) -> list[str]:
        cmd = [flower_bin("flower-superlink"), "--insecure"]
        if simulation:
            cmd.append("--simulation")
        cmd += ["--disable-runtime-dependency-installation", "--host", LOOPBACK,
                "--port", str(port), "--database", str(db)]
        return cmd

    def ready(port: int) -> bool:
        # uvicorn binds the port only after the FastAPI lifespan startup has completed
        return port_open(port)

    if db.exists():
        db.unlink()
    stack.superlink_port = start_with_port_retry(stack, "superlink", make_cmd, ready, "HTTP port")
    write_flower_config(stack.flwr_home, stack.federation, stack.superlink_address)


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
        flags = sim_config_flags(num_supernodes, stack.backend)
        _start_superlink(stack, simulation=True)
        res = flwr_cli(stack, ["federation", "simulation-config", stack.federation_id,
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


def _package_root() -> str:
    """The directory this ``specfed_flwr`` package was imported from (a checkout or site-packages)."""
    return str(Path(__file__).resolve().parents[2])


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
    _check_deployment_options(num_supernodes, node_configs, runtime, app, runtime_threads,
                              superexec_poll_s=superexec_poll_s, supernode_superexec_poll_s=supernode_superexec_poll_s,
                              runtime_poll_s=runtime_poll_s)
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
        names = _start_supernodes(stack, configs, supernode_superexec_poll_s)
        runtime_procs = _start_runtimes(stack, app, runtime_poll_s, threads) if runtime == "persistent" else []
        deadline = time.monotonic() + START_TIMEOUT_S
        stack.node_ids = _wait_registered(stack, names, deadline)
        for name, proc in runtime_procs:
            wait_runtime_ready(stack, name, proc, max(1.0, deadline - time.monotonic()))
        stack.check_alive()
        stack.pids()
        return stack
    except BaseException:
        stack.stop(grace=3.0)
        raise


def _check_deployment_options(num_supernodes: int, node_configs: list[dict] | None, runtime: str, app: str | None,
                              runtime_threads: int | None, **polls: float) -> None:
    """Refuse bad options before anything is started."""
    if node_configs is not None and len(node_configs) != num_supernodes:
        raise ValueError("len(node_configs) must equal num_supernodes")
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if app is not None and runtime != "persistent":
        raise ValueError("app= selects the ClientApp of the persistent device runtime; the stock path always "
                         "loads each run's ClientApp from its FAB")
    for label, value in polls.items():
        if not 0.01 <= float(value) <= 60.0:  # Flower's own bounds for the SuperExec poll
            raise ValueError(f"{label} must be in [0.01, 60] seconds, got {value!r}")
    if runtime_threads is not None and (isinstance(runtime_threads, bool) or int(runtime_threads) < 0):
        raise ValueError(f"runtime_threads must be >= 1, 0 (auto) or None, got {runtime_threads!r}")


def _start_supernodes(stack: FlowerStack, configs: list[dict], poll_s: float) -> list[str]:
    """Every SuperNode at once, each on its own Runtime API port (``--port``); their names."""
    names = [f"supernode-{i}" for i in range(len(configs))]
    supernode_env = dict(stack.env, FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(float(poll_s)))

    def make_cmd(i: int, port: int) -> list[str]:
        cmd = [flower_bin("flower-supernode"), "--insecure", "--superlink",
               stack.superlink_address, "--host", LOOPBACK, "--port", str(port)]
        if stack.runtime == "persistent":
            cmd += ["--isolation", "process"]
        if configs[i]:
            cmd += ["--node-config", format_config_args(configs[i])]
        return cmd

    stack.supernode_ports = start_all_with_port_retry(stack, names, make_cmd, "Runtime API port", env=supernode_env)
    return names


def _start_runtimes(stack: FlowerStack, app: str | None, poll_s: float,
                    threads: int | None) -> list[tuple[str, subprocess.Popen]]:
    """One device runtime per SuperNode, started now: its imports overlap the registration."""
    runtime_env = dict(stack.env)
    if threads is not None:
        runtime_env["OMP_NUM_THREADS"] = runtime_env["MKL_NUM_THREADS"] = str(threads)
    runtime_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_package_root(), runtime_env.get("PYTHONPATH", "")) if p)
    procs = []
    for i, port in enumerate(stack.supernode_ports):
        cmd = runtime_command(f"{LOOPBACK}:{port}", app=app, poll_s=poll_s)
        procs.append((f"runtime-{i}", popen(cmd, name=f"runtime-{i}", stack=stack, env=runtime_env)))
    return procs


def _wait_registered(stack: FlowerStack, names: list[str], deadline: float) -> list[int]:
    """Until every SuperNode's log shows its ``SuperNode ID``; the ids, in ``names`` order."""
    node_ids: dict[str, int] = {}
    for name in names:
        proc = stack.process(name)

        def registered(name: str = name) -> bool:
            m = re.search(r"SuperNode ID: (\d+)", tail(stack.log_path(name), 400))
            if m:
                node_ids[name] = int(m.group(1))
            return m is not None

        wait_until(registered, proc=proc, name=name, stack=stack,
                   timeout=max(1.0, deadline - time.monotonic()), what="registration at the SuperLink")
    return [node_ids[n] for n in names]
