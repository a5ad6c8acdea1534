"""What a user would run instead, side by side: the engines at the same concurrency, on shared
and on split CPUs, plus the draft/verify step costs and the draft-quantization choice.

Part of ``specfed-flwr bench`` (``bench.jobs_federation``). Every comparison is made within one
repetition (the machine is noisy: ratios of runs made back to back, medians over repetitions):

* **target-only**: transformers' ``generate``, greedy, batched with left padding at the same
  concurrency (chunks of ``concurrency`` prompts), the baseline a user would run;
* **HF assisted** (concurrency 1): transformers' assisted generation with the same draft;
* **in-process, shared**: the in-process engine (devices on worker threads, pipelined rounds,
  drafting ahead), every thread free to run on every CPU;
* **emulated federation, split**: the server (this process) pinned to the first CPU with one
  torch thread, the devices in their own process pinned to the other CPU(s) with one torch thread
  each (``inprocess.ProcessTransport``), against target-only pinned to the server's CPU with one
  thread. "Devices have their own hardware" is measured, not modeled.

Server CPU seconds per generated token are the CPU time of this process (``getrusage``): in the
split layout the devices run in another process, so that is the server's work alone; for the
thread transport it includes the device threads and is reported as ``process_cpu_s_per_token``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from typing import Any, Iterator, Sequence

import torch

from ..config import SpecFedConfig
from ..summary import median_gamma_asked


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def split_layout(cpus: Sequence[int] | None = None) -> tuple[list[int], list[int]] | None:
    """(server CPUs, device CPUs): the first CPU for the server, the rest for the devices; None
    when there is only one CPU."""
    cpus = list(cpus if cpus is not None else available_cpus())
    if len(cpus) < 2:
        return None
    return cpus[:1], cpus[1:]


@contextlib.contextmanager
def pinned(cpus: Sequence[int] | None, threads: int | None) -> Iterator[None]:
    """Run the calling thread on ``cpus`` with ``threads`` torch threads; restored afterwards."""
    old_threads = torch.get_num_threads()
    old_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        if cpus is not None and old_cpus is not None:
            os.sched_setaffinity(0, set(cpus))
        if threads is not None:
            torch.set_num_threads(int(threads))
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_cpus is not None:
            os.sched_setaffinity(0, old_cpus)


def _measured(fn) -> tuple[Any, float, float]:
    cpu, wall = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - wall, cpu_seconds() - cpu


@torch.inference_mode()
def target_only(model: torch.nn.Module, prompts: list[list[int]], *, concurrency: int, max_new_tokens: int,
                eos: list[int], assistant: torch.nn.Module | None = None) -> dict[str, Any]:
    """Greedy ``generate`` in batches of ``concurrency`` (left padded); tokens count up to EOS."""
    pad = eos[0] if eos else 0
    device = next(model.parameters()).device

    def run() -> list[list[int]]:
        outputs: list[list[int]] = []
        for start in range(0, len(prompts), concurrency):
            chunk = prompts[start:start + concurrency]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            kwargs: dict[str, Any] = {"attention_mask": mask, "max_new_tokens": max_new_tokens, "do_sample": False,
                                      "pad_token_id": pad, "eos_token_id": eos or None}
            if assistant is not None:
                kwargs["assistant_model"] = assistant
            out = model.generate(ids, **kwargs)[:, width:].tolist()
            for row in out:
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                outputs.append(row[:cut])
        return outputs

    outputs, wall, cpu = _measured(run)
    tokens = sum(len(o) for o in outputs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "server_cpu_s_per_token": cpu / tokens,
            "outputs": outputs}


def speculative(target: torch.nn.Module, prompts: list[list[int]], cfg: SpecFedConfig, *, eos: list[int],
                drafts: Sequence[torch.nn.Module] = (), transport: Any = None) -> dict[str, Any]:
    """The in-process engine over ``prompts`` (threads, or ``transport``)."""
    from ..inprocess import InProcessEngine

    engine = InProcessEngine(target, list(drafts), cfg, eos_token_ids=eos, transport=transport)
    seen: list[tuple[float, Any]] = []  # (perf_counter, RoundReport) as each round was verified
    started = time.perf_counter()
    result, wall, cpu = _measured(lambda: engine.generate(prompts, on_round=lambda r: seen.append((time.perf_counter(), r))))
    tokens = result.metrics["tokens"]
    # the two phases of a run: until the devices' first drafts were verified (they prefill every
    # prompt first; the target prefills and decodes alone meanwhile), then the speculative rounds
    first = next((t - started for t, r in seen if r.drafted > 0), None)
    round_tokens = sum(r.emitted for t, r in seen if first is not None and t - started > first)
    solo = result.metrics.get("target_steps_while_waiting") or {}
    depths = [r.pipeline_depth for r in result.rounds]
    seq_rounds = sum(r.active_sequences for r in result.rounds)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "cpu_s_per_token": cpu / tokens,
            "outputs": result.token_ids, "alpha": result.metrics["alpha"], "tau": result.metrics["tau"],
            "rounds": len(result.rounds), "proactive_hits": result.metrics["proactive_hits"],
            "proactive_misses": result.metrics["proactive_misses"],
            "pipeline_depth_median": statistics.median(depths) if depths else None,
            # what the (adaptive) rounds drafted: positions per sequence and round, and the gamma asked
            "drafted_per_sequence_round": result.metrics["drafted_positions"] / seq_rounds if seq_rounds else None,
            "gamma_asked_median": median_gamma_asked(result.metrics.get("settings")),
            "first_drafts_s": first, "solo_tokens": solo.get("tokens"), "solo_seconds": solo.get("seconds"),
            # tokens the rounds verified after the first drafts, per second of that phase
            "rounds_phase_tokens_per_s": round_tokens / (wall - first) if first is not None and wall > first else None}


def engine_config(vocab: int, concurrency: int, max_new_tokens: int, **extra: Any) -> SpecFedConfig:
    """What a user runs at ``concurrency`` (greedy; the defaults: pipelined, drafting ahead, adaptive
    gamma and K starting from 4 and 8); ``extra`` overrides."""
    base = dict(target="bench", draft="bench", top_k=8, draft_length=4, max_new_tokens=max_new_tokens,
                max_active_sequences=concurrency, chat_template=False, temperature=0.0)
    base.update(extra)
    return SpecFedConfig(**base).validate()


def workload(prompts: list[list[int]], concurrency: int) -> list[list[int]]:
    """The prompts for one concurrency: at least 4, at least 2 batches' worth below 16."""
    n = max(concurrency, 4) if concurrency >= 16 else max(4, 2 * concurrency)
    return [prompts[i % len(prompts)] for i in range(n)]


