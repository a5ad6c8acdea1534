"""Modeled latency per link profile and the theory beside the measurement.

``latency_model``: the measured round split of the base run (draft, verify, server) plus each
transmission scheme's bytes over a device's link -> seconds per token, for top-K vs full
distributions vs target-only. ``gamma_theory``: T(gamma) = a*gamma + b fitted to the gamma
sweep's measured rounds, the Lambert-W gamma* (``theory.optimal_gamma``) against the measured
best gamma, compute only and at the target link profile.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .presets import BASE, LINK_RTTS_MS, LINK_UPLINKS_MBPS, TARGET_PROFILE

HEADER_BYTES = 12  # a reply's per-sequence header: seq id (int64) + length (int32)
DOWNLINK_MBPS = 50.0


def modeled_latency(*, gamma: int, tau: float, draft_s_per_position: float, verify_s: float, server_other_s: float,
                    overhead_s: float, uplink_bytes_per_round: float, downlink_bytes_per_round: float,
                    uplink_mbps: float, downlink_mbps: float, rtt_ms: float) -> dict[str, float]:
    """Seconds per round and per generated token of one sequence over one device's link."""
    draft = draft_s_per_position * gamma
    up = uplink_bytes_per_round * 8 / (uplink_mbps * 1e6)
    down = downlink_bytes_per_round * 8 / (downlink_mbps * 1e6)
    rtt = rtt_ms / 1000
    round_s = draft + up + down + rtt + verify_s + server_other_s + overhead_s
    return {"round_s": round_s, "s_per_token": round_s / tau, "draft_s": draft, "uplink_s": up, "downlink_s": down,
            "rtt_s": rtt, "server_s": verify_s + server_other_s + overhead_s}


def tau_ss(r: dict[str, Any]) -> float:
    """Steady-state tau (full-gamma rounds), else the run's tau."""
    return r.get("tau_full_rounds") or r["tau"]


