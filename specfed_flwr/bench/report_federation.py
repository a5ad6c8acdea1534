"""The report's section on pipelined rounds and the emulated federation (``jobs_federation``):
its targets, the engines at the same concurrency, ``make run``'s settings, the draft choice, the
step costs, and where the split layout stands given this run's own step costs."""

from __future__ import annotations

from typing import Any

from .report_format import fmt, median, status, table


#: the deployment row of the pipelining issue: 3.2 tok/s before it (16 sequences, draft workers)
DEPLOYMENT_BEFORE_TPS = 3.2


def _deployment_targets(fed: dict[str, Any], deployment: Any) -> list[dict[str, Any]]:
    """Pipelined deployment (persistent runtime, 2 SuperNodes) against 5x the earlier deployment
    row and 0.5x target-only batched at the same concurrency (this run's shared target-only)."""
    if not isinstance(deployment, dict) or not deployment.get("persistent-pipelined"):
        return []
    got = deployment["persistent-pipelined"].get("tokens_per_s")
    if got is None:
        return []
    rows = [{"target": f"deployment, pipelined, persistent runtime: >= 5x the earlier {DEPLOYMENT_BEFORE_TPS} tok/s",
             "value": got / DEPLOYMENT_BEFORE_TPS, "met": got >= 5 * DEPLOYMENT_BEFORE_TPS}]
    base = (fed.get("engines") or {}).get("target-only/shared/16", {}).get("tokens_per_s")
    if base:
        rows.append({"target": "deployment, pipelined, persistent runtime: >= 0.5x target-only batched at 16",
                     "value": got / base, "met": got / base >= 0.5})
    return rows


def federation_section(fed: dict[str, Any], deployment: Any = None) -> str:
    """Pipelined rounds, the emulated federation, draft choice and step costs (``federation``)."""
    s: list[str] = ["## Pipelined rounds and the emulated federation\n"]
    s.append("Greedy, the shipped prompts cycled to the concurrency, 32 new tokens, each engine beside "
             "**target-only batched at the same concurrency** (transformers `generate`, left padding) measured "
             "back to back in the same repetition; medians over the repetitions. *shared*: every process and "
             "thread may run on every CPU. *split* (emulated federation): the server process pinned to one CPU "
             "with one torch thread, the device process pinned to the other CPU(s) "
             "(`inprocess.ProcessTransport`), and its target-only baseline pinned to the server's CPU with one "
             "thread. Server CPU s/token is this process's CPU time (`getrusage`), i.e. the server alone in the "
             "split layout. Rounds are pipelined (`pipeline-depth=auto`), devices draft ahead, and gamma and K "
             "are chosen per round (`adaptive`, starting from gamma=4, K=8): the user's defaults.\n")
    targets = list(fed.get("targets") or []) + _deployment_targets(fed, deployment)
    if targets:
        s.append("### Targets (this run)\n")
        s.append(table(["target", "measured", "status"],
                        [[t["target"], fmt(t["value"], ".2f"), status(t["met"])] for t in targets]))
        s.append("")
        why = _federation_why(fed)
        if why:
            s.append(why + "\n")
    rows = []
    for key, r in (fed.get("engines") or {}).items():
        rows.append([r["engine"], r["cpu_layout"], r["concurrency"], fmt(r["tokens_per_s"], ".2f"),
                     fmt(r["ratio_vs_target_only"], ".2f") + "x", fmt(r.get("server_cpu_s_per_token"), ".4f"),
                     fmt(r.get("target_only_server_cpu_s_per_token"), ".4f"), fmt(r.get("exact_match"), ".2f"),
                     fmt(r.get("proactive_hits"), ".0f") + " / " + fmt(r.get("proactive_misses"), ".0f"),
                     fmt(r.get("pipeline_depth_median"), ".0f"), r["reps"]])
    if rows:
        s.append("### Engines at the same concurrency\n")
        s.append(table(["engine", "CPUs", "concurrency", "tokens/s", "vs target-only", "server CPU s/token",
                         "target-only CPU s/token", "identical to target", "drafted-ahead hits / misses", "depth",
                         "reps"], rows))
        s.append("")
    mr = fed.get("make_run")
    if mr and "tokens_per_s" in mr:
        s.append(f"`make run` settings through the Flower simulation engine ({mr['concurrency']} prompts, 2 SuperNodes "
                 f"in one warm Ray actor, pipelined): {fmt(mr['tokens_per_s'], '.2f')} tok/s, "
                 f"{fmt(mr['ratio_vs_target_only'], '.2f')}x target-only batched at {mr['concurrency']} "
                 f"({fmt(mr['target_only_tokens_per_s'], '.2f')} tok/s); draft loads {mr.get('draft_loads')}, "
                 f"resyncs after round 1: {mr.get('resyncs_after_round_1')}.\n")
    elif mr:
        s.append(f"`make run` settings through the Flower simulation: failed ({mr.get('error')}).\n")
    choice = fed.get("draft_choice") or []
    if choice:
        by_q: dict[str, list[dict]] = {}
        for r in choice:
            by_q.setdefault(r["draft_quantization"], []).append(r)
        s.append("### Draft quantization (in-process, concurrency 1, strict rounds, no drafting ahead)\n")
        s.append(table(["draft", "tokens/s", "vs target-only", "alpha", "tau", "identical to target"], [
            [q, fmt(median(rs, "tokens_per_s"), ".2f"), fmt(median(rs, "ratio_vs_target_only"), ".2f") + "x",
             fmt(median(rs, "alpha")), fmt(median(rs, "tau"), ".2f"), fmt(median(rs, "exact_match"), ".2f")]
            for q, rs in by_q.items()]))
        s.append("")
    steps = fed.get("steps") or []
    if steps:
        s.append("### Draft and verify step against the bare forward\n")
        s.append("`stepcost`: the wrapped step (draft: `HFDraftProposer.propose` per drafted position; verify: "
                 "`TargetVerifier.score_batch` + `commit`) against the model's own forward on the same shapes with "
                 "a plain cache, interleaved, medians; rows of equal length, so padding, masks and cache "
                 "bookkeeping count as overhead.\n")
        s.append(table(["component", "batch", "step ms", "raw forward ms", "ratio"], [
            [r["component"], r["batch"], fmt(r["step_ms"], ".1f"), fmt(r["raw_forward_ms"], ".1f"), fmt(r["ratio"], ".3f")]
            for r in steps]))
        s.append("")
    numerics = fed.get("numerics") or []
    if numerics:
        s.append("### Reduced-precision verification: `verify-numerics` batched vs stepwise\n")
        s.append("A bfloat16 copy of the target, one verify step (gamma 4, score + commit) with one attention call "
                 "per forward (`batched`) and with one per position (`stepwise`, the default for a bf16/fp16 target: "
                 "logits bit-for-bit the target's own `generate`, docs/CONFIG.md), interleaved, medians.\n")
        s.append(table(["dtype", "batch", "batched ms", "stepwise ms", "stepwise / batched"], [
            [r["dtype"], r["batch"], fmt(r["batched_ms"], ".1f"), fmt(r["stepwise_ms"], ".1f"), fmt(r["ratio"], ".2f") + "x"]
            for r in numerics]))
        s.append("")
    return "\n".join(s) + "\n"


