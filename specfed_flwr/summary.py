"""The run's summary: the numbers of the summary table, folded from the round reports and client stats."""

from __future__ import annotations

import statistics
from typing import Any

from .round_report import ClientStats, RoundReport, SequenceResult
from .wire import DraftReply, distribution_bytes, full_distribution_bytes


def topk_bytes(reply: DraftReply) -> int:
    """The distribution part of a reply: the ids + probabilities actually sent per drafted
    position (fixed K or each position's own count; no header, no padding)."""
    return distribution_bytes(reply)


def summarize(
    finished: list[SequenceResult],
    rounds: list[RoundReport],
    client_stats: dict[str, ClientStats],
    vocab_size: int,
    wall_seconds: float,
    weights: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregate metrics of a run (the summary table's numbers)."""
    tokens = sum(len(r.token_ids) for r in finished)
    drafted = sum(r.drafted for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    seq_steps = sum(r.active_sequences for r in rounds)
    alphas = [(r.alpha, r.drafted) for r in rounds if r.alpha is not None and r.drafted]
    uplink = sum(r.uplink_bytes for r in rounds)
    downlink = sum(r.downlink_bytes for r in rounds)
    positions = sum(s.positions for s in client_stats.values())
    uplink_payload = sum(s.uplink_bytes for s in client_stats.values())
    per_position = uplink_payload / positions if positions else None
    topk = sum(s.topk_bytes for s in client_stats.values())
    topk_per_position = topk / positions if positions and topk else None
    return {
        "sequences": len(finished),
        "tokens": tokens,
        "rounds": len(rounds),
        # the most cohorts in flight when a round was verified (``pipeline-depth``; auto varies it)
        "pipeline_depth_max": max((r.pipeline_depth for r in rounds), default=None),
        "wall_seconds": wall_seconds,
        "tokens_per_s": tokens / wall_seconds if wall_seconds > 0 else None,
        "seconds_per_round": wall_seconds / len(rounds) if rounds else None,
        "alpha": sum(a * n for a, n in alphas) / sum(n for _, n in alphas) if alphas else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "tau": (accepted + seq_steps) / seq_steps if seq_steps else None,
        "drafted_positions": drafted,
        "accepted": accepted,
        "uplink_bytes": uplink,
        "downlink_bytes": downlink,
        "uplink_bytes_per_token": uplink / tokens if tokens else None,
        # all-in: every uplink byte (headers and padding included) over the positions drafted
        "uplink_bytes_per_position": per_position,
        "bytes_per_position_all_in": per_position,
        # the top-K distribution alone, what replaces one dense distribution per position
        "topk_bytes_per_position": topk_per_position,
        "compression_vs_fp32": full_distribution_bytes(vocab_size, "float32") / topk_per_position if topk_per_position else None,
        "compression_vs_fp16": full_distribution_bytes(vocab_size, "float16") / topk_per_position if topk_per_position else None,
        "compression_vs_fp32_all_in": full_distribution_bytes(vocab_size, "float32") / per_position if per_position else None,
        "verify_seconds": sum(r.verify_seconds for r in rounds),
        "clients": {c: s.as_dict() for c, s in client_stats.items()},
        "proactive_hits": sum(s.proactive_hits for s in client_stats.values()),
        "proactive_misses": sum(s.proactive_misses for s in client_stats.values()),
        # per client: fault kind -> count, plus what the server did about it (events)
        "faults": {
            c: {**s.fault_kinds, **s.event_kinds}
            for c, s in client_stats.items() if s.fault_kinds or s.event_kinds
        },
        "weights": weights or {},
        "settings": settings_per_client(rounds),
    }


def settings_per_client(rounds: list[RoundReport]) -> dict[str, dict[str, Any]]:
    """Per client, the (gamma, K) it was asked for over the run: median, range and the last round's.
    With ``adaptive`` these are the controller's choices; with fixed settings every round's are equal."""
    gammas: dict[str, list[int]] = {}
    ks: dict[str, list[int]] = {}
    for report in rounds:
        for client, (gamma, k) in report.settings.items():
            gammas.setdefault(client, []).append(int(gamma))
            ks.setdefault(client, []).append(int(k))
    return {
        client: {"rounds": len(g), "gamma_median": statistics.median(g), "gamma_min": min(g), "gamma_max": max(g),
                 "gamma_last": g[-1], "k_median": statistics.median(ks[client]), "k_last": ks[client][-1]}
        for client, g in gammas.items()
    }


def median_gamma_asked(settings: dict[str, dict[str, Any]] | None) -> float | None:
    """One gamma for a run: the median over clients of each one's median gamma (``settings_per_client``)."""
    values = [s["gamma_median"] for s in (settings or {}).values()]
    return float(statistics.median(values)) if values else None