def _exact(outputs: list[list[int]], reference: list[list[int]]) -> float:
    return sum(o == r for o, r in zip(outputs, reference)) / len(reference)


def compare_engines(pair, prompts: list[list[int]], *, concurrencies: Sequence[int] = (1, 4, 16), reps: int = 2,
                    max_new_tokens: int = 32, draft_spec: tuple[str, str] = ("default", "int4"),
                    progress=None) -> list[dict[str, Any]]:
    """One record per (engine, concurrency, layout, repetition), ratios within each repetition."""
    from ..inprocess import ProcessTransport

    records: list[dict[str, Any]] = []
    layout = split_layout()
    settings = {"draft": draft_spec[0], "draft-quantization": draft_spec[1], "draft-ahead": True}
    transport = None
    if layout is not None:
        transport = ProcessTransport(["device-0"], settings, vocab_size=pair.vocab_size,
                                     limits=engine_config(pair.vocab_size, 16, max_new_tokens),
                                     device_cpus=layout[1], threads=len(layout[1]))
    try:
        # warm-up (first forwards, allocator, the device process): not measured
        warm = prompts[:1]
        warm_cfg = engine_config(pair.vocab_size, 1, 4)
        target_only(pair.target, warm, concurrency=1, max_new_tokens=4, eos=pair.eos)
        speculative(pair.target, warm, warm_cfg, eos=pair.eos, drafts=[pair.draft])
        if transport is not None:
            with pinned(layout[0], 1):
                speculative(pair.target, warm, warm_cfg, eos=pair.eos, transport=transport)
        for rep in range(reps):
            for conc in concurrencies:
                work = workload(prompts, conc)
                cfg = engine_config(pair.vocab_size, conc, max_new_tokens)
                base = target_only(pair.target, work, concurrency=conc, max_new_tokens=max_new_tokens, eos=pair.eos)
                reference = base["outputs"]

                def record(engine: str, cpu_layout: str, m: dict[str, Any], baseline: dict[str, Any], **extra):
                    rec = {"kind": "engine_comparison", "engine": engine, "concurrency": conc, "cpu_layout": cpu_layout,
                           "rep": rep, "tokens_per_s": m["tokens_per_s"], "tokens": m["tokens"], "wall_s": m["wall_s"],
                           "target_only_tokens_per_s": baseline["tokens_per_s"],
                           "ratio_vs_target_only": m["tokens_per_s"] / baseline["tokens_per_s"],
                           "server_cpu_s_per_token": m.get("server_cpu_s_per_token"),
                           "target_only_server_cpu_s_per_token": baseline["server_cpu_s_per_token"],
                           "exact_match": _exact(m["outputs"], reference) if m is not baseline else 1.0,
                           "max_new_tokens": max_new_tokens, "prompts": len(work)}
                    for key in ("alpha", "tau", "rounds", "proactive_hits", "proactive_misses", "pipeline_depth_median",
                                "cpu_s_per_token", "drafted_per_sequence_round", "gamma_asked_median",
                                "first_drafts_s", "solo_tokens", "solo_seconds", "rounds_phase_tokens_per_s"):
                        if key in m:
                            rec[key] = m[key]
                    rec.update(extra)
                    records.append(rec)
                    if progress is not None:
                        progress(rec)

                record("target-only", "shared", base, base)
                shared = speculative(pair.target, work, cfg, eos=pair.eos, drafts=[pair.draft])
                shared["process_cpu_s_per_token"] = shared.pop("cpu_s_per_token")
                record("in-process", "shared", shared, base, process_cpu_s_per_token=shared["process_cpu_s_per_token"])
                if conc == 1:
                    assisted = target_only(pair.target, work, concurrency=1, max_new_tokens=max_new_tokens,
                                           eos=pair.eos, assistant=pair.draft)
                    record("hf-assisted", "shared", assisted, base)
                if layout is None:
                    continue
                with pinned(layout[0], 1):
                    base_split = target_only(pair.target, work, concurrency=conc, max_new_tokens=max_new_tokens,
                                             eos=pair.eos)
                    split = speculative(pair.target, work, cfg, eos=pair.eos, transport=transport)
                split["server_cpu_s_per_token"] = split.pop("cpu_s_per_token")
                record("target-only", "split", base_split, base_split)
                record("emulated-federation", "split", split, base_split,
                       server_cpus=layout[0], device_cpus=layout[1])
    finally:
        if transport is not None:
            transport.close()
    return records


