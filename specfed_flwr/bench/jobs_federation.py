"""The federation job of a run: the engines a user would run instead at the same concurrency, on
shared and on split CPUs, the draft/verify step costs, the draft-quantization choice, ``make run``'s
settings through the Flower simulation, and their targets (measurements: ``federation``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import federation as fed
from .presets import DRAFT_QUANTIZATION
from .run_flower import run_flower

if TYPE_CHECKING:
    from .suite import Bench

log = logging.getLogger("specfed_flwr.bench")

#: the bars of the pipelining and device-runtime issues, judged on this run's medians
FEDERATION_TARGETS = {
    ("emulated-federation", "split", 4): 1.8, ("emulated-federation", "split", 16): 1.3,
    ("emulated-federation", "split", 1): 1.5, ("in-process", "shared", 16): 1.0,
}
STEP_TARGET_RATIO = 1.15


def federation(bench: "Bench") -> None:
    """``bench.analysis["federation"]``: steps, draft choice, engines (medians), make run, targets."""
    pr, pair, prompts = bench.preset, bench.pair, bench.work.prompts
    tokens = pr.max_new_tokens
    reps = 1 if "quick" in pr.name else 2
    out: dict[str, Any] = {}
    bench.step("step costs")
    steps = _add(bench, fed.step_records(pair, prompts, reps=3 if "quick" in pr.name else 5))
    out["steps"] = steps
    bench.step("verify numerics (bf16)")
    out["numerics"] = _add(bench, fed.numerics_records(pair, prompts, reps=3 if "quick" in pr.name else 5))
    if not bench.tiny:
        bench.step("draft choice")
        out["draft_choice"] = _add(bench, fed.draft_choice(pair, prompts, reps=reps, max_new_tokens=tokens))
    bench.step("engines at the same concurrency")
    engines = _add(bench, fed.compare_engines(
        pair, prompts, concurrencies=(1, 4, 16), reps=reps, max_new_tokens=tokens,
        draft_spec=(pair.draft_spec, DRAFT_QUANTIZATION if not bench.tiny else "none")))
    summary = fed.summarize(engines)
    out["engines"] = summary
    if not bench.args.no_flower:
        bench.step("flower sim, make run settings")
        out["make_run"] = make_run_comparison(bench)
    out["targets"] = federation_targets(summary, steps, out.get("make_run"))
    bench.analysis["federation"] = out


def _add(bench: "Bench", records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``federation`` records into results.json, with every required key."""
    out = []
    for rec in records:
        rec = dict(rec)
        out.append(bench.record(rec.pop("kind"), rec.pop("engine"), rec))
    bench.advance()
    return out


def make_run_comparison(bench: "Bench") -> dict[str, Any]:
    """``make run``'s settings (the 12 shipped prompts, 2 SuperNodes, 48 new tokens, pipelined,
    drafting ahead, adaptive gamma and K) through the Flower simulation beside target-only batched at 12."""
    from ..config import SpecFedConfig

    cfg = SpecFedConfig()
    conc = len(bench.work.prompts)
    prompts = list(bench.work.prompts)
    base = fed.target_only(bench.pair.target, prompts, concurrency=conc, max_new_tokens=cfg.max_new_tokens,
                                  eos=bench.pair.eos)
    try:
        m = run_flower(bench.pair, prompts, clients=2, concurrency=min(conc, cfg.max_active_sequences),
                       max_new_tokens=cfg.max_new_tokens, references=base["outputs"], device=bench.args.device,
                       pipelined=True, adaptive=cfg.adaptive)
    except Exception as exc:  # report, do not lose the rest of the run
        log.exception("Flower simulation (make run settings) failed")
        return {"error": f"{type(exc).__name__}: {exc}"}
    rec = bench.record("engine_comparison", "flower-simulation", {
        "concurrency": conc, "cpu_layout": "shared", "tokens_per_s": m["tokens_per_s"],
        "target_only_tokens_per_s": base["tokens_per_s"],
        "ratio_vs_target_only": m["tokens_per_s"] / base["tokens_per_s"], "exact_match": m.get("exact_match"),
        "proactive_hits": m.get("proactive_hits"), "proactive_misses": m.get("proactive_misses"),
        "draft_loads": m.get("draft_loads"), "resyncs_after_round_1": m.get("resyncs_after_round_1"),
        # the uplink of a greedy run with the default encoding (auto: one compact slot per position)
        "bytes_per_position_all_in": m.get("uplink_bytes_per_position"),
        "server_cpu_s_per_token": None}, label="make-run-settings")
    bench.advance()
    return rec


def federation_targets(engines: dict[str, Any], steps: list[dict], make_run: dict | None) -> list[dict]:
    """The pipelining and device-runtime issues' bars, judged on this run's medians."""
    rows = []
    for (engine, layout, conc), bar in FEDERATION_TARGETS.items():
        got = engines.get(f"{engine}/{layout}/{conc}", {}).get("ratio_vs_target_only")
        rows.append({"target": f"{engine} ({layout} CPUs), concurrency {conc}: >= {bar}x target-only at {conc}",
                     "value": got, "bar": bar, "met": None if got is None else got >= bar})
    if make_run and "ratio_vs_target_only" in make_run:
        got = make_run["ratio_vs_target_only"]
        rows.append({"target": f"make run settings (Flower simulation, {make_run['concurrency']} prompts): "
                               f">= 0.8x target-only at {make_run['concurrency']}",
                     "value": got, "bar": 0.8, "met": got >= 0.8})
    split16 = engines.get("emulated-federation/split/16", {})
    if split16.get("server_cpu_s_per_token") and split16.get("target_only_server_cpu_s_per_token"):
        got = split16["server_cpu_s_per_token"] / split16["target_only_server_cpu_s_per_token"]
        rows.append({"target": "server CPU-seconds per token at concurrency 16 <= 0.5x target-only's",
                     "value": got, "bar": 0.5, "met": got <= 0.5})
    for rec in steps:
        if rec["batch"] == 16:
            rows.append({"target": f"{rec['component']} step at batch 16 <= {STEP_TARGET_RATIO}x a raw forward",
                         "value": rec["ratio"], "bar": STEP_TARGET_RATIO,
                         "met": rec["ratio"] <= STEP_TARGET_RATIO})
    return rows
