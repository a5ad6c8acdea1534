"""The device's side of one round, independent of how messages travel.

The Flower ClientApp (through ``device.DeviceRuntime``) and the in-process engine both call
``DraftClient.handle``: free released sequences, apply each sequence's accepted delta,
draft, and report what it cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .protocol import DraftRequest
from .proposer import DraftProposer
from .wire import DraftReply, payload_bytes


@dataclass
class DraftMetrics:
    draft_seconds: float
    positions: int
    uplink_bytes: int
    downlink_bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "draft_seconds": self.draft_seconds,
            "positions": self.positions,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
        }


class DraftClient:
    def __init__(self, proposer: DraftProposer, max_k: int | None = None, max_gamma: int | None = None):
        self.proposer = proposer
        self.max_k = max_k
        self.max_gamma = max_gamma

    def handle(self, request: DraftRequest) -> tuple[DraftReply, DraftMetrics]:
        request.validate(self.proposer.vocab_size)
        start = time.perf_counter()
        for seq_id in request.release.tolist():
            self.proposer.forget(int(seq_id))
        k = request.k if self.max_k is None else min(request.k, self.max_k)
        gammas = request.gammas.tolist()
        if self.max_gamma is not None:
            gammas = [min(g, self.max_gamma) for g in gammas]
        for b, seq_id in enumerate(request.seq_ids.tolist()):
            self.proposer.sync(int(seq_id), int(request.starts[b]), request.delta(b).tolist())
        reply = self.proposer.propose(
            request.seq_ids.tolist(),
            gammas,
            k,
            temperature=request.temperature,
            sampling=request.sampling,
            seed=request.seed,
            round_=request.round,
        )
        elapsed = time.perf_counter() - start
        metrics = DraftMetrics(
            draft_seconds=elapsed,
            positions=int(reply.lengths.sum()),
            uplink_bytes=payload_bytes(reply),
            downlink_bytes=request.nbytes(),
        )
        return reply, metrics
