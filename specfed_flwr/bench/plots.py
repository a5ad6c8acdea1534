"""The PNG plots of a run (matplotlib, Agg): payload and alpha vs K, tau and speedup vs gamma with
the theory, modeled latency vs uplink bandwidth, acceptance per draft position."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .latency import modeled_latency
from .presets import LINK_RTTS_MS

if TYPE_CHECKING:
    from .suite import Bench


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _k_num(label: str, vocab: int) -> int:
    return vocab if label == "V" else int(label)


def make_plots(bench: "Bench") -> dict[str, Path]:
    plt = _plt()
    out = Path(bench.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fn in (("payload_alpha_vs_k", _plot_k), ("gamma", _plot_gamma),
                     ("latency_vs_bandwidth", _plot_latency), ("acceptance_per_position", _plot_positions)):
        fig = fn(bench, plt)
        if fig is None:
            continue
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[name] = path
    return paths


def _plot_k(bench: "Bench", plt):
    v = bench.pair.vocab_size
    per_k = bench.fixed["per_k"]
    labels = list(per_k)
    ks = [_k_num(lab, v) for lab in labels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.loglog(ks, [per_k[lab]["bytes_per_position"] for lab in labels], "o-", label="top-K (ids + fp16 probs)")
    ax1.axhline(4 * v, color="C3", ls="--", label=f"full fp32 ({4 * v} B)")
    ax1.axhline(2 * v, color="C1", ls=":", label=f"full fp16 ({2 * v} B)")
    ax1.set_xlabel("K (V = whole vocabulary)")
    ax1.set_ylabel("uplink bytes per draft position")
    ax1.set_title("payload vs K")
    ax1.set_xticks(ks)
    ax1.set_xticklabels(labels)
    ax1.legend(fontsize=8)
    for rule in bench.preset.reconstructions:
        ax2.semilogx(ks, [per_k[lab]["alpha"][rule] for lab in labels], "o-", label=f"fixed prefixes, {rule}")
    ax2.axhline(next(iter(per_k.values()))["alpha_full_q"], color="k", ls="--", lw=1, label="full q (no truncation)")
    runs = {r["k_label"]: r for r in bench.sweep_rows("k")}
    rk = [lab for lab in labels if lab in runs and runs[lab]["alpha"] is not None]
    ax2.semilogx([_k_num(lab, v) for lab in rk], [runs[lab]["alpha"] for lab in rk], "s", color="k", mfc="none",
                 label="engine runs (exact, sampled)")
    ax2.set_xticks(ks)
    ax2.set_xticklabels(labels)
    ax2.set_xlabel("K")
    ax2.set_ylabel("alpha = sum min(p, q_hat)")
    ax2.set_title("acceptance rate vs K")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_gamma(bench: "Bench", plt):
    from .. import theory

    th = bench.theory
    rows = sorted({r["gamma"]: r for r in bench.sweep_rows("gamma")}.values(), key=lambda r: r["gamma"])
    if len(rows) < 2:
        return None
    g = np.array([r["gamma"] for r in rows])
    grid = np.linspace(0, max(g.max(), 10), 200)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(g, [r.get("tau_full_rounds") or r["tau"] for r in rows], "o", label="measured tau (full-gamma rounds)")
    ax1.plot(g, [r["tau"] for r in rows], "x", color="grey", label="measured tau (all rounds, incl. budget-cut last rounds)")
    ax1.plot(grid, theory.expected_tokens_per_step(th["alpha"], grid), "-",
             label=f"theory (1-a^(g+1))/(1-a), alpha={th['alpha']:.3f}")
    ax1.plot(grid, theory.expected_tokens_per_step(th["alpha_fit_from_tau"], grid), ":",
             label=f"theory with alpha fitted to tau ({th['alpha_fit_from_tau']:.3f})")
    ax1.set_xlabel("gamma (draft length)")
    ax1.set_ylabel("tokens per step (incl. bonus)")
    ax1.set_title("tokens per verification step")
    ax1.legend(fontsize=7)
    t_target = 1.0 / bench.target_only_tps
    ax2.plot(g, [r["tokens_per_s"] * t_target for r in rows], "o", label="measured (in-process, 2 clients)")
    model = theory.expected_tokens_per_step(th["alpha"], grid) / (th["a_compute"] * grid + th["b_compute"]) * t_target
    ax2.plot(grid, model, "-", label=f"theory, T = {1000 * th['a_compute']:.0f} ms*g + {1000 * th['b_compute']:.0f} ms")
    if th.get("gamma_star_compute") is not None:
        ax2.axvline(th["gamma_star_compute"], color="C1", ls="--", label=f"gamma* = {th['gamma_star_compute']:.2f}")
    ax2.axvline(th["measured_best_gamma_compute"], color="C2", ls=":",
                label=f"measured best = {th['measured_best_gamma_compute']}")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xlabel("gamma (draft length)")
    ax2.set_ylabel("speedup vs target-only (sampling T=1 vs greedy target)")
    ax2.set_title("speedup vs gamma")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_latency(bench: "Bench", plt):
    inp = bench.latency["inputs"]
    ups = np.logspace(np.log10(0.5), np.log10(200), 80)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {LINK_RTTS_MS[0]: "-", LINK_RTTS_MS[-1]: "--"}
    for rtt in LINK_RTTS_MS:
        for name, color, tau in (("top-K (K=8)", "C0", inp["tau_topk"]), ("full fp32", "C3", inp["tau_full"]),
                                 ("full fp16", "C1", inp["tau_full"])):
            ms = [1000 * modeled_latency(gamma=inp["gamma"], tau=tau, draft_s_per_position=inp["draft_s_per_position"],
                                         verify_s=inp["verify_s_per_round"], server_other_s=inp["server_other_s_per_round"],
                                         overhead_s=0.0, uplink_bytes_per_round=inp["uplink_bytes_per_round"][name],
                                         downlink_bytes_per_round=inp["downlink_bytes_per_round"], uplink_mbps=u,
                                         downlink_mbps=50.0, rtt_ms=rtt)["s_per_token"] for u in ups]
            ax.loglog(ups, ms, styles[rtt], color=color, label=f"{name}, RTT {rtt:.0f} ms")
        n = bench.preset.max_new_tokens
        ax.axhline(1000 * (inp["target_only_s_per_token"] + rtt / 1000 / n), color="k", ls=styles[rtt], lw=1,
                   label=f"target-only, RTT {rtt:.0f} ms")
    ax.set_xlabel("device uplink (Mbit/s); downlink 50 Mbit/s")
    ax.set_ylabel("modeled ms per generated token (1 sequence)")
    ax.set_title("modeled latency: top-K vs full-distribution transmission")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _plot_positions(bench: "Bench", plt):
    rows = [r for r in bench.sweep_rows("gamma") if r.get("per_position_acceptance")]
    if not rows:
        return None
    row = max(rows, key=lambda r: r["gamma"])
    vals = [x for x in row["per_position_acceptance"]]
    reach = row["per_position_reach"]
    pos = np.arange(1, len(vals) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(pos, [np.nan if x is None else x for x in vals], "o-", label="P(accept j | j tested)")
    ax.plot(pos, [np.nan if x is None else x for x in reach], "s--", label="P(accept j | j drafted)")
    ax.axhline(row["alpha"], color="k", lw=0.8, ls=":", label=f"alpha = {row['alpha']:.3f}")
    ax.set_xlabel("draft position j")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"per-position acceptance (gamma={row['gamma']}, sampling)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
