"""The engine sections of the report: every engine record, the Flower engines' per-round
overhead, the deployment engine's two ClientApp runtimes, batched verification and drafting."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .report_format import client_draft_s, fmt, table

if TYPE_CHECKING:
    from .suite import Bench


def engines_section(bench: "Bench") -> list[str]:
    """Every engine record (greedy, same prompts, same run)."""
    s: list[str] = []
    s.append("## Engines (greedy, same prompts, same run)\n")
    rows = []
    for r in bench.records:
        if r["kind"] != "engine":
            continue
        label = r.get("label") or r["engine"]
        if r.get("status") == "not measured":
            rows.append([f"{r['engine']} ({r.get('note') or 'not measured'})", fmt(r.get("clients")),
                         fmt(r.get("concurrency")), "–", "not measured", "–", "–", "–", "–", "–"])
            continue
        if r.get("error"):
            rows.append([label, fmt(r.get("clients")), fmt(r.get("concurrency")), "–", f"failed: {r['error']}", "–", "–", "–", "–", "–"])
            continue
        rows.append([label, fmt(r.get("clients")), fmt(r.get("concurrency")), fmt(r.get("gamma")),
                     fmt(r.get("tokens_per_s"), ".1f"), fmt(r.get("speedup_vs_target_only"), ".2f") + "x",
                     fmt(r.get("alpha")), fmt(r.get("tau"), ".2f"), fmt(r.get("exact_match"), ".2f"),
                     _round_split(r)])
    s.append(table(["engine", "clients", "concurrent", "gamma", "tok/s", "vs target-only", "alpha", "tau",
                     "exact match", "per round: wall = draft + verify + other + overhead (ms)"], rows))
    s.append("\nRatios are medians of per-repetition ratios (same repetition, interleaved). HF assisted generation uses "
             "transformers' own dynamic draft length. Flower rows: 2 SuperNodes in `flwr.simulation.run_simulation`, "
             "K=8, gamma=4, exact; tok/s over the decoding rounds (handshake and model loading excluded; "
             "`wall_incl_setup_s` in results.json has the total). The deployment rows: the same app through `flwr run` "
             "on real SuperLink/SuperNode processes, with the persistent device runtime and with Flower's stock "
             "process per message; their tok/s is over the ServerApp's generation loop (waiting for the nodes and the "
             "handshake included, model loading and stack start-up excluded).\n")
    return s


def flower_overhead_section(bench: "Bench") -> list[str]:
    """Per-round engine overhead of the Flower engines, simulation and deployment side by side."""
    pr = bench.preset
    s: list[str] = []
    fl = [r for r in bench.records if r.get("engine") in ("flower-simulation", "flower-deployment") and r.get("rounds")]
    if fl:
        s.append("### Flower engines: per-round engine overhead (simulation and deployment side by side)\n")
        s.append(table(["run", "client processes", "rounds", "round (ms)", "verify (ms)", "client draft (ms)",
                         "server other (ms)", "engine overhead (ms)", "overhead share of round time",
                         "draft model loads per device"],
                        [[r["label"],
                          (f"{fmt(r.get('flower_actors'))} Ray actor(s)" if r["engine"] == "flower-simulation"
                           else _deployment_processes(r)),
                          r["rounds"],
                          (fmt(1000 * r["round_s_median"], ".0f") + " median" if r.get("round_s_median") is not None
                           else fmt(1000 * r["round_s_mean"], ".0f") + " mean"),
                          fmt(1000 * r["verify_s_per_round"], ".0f"), fmt(1000 * client_draft_s(r), ".0f"),
                          fmt(1000 * r["server_other_s_per_round"], ".0f") if r.get("server_other_s_per_round") is not None
                          else "(in overhead)",
                          fmt(1000 * r["engine_overhead_s_per_round"], ".0f")
                          + (" median" if r["engine"] == "flower-simulation" else " mean"),
                          fmt(100 * r["engine_overhead_share"], ".0f") + "%",
                          _draft_loads(r)]
                         for r in fl]))
        s.append("\nEngine overhead = round wall time − verify − client draft time. The simulation gives a node's message "
                 "to whichever Ray actor is free, so with one actor per client a node's draft KV caches would be split "
                 "over two processes (the strategy then resends whole sequences every round); the benchmark runs ONE "
                 "actor for both SuperNodes, which keeps the caches warm but drafts the two clients one after the other, "
                 "so client draft time is the sum over clients (it would be the max with one actor per client). The "
                 "overhead contains Flower's message pickup (a 0.1 s tick in the simulation engine), serialisation, and "
                 "the server's reconstruction/aggregation (`server other`). The deployment rows run the same app with "
                 "`flwr run` on `launch.start_deployment_stack` (a real SuperLink, 2 real SuperNodes), once with one "
                 "`specfed-flwr device-runtime` per SuperNode (`--isolation process`: one ClientApp process holds the "
                 "draft and its KV caches for the whole run) and once on Flower's stock path (a new `flwr-clientapp` "
                 "process per message); the round column is the median strict-round wall time the ServerApp measured. "
                 "Their ServerApp is another process, so the split comes from the run summary's totals: round = decode "
                 "wall / (rounds + 1) (the wall includes the handshake, one more exchange), overhead = round − verify − "
                 "the slower client's draft time (server work besides verify is inside the overhead). They generate "
                 f"fewer tokens ({pr.deployment_max_new_tokens} per sequence) because every deployment round pays "
                 "Flower's SuperNode polling (docs/DEPLOYMENT.md).\n")
    return s


def batched_section(bench: "Bench") -> list[str]:
    """Batched vs per-sequence verification and drafting."""
    a = bench.analysis
    s: list[str] = []
    bv = a.get("batched_verification", {})
    s.append("### Batched verification\n")
    if bv.get("status") == "measured":
        s.append(f"In-process engine, 2 clients, {bv['concurrency']} concurrent sequences, greedy: one padded target "
                 f"forward for all sequences takes {1000 * bv['verify_s_per_round_batched']:.0f} ms per round against "
                 f"{1000 * bv['verify_s_per_round_per_sequence']:.0f} ms for one forward per sequence "
                 f"({fmt(bv['verify_gain'], '.2f')}x); end to end {bv['tokens_per_s_batched']:.1f} vs "
                 f"{bv['tokens_per_s_per_sequence']:.1f} tok/s ({bv['throughput_gain']:.2f}x).\n")
        dr = bv.get("drafting")
        s.append("### Batched drafting\n")
        if dr:
            s.append(f"Same run, each client drafting all its active sequences in one forward per draft step "
                     f"(`HFDraftProposer(batched=True)`, the default) against one sequence at a time "
                     f"(`batched=False`): client drafting {1000 * dr['draft_s_per_round_batched']:.0f} vs "
                     f"{1000 * dr['draft_s_per_round_per_sequence']:.0f} ms per round for both clients "
                     f"({fmt(dr['draft_gain'], '.2f')}x); end to end {bv['tokens_per_s_batched']:.1f} vs "
                     f"{dr['tokens_per_s_per_sequence_draft']:.1f} tok/s ({dr['throughput_gain']:.2f}x).\n")
        else:
            s.append("not measured (the draft model does not support padded batching)\n")
    else:
        s.append(f"{bv.get('status', 'pending')}\n")
    return s


def deployment_runtimes_section(cmp: Any) -> str:
    """The deployment engine's two ClientApp runtimes side by side (analysis['deployment_runtimes'])."""
    if not isinstance(cmp, dict):
        return (f"### Deployment engine: persistent device runtime vs stock\n\n{cmp}\n" if cmp else "")
    rows = []
    for name in ("persistent", "persistent-no-standby", "stock", "persistent-pipelined", "persistent-pipelined-depth2"):
        r = cmp.get(name)
        if name.endswith("depth2") and not r:
            continue  # a run made before this row existed
        runtime, pipelined = name.split("-")[0], "yes" if "pipelined" in name else "no"
        if "pipelined" in name:
            most = (r or {}).get("pipeline_depth_max")
            pipelined += " (depth 2)" if name.endswith("depth2") else (
                f" (auto, at most {most} in flight)" if most else " (auto)")
        standby = "off" if "no-standby" in name else ("–" if runtime == "stock" else "auto")
        if not r:
            rows.append([runtime, pipelined, standby, "failed / not measured", "–", "–", "–", "–"])
            continue
        procs = r.get("clientapp_processes_per_node") or {}
        if r.get("standby_sent"):
            slept = f", {r['standby_slept']} slept anyway" if r.get("standby_slept") is not None else ""
            standby += f" ({r['standby_sent']} sent{slept}, hold {fmt(r.get('standby_median_hold_s'), '.2f')} s)"
        rows.append([runtime, pipelined, standby, fmt(r.get("round_s_median"), ".2f"),
                     fmt(r.get("reply_gap_s_median"), ".2f"), fmt(r.get("tokens_per_s"), ".2f"), fmt(r.get("rounds")),
                     ", ".join(str(v) for v in procs.values()) or "–"])
    out = ["### Deployment engine: persistent device runtime vs stock\n",
           table(["ClientApp runtime", "pipelined", "standby messages", "round (s, median)", "reply gap (s, median)",
                  "tokens/s", "rounds", "ClientApp processes per node"], rows)]
    if cmp.get("met") is not None:
        verdict = "met" if cmp["met"] else "missed"
        speed = (f", {cmp['round_speedup_vs_stock']:.2f}x faster than stock" if cmp.get("round_speedup_vs_stock")
                 else "")
        out.append(f"\nTarget: a strict round <= {cmp['target_round_s']:.1f} s with the persistent runtime: "
                   f"**{verdict}**{speed}. Strict rounds (the next round's messages go out after the last reply of "
                   "this one): a SuperNode sleeps a hard-coded 3 s after an empty pull, which it always finds right after "
                   "sending its reply unless a standby message is queued behind the request (the row without them "
                   "shows that floor), and checks for the ClientApp's reply every 0.5 s." + _strict_split(cmp.get("persistent"))
                   + "\n")
    if cmp.get("reply_gap_met") is not None:
        gap = cmp[cmp.get("reply_gap_run", "persistent-pipelined")]["reply_gap_s_median"]
        out.append(f"Target: with pipelined rounds, a median gap between a node's consecutive replies <= "
                   f"{cmp['target_reply_gap_s']:.1f} s: {gap:.2f} s, **{'met' if cmp['reply_gap_met'] else 'missed'}**. "
                   "With cohorts in flight the next message for a node can already be queued when it replies, and then "
                   "its SuperNode skips the 3 s idle sleep; a median above the bar means that in many gaps it was "
                   "not queued yet (the server pushes a cohort's next request only after verifying its replies, "
                   "which it first has to pull through the SuperLink)." + _contention(cmp) + "\n")
    return "\n".join(out) + "\n"


