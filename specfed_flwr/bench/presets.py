"""What one ``specfed-flwr bench`` run measures: the base configuration, the presets (sweep axes
and sizes), the link profiles of the latency model and the keys every results.json record has."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import SpecFedConfig as _Config

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
    adaptive_reps: int = 3  # repetitions of adaptive vs the best fixed gammas (``jobs_adaptive``)


# Sizes (prompts, tokens, repetitions, prefixes) are trimmed so that the full preset runs in about half an
# hour on a 2-core CPU; the sweep axes are the issue's. One prompt per category of the shipped set, 32 new
# tokens each (enough for several full rounds at gamma = 10, and for prefill not to dominate the timings).
FULL = Preset("full", 1, 32, (1, 2, 4, 8, 16, 32, 64, "V"), ("uniform", "temperature", "exact"), ("sparse", "full"),
              tuple(range(1, 11)), (1, 2, 3, 4), (1, 4, 16), 3, (16,), False, 6, 1000, False, 1 - 1e-3, 1024, 16)
QUICK = Preset("quick", 1, 6, (1, 8, 64, "V"), ("uniform", "temperature", "exact"), ("sparse", "full"),
               (1, 2, 4, 8), (1, 2), (1, 4, 16), 1, (16,), False, 3, 500, False, 1 - 1e-3, 512, 4, 2)
# --tiny: random tiny Llamas (vocab 1024), token-id prompts; for the unit test of this command
TINY_FULL = replace(FULL, name="tiny", max_new_tokens=16, tv_prefixes=6, mc_samples=2000, engine_reps=2, adaptive_reps=2)
TINY_QUICK = replace(QUICK, name="tiny-quick", max_new_tokens=8, ks=(1, 8, "V"), gammas=(1, 2, 4), concurrency=(1, 4),
                     tv_prefixes=3, mc_samples=2000, flower_concurrency=(4,), deployment_max_new_tokens=6,
                     adaptive_reps=1)


def preset_for(tiny: bool, quick: bool) -> Preset:
    """The preset of ``--tiny`` / ``--quick``."""
    if tiny:
        return TINY_QUICK if quick else TINY_FULL
    return QUICK if quick else FULL


def k_value(k: int | str, vocab: int) -> int:
    """A K of the sweep axis ("V" = the whole vocabulary) as a number of slots."""
    return vocab if k == "V" else min(int(k), vocab)
