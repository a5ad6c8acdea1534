"""The model pair and the prompts of a benchmark run: the embedded default pair on the shipped
prompt set, or (``--tiny``) random tiny Llamas on random token-id prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .presets import DRAFT_QUANTIZATION, Preset

if TYPE_CHECKING:
    from ..specs import ModelPair


@dataclass
class Workload:
    prompts: list[list[int]]  # token ids (chat template applied)
    categories: list[str]
    texts: list[str | None]


def load_bench_pair(tiny: bool, device: str = "auto") -> "ModelPair":
    """``tiny:0`` / ``tiny:1`` on the CPU, else the embedded default pair (target on ``device``);
    the draft in the default quantization, what users get."""
    from ..specs import load_pair

    spec = ("tiny:0", "tiny:1") if tiny else ("default", "default")
    return load_pair(spec[0], spec[1], DRAFT_QUANTIZATION, device="cpu" if tiny else device)


def make_workload(pair: "ModelPair", preset: Preset, tiny: bool) -> Workload:
    if tiny:
        n = 4 if preset.prompts_per_category == 1 else 8
        g = torch.Generator().manual_seed(1234)
        prompts = [torch.randint(0, pair.vocab_size, (int(torch.randint(4, 11, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
        return Workload(prompts, ["random"] * n, [None] * n)
    from ..tokens import encode_prompt
    from ..prompts import default_prompt_records

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