def _strict_split(r: dict[str, Any] | None) -> str:
    """Where a strict persistent round's median went, from the run's own per-round means."""
    if not r or not r.get("round_s_median") or r.get("draft_max_s_per_round") is None:
        return ""
    draft, verify = r["draft_max_s_per_round"], r.get("verify_s_per_round") or 0.0
    rest = r["round_s_median"] - draft - verify
    return (f" In this run: the slower device drafted {draft:.2f} s per round ({r.get('concurrency')} sequences, gamma "
            f"{r.get('gamma')}, both devices and the server on this machine's cores) and the target verified {verify:.2f} s; the other {rest:.2f} s are "
            "transport: the 0.5 s reply checks, the standby hold and the ServerApp's pulls.")


def _contention(cmp: dict[str, Any]) -> str:
    """Why pipelined rounds are slower here: the verify shares the cores with the devices' drafting."""
    pipe, strict = cmp.get(cmp.get("reply_gap_run", "persistent-pipelined")) or {}, cmp.get("persistent") or {}
    auto = cmp.get("persistent-pipelined") or {}
    note = ""
    if cmp.get("reply_gap_run", "").endswith("depth2") and auto.get("reply_gap_s_median") is not None:
        note = (f" The default (`pipeline-depth=auto`) run kept at most {auto.get('pipeline_depth_max') or '?'} "
                f"cohort(s) in flight over its {auto.get('rounds')} rounds (devices that draft ahead get one until three "
                f"rounds show the transport outlasting a whole cycle): reply gap {auto['reply_gap_s_median']:.2f} s, "
                f"{fmt(auto.get('tokens_per_s'), '.2f')} tok/s against {fmt(pipe.get('tokens_per_s'), '.2f')} tok/s with two.")
    if not pipe.get("verify_s_per_round") or not strict.get("verify_s_per_round"):
        return note
    return note + (f" In this run the target's verify took {pipe['verify_s_per_round']:.2f} s per round pipelined against "
            f"{strict['verify_s_per_round']:.2f} s in strict rounds, although with cohorts in flight each verify covers "
            "fewer sequences: pipelined, it runs while both device runtimes draft, three busy processes on this "
            "machine's cores, so every step of the pipeline slows down and the next request is late. Devices on "
            "their own hardware would not take the server's cores.")


