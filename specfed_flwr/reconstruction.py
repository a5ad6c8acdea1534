"""Server-side reconstruction of a draft distribution q_hat from K ids + K probabilities.

A client sends, per drafted position, K token ids and their draft probabilities (kept mass
S = sum of the K). The server must infer from that a distribution over the whole vocabulary
to run the accept test. Three rules:

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

Every rule gives all tokens the client did not send the same probability (uniform: the
normalised (1 - S)/(V - K); temperature and exact: 0), so ``reconstruct_sparse`` returns q_hat
in closed form as a :class:`~specfed_flwr.sparse.SparseQ`: the K ids, q_hat at them, and that
one "fill" value -- ``[N, K]`` + ``[N]`` instead of ``[N, V]``. The server works on this form
only (see ``sparse.py``); ``reconstruct`` densifies it, for tests and offline analysis.

All rules are pure tensor functions. The K ids of a row must be distinct (the wire decoder
refuses a reply that repeats an id at a position).

Variable K (``counts``): a row of a budgeted reply sends only its first ``counts[n]`` slots. The
rules then see exactly those: the other slots become empty (id -1, value 0) and uniform
diffusion spreads 1 - S over the V - counts[n] tokens that row did not send.
"""

from __future__ import annotations

import torch

from .sparse import SparseQ, densify

RULES = ("uniform", "temperature", "exact")

_BISECTION_STEPS = 40
_MAX_LOG_TAU = 12.0  # tau up to e^12: flat enough for any K we allow


def reconstruct(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int, rule: str,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``[N, V]`` float32 q_hat from ``[N, K]`` token ids and probabilities."""
    return densify(reconstruct_sparse(ids, probs, vocab_size, rule, counts))


def reconstruct_sparse(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int, rule: str,
                       counts: torch.Tensor | None = None) -> SparseQ:
    """q_hat of ``[N, K]`` ids and probabilities as a SparseQ of batch [N] with M = K slots.

    ``counts`` [N] (optional): slots sent per row; slots at or past it are empty."""
    if rule not in RULES:
        raise ValueError(f"unknown reconstruction rule {rule!r}; choose one of {', '.join(RULES)}")
    ids = ids.long()  # [N, K]
    probs = probs.float().clamp_min(0.0)  # [N, K]
    listed = None
    if counts is not None:
        listed = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < counts.long().unsqueeze(1)  # [N, K]
        ids = torch.where(listed, ids, torch.full_like(ids, -1))
        probs = torch.where(listed, probs, torch.zeros_like(probs))
    if rule == "uniform":
        values, fill = uniform_closed_form(probs, vocab_size, counts)
    elif rule == "exact":
        values, fill = exact_closed_form(probs)
    else:
        values, fill = temperature_closed_form(probs, vocab_size, counts)
    if listed is not None:
        values = torch.where(listed, values, torch.zeros_like(values))
    return SparseQ(ids=ids, values=values, fill=fill, vocab_size=int(vocab_size))


def exact_closed_form(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Renormalised top-K, 0 elsewhere: probs [N, K] -> (values [N, K], fill [N])."""
    kept = probs.sum(dim=1, keepdim=True)  # [N, 1]
    # A row with no mass cannot have been sampled from; keep it all-zero so it is never used.
    values = torch.where(kept > 0, probs / kept.clamp_min(torch.finfo(torch.float32).tiny), probs)  # [N, K]
    return values, probs.new_zeros(probs.shape[0])


def uniform_closed_form(probs: torch.Tensor, vocab_size: int,
                        counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept probabilities as sent, (1 - S)/(V - K) on each other token, then normalised by
    Z = S + max(0, 1 - S) (float16 rounding can push S a hair above 1): probs [N, K] ->
    (values [N, K], fill [N]). ``counts`` [N]: K per row (variable K)."""
    kept = probs.sum(dim=1)  # [N]
    if counts is None:
        k = probs.shape[1]
        if k >= vocab_size:  # every token was sent: nothing to diffuse
            return probs / kept.clamp_min(1e-30).unsqueeze(1), probs.new_zeros(probs.shape[0])
        unsent = torch.full_like(kept, float(vocab_size - k))  # [N]
    else:
        unsent = (vocab_size - counts.to(kept.dtype)).clamp_min(0.0)  # [N]
    fill = torch.where(unsent > 0, (1.0 - kept).clamp_min(0.0) / unsent.clamp_min(1.0), torch.zeros_like(kept))  # [N]
    total = (kept + fill * unsent).clamp_min(1e-30)  # [N]  Z
    return probs / total.unsqueeze(1), fill / total


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


def temperature_closed_form(probs: torch.Tensor, vocab_size: int,
                            counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(log p_kept / tau) on the kept tokens, 0 elsewhere; uniform diffusion on the rows
    where no tau >= 1 reaches p_1: probs [N, K] -> (values [N, K], fill [N])."""
    tau, solvable = temperature_for_top1(probs)  # [N], [N]
    positive = probs > 0  # [N, K]
    logp = torch.where(positive, probs.clamp_min(1e-38).log(), torch.full_like(probs, float("-inf")))  # [N, K]
    flattened = torch.nan_to_num(torch.softmax(logp / tau.unsqueeze(1), dim=1), nan=0.0)  # [N, K]
    if bool(solvable.all()):
        return flattened, probs.new_zeros(probs.shape[0])
    fallback_values, fallback_fill = uniform_closed_form(probs, vocab_size, counts)
    values = torch.where(solvable.unsqueeze(1), flattened, fallback_values)  # [N, K]
    fill = torch.where(solvable, torch.zeros_like(fallback_fill), fallback_fill)  # [N]
    return values, fill
