"""``python -m specfed_flwr.launch {simulation,deployment,run,down} [options]``.

``simulation`` / ``deployment``: start a stack, run ``flwr run`` once with streamed
logs, stop the stack and exit with :func:`flwr_run`'s code. ``--runtime`` (deployment) picks
how ClientApps run: ``persistent`` (default; one ``specfed-flwr device-runtime`` per SuperNode,
one warm process for all messages) or ``stock`` (Flower's new process per message). ``--keep``
leaves the stack up until Ctrl-C/SIGTERM (``--no-run``: start only) and, with ``--state FILE``,
records it so that ``run --state FILE`` runs the app against it and ``down --state FILE`` stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .defaults import RUNTIMES
from .run import flwr_run
from .stack import FlowerStack
from .starters import start_deployment_stack, start_simulation_stack
from .state import attach_stack, stop_from_state, write_state


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m specfed_flwr.launch", description=__doc__)
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
    return ap


def main(argv: list[str] | None = None) -> int:
    from flwr.common.config import parse_config_args

    ap = build_parser()
    args = ap.parse_args(argv)
    run_config = parse_config_args(args.run_config) if args.run_config else None
    if args.engine == "down":
        return _down(args.state)
    if args.engine == "run":
        if args.state is None:
            ap.error("run needs --state FILE (from `deployment --keep --state FILE`)")
        return flwr_run(attach_stack(args.state), args.app, run_config, stream=True, timeout=args.timeout)
    stack = _start(ap, args)
    rc = 0
    with stack:
        print(f"[specfed_flwr.launch] {stack.kind} SuperLink at {stack.superlink_address}, "
              f"connection '{stack.federation}', logs in {stack.log_dir}"
              + (f", ClientApps: {stack.runtime} runtime" if stack.kind == "deployment" else ""),
              flush=True)
        if args.state is not None:
            write_state(stack, args.state)
        if not args.no_run:
            rc = flwr_run(stack, args.app, run_config, stream=True, timeout=args.timeout)
        if args.keep or args.no_run:
            _keep_up(stack, args)
    _remove_own_state(args.state)
    return rc


def _down(state: Path | None) -> int:
    if state is None or not state.exists():
        print(f"[specfed_flwr.launch] no state file {state}: nothing to stop", flush=True)
        return 0
    killed = stop_from_state(state)
    print("[specfed_flwr.launch] stack stopped" + (f" (SIGKILLed {killed})" if killed else ""), flush=True)
    return 0


def _start(ap: argparse.ArgumentParser, args: argparse.Namespace) -> FlowerStack:
    """The stack of ``simulation`` / ``deployment``; a bad deployment option ends the CLI."""
    from flwr.common.config import parse_config_args

    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="specfed-flwr-logs-"))
    if args.engine == "simulation":
        backend = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0}}
        return start_simulation_stack(args.num_supernodes, log_dir=log_dir, backend=backend)
    extra = parse_config_args(args.node_config) if args.node_config else {}
    configs = [{"partition-id": i, "num-partitions": args.num_supernodes, **extra}
               for i in range(args.num_supernodes)]
    try:
        return start_deployment_stack(args.num_supernodes, log_dir=log_dir, node_configs=configs,
                                      runtime=args.runtime, app=args.runtime_app,
                                      runtime_threads=None if args.runtime_threads == -1 else args.runtime_threads)
    except ValueError as exc:  # a bad option: nothing was started
        ap.error(str(exc))


def _keep_up(stack: FlowerStack, args: argparse.Namespace) -> None:
    """Say how to use the stack, then keep it up until Ctrl-C (or SIGTERM, via the stack registry)."""
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


def _remove_own_state(state: Path | None) -> None:
    """The state file, if this launcher wrote it (another launcher's stays)."""
    if state is None or not state.exists():
        return
    try:
        if json.loads(state.read_text()).get("launcher_pid") == os.getpid():
            state.unlink()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
