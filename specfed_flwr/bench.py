"""``specfed-flwr bench``: every measurement of BENCHMARKS.md, side by side in one process.

One run loads the pair once and measures, on the shipped prompt set:

* **sweeps** (in-process engine, sampling at temperature 1), one axis at a time around the base
  configuration K=8, gamma=4, reconstruction=exact, 2 clients, 1 concurrent sequence:
  K, reconstruction rule (for both draft-sampling modes), gamma, clients, concurrency;
* **fixed prefixes** (paired, no sampling noise): alpha = sum_x min(p, q_hat) and the kept mass
  S for every K and rule, and the exact one-step output law of each scheme -> TV to the target;
  a Monte Carlo run of the engine's own sparsify -> reconstruct -> select -> verify functions at
  one prefix checks that law;
* **engines** (greedy, same prompts, interleaved repetitions, medians): target-only
  ``generate``, transformers' assisted generation with the same pair, the in-process engine
  (1 and 2 clients), batched vs per-sequence verification, the Flower simulation engine
  (``run_simulation`` with ``serve.make_server_app`` and ``client_app.app``) with its per-round
  overhead, and the deployment engine (``launch.start_deployment_stack``, 2 SuperNodes, ``flwr run``)
  with the persistent device runtime and with Flower's stock process-per-message path side by side
  (median strict-round time and median gap between a node's consecutive replies);
* **modeled latency** per link profile for top-K vs full-distribution transmission vs
  target-only, and the Lambert-W gamma* (``theory.optimal_gamma``) against the measured best.

It writes ``<out-dir>/results.json`` (a list of records), ``<out-dir>/analysis.json``,
PNG plots in ``<out-dir>`` and regenerates the markdown report (``--markdown``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np


class _LazyTorch:
    """``torch``, imported on first use: ``specfed-flwr`` builds every sub-command's parser, so this
    module (``build_parser``) must import fast."""

    def __getattr__(self, name: str) -> Any:
        import torch as _torch

        globals()["torch"] = _torch
        return getattr(_torch, name)


torch: Any = _LazyTorch()

log = logging.getLogger("specfed_flwr.bench")

from .config import SpecFedConfig as _Config

DRAFT_QUANTIZATION = _Config.draft_quantization  # the default draft (int4), what users get
BASE = {"k": 8, "gamma": 4, "reconstruction": "exact", "draft_sampling": "sparse", "clients": 2, "concurrency": 1}
LINK_UPLINKS_MBPS = (1.0, 10.0, 100.0)
LINK_RTTS_MS = (20.0, 50.0)
TARGET_PROFILE = (10.0, 20.0)  # the profile the targets are judged at: 10 Mbit/s uplink, 20 ms RTT
REQUIRED_KEYS = (
    "engine", "k", "reconstruction", "gamma", "clients", "concurrency", "alpha", "tau",
    "uplink_bytes_per_position", "compression_vs_fp32", "tokens_per_s", "tv_to_target", "exact_match",
)
# One Ray actor serves both SuperNodes: the simulation hands a node's message to whichever actor is
# free, so with one actor per CPU a node's draft KV caches would live in two processes and the
# strategy falls back to resending whole sequences every round. One actor keeps them warm
# (the two virtual clients then draft one after the other in that process).
FLOWER_BACKEND = {"client_resources": {"num_cpus": 2, "num_gpus": 0.0},
                  "init_args": {"num_cpus": 2, "include_dashboard": False}}


# ---------------------------------------------------------------------------------------------
# presets
# ---------------------------------------------------------------------------------------------

@dataclass
class Preset:
    name: str
    prompts_per_category: int | None  # None: the whole set
    max_new_tokens: int
    ks: tuple[int | str, ...]  # "V" = the whole vocabulary
    reconstructions: tuple[str, ...]
    recon_sampling_modes: tuple[str, ...]
    gammas: tuple[int, ...]
    clients: tuple[int, ...]
    concurrency: tuple[int, ...]
    engine_reps: int
    flower_concurrency: tuple[int, ...]
    flower_per_device: bool
    tv_prefixes: int  # fixed prefixes for the paper-faithful (x-dependent) output law
    mc_samples: int
    bias_vs_k: bool  # paper-faithful bias for every K (uniform rule)
    law_cover: float = 1 - 1e-4  # draft mass the paper-faithful law enumerates (the rest bounds its error)
    law_max_candidates: int = 4096
    deployment_max_new_tokens: int = 16  # a deployment round costs seconds (see docs/DEPLOYMENT_NOTES.md)


# Sizes (prompts, tokens, repetitions, prefixes) are trimmed so that the full preset runs in about half an
# hour on a 2-core CPU; the sweep axes are the issue's. One prompt per category of the shipped set, 32 new
# tokens each (enough for several full rounds at gamma = 10, and for prefill not to dominate the timings).
FULL = Preset("full", 1, 32, (1, 2, 4, 8, 16, 32, 64, "V"), ("uniform", "temperature", "exact"), ("sparse", "full"),
              tuple(range(1, 11)), (1, 2, 3, 4), (1, 4, 16), 3, (16,), False, 6, 1000, False, 1 - 1e-3, 1024, 16)
QUICK = Preset("quick", 1, 6, (1, 8, 64, "V"), ("uniform", "temperature", "exact"), ("sparse", "full"),
               (1, 2, 4, 8), (1, 2), (1, 4, 16), 1, (16,), False, 3, 500, False, 1 - 1e-3, 512, 4)
# --tiny: random tiny Llamas (vocab 1024), token-id prompts; for the unit test of this command
TINY_FULL = replace(FULL, name="tiny", max_new_tokens=16, tv_prefixes=6, mc_samples=2000, engine_reps=2)
TINY_QUICK = replace(QUICK, name="tiny-quick", max_new_tokens=8, ks=(1, 8, "V"), gammas=(1, 2, 4), concurrency=(1, 4),
                     tv_prefixes=3, mc_samples=2000, flower_concurrency=(4,), deployment_max_new_tokens=6)


# ---------------------------------------------------------------------------------------------
# the model pair and the prompts
# ---------------------------------------------------------------------------------------------

@dataclass
class Pair:
    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: Any
    vocab_size: int
    target_spec: str
    draft_spec: str
    target_identity: str
    draft_identity: str
    eos: list[int]
    load_seconds: dict[str, float]


@dataclass
class Workload:
    prompts: list[list[int]]  # token ids (chat template applied)
    categories: list[str]
    texts: list[str | None]


def load_pair(tiny: bool, device: str = "auto") -> Pair:
    from .tokens import default_eos_ids
    from .specs import load_draft_spec, load_target_spec

    t_spec, d_spec = ("tiny:0", "tiny:1") if tiny else ("default", "default")
    target = load_target_spec(t_spec, "cpu" if tiny else device)
    draft = load_draft_spec(d_spec, DRAFT_QUANTIZATION)
    if target.vocab_size != draft.vocab_size:
        raise ValueError(f"target vocabulary {target.vocab_size} != draft vocabulary {draft.vocab_size}")
    tokenizer = target.tokenizer
    return Pair(
        target=target.model.eval(), draft=draft.model.eval(), tokenizer=tokenizer, vocab_size=int(target.vocab_size),
        target_spec=t_spec, draft_spec=d_spec, target_identity=target.identity, draft_identity=draft.identity,
        eos=default_eos_ids(target.model, tokenizer) if not tiny else [],
        load_seconds={"target": target.load_seconds, "draft": draft.load_seconds},
    )


def make_workload(pair: Pair, preset: Preset, tiny: bool) -> Workload:
    if tiny:
        n = 4 if preset.prompts_per_category == 1 else 8
        g = torch.Generator().manual_seed(1234)
        prompts = [torch.randint(0, pair.vocab_size, (int(torch.randint(4, 11, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
        return Workload(prompts, ["random"] * n, [None] * n)
    from .tokens import encode_prompt
    from .prompts import default_prompt_records

    records = default_prompt_records()
    if preset.prompts_per_category is not None:
        seen: dict[str, int] = {}
        chosen = []
        for r in records:
            if seen.get(r["category"], 0) < preset.prompts_per_category:
                chosen.append(r)
                seen[r["category"]] = seen.get(r["category"], 0) + 1
        records = chosen
    prompts = [encode_prompt(pair.tokenizer, r["prompt"], True) for r in records]
    return Workload(prompts, [r["category"] for r in records], [r["prompt"] for r in records])


def cycled(prompts: list[list[int]], n: int) -> list[list[int]]:
    return [prompts[i % len(prompts)] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# machine
# ---------------------------------------------------------------------------------------------

def machine_info(device: str) -> dict[str, Any]:
    import transformers

    try:
        import flwr

        flwr_version = flwr.__version__
    except Exception:  # pragma: no cover - flwr is a dependency
        flwr_version = None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_name = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb,
        "device": f"{device} ({dev_name})",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flwr": flwr_version,
        "numpy": np.__version__,
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


# ---------------------------------------------------------------------------------------------
# instrumentation of the Coordinator (the same code the in-process and Flower engines drive)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Round:
    start: float
    end: float = 0.0
    verify_s: float = 0.0
    server_s: float = 0.0
    draft_s: dict[str, float] = field(default_factory=dict)
    positions: dict[str, int] = field(default_factory=dict)
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    active: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0


class Probe:
    """Records per-round timings and per-position acceptance of every Coordinator in this process.

    Wraps ``Coordinator.plan_round`` / ``complete_round`` (round wall time, the clients'
    ``draft_seconds`` metrics, the RoundReport) and the verification functions the engine
    module calls (per-position accept decisions). Restores everything on exit.
    """

    def __init__(self) -> None:
        self.rounds: list[_Round] = []
        self.accepted_rows: list[np.ndarray] = []  # [B, G] bool per verify call
        self.length_rows: list[np.ndarray] = []  # [B]
        self._open: dict[int, _Round] = {}
        self.padded_rounds = 0

    def __enter__(self) -> "Probe":
        from . import engine
        from .target import TargetVerifier

        self._engine = engine
        self._orig = (engine.Coordinator.plan_cohort, engine.Coordinator.complete_round,
                      engine.verify_greedy, engine.verify_sampling)
        plan, complete, vg, vs = self._orig
        probe = self

        def plan_cohort(coord, *args, **kwargs):
            started = time.perf_counter()
            out = plan(coord, *args, **kwargs)
            probe._open[(id(coord), out.round)] = _Round(start=started)
            return out

        def complete_round(coord, replies, *args, **kwargs):
            report = complete(coord, replies, *args, **kwargs)
            rnd = probe._open.pop((id(coord), report.round), None) or _Round(start=time.perf_counter())
            rnd.end = time.perf_counter()
            metrics = kwargs.get("client_metrics") or {}
            for client, m in metrics.items():
                if client in replies:
                    rnd.draft_s[client] = float(m.get("draft_seconds", 0.0))
                    rnd.positions[client] = int(m.get("positions", int(replies[client].lengths.sum())))
            rnd.verify_s, rnd.server_s = float(report.verify_seconds), float(report.server_seconds)
            rnd.uplink_bytes, rnd.downlink_bytes = int(report.uplink_bytes), int(report.downlink_bytes)
            rnd.active, rnd.drafted, rnd.accepted, rnd.emitted = (
                report.active_sequences, report.drafted, report.accepted, report.emitted)
            probe.rounds.append(rnd)
            return report

        def _record(result, lengths):
            probe.accepted_rows.append(result.accepted.detach().cpu().numpy().astype(bool))
            probe.length_rows.append(lengths.detach().cpu().numpy().astype(np.int64))
            return result

        def verify_greedy(target_logits, draft_tokens, lengths, *a, **kw):
            return _record(vg(target_logits, draft_tokens, lengths, *a, **kw), lengths)

        def verify_sampling(target_probs, draft_probs, draft_tokens, lengths, *a, **kw):
            return _record(vs(target_probs, draft_probs, draft_tokens, lengths, *a, **kw), lengths)

        # Shim for a Coordinator._verify bug (consensus paths that end before every client's draft
        # leave the target logits shorter than the drafted length): pad the logits to the drafted
        # length + 1. Padded positions lie beyond every path, so verification never reads them.
        # A no-op once the engine pads (or trims) itself.
        select = engine.select_draft_path
        score_batch = TargetVerifier.score_batch
        drafted_len: dict[str, int] = {}

        def select_draft_path(client_tokens, *a, **kw):
            drafted_len["g"] = int(client_tokens.shape[-1])
            return select(client_tokens, *a, **kw)

        def padded_score_batch(verifier, seq_ids, paths, *a, **kw):
            logits = score_batch(verifier, seq_ids, paths, *a, **kw)
            need = drafted_len.pop("g", 0) + 1
            if logits.dim() == 3 and logits.shape[1] < need:
                pad = torch.zeros((logits.shape[0], need - logits.shape[1], logits.shape[2]), dtype=logits.dtype)
                logits = torch.cat([logits, pad], dim=1)
                probe.padded_rounds += 1
            return logits

        self._orig_shim = (select, score_batch)
        engine.Coordinator.plan_cohort = plan_cohort
        engine.Coordinator.complete_round = complete_round
        engine.verify_greedy = verify_greedy
        engine.verify_sampling = verify_sampling
        engine.select_draft_path = select_draft_path
        TargetVerifier.score_batch = padded_score_batch
        return self

    def __exit__(self, *exc) -> None:
        from .target import TargetVerifier

        engine = self._engine
        (engine.Coordinator.plan_cohort, engine.Coordinator.complete_round,
         engine.verify_greedy, engine.verify_sampling) = self._orig
        engine.select_draft_path, TargetVerifier.score_batch = self._orig_shim

    @staticmethod
    def _full_rounds(rounds, wall, draft, draft_max, gamma) -> dict[str, Any]:
        if not gamma:
            return {}
        full = np.array([r.active > 0 and r.drafted == gamma * r.active for r in rounds])
        if not full.any():
            return {"full_rounds": 0}
        return {"full_rounds": int(full.sum()), "round_s_full_mean": float(wall[full].mean()),
                "parallel_round_s_full_mean": float((wall - draft + draft_max)[full].mean())}

    # ---- derived numbers ----------------------------------------------------------------------
    def per_position(self, g_max: int) -> tuple[list[float | None], list[float | None]]:
        """(conditional acceptance P(accept j | j tested), reach P(accept j | j drafted)) per position."""
        cond: list[float | None] = []
        reach: list[float | None] = []
        for j in range(g_max):
            tested = acc = drafted = 0
            for a, lens in zip(self.accepted_rows, self.length_rows):
                if a.shape[1] <= j:
                    continue
                has = lens > j
                prev_ok = a[:, j - 1] if j > 0 else np.ones(len(lens), dtype=bool)
                drafted += int(has.sum())
                tested += int((has & prev_ok).sum())
                acc += int((has & a[:, j]).sum())
            cond.append(acc / tested if tested else None)
            reach.append(acc / drafted if drafted else None)
        return cond, reach

    def steady_tau(self, gamma: int) -> float | None:
        """Mean tokens per sequence-round over the rounds that drafted the full gamma (the last rounds of
        an answer draft less: its token budget cuts them), i.e. the tau the i.i.d. theory describes."""
        n = tot = 0
        for a, lens in zip(self.accepted_rows, self.length_rows):
            full = lens == gamma
            if gamma > 0 and a.shape[1] >= gamma:
                tot += int((a[full].sum(axis=1) + 1).sum())
                n += int(full.sum())
        return tot / n if n else None

    def timing(self, parallel_clients: bool, gamma: int | None = None) -> dict[str, Any]:
        rounds = [r for r in self.rounds if r.end > 0]
        if not rounds:
            return {}
        wall = np.array([r.end - r.start for r in rounds])
        verify = np.array([r.verify_s for r in rounds])
        server = np.array([r.server_s for r in rounds])
        draft = np.array([(max(r.draft_s.values()) if parallel_clients else sum(r.draft_s.values())) if r.draft_s else 0.0
                          for r in rounds])
        draft_max = np.array([max(r.draft_s.values()) if r.draft_s else 0.0 for r in rounds])
        overhead = np.maximum(wall - verify - draft, 0.0)  # the issue's definition
        positions = sum(sum(r.positions.values()) for r in rounds)
        draft_total = sum(sum(r.draft_s.values()) for r in rounds)
        per_client_rounds = [len(r.draft_s) for r in rounds]
        return {
            "rounds": len(rounds),
            "decode_wall_s": float(rounds[-1].end - rounds[0].start),
            "round_s_median": float(np.median(wall)),
            "round_s_mean": float(wall.mean()),
            "verify_s_per_round": float(verify.mean()),
            "server_other_s_per_round": float((server - verify).mean()),
            "draft_s_per_round": float(draft.mean()),
            "draft_max_s_per_round": float(draft_max.mean()),
            # the round if every client drafted on its own device, in parallel (max instead of sum)
            "parallel_round_s_mean": float((wall - draft + draft_max).mean()),
            # the same over the rounds where every active sequence drafted the full gamma
            **self._full_rounds(rounds, wall, draft, draft_max, gamma),
            "draft_s_per_position": draft_total / positions if positions else None,
            "engine_overhead_s_per_round": float(np.median(overhead)),
            "engine_overhead_s_per_round_mean": float(overhead.mean()),
            "engine_overhead_share": float(overhead.sum() / wall.sum()) if wall.sum() > 0 else None,
            "transport_overhead_s_per_round": float(np.median(np.maximum(wall - server - draft, 0.0))),
            "uplink_bytes_per_round_per_client": float(np.mean([r.uplink_bytes / max(1, len(r.draft_s)) for r in rounds])),
            "downlink_bytes_per_round_per_client": float(np.mean([r.downlink_bytes / max(1, len(r.draft_s)) for r in rounds])),
            "clients_replied_per_round": float(np.mean(per_client_rounds)),
        }


# ---------------------------------------------------------------------------------------------
# running the engines
# ---------------------------------------------------------------------------------------------

def _inference_mode(fn: Callable) -> Callable:
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


def _k_value(k: int | str, vocab: int) -> int:
    return vocab if k == "V" else min(int(k), vocab)


def make_config(vocab: int, *, k: int, gamma: int, reconstruction: str, draft_sampling: str, concurrency: int,
                temperature: float, max_new_tokens: int, mode: str = "collaborative", seed: int = 0,
                pipeline_depth: str = "1", draft_ahead: bool = False):
    """The sweeps measure the protocol's parameters in strict rounds without drafting ahead (the
    round-cost model T = a*gamma + b); the engine comparison (``fedbench``) measures the pipeline."""
    from .config import SpecFedConfig

    return SpecFedConfig(
        pipeline_depth=pipeline_depth, draft_ahead=draft_ahead,
        target="bench", draft="bench", top_k=k, max_k=max(64, k), draft_length=gamma, max_gamma=max(16, gamma),
        reconstruction=reconstruction, draft_sampling=draft_sampling, temperature=temperature,
        max_new_tokens=max_new_tokens, max_active_sequences=concurrency, chat_template=False, seed=seed,
        mode=mode, max_reply_bytes=max(8_000_000, 64 * 4 * vocab * max(1, concurrency) * max(16, gamma)),
    ).validate()


def _exact_match(outputs: list[list[int]], references: list[list[int]] | None) -> float | None:
    if references is None:
        return None
    hits = [out == references[i % len(references)] for i, out in enumerate(outputs)]
    return sum(hits) / len(hits) if hits else None


def run_inprocess(pair: Pair, prompts: list[list[int]], cfg, clients: int, *, batched: bool = True,
                  batched_draft: bool = True, references: list[list[int]] | None = None) -> dict[str, Any]:
    """``batched``: one padded target forward per round for all sequences (else one per sequence);
    ``batched_draft``: each client drafts all its sequences in one forward per draft step (else a loop)."""
    from .client_core import DraftClient
    from .inprocess import InProcessEngine
    from .proposer import HFDraftProposer
    from .target import TargetVerifier

    if batched_draft:
        engine = InProcessEngine(pair.target, [pair.draft] * clients, cfg, tokenizer=None, eos_token_ids=pair.eos,
                                 vocab_size=pair.vocab_size)
    else:
        drafters = {f"drafter-{i}": DraftClient(HFDraftProposer(pair.draft, vocab_size=pair.vocab_size, batched=False),
                                                max_k=cfg.max_k, max_gamma=cfg.max_gamma) for i in range(clients)}
        engine = InProcessEngine(pair.target, [], cfg, tokenizer=None, eos_token_ids=pair.eos, clients=drafters,
                                 vocab_size=pair.vocab_size)
    if not batched:
        engine.target = TargetVerifier(pair.target, vocab_size=pair.vocab_size, batched=False)
    with Probe() as probe:
        result = engine.generate(prompts)
    outputs = [s.token_ids for s in result.sequences]
    m = _run_metrics(result.metrics, probe, cfg, clients, parallel=False, outputs=outputs,
                     references=references if cfg.greedy else None, batched=bool(engine.target.batched))
    m["batched_draft"] = all(bool(getattr(c.proposer, "batched", False)) for c in engine.clients.values())
    return m


def _run_metrics(summary: dict[str, Any], probe: Probe, cfg, clients: int, *, parallel: bool,
                 outputs: list[list[int]], references, batched: bool) -> dict[str, Any]:
    timing = probe.timing(parallel_clients=parallel, gamma=cfg.draft_length)
    cond, reach = probe.per_position(cfg.draft_length)
    tokens = int(summary["tokens"])
    decode_wall = timing.get("decode_wall_s") or summary["wall_seconds"]
    accepted = int(summary.get("accepted") or 0)
    uplink = int(summary.get("uplink_bytes") or 0)
    return {
        "k": cfg.top_k,
        "reconstruction": cfg.reconstruction,
        "draft_sampling": cfg.draft_sampling,
        "selection": cfg.selection_scheme(),
        "gamma": cfg.draft_length,
        "clients": clients,
        "concurrency": cfg.max_active_sequences,
        "mode": cfg.mode,
        "temperature": cfg.temperature,
        "sequences": summary["sequences"],
        "tokens": tokens,
        "alpha": summary.get("alpha"),
        "tau": summary.get("tau"),
        "tau_full_rounds": probe.steady_tau(cfg.draft_length),
        "acceptance_rate": summary.get("acceptance_rate"),
        "per_position_acceptance": cond,
        "per_position_reach": reach,
        "uplink_bytes_per_position": summary.get("uplink_bytes_per_position"),
        "uplink_bytes_per_accepted_token": uplink / accepted if accepted else None,
        "uplink_bytes_per_token": summary.get("uplink_bytes_per_token"),
        "downlink_bytes_per_token": (summary.get("downlink_bytes") or 0) / tokens if tokens else None,
        # the top-K arrays alone (K ids + K float16 probabilities per position): what replaces one
        # dense distribution; compression_vs_fp32/fp16 are measured on it (the engine's definition)
        "topk_bytes_per_position": summary.get("topk_bytes_per_position"),
        "compression_vs_fp32": summary.get("compression_vs_fp32"),
        "compression_vs_fp16": summary.get("compression_vs_fp16"),
        # all-in: every uplink byte (per-sequence headers and padding included)
        "compression_vs_fp32_all_in": summary.get("compression_vs_fp32_all_in"),
        "compression_vs_fp16_all_in": (summary["compression_vs_fp32_all_in"] / 2
                                       if summary.get("compression_vs_fp32_all_in") else None),
        "tokens_per_s": tokens / decode_wall if decode_wall else None,
        "wall_s": decode_wall,
        "wall_incl_setup_s": summary.get("wall_seconds"),
        "batched_verify": batched,
        "exact_match": _exact_match(outputs, references),
        "shim_padded_rounds": probe.padded_rounds,
        **timing,
    }


def hf_generate(pair: Pair, prompt: list[int], max_new_tokens: int, assistant: torch.nn.Module | None = None) -> list[int]:
    x = torch.tensor([prompt], dtype=torch.long, device=next(pair.target.parameters()).device)
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(x), "max_new_tokens": max_new_tokens, "do_sample": False,
        "pad_token_id": (pair.eos[0] if pair.eos else 0), "eos_token_id": (pair.eos or None),
    }
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    with torch.inference_mode():
        out = pair.target.generate(x, **kwargs)
    return out[0, len(prompt):].tolist()


def run_hf(pair: Pair, prompts: list[list[int]], max_new_tokens: int, *, assisted: bool) -> dict[str, Any]:
    outputs, started = [], time.perf_counter()
    for p in prompts:
        outputs.append(hf_generate(pair, p, max_new_tokens, pair.draft if assisted else None))
    wall = time.perf_counter() - started
    tokens = sum(len(o) for o in outputs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else None, "outputs": outputs}


def run_flower(pair: Pair, prompts: list[list[int]], *, clients: int, concurrency: int, max_new_tokens: int,
               mode: str = "collaborative", references=None, device: str = "auto", pipelined: bool = True) -> dict[str, Any]:
    """The Flower simulation engine (``run_simulation``); ``pipelined``: the run config's defaults
    (cohorts in flight, drafting ahead), else strict rounds."""
    from flwr.simulation import run_simulation

    from .client_app import app as client_app
    from .serve import make_server_app

    with tempfile.TemporaryDirectory(prefix="specfed-bench-") as tmp:
        overrides = {
            "target": pair.target_spec, "draft": pair.draft_spec, "draft-quantization": DRAFT_QUANTIZATION,
            "device": "cpu" if pair.target_spec.startswith("tiny") else device,
            "chat-template": False, "results": str(Path(tmp) / "results.jsonl"), "resume": False,
            "max-new-tokens": max_new_tokens, "max-active-sequences": concurrency, "top-k": BASE["k"],
            "draft-length": BASE["gamma"], "reconstruction": BASE["reconstruction"], "temperature": 0.0,
            "min-nodes": clients, "mode": mode, "round-timeout": 300.0,
        }
        if not pipelined:
            overrides.update({"pipeline-depth": "1", "draft-ahead": False})
        captured: dict[str, Any] = {}
        server_app = make_server_app(overrides, prompts=prompts, on_result=lambda r: captured.update(result=r))
        started = time.perf_counter()
        with Probe() as probe, _quiet_flower():
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                           backend_config=FLOWER_BACKEND)
        total = time.perf_counter() - started
    if "result" not in captured:
        raise RuntimeError("the Flower ServerApp did not finish (see the log above)")
    result = captured["result"]
    cfg = make_config(pair.vocab_size, k=BASE["k"], gamma=BASE["gamma"], reconstruction=BASE["reconstruction"],
                      draft_sampling="sparse", concurrency=concurrency, temperature=0.0, max_new_tokens=max_new_tokens,
                      mode=mode)
    outputs = [s.token_ids for s in result.sequences]
    # clients draft in parallel only if the simulation has an actor for each of them
    actors = int(FLOWER_BACKEND["init_args"]["num_cpus"] // FLOWER_BACKEND["client_resources"]["num_cpus"])
    metrics = _run_metrics(result.summary, probe, cfg, clients, parallel=actors >= clients, outputs=outputs,
                           references=references, batched=True)
    metrics["flower_actors"] = actors
    metrics["simulation_total_s"] = total
    metrics["faults"] = {c: len(f) for c, f in result.faults.items()}
    metrics["draft_loads"] = result.summary.get("draft_loads")
    metrics["proactive_hits"] = result.summary.get("proactive_hits")
    metrics["proactive_misses"] = result.summary.get("proactive_misses")
    metrics["resyncs_after_round_1"] = sum(
        sum(1 for r in c.get("resync_rounds", []) if r > 1) for c in result.summary.get("clients", {}).values())
    metrics["pipelined"] = pipelined
    return metrics


def app_dir() -> Path | None:
    """The Flower app (this repository's pyproject.toml with [tool.flwr.app]), or None when the
    package runs from an installed wheel without the repository."""
    root = Path(__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    with contextlib.suppress(OSError):
        if "[tool.flwr.app]" in pyproject.read_text():
            return root
    return None


def _reply_gaps(reply_times: dict[str, list[float]]) -> list[float]:
    """Gaps between each node's consecutive draft replies (as the server pulled them), pooled."""
    gaps: list[float] = []
    for times in (reply_times or {}).values():
        gaps += [b - a for a, b in zip(times, times[1:])]
    return gaps


def run_deployment(pair: Pair, prompts: list[list[int]], *, clients: int, concurrency: int, max_new_tokens: int,
                   references=None, device: str = "auto", timeout: float = 900.0,
                   runtime: str = "persistent", pipelined: bool = False) -> dict[str, Any]:
    """The same app on Flower's DEPLOYMENT engine: ``launch.start_deployment_stack`` (a real SuperLink,
    ``clients`` real SuperNodes) and ``flwr run``, with ``runtime="persistent"`` (one ``specfed-flwr
    device-runtime`` per SuperNode: one warm ClientApp process for all messages) or ``"stock"``
    (Flower's new ``flwr-clientapp`` process per message, SuperExec poll 0.1 s). ``pipelined`` False:
    strict rounds (``pipeline-depth=1``, no drafting ahead: the next round's messages go out after
    every reply of this one is in); True: the run config's defaults (cohorts in flight, drafting ahead).

    ``round_s_median``: median wall time of one round as the ServerApp measured it (push, wait for the
    replies, verify, commit); ``reply_gap_s_median``: median gap between a node's consecutive replies.
    The ServerApp runs in its own process, so the rest comes from the run summary's totals: round =
    decode wall / (rounds + 1) (the wall includes waiting for the nodes and the handshake, one more
    exchange), overhead = round - verify - the slowest client's draft time."""
    from .launch import flwr_run, start_deployment_stack
    from .serve import summary_path_for

    root = app_dir()
    if root is None:
        raise RuntimeError("the Flower app (repository pyproject.toml) was not found")
    with tempfile.TemporaryDirectory(prefix="specfed-bench-dep-") as tmp:
        tmp_p = Path(tmp)
        prompt_file = tmp_p / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
        results = tmp_p / "results.jsonl"
        run_cfg = {
            "target": pair.target_spec, "draft": pair.draft_spec, "draft-quantization": DRAFT_QUANTIZATION,
            "device": "cpu" if pair.target_spec.startswith("tiny") else device,
            "chat-template": False, "prompts": str(prompt_file), "results": str(results), "resume": False,
            "max-new-tokens": max_new_tokens, "max-active-sequences": concurrency, "top-k": BASE["k"],
            "draft-length": BASE["gamma"], "reconstruction": BASE["reconstruction"], "temperature": 0.0,
            "min-nodes": clients, "round-timeout": 120.0, "node-wait-timeout": 120.0,
        }
        if not pipelined:
            run_cfg.update({"pipeline-depth": "1", "draft-ahead": False})
        started = time.perf_counter()
        stack = start_deployment_stack(clients, log_dir=tmp_p / "logs", runtime=runtime)
        try:
            stack_s = time.perf_counter() - started
            rc = flwr_run(stack, root, run_cfg, stream=False, timeout=timeout)
            if rc != 0:
                tail = stack.last_run.log_path.read_text()[-2000:] if stack.last_run else ""
                raise RuntimeError(f"flwr run failed (rc={rc}): {tail}")
            run_s = stack.last_run.elapsed_s
        finally:
            stack.stop()
        summary = json.loads(summary_path_for(results).read_text())
        records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    outputs = [r["token_ids"] for r in sorted(records, key=lambda r: r["index"])]
    rounds = int(summary.get("rounds") or 0)
    wall = float(summary["wall_seconds"])
    verify = float(summary.get("verify_seconds") or 0.0)
    drafts = [float(c.get("draft_seconds") or 0.0) for c in (summary.get("clients") or {}).values()]
    # the handshake is one more message exchange through the same engine: per exchange = wall / (rounds + 1)
    exchanges = rounds + 1
    round_s = wall / exchanges if rounds else None
    overhead = max(0.0, wall - verify - max(drafts, default=0.0)) / exchanges if rounds else None
    walls = [float(x) for x in summary.get("round_wall_seconds") or []]
    gaps = _reply_gaps(summary.get("reply_times") or {})
    return {
        "runtime": runtime, "pipelined": pipelined,
        "proactive_hits": summary.get("proactive_hits"), "proactive_misses": summary.get("proactive_misses"),
        "round_s_median": statistics.median(walls) if walls else None,
        "round_s_all": walls,
        "reply_gap_s_median": statistics.median(gaps) if gaps else None,
        "reply_gaps": len(gaps),
        # distinct ClientApp processes that answered each node (handshake included): 1 = warm for the run
        "clientapp_processes_per_node": {n: len(c) for n, c in (summary.get("reply_pids") or {}).items()},
        "server_poll_s": summary.get("poll_interval"),
        "k": BASE["k"], "reconstruction": BASE["reconstruction"], "draft_sampling": "sparse", "gamma": BASE["gamma"],
        "clients": clients, "concurrency": concurrency, "mode": "collaborative", "temperature": 0.0,
        "sequences": summary.get("sequences"), "tokens": int(summary["tokens"]),
        "alpha": summary.get("alpha"), "tau": summary.get("tau"), "acceptance_rate": summary.get("acceptance_rate"),
        "uplink_bytes_per_position": summary.get("uplink_bytes_per_position"),
        "topk_bytes_per_position": summary.get("topk_bytes_per_position"),
        "compression_vs_fp32": summary.get("compression_vs_fp32"),
        "compression_vs_fp16": summary.get("compression_vs_fp16"),
        "compression_vs_fp32_all_in": summary.get("compression_vs_fp32_all_in"),
        "tokens_per_s": int(summary["tokens"]) / wall if wall else None,
        "wall_s": wall, "rounds": rounds, "round_s_mean": round_s,
        "verify_s_per_round": verify / exchanges if rounds else None,
        "draft_max_s_per_round": max(drafts, default=0.0) / exchanges if rounds else None,
        "draft_s_per_round": sum(drafts) / exchanges if rounds else None,
        "engine_overhead_s_per_round": overhead, "engine_overhead_s_per_round_mean": overhead,
        "engine_overhead_share": overhead / round_s if round_s else None,
        "stack_start_s": stack_s, "flwr_run_s": run_s,
        "draft_loads": summary.get("draft_loads"), "ephemeral_nodes": summary.get("ephemeral_nodes"),
        "faults": {c: len(v.get("faults") or []) for c, v in (summary.get("clients") or {}).items()},
        "exact_match": _exact_match(outputs, references),
        "batched_verify": True,
    }


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower logs every round at INFO; keep warnings only while a benchmark runs."""
    loggers = [logging.getLogger(n) for n in ("flwr", "specfed_flwr")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


# ---------------------------------------------------------------------------------------------
# fixed prefixes: paired alpha, kept mass, exact one-step output law (TV), Monte Carlo check
# ---------------------------------------------------------------------------------------------

@dataclass
class Prefixes:
    p: torch.Tensor  # [M, V] target softmax at temperature 1
    q: torch.Tensor  # [M, V] draft softmax at temperature 1
    where: list[tuple[int, int]]  # (prompt index, generated tokens before the prefix)


@_inference_mode
def collect_prefixes(pair: Pair, prompts: list[list[int]], continuations: list[list[int]]) -> Prefixes:
    """Target and draft next-token distributions at every position of the target's greedy continuation."""
    ps, qs, where = [], [], []
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        seq = prompt + cont[:-1] if cont else prompt
        x = torch.tensor([seq], dtype=torch.long)
        n = max(1, len(cont))
        lt = pair.target(input_ids=x.to(next(pair.target.parameters()).device)).logits[0, -n:, : pair.vocab_size]
        ld = pair.draft(input_ids=x).logits[0, -n:, : pair.vocab_size]
        ps.append(torch.softmax(lt.float().cpu(), dim=-1))
        qs.append(torch.softmax(ld.float().cpu(), dim=-1))
        where += [(i, j) for j in range(n)]
    return Prefixes(torch.cat(ps), torch.cat(qs), where)


def _topk_reply(q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a device sends for q [N, V] (greedy sparsify: top-K ids, float16 probabilities)."""
    from .proposer import sparsify

    ids, probs, _ = sparsify(q, k, "greedy")
    return ids, probs.float()


def fixed_prefix_alpha(pre: Prefixes, k: int, rules: Sequence[str], chunk: int = 64) -> dict[str, Any]:
    """Mean alpha = sum_x min(p, q_hat) per rule, mean kept mass S and mean TV(q, q_hat) per rule."""
    from .reconstruction import reconstruct

    v = pre.p.shape[1]
    alpha = {r: 0.0 for r in rules}
    tv_q = {r: 0.0 for r in rules}
    kept = 0.0
    m = pre.p.shape[0]
    for s in range(0, m, chunk):
        p, q = pre.p[s:s + chunk], pre.q[s:s + chunk]
        ids, probs = _topk_reply(q, k)
        kept += float(q.gather(1, ids).sum())
        for r in rules:
            qh = reconstruct(ids, probs, v, r)
            alpha[r] += float(torch.minimum(p, qh).sum())
            tv_q[r] += float(0.5 * (q - qh).abs().sum())
    return {
        "alpha": {r: alpha[r] / m for r in rules},
        "alpha_full_q": float(torch.minimum(pre.p, pre.q).sum(dim=1).mean()),
        "kept_mass": kept / m,
        "tv_q_qhat": {r: tv_q[r] / m for r in rules},
        "prefixes": m,
    }


def _law_fixed_q(p: torch.Tensor, r: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
    """Exact one-step law when the draft token ~ r and the accept test uses qt (rows = prefixes)."""
    from .theory import one_step_output_law

    return torch.from_numpy(one_step_output_law(p.double().numpy(), r.double().numpy(), qt.double().numpy()))


@_inference_mode
def output_law(p: torch.Tensor, q: torch.Tensor, k: int, rule: str, sampling: str, *, cover: float = 1 - 1e-4,
               max_candidates: int = 4096, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """Exact law of the first token one speculative step emits at one prefix (1 client), and the
    draft mass left out of the enumeration (an upper bound on the law's error in TV).

    ``sparse``: the device samples from the renormalised float16 top-K it sends; the server then
    either verifies that token against q_hat (``exact`` rule: q_hat is that very distribution) or
    samples its own draft from q_hat (``consensus``, the other rules) -- both: law(x) from
    (r = q_hat, test = q_hat). ``full`` (paper-faithful): the token x ~ q (full draft softmax);
    the reply is the top-K with x in the last slot when it is outside, so q_hat depends on x; the
    law is enumerated over x (the most likely tokens covering ``cover`` of q).
    """
    from .reconstruction import reconstruct

    v = p.shape[-1]
    p64 = p.double()
    ids, probs = _topk_reply(q[None], k)
    qhat = reconstruct(ids, probs, v, rule)[0]
    if sampling == "sparse":
        return _law_fixed_q(p[None], qhat[None], qhat[None])[0], 0.0
    order = torch.argsort(q, descending=True)
    csum = torch.cumsum(q[order].double(), 0)
    n_cand = int(min(max_candidates, max(k, int(torch.searchsorted(csum, cover)) + 1), v))
    cand = order[:n_cand]
    law = torch.zeros(v, dtype=torch.float64)
    top_ids = ids[0]
    kk = top_ids.numel()
    # tokens inside the top-K: the reply (hence q_hat) is the same for all of them
    inside = top_ids
    res_base = torch.clamp(p64 - qhat.double(), min=0)
    z = res_base.sum()
    res_base = res_base / z if z > 0 else p64
    qx = q[inside].double()
    acc = torch.clamp(p64[inside] / qhat[inside].double().clamp_min(1e-300), max=1.0)
    law.index_add_(0, inside, qx * acc)
    law += float((qx * (1 - acc)).sum()) * res_base
    # tokens outside: top-(K-1) plus x in the last slot
    outside = cand[~torch.isin(cand, top_ids)]
    for s in range(0, outside.numel(), chunk):
        xs = outside[s:s + chunk]
        n = xs.numel()
        ids_x = top_ids.expand(n, kk).clone()
        probs_x = probs[0].expand(n, kk).clone()
        ids_x[:, kk - 1] = xs
        probs_x[:, kk - 1] = q[xs].to(torch.float16).float().clamp_min(float(np.finfo(np.float16).smallest_subnormal))
        qh = reconstruct(ids_x, probs_x, v, rule).double()
        qhx = qh.gather(1, xs[:, None]).squeeze(1)
        a = torch.clamp(p64[xs] / qhx.clamp_min(1e-300), max=1.0)
        res = torch.clamp(p64[None] - qh, min=0)
        zr = res.sum(dim=1, keepdim=True)
        res = torch.where(zr > 0, res / zr.clamp_min(1e-300), p64[None].expand_as(res))
        w = q[xs].double()
        law.index_add_(0, xs, w * a)
        law += ((w * (1 - a))[:, None] * res).sum(dim=0)
    left = max(0.0, 1.0 - float(q[top_ids].double().sum()) - float(q[outside].double().sum()))
    law += left * p64  # the draft mass not enumerated: attributed to p (error <= left in TV)
    return law, left


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(0.5 * (a.double() - b.double()).abs().sum())


@_inference_mode
def monte_carlo_first_token(p: torch.Tensor, q: torch.Tensor, k: int, rule: str, sampling: str, n: int,
                            seed: int = 0, chunk: int = 512) -> torch.Tensor:
    """Histogram of the first emitted token over n independent one-step runs of the engine's own
    functions (sparsify -> reconstruct -> select_draft_path -> verify_sampling), 1 client."""
    from .aggregation import select_draft_path
    from .proposer import sparsify
    from .reconstruction import reconstruct
    from .verification import verify_sampling

    cfg = make_config(p.shape[-1], k=k, gamma=1, reconstruction=rule, draft_sampling=sampling, concurrency=1,
                      temperature=1.0, max_new_tokens=2)
    scheme = cfg.selection_scheme()
    gen = torch.Generator().manual_seed(seed)
    v = p.shape[-1]
    counts = torch.zeros(v, dtype=torch.float64)
    target = torch.stack([p, p])[None]  # [1, 2, V]
    done = 0
    while done < n:
        c = min(chunk, n - done)
        ids, probs16, drafted = sparsify(q.expand(c, v), k, sampling, gen)
        qh = reconstruct(ids, probs16.float(), v, rule)
        path = select_draft_path(drafted.view(c, 1, 1), qh.view(c, 1, 1, v), torch.ones((c, 1), dtype=torch.long),
                                 torch.ones(1), scheme, gen)
        res = verify_sampling(target.expand(c, 2, v), path.q_bar, path.tokens, path.lengths, gen)
        counts.index_add_(0, res.tokens[:, 0], torch.ones(c, dtype=torch.float64))
        done += c
    return counts / n


def noise_floor(p: torch.Tensor, n: int, reps: int = 3, seed: int = 1) -> float:
    """Median TV between an n-sample histogram drawn from p itself and p (the Monte Carlo floor)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(reps):
        draws = torch.multinomial(p, n, replacement=True, generator=gen)
        hist = torch.bincount(draws, minlength=p.numel()).double() / n
        out.append(tv(hist, p))
    return float(statistics.median(out))


# ---------------------------------------------------------------------------------------------
# modeled latency and theory
# ---------------------------------------------------------------------------------------------

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


def _tau_ss(r: dict[str, Any]) -> float:
    """Steady-state tau (full-gamma rounds), else the run's tau."""
    return r.get("tau_full_rounds") or r["tau"]


def _get(r: dict[str, Any], key: str, fallback: str) -> float:
    return r.get(key) if r.get(key) is not None else r[fallback]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares y = a*x + b."""
    a, b = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(a), float(b)


# ---------------------------------------------------------------------------------------------
# the benchmark run
# ---------------------------------------------------------------------------------------------

class _PairInfo:
    """What the report needs of the pair when it is rebuilt from analysis.json (no models loaded)."""

    def __init__(self, models: dict[str, Any]):
        self.vocab_size = int(models["vocab_size"])
        self.target_identity, self.draft_identity = models["target"], models["draft"]


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tiny = bool(args.tiny)
        self.preset = (TINY_QUICK if args.quick else TINY_FULL) if self.tiny else (QUICK if args.quick else FULL)
        self.out_dir = Path(args.out_dir)
        self.records: list[dict[str, Any]] = []
        self.analysis: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.bar = None
        self.load_samples: list[float] = []

    # ---- helpers -------------------------------------------------------------------------------
    def _record(self, kind: str, engine: str, values: dict[str, Any], **extra: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {key: None for key in REQUIRED_KEYS}
        rec.update({"kind": kind, "engine": engine, "preset": self.preset.name})
        rec.update(values)
        rec.update(extra)
        rec.setdefault("tv_to_target", None)
        rec.setdefault("exact_match", None)
        self.records.append(rec)
        return rec

    def _step(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc[:48])

    def _advance(self) -> None:
        self._sample_load()
        if self.bar is not None:
            self.bar.update(1)

    def _sample_load(self) -> None:
        """The 1-minute load average after every job: the machine may be shared (reported in the markdown)."""
        load = _loadavg()
        if load:
            self.load_samples.append(load[0])

    # ---- plan --------------------------------------------------------------------------------
    def sweep_configs(self) -> list[tuple[str, dict[str, Any]]]:
        """One axis at a time around BASE; the base configuration runs once (axis 'base')."""
        pr = self.preset
        out: list[tuple[str, dict[str, Any]]] = [("base", dict(BASE))]
        seen = {tuple(sorted(BASE.items()))}

        def add(axis: str, **change: Any) -> None:
            cfg = dict(BASE, **change)
            key = tuple(sorted(cfg.items()))
            if key not in seen:
                seen.add(key)
                out.append((axis, cfg))

        for k in pr.ks:
            add("k", k=k)
        for mode in pr.recon_sampling_modes:
            for rule in pr.reconstructions:
                add("reconstruction", reconstruction=rule, draft_sampling=mode)
        for g in pr.gammas:
            add("gamma", gamma=g)
        for c in pr.clients:
            add("clients", clients=c)
        for c in pr.concurrency:
            add("concurrency", concurrency=c)
        return out

    # ---- main --------------------------------------------------------------------------------
    def run(self) -> int:
        from tqdm.auto import tqdm

        pr = self.preset
        device = self.args.device
        self.machine = machine_info("cpu" if self.tiny else device)
        log.info("loading the model pair (%s)", "tiny:0 / tiny:1" if self.tiny else "embedded default")
        self.pair = load_pair(self.tiny, device)
        self.work = make_workload(self.pair, pr, self.tiny)
        sweeps = self.sweep_configs()
        n_jobs = 2 + pr.engine_reps * 4 + 3 + len(sweeps) + 3 + 1 + (0 if self.args.no_flower else
                                                                   len(pr.flower_concurrency) + int(pr.flower_per_device)
                                                                   + len(Bench.DEPLOYMENT_RUNS)
                                                                   * int(not self.args.no_deployment))
        self.bar = tqdm(total=n_jobs, desc="bench", unit="job", file=sys.stderr, mininterval=0.5,
                        disable=self.args.no_progress)
        try:
            self._warmup()
            self._engines()
            self._fixed_prefixes()
            self._sweeps(sweeps)
            self._concurrency_engines()
            if not self.args.no_flower:
                self._flower()
            else:
                self.analysis["flower"] = "skipped (--no-flower)"
            self._deployment()
            self._model_and_theory()
            if not self.args.no_federation:
                self._federation()
        finally:
            self.bar.close()
        self.machine["loadavg_end"] = _loadavg()
        if self.load_samples:
            self.machine["load_1min_during_run"] = {
                "samples": len(self.load_samples), "mean": round(statistics.mean(self.load_samples), 2),
                "min": round(min(self.load_samples), 2), "max": round(max(self.load_samples), 2)}
        self.analysis["bench_seconds"] = time.perf_counter() - self.started
        self._targets()
        self._write()
        return 0

    # ---- pipelined rounds, the emulated federation, step costs (fedbench) -------------------
    #: the bars of the pipelining and device-runtime issues, judged on this run's medians
    FEDERATION_TARGETS = {
        ("emulated-federation", "split", 4): 1.8, ("emulated-federation", "split", 16): 1.3,
        ("emulated-federation", "split", 1): 1.5, ("in-process", "shared", 16): 1.0,
    }
    STEP_TARGET_RATIO = 1.15

    def _federation(self) -> None:
        from . import fedbench

        pr = self.preset
        tokens = pr.max_new_tokens
        reps = 1 if "quick" in pr.name else 2
        out: dict[str, Any] = {}
        self._step("step costs")
        steps = self._add(fedbench.step_records(self.pair, self.work.prompts, reps=3 if "quick" in pr.name else 5))
        out["steps"] = steps
        if not self.tiny:
            self._step("draft choice")
            choice = self._add(fedbench.draft_choice(self.pair, self.work.prompts, reps=reps, max_new_tokens=tokens))
            out["draft_choice"] = choice
        self._step("engines at the same concurrency")
        engines = self._add(fedbench.compare_engines(
            self.pair, self.work.prompts, concurrencies=(1, 4, 16), reps=reps, max_new_tokens=tokens,
            draft_spec=(self.pair.draft_spec, DRAFT_QUANTIZATION if not self.tiny else "none")))
        summary = fedbench.summarize(engines)
        out["engines"] = summary
        if not self.args.no_flower:
            self._step("flower sim, make run settings")
            out["make_run"] = self._make_run_comparison()
        out["targets"] = self._federation_targets(summary, steps, out.get("make_run"))
        self.analysis["federation"] = out

    def _add(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """fedbench records into results.json, with every required key."""
        out = []
        for rec in records:
            rec = dict(rec)
            out.append(self._record(rec.pop("kind"), rec.pop("engine"), rec))
        self._advance()
        return out

    def _make_run_comparison(self) -> dict[str, Any]:
        """``make run``'s settings (the 12 shipped prompts, 2 SuperNodes, 48 new tokens, pipelined,
        drafting ahead) through the Flower simulation beside target-only batched at 12."""
        from . import fedbench
        from .config import SpecFedConfig

        cfg = SpecFedConfig()
        conc = len(self.work.prompts)
        prompts = list(self.work.prompts)
        base = fedbench.target_only(self.pair.target, prompts, concurrency=conc, max_new_tokens=cfg.max_new_tokens,
                                    eos=self.pair.eos)
        try:
            m = run_flower(self.pair, prompts, clients=2, concurrency=min(conc, cfg.max_active_sequences),
                           max_new_tokens=cfg.max_new_tokens, references=base["outputs"], device=self.args.device,
                           pipelined=True)
        except Exception as exc:  # report, do not lose the rest of the run
            log.exception("Flower simulation (make run settings) failed")
            return {"error": f"{type(exc).__name__}: {exc}"}
        rec = self._record("engine_comparison", "flower-simulation", {
            "concurrency": conc, "cpu_layout": "shared", "tokens_per_s": m["tokens_per_s"],
            "target_only_tokens_per_s": base["tokens_per_s"],
            "ratio_vs_target_only": m["tokens_per_s"] / base["tokens_per_s"], "exact_match": m.get("exact_match"),
            "proactive_hits": m.get("proactive_hits"), "proactive_misses": m.get("proactive_misses"),
            "draft_loads": m.get("draft_loads"), "resyncs_after_round_1": m.get("resyncs_after_round_1"),
            "server_cpu_s_per_token": None}, label="make-run-settings")
        self._advance()
        return rec

    def _federation_targets(self, engines: dict[str, Any], steps: list[dict], make_run: dict | None) -> list[dict]:
        rows = []
        for (engine, layout, conc), bar in self.FEDERATION_TARGETS.items():
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
                rows.append({"target": f"{rec['component']} step at batch 16 <= {self.STEP_TARGET_RATIO}x a raw forward",
                             "value": rec["ratio"], "bar": self.STEP_TARGET_RATIO,
                             "met": rec["ratio"] <= self.STEP_TARGET_RATIO})
        return rows

    # ---- engines (greedy) --------------------------------------------------------------------
    def _warmup(self) -> None:
        self._step("warm-up")
        p = self.work.prompts[0]
        hf_generate(self.pair, p, 4)
        hf_generate(self.pair, p, 4, self.pair.draft)
        self._advance()
        cfg = make_config(self.pair.vocab_size, k=8, gamma=4, reconstruction="exact", draft_sampling="sparse",
                          concurrency=1, temperature=0.0, max_new_tokens=8)
        run_inprocess(self.pair, [p], cfg, 1)
        self._advance()

    def _engines(self) -> None:
        """Greedy, same prompts: target-only, HF assisted, in-process (1 and 2 clients), interleaved."""
        pr, pair, work = self.preset, self.pair, self.work
        reps: dict[str, list[dict[str, Any]]] = {"target-only": [], "hf-assisted": [], "in-process-1c": [], "in-process-2c": []}
        references = None
        for rep in range(pr.engine_reps):
            self._step(f"engines: target-only (rep {rep + 1})")
            t = run_hf(pair, work.prompts, pr.max_new_tokens, assisted=False)
            if references is None:
                references = t["outputs"]
            reps["target-only"].append(t)
            self._advance()
            self._step(f"engines: hf assisted (rep {rep + 1})")
            reps["hf-assisted"].append(run_hf(pair, work.prompts, pr.max_new_tokens, assisted=True))
            self._advance()
            for clients in (1, 2):
                self._step(f"engines: in-process {clients}c (rep {rep + 1})")
                cfg = make_config(pair.vocab_size, k=BASE["k"], gamma=BASE["gamma"], reconstruction=BASE["reconstruction"],
                                  draft_sampling="sparse", concurrency=1, temperature=0.0, max_new_tokens=pr.max_new_tokens)
                reps[f"in-process-{clients}c"].append(run_inprocess(pair, work.prompts, cfg, clients, references=references))
                self._advance()
        self.references = references
        target_tps = [r["tokens_per_s"] for r in reps["target-only"]]
        self.target_only_tps = statistics.median(target_tps)
        self.engine_ratios: dict[str, dict[str, float]] = {}
        v = pair.vocab_size
        for name, runs in reps.items():
            tps = [r["tokens_per_s"] for r in runs]
            ratio_target = statistics.median(r["tokens_per_s"] / t for r, t in zip(runs, target_tps))
            ratio_assisted = statistics.median(r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(runs, reps["hf-assisted"]))
            self.engine_ratios[name] = {"vs_target_only": ratio_target, "vs_hf_assisted": ratio_assisted}
            base = {"tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps, "repetitions": len(runs),
                    "speedup_vs_target_only": ratio_target, "speedup_vs_hf_assisted": ratio_assisted,
                    "temperature": 0.0, "concurrency": 1}
            if name in ("target-only", "hf-assisted"):
                outs = runs[0]["outputs"]
                base.update({"exact_match": _exact_match(outs, references), "tokens": runs[0]["tokens"],
                             "clients": 0 if name == "target-only" else 1,
                             "k": None, "gamma": None})
                if name == "hf-assisted":
                    base["gamma_note"] = "transformers' dynamic draft length (num_assistant_tokens heuristic)"
                if name == "target-only":
                    base["uplink_bytes_per_position"] = None
                self._record("engine", name, base)
            else:
                run = dict(runs[len(runs) // 2])
                run.update(base)
                self._record("engine", "in-process", run, label=name)
        self.engine_reps_raw = reps

    def _concurrency_engines(self) -> None:
        """Greedy, 16 concurrent sequences, 2 clients: batched vs per-sequence target verification."""
        pr, pair = self.preset, self.pair
        conc = max(pr.concurrency)
        prompts = cycled(self.work.prompts, max(conc, len(self.work.prompts)))
        for name, batched, batched_draft in (("batched", True, True), ("per-seq", False, True),
                                             ("per-seq-draft", True, False)):
            self._step(f"in-process c={conc} {name}")
            cfg = make_config(pair.vocab_size, k=BASE["k"], gamma=BASE["gamma"], reconstruction=BASE["reconstruction"],
                              draft_sampling="sparse", concurrency=conc, temperature=0.0, max_new_tokens=pr.max_new_tokens)
            m = run_inprocess(pair, prompts, cfg, 2, batched=batched, batched_draft=batched_draft,
                              references=self.references)
            m["speedup_vs_target_only"] = m["tokens_per_s"] / self.target_only_tps
            self._record("engine", "in-process", m, label=f"in-process-2c-c{conc}-{name}")
            self._advance()
        self.analysis["batched_verification"] = self._batched_gain(conc)

    def _batched_gain(self, conc: int) -> dict[str, Any]:
        recs = {r["label"]: r for r in self.records if str(r.get("label", "")).startswith(f"in-process-2c-c{conc}-")}
        b, s = recs.get(f"in-process-2c-c{conc}-batched"), recs.get(f"in-process-2c-c{conc}-per-seq")
        d = recs.get(f"in-process-2c-c{conc}-per-seq-draft")
        if not b or not s:
            return {"status": "pending"}
        if not b.get("batched_verify"):
            return {"status": "pending (TargetVerifier(batched=True) is not available for this model)"}
        drafting = None
        if d and b.get("batched_draft") and not d.get("batched_draft"):
            drafting = {
                "tokens_per_s_per_sequence_draft": d["tokens_per_s"],
                "throughput_gain": b["tokens_per_s"] / d["tokens_per_s"],
                "draft_s_per_round_batched": b["draft_s_per_round"], "draft_s_per_round_per_sequence": d["draft_s_per_round"],
                "draft_gain": d["draft_s_per_round"] / b["draft_s_per_round"] if b["draft_s_per_round"] else None,
            }
        return {
            "drafting": drafting,
            "status": "measured", "concurrency": conc,
            "tokens_per_s_batched": b["tokens_per_s"], "tokens_per_s_per_sequence": s["tokens_per_s"],
            "throughput_gain": b["tokens_per_s"] / s["tokens_per_s"],
            "verify_s_per_round_batched": b["verify_s_per_round"], "verify_s_per_round_per_sequence": s["verify_s_per_round"],
            "verify_gain": s["verify_s_per_round"] / b["verify_s_per_round"] if b["verify_s_per_round"] else None,
        }

    # ---- Flower simulation -------------------------------------------------------------------
    def _flower(self) -> None:
        pr, pair = self.preset, self.pair
        runs = [(c, "collaborative") for c in pr.flower_concurrency]
        if pr.flower_per_device:
            runs.append((max(pr.flower_concurrency), "per-device"))
        for conc, mode in runs:
            self._step(f"flower sim c={conc} {mode}")
            prompts = cycled(self.work.prompts, max(conc, len(self.work.prompts)))
            try:
                m = run_flower(pair, prompts, clients=2, concurrency=conc, max_new_tokens=pr.max_new_tokens, mode=mode,
                               references=self.references, device=self.args.device)
            except Exception as exc:  # report, do not lose the rest of the run
                log.exception("Flower simulation failed")
                self._record("engine", "flower-simulation", {"clients": 2, "concurrency": conc, "mode": mode},
                             error=f"{type(exc).__name__}: {exc}")
                self._advance()
                continue
            m["speedup_vs_target_only"] = m["tokens_per_s"] / self.target_only_tps
            self._record("engine", "flower-simulation", m, label=f"flower-sim-2c-c{conc}-{mode}")
            self._advance()

    #: ClientApp runtimes of the deployment engine, measured side by side (same prompts, same run)
    DEPLOYMENT_RUNTIMES = ("persistent", "stock")
    #: (runtime, pipelined) configurations measured: strict rounds on both runtimes, then pipelined
    DEPLOYMENT_RUNS = (("persistent", False), ("stock", False), ("persistent", True))
    #: issue 11's bar for a strict round with the persistent runtime (stock: 6.3-7.8 s)
    DEPLOYMENT_ROUND_TARGET_S = 4.0

    def _deployment(self) -> None:
        """Flower's deployment engine (real SuperLink + 2 SuperNodes, ``flwr run``) with each ClientApp
        runtime, same configuration as the simulation run, fewer tokens: a deployment round costs
        seconds. One ``flower-deployment`` record per runtime (``runtime``, ``pipelined``,
        ``round_s_median``, ``reply_gap_s_median``), and their comparison in the analysis."""
        pr = self.preset
        conc = max(pr.flower_concurrency)
        base = {"clients": 2, "concurrency": conc, "pipelined": False, "round_s_median": None,
                "reply_gap_s_median": None}
        if self.args.no_flower or self.args.no_deployment:
            why = "--no-flower" if self.args.no_flower else "--no-deployment"
            for runtime, pipelined in self.DEPLOYMENT_RUNS:
                self._record("engine", "flower-deployment", dict(base, runtime=runtime, pipelined=pipelined),
                             status="not measured", note=f"skipped ({why})")
            self.analysis["deployment_runtimes"] = f"not measured ({why})"
            return
        prompts = cycled(self.work.prompts, max(conc, len(self.work.prompts)))
        n = pr.deployment_max_new_tokens
        refs = [r[:n] for r in self.references] if self.references else None
        measured: dict[str, dict[str, Any]] = {}
        for runtime, pipelined in self.DEPLOYMENT_RUNS:
            name = f"{runtime}{'-pipelined' if pipelined else ''}"
            self._step(f"flower deployment c={conc} {name}")
            try:
                m = run_deployment(self.pair, prompts, clients=2, concurrency=conc, max_new_tokens=n, references=refs,
                                   device=self.args.device, runtime=runtime, pipelined=pipelined)
            except Exception as exc:  # report, do not lose the rest of the run
                log.exception("Flower deployment run (%s) failed", name)
                self._record("engine", "flower-deployment", dict(base, runtime=runtime, pipelined=pipelined),
                             status="failed", error=f"{type(exc).__name__}: {str(exc)[-600:]}")
                self._advance()
                continue
            m["speedup_vs_target_only"] = m["tokens_per_s"] / self.target_only_tps
            measured[name] = self._record("engine", "flower-deployment", m,
                                          label=f"flower-deployment-2c-c{conc}-{name}", status="measured")
            self._advance()
        self.analysis["deployment_runtimes"] = deployment_comparison(measured, self.DEPLOYMENT_ROUND_TARGET_S)

    # ---- fixed prefixes ------------------------------------------------------------------------
    def _fixed_prefixes(self) -> None:
        pr, pair = self.preset, self.pair
        self._step("fixed prefixes: alpha per K and rule")
        pre = collect_prefixes(pair, self.work.prompts, self.references)
        v = pair.vocab_size
        from .wire import bytes_per_position, compression_ratio

        per_k = {}
        for k in pr.ks:
            kv = _k_value(k, v)
            per_k[str(k)] = fixed_prefix_alpha(pre, kv, pr.reconstructions, chunk=16 if kv > 4096 else 64)
            per_k[str(k)].update({"k": kv, "bytes_per_position": bytes_per_position(kv, v),
                                  "compression_vs_fp32": compression_ratio(kv, v, "float32"),
                                  "compression_vs_fp16": compression_ratio(kv, v, "float16")})
        self.fixed = {"per_k": per_k, "prefixes": pre.p.shape[0]}
        self._advance()

        # exact one-step output law -> TV to the target, at a subset of the prefixes
        self._step("fixed prefixes: output law / TV")
        m = pre.p.shape[0]
        idx = np.linspace(0, m - 1, num=min(pr.tv_prefixes, m)).round().astype(int).tolist()
        idx = sorted(set(idx))
        tv_table: dict[str, dict[str, Any]] = {}
        laws: dict[tuple[int, int, str, str], torch.Tensor] = {}
        schemes = [(BASE["k"], rule, mode) for mode in pr.recon_sampling_modes for rule in pr.reconstructions]
        schemes += [(_k_value(k, v), BASE["reconstruction"], "sparse") for k in pr.ks if _k_value(k, v) != BASE["k"]]
        if pr.bias_vs_k:
            schemes += [(_k_value(k, v), "uniform", "full") for k in pr.ks if _k_value(k, v) not in (BASE["k"], v)]
        for k, rule, mode in schemes:
            tvs, lefts, bounds = [], [], []
            for i in idx:
                law, left = output_law(pre.p[i], pre.q[i], k, rule, mode, cover=pr.law_cover,
                                       max_candidates=pr.law_max_candidates)
                laws[(i, k, rule, mode)] = law
                tvs.append(tv(law, pre.p[i]))
                lefts.append(left)
                ids, _ = _topk_reply(pre.q[i][None], k)
                bounds.append(max(0.0, 1.0 - float(pre.q[i][ids[0]].sum())))
            tv_table[f"{k}/{rule}/{mode}"] = {"k": k, "reconstruction": rule, "draft_sampling": mode,
                                              "tv_to_target": float(np.mean(tvs)), "tv_max": float(np.max(tvs)),
                                              "tv_enumeration_error": float(np.max(lefts)),
                                              "tv_bound_1_minus_S": float(np.mean(bounds)), "prefixes": len(idx)}
        self.tv_table = tv_table
        self._advance()

        # Monte Carlo check of the law with the engine's own functions, at the prefix with the
        # largest 1 - S at K=8 among the TV prefixes (where the paper-faithful bias is largest)
        self._step("Monte Carlo check at one prefix")
        bounds = []
        for i in idx:
            ids, _ = _topk_reply(pre.q[i][None], BASE["k"])
            bounds.append(1.0 - float(pre.q[i][ids[0]].sum()))
        j = idx[int(np.argmax(bounds))]
        p, q = pre.p[j], pre.q[j]
        floor = noise_floor(p, pr.mc_samples)
        mc = []
        # the default exact scheme and every paper-faithful one (the other sparse schemes are exact
        # by the same argument; the law table above covers them)
        mc_schemes = [(BASE["reconstruction"], "sparse")] + [(r, "full") for r in pr.reconstructions
                                                             if "full" in pr.recon_sampling_modes]
        for rule, mode in mc_schemes:
            hist = monte_carlo_first_token(p, q, BASE["k"], rule, mode, pr.mc_samples)
            law = laws[(j, BASE["k"], rule, mode)]
            rec = {"k": BASE["k"], "reconstruction": rule, "draft_sampling": mode, "samples": pr.mc_samples,
                   "prefix": {"prompt": pre.where[j][0], "position": pre.where[j][1]},
                   "tv_mc_to_target": tv(hist, p), "tv_mc_to_exact_law": tv(hist, law),
                   "tv_exact_law_to_target": tv(law, p), "tv_noise_floor": floor,
                   "kept_mass": 1.0 - bounds[idx.index(j)]}
            mc.append(rec)
            self._record("tv", "monte-carlo (engine functions)", {
                "k": BASE["k"], "reconstruction": rule, "gamma": 1, "clients": 1, "concurrency": 1,
                "tv_to_target": rec["tv_mc_to_target"], "draft_sampling": mode, "temperature": 1.0}, **rec)
        self.mc = mc
        self._advance()

    # ---- sweeps (sampling) ---------------------------------------------------------------------
    def _sweeps(self, sweeps: list[tuple[str, dict[str, Any]]]) -> None:
        pr, pair, v = self.preset, self.pair, self.pair.vocab_size
        for axis, c in sweeps:
            kv = _k_value(c["k"], v)
            self._step(f"sweep {axis}: K={c['k']} g={c['gamma']} {c['reconstruction'][:4]}/{c['draft_sampling'][:2]} "
                       f"c{c['clients']} x{c['concurrency']}")
            cfg = make_config(v, k=kv, gamma=c["gamma"], reconstruction=c["reconstruction"],
                              draft_sampling=c["draft_sampling"], concurrency=c["concurrency"], temperature=1.0,
                              max_new_tokens=pr.max_new_tokens)
            prompts = cycled(self.work.prompts, max(c["concurrency"], len(self.work.prompts)))
            m = run_inprocess(pair, prompts, cfg, c["clients"])
            fixed = self.fixed["per_k"].get(str(c["k"]))
            if fixed is not None:
                m["alpha_fixed_prefixes"] = fixed["alpha"].get(c["reconstruction"])
                m["kept_mass"] = fixed["kept_mass"]
            law = self.tv_table.get(f"{kv}/{c['reconstruction']}/{c['draft_sampling']}")
            if law is None and c["draft_sampling"] == "sparse" and c["k"] == BASE["k"]:
                law = self.tv_table.get(f"{BASE['k']}/{c['reconstruction']}/sparse")
            if law is not None:
                m["tv_to_target"] = law["tv_to_target"]
                m["tv_bound_1_minus_S"] = law["tv_bound_1_minus_S"]
            m["exact"] = cfg.exact()
            self._record("sweep", "in-process", m, axis=axis, k_label=str(c["k"]))
            self._advance()

    # ---- modeled latency and theory -------------------------------------------------------------
    def _sweep(self, axis: str) -> list[dict[str, Any]]:
        base = [r for r in self.records if r["kind"] == "sweep" and r["axis"] == "base"]
        rows = [r for r in self.records if r["kind"] == "sweep" and r["axis"] == axis]
        return base + rows

    def _model_and_theory(self) -> None:
        from . import theory
        from .wire import bytes_per_position, full_distribution_bytes

        self._step("modeled latency and theory")
        v = self.pair.vocab_size
        base = self._sweep("base")[0]
        k_rows = {r["k_label"]: r for r in self._sweep("k")}
        full = k_rows.get("V")
        gamma = BASE["gamma"]
        # per-round compute of ONE device (the model gives every device its own link and CPU)
        per_pos = base["draft_s_per_position"]
        verify, other = base["verify_s_per_round"], base["server_other_s_per_round"]
        down = base["downlink_bytes_per_round_per_client"]
        header = 12  # seq id (int64) + length (int32) of the one sequence
        schemes = {
            "top-K (K=8)": (bytes_per_position(BASE["k"], v) * gamma + header, _tau_ss(base)),
            "full fp32": ((full_distribution_bytes(v, "float32") + 4) * gamma + header, _tau_ss(full or base)),
            "full fp16": ((full_distribution_bytes(v, "float16") + 4) * gamma + header, _tau_ss(full or base)),
        }
        t_target = 1.0 / self.target_only_tps
        n_tok = self.preset.max_new_tokens
        rows = []
        for up in LINK_UPLINKS_MBPS:
            for rtt in LINK_RTTS_MS:
                row = {"uplink_mbps": up, "rtt_ms": rtt, "downlink_mbps": 50.0}
                for name, (up_bytes, tau) in schemes.items():
                    lat = modeled_latency(gamma=gamma, tau=tau, draft_s_per_position=per_pos, verify_s=verify,
                                          server_other_s=other, overhead_s=0.0, uplink_bytes_per_round=up_bytes,
                                          downlink_bytes_per_round=down, uplink_mbps=up, downlink_mbps=50.0, rtt_ms=rtt)
                    row[name] = lat
                row["target-only"] = {"s_per_token": t_target + rtt / 1000 / n_tok}
                row["speedup_topk_vs_full_fp32"] = row["full fp32"]["s_per_token"] / row["top-K (K=8)"]["s_per_token"]
                row["speedup_topk_vs_full_fp16"] = row["full fp16"]["s_per_token"] / row["top-K (K=8)"]["s_per_token"]
                row["speedup_topk_vs_target_only"] = row["target-only"]["s_per_token"] / row["top-K (K=8)"]["s_per_token"]
                rows.append(row)
                for name in ("top-K (K=8)", "full fp32", "full fp16", "target-only"):
                    tps = 1.0 / row[name]["s_per_token"]
                    self._record("modeled", f"modeled: {name}", {
                        "k": BASE["k"] if name.startswith("top") else (v if name.startswith("full") else None),
                        "gamma": gamma if name != "target-only" else None, "clients": 1, "concurrency": 1,
                        "reconstruction": BASE["reconstruction"] if name != "target-only" else None,
                        "alpha": (base if name.startswith("top") else (full or base))["alpha"] if name != "target-only" else None,
                        "tau": schemes[name][1] if name in schemes else None,
                        "uplink_bytes_per_position": (schemes[name][0] - header) / gamma if name in schemes else None,
                        "compression_vs_fp32": (full_distribution_bytes(v, "float32") * gamma / (schemes[name][0] - header)
                                                if name in schemes else None),
                        "tokens_per_s": tps}, uplink_mbps=up, rtt_ms=rtt, ms_per_token=1000 * row[name]["s_per_token"])
        self.latency = {"rows": rows, "inputs": {
            "gamma": gamma, "draft_s_per_position": per_pos, "verify_s_per_round": verify,
            "server_other_s_per_round": other, "downlink_bytes_per_round": down,
            "target_only_s_per_token": t_target, "tau_topk": _tau_ss(base), "tau_full": _tau_ss(full or base),
            "uplink_bytes_per_round": {k: b for k, (b, _) in schemes.items()}}}

        # theory: T(gamma) = a*gamma + b fitted to the measured rounds of the gamma sweep
        g_rows = sorted(self._sweep("gamma"), key=lambda r: r["gamma"])
        g_rows = list({r["gamma"]: r for r in g_rows}.values())
        gammas = [r["gamma"] for r in g_rows]
        round_s = [_get(r, "round_s_full_mean", "round_s_mean") for r in g_rows]
        a_c, b_c = fit_line(gammas, round_s) if len(gammas) >= 2 else (per_pos, verify)
        a_c = max(a_c, 1e-6)
        alpha = base["alpha"]
        measured_best = max(g_rows, key=lambda r: r["tokens_per_s"])["gamma"]
        th: dict[str, Any] = {
            "alpha": alpha, "a_compute": a_c, "b_compute": b_c,
            "fit": {"gamma": gammas, "round_s": round_s},
            "gamma_star_compute": theory.optimal_gamma(alpha, a_c, b_c) if b_c > 0 else None,
            "gamma_best_int_compute": theory.best_integer_gamma(alpha, a_c, b_c, gamma_max=max(gammas)) if b_c > 0 else None,
            "measured_best_gamma_compute": measured_best,
            "measured_tau": {r["gamma"]: _tau_ss(r) for r in g_rows},
            "measured_tau_all_rounds": {r["gamma"]: r["tau"] for r in g_rows},
            "measured_tokens_per_s": {r["gamma"]: r["tokens_per_s"] for r in g_rows},
            "theory_tau": {g: float(theory.expected_tokens_per_step(alpha, g)) for g in gammas},
        }
        # the same at the target link profile, every client on its own device (drafting in parallel:
        # the measured round with the slowest client's draft instead of the sum), plus the link:
        # a += bytes per position / uplink; b += RTT + header and downlink bytes
        up, rtt = TARGET_PROFILE
        bpp = bytes_per_position(BASE["k"], v)
        par = [_get(r, "parallel_round_s_full_mean", "parallel_round_s_mean") for r in g_rows]
        a_p, b_p = fit_line(gammas, par) if len(gammas) >= 2 else (per_pos, verify)
        a_p = max(a_p, 1e-6)
        link_fixed = rtt / 1000 + (header * 8) / (up * 1e6) + down * 8 / 50e6
        a_l = a_p + bpp * 8 / (up * 1e6)
        b_l = b_p + link_fixed
        modeled = {r["gamma"]: (pr_s + r["gamma"] * bpp * 8 / (up * 1e6) + link_fixed) / _tau_ss(r)
                   for r, pr_s in zip(g_rows, par)}
        th.update({
            "profile": {"uplink_mbps": up, "rtt_ms": rtt},
            "a_parallel": a_p, "b_parallel": b_p, "parallel_round_s": par,
            "a_link": a_l, "b_link": b_l,
            "gamma_star_link": theory.optimal_gamma(alpha, a_l, b_l),
            "gamma_best_int_link": theory.best_integer_gamma(alpha, a_l, b_l, gamma_max=max(gammas)),
            "modeled_s_per_token_link": modeled,
            "measured_best_gamma_link": min(modeled, key=modeled.get),
        })
        # alpha that best explains the measured tau(gamma) under the i.i.d. model (for reference)
        grid = np.linspace(0.01, 0.999, 999)
        err = [sum((float(theory.expected_tokens_per_step(a, g)) - t) ** 2 for g, t in th["measured_tau"].items())
               for a in grid]
        th["alpha_fit_from_tau"] = float(grid[int(np.argmin(err))])
        self.theory = th
        self._advance()

    # ---- targets -------------------------------------------------------------------------------
    def _targets(self) -> None:
        v = self.pair.vocab_size
        out = []
        k_rows = {r["k_label"]: r for r in self._sweep("k")}
        k8, kv = k_rows.get("8"), k_rows.get("V")
        fk8, fkv = self.fixed["per_k"].get("8"), self.fixed["per_k"].get("V")
        if k8 and fk8 and fkv:
            from .wire import bytes_per_position, compression_ratio

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
                within = [lab for lab, d in self.fixed["per_k"].items()
                          if abs(d["alpha"][rule] - fkv["alpha"][rule]) <= 0.01]
                why += (f"; alpha misses: at temperature 1 the draft keeps only S = {fk8['kept_mass']:.3f} of its mass in "
                        f"its top 8, and q_hat cannot match p outside it; the smallest K of the sweep within 1 point is "
                        f"{within[0] if within else 'none'}"
                        + (f" ({self.fixed['per_k'][within[0]]['compression_vs_fp32']:.0f}x vs fp32)" if within else "")
                        + ", so closing it means a larger K (less compression), or a draft whose top-8 mass is higher "
                          "(lower sampling temperature, a draft closer to the target)")
            out.append({"target": "K=8: uplink per draft position >= 6000x smaller than fp32, alpha within 1 point of K=V",
                        "measured": why, "met": met})
        r = self.engine_ratios.get("in-process-1c")
        if r:
            met = r["vs_hf_assisted"] >= 1.0 and r["vs_target_only"] >= 1.5
            text = (f"{r['vs_hf_assisted']:.2f}x HF assisted, {r['vs_target_only']:.2f}x target-only "
                    f"(1 client, greedy, median of {self.preset.engine_reps} interleaved repetitions)")
            one = next((x for x in self.records if x.get("label") == "in-process-1c"), None)
            if not met and one and one.get("rounds") and one.get("draft_s_per_position"):
                t_tok = 1.0 / self.target_only_tps
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
                         "specfed_flwr/models.py). What would close it: a draft >= 4x cheaper than the target per "
                         "forward (a larger target such as SmolLM2-1.7B with the 135M draft, fused kernels or "
                         "torch.compile for the draft) or a GPU target")
            out.append({"target": "in-process engine, 1 sequence: >= 1.0x HF assisted and >= 1.5x target-only tokens/s",
                        "measured": text, "met": met})
        fl = [x for x in self.records if x.get("label", "").startswith("flower-sim-2c-c") and x.get("mode") == "collaborative"
              and x.get("tokens_per_s")]
        if fl:
            best = max(fl, key=lambda x: x["concurrency"])
            ratio = best["tokens_per_s"] / self.target_only_tps
            text = (f"{best['tokens_per_s']:.1f} tok/s = {ratio:.2f}x target-only "
                    f"({self.target_only_tps:.1f} tok/s); engine overhead "
                    f"{1000 * best['engine_overhead_s_per_round']:.0f} ms/round = "
                    f"{100 * best['engine_overhead_share']:.0f}% of round time")
            dep = next((x for x in self.records if x.get("engine") == "flower-deployment" and x.get("rounds")), None)
            if dep:
                text += (f"; deployment engine beside it ({dep.get('runtime') or 'stock'} ClientApp runtime): "
                         f"{1000 * dep['engine_overhead_s_per_round']:.0f} ms overhead "
                         f"per exchange ({100 * dep['engine_overhead_share']:.0f}% of {1000 * dep['round_s_mean']:.0f} ms)")
            if ratio < 2.0 and best.get("rounds"):
                per_round = best["round_s_mean"]
                tokens_round = best["tokens"] / best["rounds"]
                text += (f". Why: a round takes {1000 * per_round:.0f} ms (client drafting "
                         f"{1000 * _client_draft_s(best):.0f} ms: both virtual clients draft one after the other in the "
                         f"single Ray actor, {1000 * best['verify_s_per_round']:.0f} ms batched verification) and emits "
                         f"{tokens_round:.1f} tokens across the active sequences. What would close it: each client "
                         "drafting on its own device (the parallel round would drop the second client's drafting), a "
                         "target that batches more cheaply than it decodes (GPU), and a larger target/draft cost ratio")
            out.append({"target": f"Flower simulation, 2 clients, {best['concurrency']} concurrent: >= 2x target-only (1 sequence); overhead share reported",
                        "measured": text, "met": ratio >= 2.0})
        else:
            out.append({"target": "Flower simulation, 2 clients, 16 concurrent: >= 2x target-only",
                        "measured": "not measured in this run (--no-flower or the run failed)", "met": None})
        row = next((x for x in self.latency["rows"] if (x["uplink_mbps"], x["rtt_ms"]) == TARGET_PROFILE), None)
        th = self.theory
        if row:
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
                load = (self.machine.get("load_1min_during_run") or {}).get("mean") or 0.0
                where = "this CPU" + (" (shared and loaded while it ran)" if load > (self.machine.get("cores") or 1) else "")
                text += (f". (a) missed because the modeled round is dominated by compute measured on {where}, which "
                         "dilutes the uplink saving of full-distribution transmission; faster compute "
                         "(a GPU target, a cheaper draft) or a slower uplink widens the gap")
            if dg > 1:
                text += (". (b) missed: the measured tokens/s vs gamma is flat near its maximum, so one noisy run per "
                         "gamma on a shared machine moves the argmax; the i.i.d. model also ignores that acceptance "
                         "falls with the position (see the per-position plot). More prompts/repetitions per gamma "
                         "would close it if the curve is really flat")
            out.append({"target": "modeled at 10 Mbit/s, 20 ms RTT: >= 3x faster than full-distribution transmission; "
                                  "theory gamma* within 1 of the measured best gamma",
                        "measured": text, "met": sp >= 3.0 and dg <= 1.0})
        self.targets = out

    # ---- output --------------------------------------------------------------------------------
    def _write(self) -> None:
        from . import benchplots

        self.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for rec in self.records:
            rec["machine"] = {k: self.machine.get(k) for k in ("cpu", "cores", "device", "torch", "transformers", "flwr")}
            rec["timestamp"] = stamp
        self.analysis.update({
            "preset": self.preset.name, "timestamp": stamp, "machine": self.machine,
            "models": {"target": self.pair.target_identity, "draft": self.pair.draft_identity,
                       "vocab_size": self.pair.vocab_size, "load_seconds": self.pair.load_seconds},
            "workload": {"prompts": len(self.work.prompts), "categories": sorted(set(self.work.categories)),
                         "max_new_tokens": self.preset.max_new_tokens},
            "base": BASE, "target_only_tokens_per_s": self.target_only_tps, "engine_ratios": self.engine_ratios,
            "fixed_prefixes": self.fixed, "tv": self.tv_table, "monte_carlo": self.mc,
            "latency": self.latency, "theory": _jsonable(self.theory), "targets": self.targets,
        })
        (self.out_dir / "results.json").write_text(json.dumps(_jsonable(self.records), indent=1) + "\n")
        (self.out_dir / "analysis.json").write_text(json.dumps(_jsonable(self.analysis), indent=1) + "\n")
        import pickle

        state = {k: getattr(self, k) for k in self._STATE}
        state.update(preset=self.preset, tiny=self.tiny)
        with contextlib.suppress(OSError):
            self.state_path().write_bytes(pickle.dumps(state))
        self.render()

    # everything the plots and the markdown read: ``--render-from STATE`` rebuilds them from a run's
    # saved state (no measuring), e.g. after a change to the report's text
    _STATE = ("records", "analysis", "machine", "fixed", "tv_table", "mc", "latency", "theory", "targets",
              "engine_ratios", "target_only_tps")

    def state_path(self) -> Path:
        return Path(tempfile.gettempdir()) / f"specfed-bench-state-{self.preset.name}.pkl"

    @classmethod
    def from_state(cls, args: argparse.Namespace, path: str) -> "Bench":
        import pickle

        state = pickle.loads(Path(path).read_bytes())
        bench = cls(args)
        for k in cls._STATE:
            setattr(bench, k, state[k])
        bench.preset, bench.tiny = state["preset"], state["tiny"]
        bench.pair = _PairInfo(bench.analysis["models"])
        bench._targets()  # the verdicts' wording may have changed since the run; the numbers have not
        return bench

    def render(self) -> None:
        from . import benchplots

        plots = benchplots.make_plots(self)
        md = Path(self.args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(benchplots.markdown(self, plots, md))
        log.info("wrote %s, %s and %d plots in %.0f s", self.out_dir / "results.json", md, len(plots),
                 time.perf_counter() - self.started)


def deployment_comparison(measured: dict[str, dict[str, Any]], target_s: float) -> dict[str, Any]:
    """Persistent vs stock deployment records -> the numbers BENCHMARKS.md and docs/DEPLOYMENT.md quote."""
    out: dict[str, Any] = {"target_round_s": target_s, "target_reply_gap_s": 0.8}
    for runtime, r in measured.items():
        out[runtime] = {k: r.get(k) for k in ("round_s_median", "reply_gap_s_median", "rounds", "tokens_per_s",
                                               "clientapp_processes_per_node", "draft_loads", "exact_match",
                                               "pipelined", "proactive_hits", "proactive_misses")}
    pp = measured.get("persistent-pipelined")
    if pp and pp.get("reply_gap_s_median") is not None:
        out["reply_gap_met"] = pp["reply_gap_s_median"] <= 0.8
    p, st = measured.get("persistent"), measured.get("stock")
    if p and p.get("round_s_median") is not None:
        out["met"] = p["round_s_median"] <= target_s
        if st and st.get("round_s_median"):
            out["round_speedup_vs_stock"] = st["round_s_median"] / p["round_s_median"]
    return out


def _client_draft_s(r: dict[str, Any]) -> float:
    """Client drafting per round as it adds to the round: the sum over clients that draft one after the
    other (in-process, one Ray actor), the max when each has its own process."""
    parallel = r.get("engine") == "flower-deployment" or (
        r.get("engine") == "flower-simulation" and (r.get("flower_actors") or 0) >= (r.get("clients") or 0))
    return (r.get("draft_max_s_per_round") if parallel else r.get("draft_s_per_round")) or 0.0


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="specfed-flwr bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short preset (a few minutes on 2 CPU cores)")
    parser.add_argument("--out-dir", default="benchmarks", help="where results.json, analysis.json and the PNGs go")
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="the report to regenerate")
    parser.add_argument("--tiny", action="store_true", help="tiny random models tiny:0/tiny:1, token-id prompts (tests)")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower simulation engine")
    parser.add_argument("--no-deployment", action="store_true",
                        help="skip the Flower deployment engine run (real SuperLink/SuperNodes/draft workers)")
    parser.add_argument("--no-federation", action="store_true",
                        help="skip the pipelined-engine comparison, emulated federation and step costs (fedbench)")
    parser.add_argument("--device", default="auto", help="target device for the default pair (auto, cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 for --tiny)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--render-from", default=None, help=argparse.SUPPRESS)  # rebuild report + plots from a saved state
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    threads = getattr(args, "threads", None) or (1 if args.tiny else None)  # tiny models: threads only add overhead
    if threads:
        torch.set_num_threads(int(threads))
    if getattr(args, "render_from", None):
        Bench.from_state(args, args.render_from).render()
        return 0
    return Bench(args).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
