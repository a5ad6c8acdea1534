"""The target's sampler settings (temperature, top-k, top-p, min-p, repetition penalty) as pure
tensor functions, applied to the target's logits before the accept test.

Speculative sampling keeps EXACTLY the law p that the accept test uses, whatever q the drafts
came from (verification.py). So for the output to follow the target's own sampler under these
settings, p must be the target's *warped* distribution, computed as transformers' ``generate``
computes it: the repetition penalty on the raw logits, then temperature, top-k, top-p, min-p
(``GenerationMixin._get_logits_processor``; one token always kept). The rules below are those of
``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper`` and ``MinPLogitsWarper`` (tests/test_sampling_controls.py compares them
on random logits).

The repetition penalty depends on the sequence so far, so each drafted position has its own:
position j of a row sees the row's committed tokens (prompt included, as in ``generate``) plus
the path's first j tokens (``path_seen``). Greedy decoding applies only the penalty (the
warpers never change the argmax), like ``generate(do_sample=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off ("top-k-sampling": not the wire's K)
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off

    @property
    def truncates(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty != 1.0

    @classmethod
    def from_config(cls, cfg) -> "SamplingSettings":
        return cls(temperature=float(cfg.temperature) if cfg.temperature > 0 else 1.0, top_k=int(cfg.top_k_sampling),
                   top_p=float(cfg.top_p), min_p=float(cfg.min_p), repetition_penalty=float(cfg.repetition_penalty))


def seen_mask(histories: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """[N, V] bool: which tokens occur in each row's history."""
    mask = torch.zeros((len(histories), vocab_size), dtype=torch.bool)
    for row, tokens in enumerate(histories):
        ids = [int(t) for t in tokens if 0 <= int(t) < vocab_size]
        if ids:
            mask[row, ids] = True
    return mask


def path_seen(committed: Sequence[Sequence[int]], path: torch.Tensor, lengths: torch.Tensor,
              vocab_size: int) -> torch.Tensor:
    """[B, G+1, V] bool: tokens seen before each path position.

    ``committed[b]``: row b's committed tokens; ``path`` [B, G] the draft path, valid up to
    ``lengths`` [B]. Position j sees committed + path[:j] (padding beyond a row's path ignored).
    """
    b, g = path.shape
    out = seen_mask(committed, vocab_size).unsqueeze(1).repeat(1, g + 1, 1)  # [B, G+1, V]
    for row in range(b):
        for j in range(min(int(lengths[row]), g)):
            out[row, j + 1:, int(path[row, j])] = True
    return out



def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty: ``logits`` [..., V], ``seen`` [..., V] bool -> [..., V].

    A seen token's logit is divided by ``penalty`` when positive, multiplied when negative (CTRL,
    as transformers does)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def warp(logits: torch.Tensor, settings: SamplingSettings, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Processed logits [..., V] (``-inf`` outside the kept support) whose softmax is the sampler's law.

    ``seen`` [..., V] bool is needed when the repetition penalty is on."""
    x = logits.float()
    if settings.penalizes:
        if seen is None:
            raise ValueError("the repetition penalty needs the tokens seen so far")
        x = penalize(x, seen, settings.repetition_penalty)
    if settings.temperature != 1.0:
        x = x / settings.temperature
    neg = float("-inf")
    if settings.top_k > 0:
        k = min(int(settings.top_k), x.shape[-1])
        kth = torch.topk(x, k, dim=-1).values[..., -1:]  # [..., 1]
        x = x.masked_fill(x < kth, neg)
    if settings.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)  # ascending, as transformers
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - settings.top_p)
        remove_sorted[..., -1:] = False  # the most likely token always stays
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        x = x.masked_fill(remove, neg)
    if settings.min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        remove = probs < settings.min_p * probs.amax(dim=-1, keepdim=True)
        top = x.argmax(dim=-1, keepdim=True)
        remove = remove.scatter(-1, top, False)
        x = x.masked_fill(remove, neg)
    return x


def warped_probs(logits: torch.Tensor, settings: SamplingSettings, seen: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(warp(logits)) [..., V]: the target's sampling law at each position."""
    return torch.softmax(warp(logits, settings, seen), dim=-1)
