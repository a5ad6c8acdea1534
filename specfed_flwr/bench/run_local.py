"""Runners of the engines that live in this process: transformers' ``generate`` (target-only and
assisted) and the in-process speculative engine, each returning one record's numbers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from .rounds import RoundLog

if TYPE_CHECKING:
    from ..config import SpecFedConfig
    from ..specs import ModelPair


def make_config(vocab: int, *, k: int, gamma: int, reconstruction: str, draft_sampling: str, concurrency: int,
                temperature: float, max_new_tokens: int, mode: str = "collaborative", seed: int = 0,
                pipeline_depth: str = "1", draft_ahead: bool = False, adaptive: bool = False) -> "SpecFedConfig":
    """The sweeps measure the protocol's parameters in strict rounds without drafting ahead, at the
    gamma and K they name (the round-cost model T = a*gamma + b; ``adaptive`` off unless asked); the
    engine comparison (``federation``) measures the pipeline with the user's defaults."""
    from ..config import SpecFedConfig

    return SpecFedConfig(
        pipeline_depth=pipeline_depth, draft_ahead=draft_ahead, adaptive=adaptive,
        target="bench", draft="bench", top_k=k, max_k=max(64, k), draft_length=gamma, max_gamma=max(16, gamma),
        reconstruction=reconstruction, draft_sampling=draft_sampling, temperature=temperature,
        max_new_tokens=max_new_tokens, max_active_sequences=concurrency, chat_template=False, seed=seed,
        mode=mode, max_reply_bytes=max(8_000_000, 64 * 4 * vocab * max(1, concurrency) * max(16, gamma)),
    ).validate()


def exact_match(outputs: list[list[int]], references: list[list[int]] | None) -> float | None:
    """Fraction of outputs equal to their reference (references cycle like the prompts)."""
    if references is None:
        return None
    hits = [out == references[i % len(references)] for i, out in enumerate(outputs)]
    return sum(hits) / len(hits) if hits else None


def hf_generate(pair: "ModelPair", prompt: list[int], max_new_tokens: int,
                assistant: torch.nn.Module | None = None) -> list[int]:
    """Greedy ``generate`` of one prompt (``assistant``: transformers' assisted generation)."""
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


def run_hf(pair: "ModelPair", prompts: list[list[int]], max_new_tokens: int, *, assisted: bool) -> dict[str, Any]:
    outputs, started = [], time.perf_counter()
    for p in prompts:
        outputs.append(hf_generate(pair, p, max_new_tokens, pair.draft if assisted else None))
    wall = time.perf_counter() - started
    tokens = sum(len(o) for o in outputs)
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else None, "outputs": outputs}


def run_inprocess(pair: "ModelPair", prompts: list[list[int]], cfg: "SpecFedConfig", clients: int, *,
                  batched: bool = True, batched_draft: bool = True,
                  references: list[list[int]] | None = None) -> dict[str, Any]:
    """``batched``: one padded target forward per round for all sequences (else one per sequence);
    ``batched_draft``: each client drafts all its sequences in one forward per draft step (else a loop)."""
    from ..client_core import DraftClient
    from ..inprocess import InProcessEngine
    from ..proposer import HFDraftProposer
    from ..target import TargetVerifier

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
    log = RoundLog().start()
    result = engine.generate(prompts, on_round=log)
    outputs = [s.token_ids for s in result.sequences]
    m = run_metrics(result.metrics, log, cfg, clients, parallel=False, outputs=outputs,
                    references=references if cfg.greedy else None, batched=bool(engine.target.batched))
    m["batched_draft"] = all(bool(getattr(c.proposer, "batched", False)) for c in engine.clients.values())
    return m


def run_metrics(summary: dict[str, Any], log: RoundLog, cfg: "SpecFedConfig", clients: int, *, parallel: bool,
                outputs: list[list[int]], references, batched: bool) -> dict[str, Any]:
    """One speculative run's record: the summary's totals, its rounds' split, its settings."""
    timing = log.timing(summary.get("clients") or {}, parallel_clients=parallel, gamma=cfg.draft_length)
    cond, reach = log.per_position(cfg.draft_length)
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
        "tau_full_rounds": log.steady_tau(cfg.draft_length),
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
        "exact_match": exact_match(outputs, references),
        "adaptive": cfg.adaptive,
        # per client: the (gamma, K) asked over the run (median, range): the controller's choices
        "settings": summary.get("settings"),
        **timing,
    }
