"""What a device process keeps warm between rounds: draft models and per-node draft clients.

In the simulation engine several virtual SuperNodes can share one process (a Ray actor),
so draft models are cached per (spec, quantization) and sequence state per (run, node).
The ClientApp goes through ``DeviceRuntime``; on the deployment engine the process that keeps
it is ``specfed-flwr device-runtime`` (``persistent_runtime.py``), one per SuperNode.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from typing import Any, Mapping

import numpy as np

from .client_core import DraftClient
from .config import SpecFedConfig
from .protocol import DraftRequest
from .records import DEVICE_RUNTIME_ENV
from .proposer import DraftStateError, HFDraftProposer
from .wire import make_reply, payload_bytes
from .specs import LoadedModel, load_draft_spec

log = logging.getLogger("specfed_flwr")

#: settings a SuperNode's node_config may set for its own device (kebab-case, like run config)
NODE_KEYS = ("draft", "draft-quantization", "draft-ahead", "max-k", "max-gamma", "uplink-mbps", "downlink-mbps", "rtt-ms", "prompts")


def node_settings(server_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The server's defaults for drafting, overridden by this node's own node_config."""
    merged = {k: server_config[k] for k in NODE_KEYS if k in server_config}
    merged.update({k: node_config[k] for k in NODE_KEYS if k in node_config})
    return merged


def tokenizer_identity(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    if tokenizer is None:
        return {"vocab_size": vocab_size, "vocab_sha256": ""}
    from .models import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tokenizer)
    return {"vocab_size": int(vocab_size), "vocab_sha256": str(fp["vocab_sha256"])}


def machine_id() -> str:
    """This machine's identity (systemd's machine-id, else the hostname): devices on the server's
    own machine share its CPUs."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                value = f.read().strip()
            if value:
                return value
        except OSError:
            continue
    import socket

    return socket.gethostname()


def _flag(value: Any) -> bool:
    """A boolean node/run setting (Flower configs carry bools, strings or 0/1)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


class DeviceRuntime:
    def __init__(self) -> None:
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._clients: dict[tuple[Any, ...], DraftClient] = {}
        self._lock = threading.Lock()
        self.load_counts: Counter[str] = Counter()

    def model(self, spec: str, quantization: str) -> LoadedModel:
        key = (spec, quantization)
        with self._lock:
            if key not in self._models:
                log.info("loading draft model %s (%s)", spec, quantization)
                self._models[key] = load_draft_spec(spec, quantization)
                self.load_counts[f"{spec}:{quantization}"] += 1
            return self._models[key]

    def client(self, key: tuple[Any, ...], settings: Mapping[str, Any]) -> DraftClient:
        with self._lock:
            existing = self._clients.get(key)
        if existing is not None:
            return existing
        loaded = self.model(str(settings.get("draft", "default")), str(settings.get("draft-quantization", SpecFedConfig.draft_quantization)))
        client = DraftClient(
            HFDraftProposer(loaded.model, vocab_size=loaded.vocab_size),
            max_k=int(settings["max-k"]) if "max-k" in settings else None,
            max_gamma=int(settings["max-gamma"]) if "max-gamma" in settings else None,
            draft_ahead=_flag(settings.get("draft-ahead", False)),
        )
        with self._lock:
            return self._clients.setdefault(key, client)

    def reset(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            client = self._clients.pop(key, None)
        if client is not None:
            client.stop_ahead()

    def handshake(self, key: tuple[Any, ...], settings: Mapping[str, Any]) -> dict[str, Any]:
        self.reset(key)  # a new run starts from clean sequence state
        self.client(key, settings)
        loaded = self.model(str(settings.get("draft", "default")), str(settings.get("draft-quantization", SpecFedConfig.draft_quantization)))
        info = tokenizer_identity(loaded.tokenizer, loaded.vocab_size)
        info.update(
            {
                "draft_identity": loaded.identity,
                "draft_load_seconds": float(loaded.load_seconds),
                "draft_loads": int(sum(self.load_counts.values())),
                "pid": os.getpid(),
                # which machine drafts: the server runs target steps while it waits only for
                # devices on other machines (``target-steps-while-waiting``)
                "host": machine_id(),
                # "persistent" in ``specfed-flwr device-runtime``: this process answers every message
                # of the run, so the server may queue standby messages for it
                "runtime": os.environ.get(DEVICE_RUNTIME_ENV, ""),
            }
        )
        for k in ("max-k", "uplink-mbps", "downlink-mbps", "rtt-ms"):
            if k in settings:
                info[k] = settings[k]
        prompts = settings.get("prompts")
        if prompts:
            from .prompts import load_prompts

            info["prompts"] = load_prompts(str(prompts))
        return info

    def stop_drafting_ahead(self) -> None:
        """Every client of this process stops drafting ahead: they share its CPUs, and a request
        that has arrived comes first."""
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.stop_ahead()

    def draft(self, key: tuple[Any, ...], settings: Mapping[str, Any], request: DraftRequest):
        self.stop_drafting_ahead()
        try:
            reply, metrics = self.client(key, settings).handle(request)
        except DraftStateError as exc:
            # This process does not hold the sequence state the server's delta builds on (in the
            # simulation engine a virtual node can be served by another Ray actor process than
            # last round). Drop whatever partial state this key has, draft nothing, and ask the
            # server to resend whole sequences (``state_lost``): a round without drafts, not a fault.
            log.info("draft state lost for %s (%s): asking for whole sequences", key, exc)
            self.reset(key)
            b = int(request.seq_ids.shape[0])
            loaded = self.model(str(settings.get("draft", "default")), str(settings.get("draft-quantization", SpecFedConfig.draft_quantization)))
            reply = make_reply(request.seq_ids, np.zeros(b, dtype=np.int64), np.zeros((b, 1, 1), dtype=np.int64),
                               np.zeros((b, 1, 1), dtype=np.float32), loaded.vocab_size)
            out = {"draft_seconds": 0.0, "positions": 0, "uplink_bytes": payload_bytes(reply),
                   "downlink_bytes": request.nbytes(), "state_lost": 1}
            out["draft_loads"] = int(sum(self.load_counts.values()))
            out["pid"] = os.getpid()
            return reply, out
        out = metrics.as_dict()
        out["draft_loads"] = int(sum(self.load_counts.values()))
        out["pid"] = os.getpid()
        return reply, out


#: one per process: the simulation's Ray actor or a deployment device runtime
RUNTIME = DeviceRuntime()
