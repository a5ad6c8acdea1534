"""The launcher's settings: Flower's federation id, SuperExec and device-runtime polls, the
ClientApp runtimes of a deployment stack, the default simulation backend, start/stop timeouts."""

from __future__ import annotations

import os
from typing import Any

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


#: Simulation backend used when ``backend`` is None (``single_actor_backend``).
DEFAULT_SIM_BACKEND: dict[str, Any] = single_actor_backend()

START_TIMEOUT_S = 90.0  # a process has this long to open its port / register / serve
STOP_GRACE_S = 8.0  # SIGTERM, then this long before SIGKILL
PORT_RETRIES = 3  # new ports tried when another process took the one picked
