"""Server-side reconstruction of a dense draft distribution q_hat from K ids + K probabilities.

A client sends, per drafted position, K token ids and their draft probabilities (kept mass
S = sum of the K). The server must turn that into a full distribution over the vocabulary to
run the accept test. Three rules:

``uniform`` (uniform diffusion)
    Kept tokens keep their probability; the missing mass 1 - S is spread evenly over the
    V - K tokens that were not sent. TV(q, q_hat) <= 1 - S.

``temperature`` (temperature scaling)
    Truncation makes a renormalised top-K over-confident: its top token gets p_1 / S > p_1.
    We flatten the kept log-probabilities with a temperature tau >= 1,
    ``q_hat = softmax(log p_kept / tau)`` over the kept tokens, choosing tau (by bisection)
    so that the reconstructed top-1 probability equals the one statistic we know exactly,
    the true top-1 probability p_1. Mass is moved from the top token to the other kept
    tokens in proportion to a flatter shape rather than invented for tokens never seen.
    When no tau >= 1 can reach p_1 (K = 1, or p_1 < 1/K so even a flat top-K is too
    confident) the rule falls back to uniform diffusion. TV(q, q_hat) <= 1 - S still holds
    for the renormalised part and the bias is reported by measurement.

``exact`` (sparsify-then-sample)
    q_hat = the kept probabilities renormalised, zero elsewhere. When the client sampled its
    token from exactly this sparse distribution (``draft_sampling="sparse"``), q_hat *is* the
    draft distribution and verification is lossless.

All rules are pure tensor functions: ``[N, K]`` ids and probabilities in, ``[N, V]`` out.
"""

from __future__ import annotations

import torch

RULES = ("uniform", "temperature", "exact")

_BISECTION_STEPS = 40
_MAX_LOG_TAU = 12.0  # tau up to e^12: flat enough for any K we allow


def reconstruct(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int, rule: str) -> torch.Tensor:
    """Dense ``[N, V]`` float32 q_hat from ``[N, K]`` token ids and probabilities."""
    if rule not in RULES:
        raise ValueError(f"unknown reconstruction rule {rule!r}; choose one of {', '.join(RULES)}")
    ids = ids.long()
    probs = probs.float().clamp_min(0.0)
    if rule == "uniform":
        return reconstruct_uniform(ids, probs, vocab_size)
    if rule == "exact":
        return reconstruct_exact(ids, probs, vocab_size)
    return reconstruct_temperature(ids, probs, vocab_size)


def _scatter(ids: torch.Tensor, values: torch.Tensor, vocab_size: int, fill: torch.Tensor | float) -> torch.Tensor:
    n = ids.shape[0]
    if isinstance(fill, torch.Tensor):
        out = fill.reshape(n, 1).expand(n, vocab_size).clone()
    else:
        out = torch.full((n, vocab_size), float(fill), dtype=torch.float32, device=ids.device)
    return out.scatter_(1, ids, values)


def reconstruct_exact(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    kept = probs.sum(dim=1, keepdim=True)
    # A row with no mass cannot have been sampled from; keep it all-zero so it is never used.
    normalised = torch.where(kept > 0, probs / kept.clamp_min(torch.finfo(torch.float32).tiny), probs)
    return _scatter(ids, normalised, vocab_size, 0.0)


def reconstruct_uniform(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    k = ids.shape[1]
    kept = probs.sum(dim=1)
    if k >= vocab_size:
        return _scatter(ids, probs / kept.clamp_min(1e-30).unsqueeze(1), vocab_size, 0.0)
    fill = (1.0 - kept).clamp_min(0.0) / (vocab_size - k)
    q = _scatter(ids, probs, vocab_size, fill)
    # float16 rounding can push S a hair above 1: renormalise so q_hat is a distribution.
    return q / q.sum(dim=1, keepdim=True)


def temperature_for_top1(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, tau >= 1 with softmax(log p / tau)[top] == p_top, and whether it exists."""
    positive = probs > 0
    k_eff = positive.sum(dim=1)
    kept = probs.sum(dim=1)
    p_top = probs.max(dim=1).values
    logp = torch.where(positive, probs.clamp_min(1e-38).log(), torch.full_like(probs, float("-inf")))
    # share(tau) falls from p_top/S (tau=1) to 1/k_eff (tau -> inf); solvable iff p_top >= 1/k_eff.
    solvable = (k_eff > 1) & (p_top * k_eff >= 1.0) & (kept > 0)
    lo = torch.zeros_like(p_top)
    hi = torch.full_like(p_top, _MAX_LOG_TAU)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        share = torch.softmax(logp / mid.exp().unsqueeze(1), dim=1).max(dim=1).values
        too_sharp = share > p_top
        lo = torch.where(too_sharp, mid, lo)
        hi = torch.where(too_sharp, hi, mid)
    return ((lo + hi) / 2).exp(), solvable


def reconstruct_temperature(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    tau, solvable = temperature_for_top1(probs)
    positive = probs > 0
    logp = torch.where(positive, probs.clamp_min(1e-38).log(), torch.full_like(probs, float("-inf")))
    flattened = torch.softmax(logp / tau.unsqueeze(1), dim=1)
    flattened = torch.nan_to_num(flattened, nan=0.0)
    scaled = _scatter(ids, flattened, vocab_size, 0.0)
    if bool(solvable.all()):
        return scaled
    fallback = reconstruct_uniform(ids, probs, vocab_size)
    return torch.where(solvable.unsqueeze(1), scaled, fallback)