def draft_choice(pair, prompts: list[list[int]], *, reps: int = 2, max_new_tokens: int = 32,
                 quantizations: Sequence[str] = ("int4", "int8")) -> list[dict[str, Any]]:
    """alpha x speed of each draft quantization: the in-process engine at concurrency 1 (strict
    rounds, no drafting ahead: the draft's own cost), interleaved, beside target-only."""
    from ..specs import load_draft_spec

    drafts = {q: load_draft_spec(pair.draft_spec, q).model.eval() for q in quantizations}
    work = workload(prompts, 1)
    cfg = engine_config(pair.vocab_size, 1, max_new_tokens, pipeline_depth="1", draft_ahead=False, adaptive=False)
    records = []
    for rep in range(reps):
        base = target_only(pair.target, work, concurrency=1, max_new_tokens=max_new_tokens, eos=pair.eos)
        for q, model in drafts.items():
            m = speculative(pair.target, work, cfg, eos=pair.eos, drafts=[model])
            records.append({"kind": "draft_choice", "engine": "in-process", "draft_quantization": q, "rep": rep,
                            "concurrency": 1, "tokens_per_s": m["tokens_per_s"], "alpha": m["alpha"], "tau": m["tau"],
                            "ratio_vs_target_only": m["tokens_per_s"] / base["tokens_per_s"],
                            "target_only_tokens_per_s": base["tokens_per_s"],
                            "exact_match": _exact(m["outputs"], base["outputs"])})
    return records


def step_records(pair, prompts: list[list[int]], *, batches: Sequence[int] = (1, 4, 16), reps: int = 5) -> list[dict]:
    """``stepcost`` records: a draft step and a verify step against the bare forward."""
    from .stepcost import step_costs

    out = []
    for cost in step_costs(pair.draft, pair.target, prompts, batches=batches, reps=reps, vocab_size=pair.vocab_size):
        rec = cost.as_record()
        rec.update({"kind": "step_cost", "engine": "in-process"})
        out.append(rec)
    return out


def numerics_records(pair, prompts: list[list[int]], *, batches: Sequence[int] = (1, 4, 16), reps: int = 5,
                     dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """``verify-numerics`` records: a bf16 copy of the target's verify step, batched vs stepwise."""
    import copy

    from .stepcost import numerics_cost

    model = copy.deepcopy(pair.target).to(dtype)
    out = []
    for b in batches:
        rec = numerics_cost(model, prompts, batch=b, reps=reps, vocab_size=pair.vocab_size).as_record()
        rec.update({"kind": "numerics_cost", "engine": "in-process"})
        out.append(rec)
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (engine, layout, concurrency) of tokens/s, ratio and server CPU per token."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("kind") == "engine_comparison":
            groups.setdefault((r["engine"], r["cpu_layout"], r["concurrency"]), []).append(r)
    out = {}
    for (engine, layout, conc), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        def med(key):
            vals = [r[key] for r in rs if r.get(key) is not None]
            return statistics.median(vals) if vals else None
        out[f"{engine}/{layout}/{conc}"] = {
            "engine": engine, "cpu_layout": layout, "concurrency": conc, "reps": len(rs),
            "tokens_per_s": med("tokens_per_s"), "ratio_vs_target_only": med("ratio_vs_target_only"),
            "server_cpu_s_per_token": med("server_cpu_s_per_token"),
            "target_only_server_cpu_s_per_token": med("target_only_server_cpu_s_per_token"),
            "exact_match": med("exact_match"), "proactive_hits": med("proactive_hits"),
            "proactive_misses": med("proactive_misses"), "alpha": med("alpha"), "tau": med("tau"),
            "pipeline_depth_median": med("pipeline_depth_median"),
            "drafted_per_sequence_round": med("drafted_per_sequence_round"),
            "gamma_asked_median": med("gamma_asked_median"), "wall_s": med("wall_s"),
            "first_drafts_s": med("first_drafts_s"), "solo_tokens": med("solo_tokens"),
            "solo_seconds": med("solo_seconds"), "rounds_phase_tokens_per_s": med("rounds_phase_tokens_per_s"),
            "tokens": med("tokens"), "prompts": med("prompts"),
        }
    return out
