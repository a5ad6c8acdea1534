"""Per-round numbers of a run, read from its ``RoundReport``s: round times, acceptance per draft
position and the steady-state tau.

Nothing is patched: the engines hand every report to an ``on_round`` callback
(``InProcessEngine.generate``, ``serve.make_server_app``), and ``RoundLog`` keeps each with the
moment it arrived. In strict rounds (``pipeline_depth`` 1) a round's wall time is the time since
the previous report (or since ``start``): planning, the message exchange, decoding the replies,
verification and bookkeeping. With cohorts in flight rounds overlap, so it is the round's own
message exchange (push to the last reply, ``exchange_seconds``) plus the server's
``complete_round`` (``server_seconds``). The clients' drafting time comes from the run summary's per-client totals
(``summary["clients"][c]["draft_seconds"]``), spread evenly over the rounds: a report carries no
per-client time, so a round's drafting is the run's mean (its mean over rounds is exact; the
slowest client's share, for clients drafting in parallel, is the largest client total per round).

A report gives counts (drafted, accepted) per round, not per row; acceptance is a prefix of each
row, so in a round with ONE active sequence the counts fix which positions were accepted. The
per-position acceptance is taken over those rounds (every round of a concurrency-1 run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..round_report import RoundReport


@dataclass
class RoundLog:
    """The ``on_round`` callback: every report, and when it arrived (``time.perf_counter``)."""

    reports: list["RoundReport"] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    started: float | None = None  # when decoding began, if the caller knows (``start``)

    def start(self) -> "RoundLog":
        self.started = time.perf_counter()
        return self

    def __call__(self, report: "RoundReport") -> None:
        self.reports.append(report)
        self.arrived.append(time.perf_counter())

    def walls(self) -> np.ndarray:
        """[R] seconds per round (see the module docstring)."""
        out = []
        for i, r in enumerate(self.reports):
            before = self.arrived[i - 1] if i else self.started
            if r.pipeline_depth == 1 and before is not None:
                out.append(self.arrived[i] - before)
            else:
                out.append(float(r.exchange_seconds or 0.0) + float(r.server_seconds))
        return np.array(out)

    def decode_wall(self) -> float | None:
        """From ``start`` (else the first round's arrival minus its wall time) to the last report."""
        if not self.reports:
            return None
        first = self.started if self.started is not None else self.arrived[0] - self.walls()[0]
        return float(self.arrived[-1] - first)

    # ---- acceptance ----------------------------------------------------------------------------
    def per_position(self, g_max: int) -> tuple[list[float | None], list[float | None]]:
        """(conditional acceptance P(accept j | j tested), reach P(accept j | j drafted)) per position,
        over the rounds with one active sequence (see the module docstring)."""
        tested, accepted, drafted = np.zeros(g_max), np.zeros(g_max), np.zeros(g_max)
        for r in self.reports:
            if r.active_sequences != 1 or not r.drafted:
                continue
            length, n = min(int(r.drafted), g_max), int(r.accepted)
            drafted[:length] += 1
            accepted[:min(n, length)] += 1
            tested[:min(n + 1, length)] += 1  # positions up to the first rejection were tested
        cond = [float(a / t) if t else None for a, t in zip(accepted, tested)]
        reach = [float(a / d) if d else None for a, d in zip(accepted, drafted)]
        return cond, reach

    def steady_tau(self, gamma: int) -> float | None:
        """Mean tokens per sequence-round over the rounds where every active sequence drafted the full
        gamma (an answer's last rounds draft less: its token budget cuts them), i.e. the tau the
        i.i.d. theory describes."""
        full = [r for r in self.reports if gamma > 0 and r.active_sequences and r.drafted == gamma * r.active_sequences]
        rows = sum(r.active_sequences for r in full)
        return sum(r.accepted + r.active_sequences for r in full) / rows if rows else None

    # ---- timing --------------------------------------------------------------------------------
    def timing(self, clients: dict[str, dict[str, Any]], *, parallel_clients: bool,
               gamma: int | None = None) -> dict[str, Any]:
        """Round-time split of the run; ``clients``: the summary's per-client totals."""
        if not self.reports:
            return {}
        wall = self.walls()
        verify = np.array([r.verify_seconds for r in self.reports])
        server = np.array([r.server_seconds for r in self.reports])
        # each client's drafting spread over all the rounds (0 in the rounds it was not asked): the
        # mean of the per-round sum over clients is exact, the per-round max a lower bound of it
        per_round = [float(s.get("draft_seconds") or 0.0) / len(wall) for s in clients.values()]
        draft_sum = sum(per_round)
        draft_max = max(per_round, default=0.0)
        draft = np.full(len(wall), draft_max if parallel_clients else draft_sum)
        overhead = np.maximum(wall - verify - draft, 0.0)  # the definition
        positions = sum(int(s.get("positions") or 0) for s in clients.values())
        draft_total = sum(float(s.get("draft_seconds") or 0.0) for s in clients.values())
        replied = np.array([max(1, r.clients_replied) for r in self.reports])
        return {
            "rounds": len(wall),
            "decode_wall_s": self.decode_wall(),
            "round_s_median": float(np.median(wall)),
            "round_s_mean": float(wall.mean()),
            "verify_s_per_round": float(verify.mean()),
            "server_other_s_per_round": float((server - verify).mean()),
            "draft_s_per_round": float(draft.mean()),
            "draft_max_s_per_round": draft_max,
            # the round if every client drafted on its own device, in parallel (max instead of sum)
            "parallel_round_s_mean": float((wall - draft + draft_max).mean()),
            # the same over the rounds where every active sequence drafted the full gamma
            **self._full_rounds(wall, draft, draft_max, gamma),
            "draft_s_per_position": draft_total / positions if positions else None,
            "engine_overhead_s_per_round": float(np.median(overhead)),
            "engine_overhead_s_per_round_mean": float(overhead.mean()),
            "engine_overhead_share": float(overhead.sum() / wall.sum()) if wall.sum() > 0 else None,
            "transport_overhead_s_per_round": float(np.median(np.maximum(wall - server - draft, 0.0))),
            "uplink_bytes_per_round_per_client": float(np.mean([r.uplink_bytes for r in self.reports] / replied)),
            "downlink_bytes_per_round_per_client": float(np.mean([r.downlink_bytes for r in self.reports] / replied)),
            "clients_replied_per_round": float(np.mean([r.clients_replied for r in self.reports])),
        }

    def _full_rounds(self, wall: np.ndarray, draft: np.ndarray, draft_max: float, gamma: int | None) -> dict[str, Any]:
        if not gamma:
            return {}
        full = np.array([r.active_sequences > 0 and r.drafted == gamma * r.active_sequences for r in self.reports])
        if not full.any():
            return {"full_rounds": 0}
        return {"full_rounds": int(full.sum()), "round_s_full_mean": float(wall[full].mean()),
                "parallel_round_s_full_mean": float((wall - draft + draft_max)[full].mean())}