def _federation_why(fed: dict[str, Any]) -> str:
    """Why a split-layout target is missed, from this run's own numbers. A run has two phases: until
    the device's first drafts are verified (it prefills every prompt first, on its one CPU, while
    the target prefills and decodes alone), then the speculative rounds. The first phase runs at
    best at target-only speed, so a short answer (32 tokens) is bounded by how long it lasts."""
    engines = fed.get("engines") or {}
    lines = []
    for conc in (1, 4, 16):
        split = engines.get(f"emulated-federation/split/{conc}")
        base = engines.get(f"target-only/split/{conc}")
        if not (split and base and split.get("first_drafts_s") is not None and split.get("wall_s")):
            continue
        first, wall = split["first_drafts_s"], split["wall_s"]
        rate = split.get("rounds_phase_tokens_per_s")
        line = (f"- concurrency {conc}: the device's first drafts were verified after {first:.2f} s of the {wall:.2f} s "
                f"run ({100 * first / wall:.0f}%)")
        if split.get("solo_tokens") is not None:
            line += (f"; over the whole run the target decoded {split['solo_tokens']:.0f} of {split.get('tokens', 0):.0f} "
                     f"tokens alone while drafts were late ({split.get('solo_seconds') or 0:.2f} s)")
        prompts = int(split.get("prompts") or 0)
        if rate and prompts <= conc:
            # every prompt started at once, so the phases are clean: after the first drafts, rounds only
            line += (f". After the first drafts the rounds made {rate:.1f} tok/s, {rate / base['tokens_per_s']:.2f}x "
                     f"target-only's {base['tokens_per_s']:.1f} tok/s on one CPU")
        elif prompts > conc:
            line += (f"; {prompts} prompts joined {conc} at a time, and the device prefilled each before its first "
                     f"drafts")
        lines.append(line + f"; the whole run {split['ratio_vs_target_only']:.2f}x.")
    if not lines:
        return ""
    return ("Where the split layout stands, from this run's phases (medians of the repetitions):\n\n" + "\n".join(lines)
            + "\n\nBefore a device drafts it prefills every prompt it is given, on its one CPU. The default draft is the "
              "target's own 30-layer network in int4, so its prefill costs about what the target's does (int4 is "
              "multiplied as dequantised float32 at prefill sizes), and with 32-token answers the prompts are a large "
              "share of all the work: until the first drafts arrive the run is at best as fast as target-only. The "
              "rounds after them are bounded by the device's draft step, itself a large fraction of a target step "
              "for this pair. A draft that prefills and drafts cheaper per token (fewer layers, a distilled model, a "
              "faster device), longer answers, or a bigger target (a GPU target with the same drafts) move these "
              "ratios; pipelining and drafting ahead only let the run approach them.")