def _deployment_processes(r: dict[str, Any]) -> str:
    n = r.get("clients")
    if r.get("runtime") == "persistent":
        return f"{n} SuperNodes + {n} device runtimes"
    return f"{n} SuperNodes, a flwr-clientapp per message"


def _draft_loads(r: dict[str, Any]) -> str:
    """How often each device loaded its draft over the whole run (1 = kept warm, not reloaded per round)."""
    loads = r.get("draft_loads")
    if not loads:
        return "–"
    return ", ".join(f"{node}: {n}" for node, n in sorted(loads.items())) if isinstance(loads, dict) else str(loads)


def _round_split(r: dict[str, Any]) -> str:
    if not r.get("rounds"):
        return "–"
    draft = client_draft_s(r)
    if r.get("server_other_s_per_round") is None:  # deployment: totals from the run summary
        return (f"{1000 * r['round_s_mean']:.0f} = {1000 * (draft or 0):.0f} + {1000 * r['verify_s_per_round']:.0f} + "
                f"(other + overhead) {1000 * r['engine_overhead_s_per_round']:.0f}")
    return (f"{1000 * r['round_s_mean']:.0f} = {1000 * (draft or 0):.0f} + {1000 * r['verify_s_per_round']:.0f} + "
            f"{1000 * r['server_other_s_per_round']:.0f} + {1000 * r['engine_overhead_s_per_round_mean'] - 1000 * r['server_other_s_per_round']:.0f}")
