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

Modules: ``defaults`` (settings), ``processes`` (ports, PIDs, signals), ``spawn`` (starting and
waiting for processes), ``stack`` (``FlowerStack``, ``RunResult``, the stop-at-exit registry),
``flwr_config`` (Flower's config files and flags), ``starters`` (the two stacks), ``run``
(``flwr_run``), ``state`` (a stack kept up for other launchers), ``cli`` (``python -m
specfed_flwr.launch``). This package re-exports what other modules and the tests use.
"""

from .defaults import DEFAULT_SIM_BACKEND, RUNTIMES, single_actor_backend
from .flwr_config import format_config_args
from .processes import FlowerStackError, free_port, pid_alive
from .run import flwr_run
from .stack import FlowerStack, RunResult
from .starters import runtime_command, start_deployment_stack, start_simulation_stack
from .state import attach_stack, stop_from_state

__all__ = [
    "DEFAULT_SIM_BACKEND",
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
    "single_actor_backend",
]
