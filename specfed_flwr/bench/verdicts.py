"""The verdicts of a run: each target of the earlier benchmark issue judged on this run's numbers,
with the reason behind a miss computed from the same numbers (``targets``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .presets import BASE, TARGET_PROFILE
from .report_format import client_draft_s

if TYPE_CHECKING:
    from .suite import Bench


def targets(bench: "Bench") -> list[dict[str, Any]]:
    """``{"target", "measured", "met"}`` per target (``met`` None: not measured)."""
    found = [compression_target(bench), inprocess_target(bench), flower_target(bench), latency_target(bench)]
    return [t for t in found if t is not None]


def compression_target(bench: "Bench") -> dict[str, Any] | None:
    """K=8: uplink per draft position >= 6000x smaller than fp32, alpha within 1 point of K=V."""
    v = bench.pair.vocab_size
    k_rows = {r["k_label"]: r for r in bench.sweep_rows("k")}
    k8, kv = k_rows.get("8"), k_rows.get("V")
    fk8, fkv = bench.fixed["per_k"].get("8"), bench.fixed["per_k"].get("V")
    if not (k8 and fk8 and fkv):
        return None
    from ..wire import bytes_per_position, compression_ratio

    slots = bytes_per_position(BASE["k"], v)
    ratio = compression_ratio(BASE["k"], v, "float32")
    wire = k8["uplink_bytes_per_position"]
    d_fixed = fk8["alpha"][BASE["reconstruction"]] - fkv["alpha"][BASE["reconstruction"]]
    d_run = (k8["alpha"] - kv["alpha"]) if kv and kv["alpha"] is not None else None
    met = ratio >= 6000 and abs(d_fixed) <= 0.01
    why = (f"{slots} B of top-K arrays per position vs {4 * v} B fp32: {ratio:.0f}x "
           f"(with the reply's per-sequence header, seq id + length = 12 B per sequence and round, amortised "
           f"over gamma={BASE['gamma']}: {wire:.1f} B measured, {4 * v / wire:.0f}x); "
           f"alpha K=8 {fk8['alpha'][BASE['reconstruction']]:.4f} vs K=V {fkv['alpha'][BASE['reconstruction']]:.4f} "
           f"at {fk8['prefixes']} fixed prefixes (paired): {100 * d_fixed:+.2f} points")
    if d_run is not None:
        why += f"; engine runs (unpaired, sampled trajectories): {100 * d_run:+.2f} points"
    all_in = 4 * v / wire if wire else None
    if all_in is not None and all_in < 6000 <= ratio:
        # gamma at which the 12 B header amortises below the 6000x budget
        budget = 4 * v / 6000 - slots
        g_need = math.ceil(12 / budget) if budget > 0 else None
        why += (f". Judged on the top-K payload (the engine's compression_vs_fp32); all-in, headers included, "
                f"it is {all_in:.0f}x < 6000x: the 12 B per-sequence header would have to amortise over gamma >= "
                f"{g_need} positions (or shrink to <= {max(0, budget * BASE['gamma']):.0f} B per sequence and "
                f"round, e.g. a uint16 sequence slot + uint8 length) to close that")
    if ratio < 6000:
        why += (f"; the top-K ratio is 4V/(K*(id bytes + 2)) = {ratio:.0f} for this vocabulary "
                f"(K=8 reaches 6000x only with V >= 48000 and uint16 ids)")
    if abs(d_fixed) > 0.01:
        rule = BASE["reconstruction"]
        within = [lab for lab, d in bench.fixed["per_k"].items()
                  if abs(d["alpha"][rule] - fkv["alpha"][rule]) <= 0.01]
        why += (f"; alpha misses: at temperature 1 the draft keeps only S = {fk8['kept_mass']:.3f} of its mass in "
                f"its top 8, and q_hat cannot match p outside it; the smallest K of the sweep within 1 point is "
                f"{within[0] if within else 'none'}"
                + (f" ({bench.fixed['per_k'][within[0]]['compression_vs_fp32']:.0f}x vs fp32)" if within else "")
                + ", so closing it means a larger K (less compression), or a draft whose top-8 mass is higher "
                  "(lower sampling temperature, a draft closer to the target)")
    return {"target": "K=8: uplink per draft position >= 6000x smaller than fp32, alpha within 1 point of K=V",
            "measured": why, "met": met}


def inprocess_target(bench: "Bench") -> dict[str, Any] | None:
    """In-process engine, 1 sequence: >= 1.0x HF assisted and >= 1.5x target-only tokens/s."""
    r = bench.engine_ratios.get("in-process-1c")
    if not r:
        return None
    met = r["vs_hf_assisted"] >= 1.0 and r["vs_target_only"] >= 1.5
    text = (f"{r['vs_hf_assisted']:.2f}x HF assisted, {r['vs_target_only']:.2f}x target-only "
            f"(1 client, greedy, median of {bench.preset.engine_reps} interleaved repetitions)")
    one = next((x for x in bench.records if x.get("label") == "in-process-1c"), None)
    if not met and one and one.get("rounds") and one.get("draft_s_per_position"):
        t_tok = 1.0 / bench.target_only_tps
        c = one["draft_s_per_position"] / t_tok  # draft forward in target-token units
        g = one["gamma"]
        ceiling = one["tau"] / (g * c + one["verify_s_per_round"] / t_tok)
        text += (f". Why: one draft forward costs {c:.2f} target decode steps here "
                 f"({1000 * one['draft_s_per_position']:.0f} ms vs {1000 * t_tok:.0f} ms per target token) and one "
                 f"verification {one['verify_s_per_round'] / t_tok:.2f}, so a round of gamma={g} costs "
                 f"{g * c + one['verify_s_per_round'] / t_tok:.2f} target steps for tau={one['tau']:.2f} tokens: "
                 f"at most {ceiling:.2f}x before any server overhead: the draft is only {1 / c:.1f}x cheaper per forward "
                 "than the target here (for the default pair, the int8 draft of SmolLM2-135M has the same 30 "
                 "layers and transformers' per-layer floor at batch 1 caps its gain, see "
                 "docs/MODELS_NOTES.md). What would close it: a draft >= 4x cheaper than the target per "
                 "forward (a larger target such as SmolLM2-1.7B with the 135M draft, fused kernels or "
                 "torch.compile for the draft) or a GPU target")
    return {"target": "in-process engine, 1 sequence: >= 1.0x HF assisted and >= 1.5x target-only tokens/s",
            "measured": text, "met": met}


def flower_target(bench: "Bench") -> dict[str, Any] | None:
    """Flower simulation, 2 clients, highest concurrency: >= 2x target-only; overhead share reported."""
    fl = [x for x in bench.records if x.get("label", "").startswith("flower-sim-2c-c") and x.get("mode") == "collaborative"
          and x.get("tokens_per_s")]
    if not fl:
        return {"target": "Flower simulation, 2 clients, 16 concurrent: >= 2x target-only",
                "measured": "not measured in this run (--no-flower or the run failed)", "met": None}
    best = max(fl, key=lambda x: x["concurrency"])
    ratio = best["tokens_per_s"] / bench.target_only_tps
    text = (f"{best['tokens_per_s']:.1f} tok/s = {ratio:.2f}x target-only "
            f"({bench.target_only_tps:.1f} tok/s); engine overhead "
            f"{1000 * best['engine_overhead_s_per_round']:.0f} ms/round = "
            f"{100 * best['engine_overhead_share']:.0f}% of round time")
    dep = next((x for x in bench.records if x.get("engine") == "flower-deployment" and x.get("rounds")), None)
    if dep:
        text += (f"; deployment engine beside it ({dep.get('runtime') or 'stock'} ClientApp runtime): "
                 f"{1000 * dep['engine_overhead_s_per_round']:.0f} ms overhead "
                 f"per exchange ({100 * dep['engine_overhead_share']:.0f}% of {1000 * dep['round_s_mean']:.0f} ms)")
    if ratio < 2.0 and best.get("rounds"):
        per_round = best["round_s_mean"]
        tokens_round = best["tokens"] / best["rounds"]
        text += (f". Why: a round takes {1000 * per_round:.0f} ms (client drafting "
                 f"{1000 * client_draft_s(best):.0f} ms: both virtual clients draft one after the other in the "
                 f"single Ray actor, {1000 * best['verify_s_per_round']:.0f} ms batched verification) and emits "
                 f"{tokens_round:.1f} tokens across the active sequences. What would close it: each client "
                 "drafting on its own device (the parallel round would drop the second client's drafting), a "
                 "target that batches more cheaply than it decodes (GPU), and a larger target/draft cost ratio")
    return {"target": f"Flower simulation, 2 clients, {best['concurrency']} concurrent: >= 2x target-only (1 sequence); overhead share reported",
            "measured": text, "met": ratio >= 2.0}


def latency_target(bench: "Bench") -> dict[str, Any] | None:
    """Modeled at the target link profile: >= 3x faster than full-distribution transmission; gamma*
    within 1 of the measured best gamma."""
    row = next((x for x in bench.latency["rows"] if (x["uplink_mbps"], x["rtt_ms"]) == TARGET_PROFILE), None)
    th = bench.theory
    if not row:
        return None
    sp = row["speedup_topk_vs_full_fp32"]
    dg_link = abs(th["gamma_star_link"] - th["measured_best_gamma_link"])
    if th.get("gamma_star_compute") is not None:
        dg = abs(th["gamma_star_compute"] - th["measured_best_gamma_compute"])
        gamma_text = (f"gamma* = {th['gamma_star_compute']:.2f} (Lambert W with alpha {th['alpha']:.3f} and "
                      f"a = {1000 * th['a_compute']:.1f} ms, b = {1000 * th['b_compute']:.1f} ms fitted to the "
                      f"measured round times of the gamma sweep) vs measured best gamma "
                      f"{th['measured_best_gamma_compute']} (max tok/s of the in-process gamma sweep): "
                      f"|diff| {dg:.2f}; at the link profile: gamma* {th['gamma_star_link']:.2f} vs "
                      f"{th['measured_best_gamma_link']} (measured tau and round times + link model), "
                      f"|diff| {dg_link:.2f}")
    else:  # the round-time fit has no positive per-round cost: judge at the link profile
        dg = dg_link
        gamma_text = (f"gamma* = {th['gamma_star_link']:.2f} at the link profile (alpha {th['alpha']:.3f}, "
                      f"a {1000 * th['a_link']:.1f} ms, b {1000 * th['b_link']:.1f} ms) vs best gamma "
                      f"{th['measured_best_gamma_link']} (measured tau and round times + link model): "
                      f"|diff| {dg:.2f}")
    text = (f"(a) top-K {1000 * row['top-K (K=8)']['s_per_token']:.1f} ms/token vs full fp32 "
            f"{1000 * row['full fp32']['s_per_token']:.1f} ms/token: {sp:.1f}x "
            f"({'met' if sp >= 3 else 'missed'}); (b) {gamma_text} ({'met' if dg <= 1 else 'missed'})")
    if sp < 3:
        load = (bench.machine.get("load_1min_during_run") or {}).get("mean") or 0.0
        where = "this CPU" + (" (shared and loaded while it ran)" if load > (bench.machine.get("cores") or 1) else "")
        text += (f". (a) missed because the modeled round is dominated by compute measured on {where}, which "
                 "dilutes the uplink saving of full-distribution transmission; faster compute "
                 "(a GPU target, a cheaper draft) or a slower uplink widens the gap")
    if dg > 1:
        text += (". (b) missed: the measured tokens/s vs gamma is flat near its maximum, so one noisy run per "
                 "gamma on a shared machine moves the argmax; the i.i.d. model also ignores that acceptance "
                 "falls with the position (see the per-position plot). More prompts/repetitions per gamma "
                 "would close it if the curve is really flat")
    return {"target": "modeled at 10 Mbit/s, 20 ms RTT: >= 3x faster than full-distribution transmission; "
                      "theory gamma* within 1 of the measured best gamma",
            "measured": text, "met": sp >= 3.0 and dg <= 1.0}
