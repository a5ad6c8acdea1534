"""The device's side of one round, independent of how messages travel.

The Flower ClientApp (through ``device.DeviceRuntime``) and the in-process engine both call
``DraftClient.handle``: free released sequences, apply each sequence's accepted delta, draft,
and report what it cost.

With ``draft_ahead`` the client keeps drafting after it replied, on a background thread, until
the next request arrives (``proposer.draft_ahead``: guess that every draft is accepted and that
the bonus token is its own next draft). ``handle`` stops that thread first (at the next forward
boundary), so the proposer is only ever used by one thread at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .protocol import DraftRequest
from .sampling import SamplingSettings
from .proposer import DraftProposer
from .wire import DraftReply, payload_bytes


@dataclass
class DraftMetrics:
    draft_seconds: float
    positions: int
    uplink_bytes: int
    downlink_bytes: int
    proactive_hits: int = 0  # rows whose drafts were already there (drafted ahead) when this request came
    proactive_misses: int = 0  # rows whose drafts made ahead were dropped (the delta differed)
    # seconds this device had no request to serve between its previous reply and this request
    # (drafting ahead counts as idle: it is optional work); ~0 when requests queue at the device,
    # i.e. it is the bottleneck and more cohorts in flight cannot keep it busier (``pipeline``)
    idle_seconds: float = 0.0
    # the device's drafting compute since its previous reply, drafting ahead included, and the
    # batched draft forwards it ran in that time (-1: the proposer does not count its forwards):
    # compute_seconds / forward_steps is what one draft step really costs this device, which
    # draft_seconds alone hides when the drafts were made ahead (the adaptive controller's ``a``)
    compute_seconds: float = 0.0
    forward_steps: int = -1
    # of those forwards, the ones that fed a prompt (or a long delta) and their seconds: prompt work,
    # which the controller takes out of the draft step cost (``proposer.PREFILL_TOKENS``)
    prefill_seconds: float = 0.0
    prefill_forwards: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "compute_seconds": self.compute_seconds,
            "forward_steps": self.forward_steps,
            "prefill_seconds": self.prefill_seconds,
            "prefill_forwards": self.prefill_forwards,
            "draft_seconds": self.draft_seconds,
            "positions": self.positions,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "proactive_hits": self.proactive_hits,
            "proactive_misses": self.proactive_misses,
            "idle_seconds": self.idle_seconds,
        }


def _uplink_kwargs(request: DraftRequest) -> dict:
    """The reply's encoding and budget, passed only when they differ from the fixed-K default (a
    proposer written before the variable-K encodings keeps working in fixed-K runs)."""
    if request.encoding == "fixed-k" and not request.budget:
        return {}
    return {"encoding": request.encoding, "budget": request.budget}
def row_warps(request: DraftRequest) -> list[SamplingSettings]:
    """Each row's sampler: its own temperature / top-p / top-k-sampling with the request's min-p
    and repetition penalty -- the law the server verifies that row against, so drafts land in it."""
    return [SamplingSettings(temperature=float(t), top_k=int(k), top_p=float(p), min_p=request.min_p,
                             repetition_penalty=request.repetition_penalty)
            for t, p, k in zip(request.temperatures.tolist(), request.top_ps.tolist(), request.top_ks.tolist())]


class DraftClient:
    def __init__(self, proposer: DraftProposer, max_k: int | None = None, max_gamma: int | None = None, *,
                 draft_ahead: bool = False):
        self.proposer = proposer
        self.max_k = max_k
        self.max_gamma = max_gamma
        self.draft_ahead = bool(draft_ahead)
        self._ahead: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_reply: float | None = None  # perf_counter() when the previous reply was ready
        self._ahead_seconds = 0.0  # drafting ahead since the previous reply (``DraftMetrics.compute_seconds``)
        self._mark = self._work_counters()  # the proposer's counters at the previous reply

    def handle(self, request: DraftRequest) -> tuple[DraftReply, DraftMetrics]:
        arrived = time.perf_counter()
        idle = 0.0 if self._last_reply is None else max(0.0, arrived - self._last_reply)
        request.validate(self.proposer.vocab_size)
        self.stop_ahead()
        with self._lock:
            start = time.perf_counter()
            before = self.proposer.stats
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
                warp=SamplingSettings(top_k=request.top_k_sampling, top_p=request.top_p, min_p=request.min_p,
                                      repetition_penalty=request.repetition_penalty),
                **_uplink_kwargs(request),
                keys=request.keys.tolist(),
                row_warps=row_warps(request),
            )
            elapsed = time.perf_counter() - start
            after = self.proposer.stats
            now = self._work_counters()
        # forwards since the previous reply: those drafting ahead and those for this reply
        calls, prefills, prefill_s = now
        steps = -1 if calls is None or self._mark[0] is None else calls - self._mark[0]
        compute, self._ahead_seconds = elapsed + self._ahead_seconds, 0.0
        metrics = DraftMetrics(
            draft_seconds=elapsed,
            positions=int(reply.lengths.sum()),
            uplink_bytes=payload_bytes(reply),
            downlink_bytes=request.nbytes(),
            proactive_hits=after["proactive_hits"] - before["proactive_hits"],
            proactive_misses=after["proactive_misses"] - before["proactive_misses"],
            idle_seconds=idle,
            compute_seconds=compute,
            forward_steps=steps,
            prefill_forwards=prefills - self._mark[1],
            prefill_seconds=prefill_s - self._mark[2],
        )
        self._mark = now
        if self.draft_ahead:
            rows = [int(s) for s, g in zip(request.seq_ids.tolist(), gammas) if g > 0]
            if rows:
                self._start_ahead(rows, max(gammas) + 1)
        self._last_reply = time.perf_counter()
        return reply, metrics

    def _start_ahead(self, seq_ids: list[int], extra: int) -> None:
        def run() -> None:
            with self._lock:
                started = time.perf_counter()
                try:
                    self.proposer.draft_ahead(seq_ids, extra, self._stop)
                except Exception:  # noqa: BLE001 - a guess that fails costs nothing but the guess
                    pass
                self._ahead_seconds += time.perf_counter() - started

        self._stop.clear()
        self._ahead = threading.Thread(target=run, name="specfed-draft-ahead", daemon=True)
        self._ahead.start()

    def _work_counters(self) -> tuple[int | None, int, float]:
        """The proposer's forward count (None if it does not count them), and its prefill forwards
        and seconds ((0, 0.0) if it does not count them), so far."""
        calls = getattr(self.proposer, "forward_calls", None)
        forwards, seconds = getattr(self.proposer, "prefill_forwards", 0), getattr(self.proposer, "prefill_seconds", 0.0)
        if not (isinstance(forwards, int) and isinstance(seconds, float)):
            forwards, seconds = 0, 0.0
        return (int(calls) if isinstance(calls, int) else None), forwards, seconds

    def stop_ahead(self) -> None:
        """Stop drafting ahead (at the next forward boundary) and wait for it."""
        thread = self._ahead
        if thread is not None:
            self._stop.set()
            thread.join()
            self._ahead = None