def _get(r: dict[str, Any], key: str, fallback: str) -> float:
    return r.get(key) if r.get(key) is not None else r[fallback]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares y = a*x + b."""
    a, b = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(a), float(b)


def schemes(base: dict[str, Any], full: dict[str, Any] | None, vocab: int) -> dict[str, tuple[float, float]]:
    """Transmission scheme -> (uplink bytes per round of one sequence, steady-state tau)."""
    from ..wire import bytes_per_position, full_distribution_bytes

    gamma = BASE["gamma"]
    return {
        "top-K (K=8)": (bytes_per_position(BASE["k"], vocab) * gamma + HEADER_BYTES, tau_ss(base)),
        "full fp32": ((full_distribution_bytes(vocab, "float32") + 4) * gamma + HEADER_BYTES, tau_ss(full or base)),
        "full fp16": ((full_distribution_bytes(vocab, "float16") + 4) * gamma + HEADER_BYTES, tau_ss(full or base)),
    }


def latency_model(base: dict[str, Any], full: dict[str, Any] | None, vocab: int, target_only_tps: float,
                  max_new_tokens: int) -> dict[str, Any]:
    """``{"rows": one per (uplink, RTT) profile, "inputs": the measured numbers they use}``.

    Per-round compute of ONE device (the model gives every device its own link and CPU)."""
    gamma = BASE["gamma"]
    per_pos = base["draft_s_per_position"]
    verify, other = base["verify_s_per_round"], base["server_other_s_per_round"]
    down = base["downlink_bytes_per_round_per_client"]
    by_scheme = schemes(base, full, vocab)
    t_target = 1.0 / target_only_tps
    rows = []
    for up in LINK_UPLINKS_MBPS:
        for rtt in LINK_RTTS_MS:
            row: dict[str, Any] = {"uplink_mbps": up, "rtt_ms": rtt, "downlink_mbps": DOWNLINK_MBPS}
            for name, (up_bytes, tau) in by_scheme.items():
                row[name] = modeled_latency(gamma=gamma, tau=tau, draft_s_per_position=per_pos, verify_s=verify,
                                            server_other_s=other, overhead_s=0.0, uplink_bytes_per_round=up_bytes,
                                            downlink_bytes_per_round=down, uplink_mbps=up, downlink_mbps=DOWNLINK_MBPS,
                                            rtt_ms=rtt)
            row["target-only"] = {"s_per_token": t_target + rtt / 1000 / max_new_tokens}
            row["speedup_topk_vs_full_fp32"] = row["full fp32"]["s_per_token"] / row["top-K (K=8)"]["s_per_token"]
            row["speedup_topk_vs_full_fp16"] = row["full fp16"]["s_per_token"] / row["top-K (K=8)"]["s_per_token"]
            row["speedup_topk_vs_target_only"] = row["target-only"]["s_per_token"] / row["top-K (K=8)"]["s_per_token"]
            rows.append(row)
    return {"rows": rows, "inputs": {
        "gamma": gamma, "draft_s_per_position": per_pos, "verify_s_per_round": verify,
        "server_other_s_per_round": other, "downlink_bytes_per_round": down,
        "target_only_s_per_token": t_target, "tau_topk": tau_ss(base), "tau_full": tau_ss(full or base),
        "uplink_bytes_per_round": {k: b for k, (b, _) in by_scheme.items()}}}


def gamma_theory(g_rows: list[dict[str, Any]], base: dict[str, Any], vocab: int) -> dict[str, Any]:
    """T(gamma) = a*gamma + b fitted to the measured rounds of the gamma sweep (``g_rows``, one per
    gamma), gamma* against the measured best, compute only and at the target link profile."""
    from .. import theory

    gammas = [r["gamma"] for r in g_rows]
    per_pos, verify = base["draft_s_per_position"], base["verify_s_per_round"]
    round_s = [_get(r, "round_s_full_mean", "round_s_mean") for r in g_rows]
    a_c, b_c = fit_line(gammas, round_s) if len(gammas) >= 2 else (per_pos, verify)
    a_c = max(a_c, 1e-6)
    alpha = base["alpha"]
    th: dict[str, Any] = {
        "alpha": alpha, "a_compute": a_c, "b_compute": b_c,
        "fit": {"gamma": gammas, "round_s": round_s},
        "gamma_star_compute": theory.optimal_gamma(alpha, a_c, b_c) if b_c > 0 else None,
        "gamma_best_int_compute": theory.best_integer_gamma(alpha, a_c, b_c, gamma_max=max(gammas)) if b_c > 0 else None,
        "measured_best_gamma_compute": max(g_rows, key=lambda r: r["tokens_per_s"])["gamma"],
        "measured_tau": {r["gamma"]: tau_ss(r) for r in g_rows},
        "measured_tau_all_rounds": {r["gamma"]: r["tau"] for r in g_rows},
        "measured_tokens_per_s": {r["gamma"]: r["tokens_per_s"] for r in g_rows},
        "theory_tau": {g: float(theory.expected_tokens_per_step(alpha, g)) for g in gammas},
    }
    th.update(_link_theory(g_rows, base, vocab, alpha))
    # alpha that best explains the measured tau(gamma) under the i.i.d. model (for reference)
    grid = np.linspace(0.01, 0.999, 999)
    err = [sum((float(theory.expected_tokens_per_step(a, g)) - t) ** 2 for g, t in th["measured_tau"].items())
           for a in grid]
    th["alpha_fit_from_tau"] = float(grid[int(np.argmin(err))])
    return th


def _link_theory(g_rows: list[dict[str, Any]], base: dict[str, Any], vocab: int, alpha: float) -> dict[str, Any]:
    """The fit at the target link profile, every client on its own device (drafting in parallel: the
    measured round with the slowest client's draft instead of the sum), plus the link:
    a += bytes per position / uplink; b += RTT + header and downlink bytes."""
    from .. import theory
    from ..wire import bytes_per_position

    up, rtt = TARGET_PROFILE
    gammas = [r["gamma"] for r in g_rows]
    bpp = bytes_per_position(BASE["k"], vocab)
    down = base["downlink_bytes_per_round_per_client"]
    par = [_get(r, "parallel_round_s_full_mean", "parallel_round_s_mean") for r in g_rows]
    a_p, b_p = fit_line(gammas, par) if len(gammas) >= 2 else (base["draft_s_per_position"], base["verify_s_per_round"])
    a_p = max(a_p, 1e-6)
    link_fixed = rtt / 1000 + (HEADER_BYTES * 8) / (up * 1e6) + down * 8 / (DOWNLINK_MBPS * 1e6)
    a_l = a_p + bpp * 8 / (up * 1e6)
    b_l = b_p + link_fixed
    modeled = {r["gamma"]: (pr_s + r["gamma"] * bpp * 8 / (up * 1e6) + link_fixed) / tau_ss(r)
               for r, pr_s in zip(g_rows, par)}
    return {
        "profile": {"uplink_mbps": up, "rtt_ms": rtt},
        "a_parallel": a_p, "b_parallel": b_p, "parallel_round_s": par,
        "a_link": a_l, "b_link": b_l,
        "gamma_star_link": theory.optimal_gamma(alpha, a_l, b_l),
        "gamma_best_int_link": theory.best_integer_gamma(alpha, a_l, b_l, gamma_max=max(gammas)),
        "modeled_s_per_token_link": modeled,
        "measured_best_gamma_link": min(modeled, key=modeled.get),
    }
