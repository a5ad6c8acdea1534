"""The long-lived draft worker of a deployed device.

In Flower's deployment engine a SuperNode starts a NEW ClientApp process for every message,
so a draft model held in ClientApp globals would reload every round. The worker is started
once next to the SuperNode (``specfed-flwr draft-worker --port 7601``) and keeps the draft
model and the per-sequence KV caches warm; the ClientApp hands it each message over a local,
authenticated channel (``multiprocessing.connection`` on 127.0.0.1 or a Unix socket).

The SuperNode's ``node_config`` names the worker: ``worker-address="127.0.0.1:7601"``
(optionally ``worker-authkey``). Without a worker the ClientApp drafts in its own process
(correct, but it reloads the model each round: it warns once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # the ClientApp imports this module: keep torch/transformers out of it
    from .device import DeviceRuntime

log = logging.getLogger("specfed_flwr")

DEFAULT_AUTHKEY = b"specfed-flwr-local"


class WorkerUnavailable(RuntimeError):
    """The node's draft worker cannot be reached."""


def parse_address(address: str) -> tuple[str, int] | str:
    """``host:port`` for TCP (loopback), anything else is a Unix socket path."""
    if ":" in address and not address.startswith("/"):
        host, port = address.rsplit(":", 1)
        return host, int(port)
    return address


def authkey(node_config: Mapping[str, Any]) -> bytes:
    key = node_config.get("worker-authkey") or os.environ.get("SPECFED_WORKER_AUTHKEY")
    return str(key).encode() if key else DEFAULT_AUTHKEY


def _handle(runtime: "DeviceRuntime", request: tuple) -> tuple[str, Any]:
    """One request of the ClientApp. ``handshake``/``draft`` carry the server's config record
    and the SuperNode's node_config: the worker merges them (``device.node_settings``), so the
    ClientApp process never imports the model code."""
    from .device import node_settings
    from .protocol import DraftRequest
    from .wire import reply_to_arrays

    op = request[0]
    if op == "ping":
        return "ok", {"pid": os.getpid(), "draft_loads": int(sum(runtime.load_counts.values()))}
    if op == "handshake":
        _, key, server_cfg, node_cfg = request
        return "ok", runtime.handshake(tuple(key), node_settings(server_cfg, node_cfg))
    if op == "draft":
        _, key, server_cfg, node_cfg, arrays, config = request
        reply, metrics = runtime.draft(tuple(key), node_settings(server_cfg, node_cfg),
                                       DraftRequest.from_parts(arrays, config))
        return "ok", (reply_to_arrays(reply), metrics)
    return "error", f"unknown worker operation {op!r}"


def serve_worker(address: str, *, key: bytes = DEFAULT_AUTHKEY, runtime: "DeviceRuntime | None" = None,
                 preload: tuple[str, str] | None = None, ready: threading.Event | None = None,
                 stop: threading.Event | None = None) -> None:
    """Serve ClientApp requests until ``stop`` is set or the process is terminated."""
    if runtime is None:
        from .device import RUNTIME as runtime
    if preload is not None:
        runtime.model(*preload)  # load before the first round, not during it
    with Listener(parse_address(address), authkey=key) as listener:
        log.info("draft worker listening on %s (pid %d)", address, os.getpid())
        if ready is not None:
            ready.set()
        while stop is None or not stop.is_set():
            try:
                conn = listener.accept()
            except (EOFError, ConnectionError, AuthenticationError) as exc:
                # a port probe, a client that went away mid-handshake or a wrong authkey:
                # refuse that connection, keep serving
                log.warning("draft worker: refused a connection (%s)", type(exc).__name__)
                continue
            except OSError:  # the listener was closed
                break
            with conn:
                try:
                    request = conn.recv()
                    conn.send(_handle(runtime, request))
                except EOFError:
                    continue
                except Exception as exc:  # report to the ClientApp; keep serving
                    log.warning("draft worker: %s: %s", type(exc).__name__, exc)
                    try:
                        conn.send(("error", f"{type(exc).__name__}: {exc}"))
                    except OSError:
                        pass


def call_worker(address: str, request: tuple, *, key: bytes = DEFAULT_AUTHKEY, timeout: float = 300.0) -> Any:
    try:
        conn = Client(parse_address(address), authkey=key)
    except AuthenticationError:
        raise WorkerUnavailable(
            f"the draft worker at {address} refused this ClientApp's authkey: give the worker and the "
            f"SuperNode the same key (worker --authkey / $SPECFED_WORKER_AUTHKEY, node_config worker-authkey)"
        ) from None
    except (OSError, EOFError) as exc:
        raise WorkerUnavailable(
            f"no draft worker at {address} ({exc}); start one on this device with "
            f"`specfed-flwr draft-worker --address {address}`"
        ) from None
    with conn:
        conn.send(request)
        if not conn.poll(timeout):
            raise WorkerUnavailable(f"draft worker at {address} did not answer within {timeout:g} s")
        status, payload = conn.recv()
    if status != "ok":
        raise RuntimeError(f"draft worker at {address}: {payload}")
    return payload


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A Flower ConfigRecord / node_config as a plain picklable dict."""
    return {str(k): (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(config).items()}


def run_worker_forever(address: str, key: bytes, preload: tuple[str, str] | None) -> int:
    """Serve until SIGTERM/SIGINT; the exception unwinds accept() and closes the listener."""

    def _terminate(signum, frame):  # noqa: ARG001
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        serve_worker(address, key=key, preload=preload)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        if isinstance(parse_address(address), str) and os.path.exists(address):
            os.unlink(address)
    return 0
