"""Sparse draft distributions: what the server knows of a q without a vocabulary-sized tensor.

A client sends K token ids and probabilities per drafted position; every reconstruction rule
(see ``reconstruction.py``) gives the tokens it did NOT send one and the same probability
(uniform diffusion: (1 - S)/(V - K) after normalisation; temperature scaling and exact: 0).
So q_hat is fully described by

    ids     [..., M] long   the listed tokens, unique along the last axis; -1 marks an empty slot
    values  [..., M] float  q at each listed token (0 at empty slots)
    fill    [...]    float  q at every token that is not listed

and so is any weighted mixture of such distributions (the aggregate q_bar: listed = the union
of the clients' ids, fill = the weighted sum of their fills). Everything the server does with
q -- mix, sample a consensus token, evaluate q at the drafted tokens, the residual
norm(max(0, p - q)) at the first rejection, and sum_x min(p(x), q(x)) for the agreement
weights -- has a closed form in these three tensors. The server's memory and time per round
then grow with clients x positions x K, never with clients x positions x vocabulary; the
only vocabulary-sized tensors are the target's own ``[B, V]`` rows.

All functions are pure (tensors in, tensors out, no state), batched over the leading axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .randomness import inverse_cdf

__all__ = ["SparseQ", "agreement", "densify", "from_dense", "mix", "q_at", "sample", "stack", "sum_min", "zeros"]


@dataclass(frozen=True)
class SparseQ:
    """A distribution over ``vocab_size`` tokens per batch element (see the module docstring).

    ``q(x) = values[..., m]`` if ``ids[..., m] == x`` else ``fill[...]``.
    """

    ids: torch.Tensor  # [..., M] long, unique per row; -1 = empty slot
    values: torch.Tensor  # [..., M] float32; 0 at empty slots
    fill: torch.Tensor  # [...] float32: q of each unlisted token
    vocab_size: int

    @property
    def shape(self) -> torch.Size:
        """The batch shape (``fill.shape``)."""
        return self.fill.shape

    @property
    def listed(self) -> torch.Tensor:
        """bool ``[..., M]``: the slot holds a token."""
        return self.ids >= 0

    def __getitem__(self, index) -> "SparseQ":
        """Index the batch axes (never the slot axis): ``q[rows, positions]``."""
        return SparseQ(self.ids[index], self.values[index], self.fill[index], self.vocab_size)


def zeros(shape: tuple[int, ...], slots: int, vocab_size: int, device: torch.device | None = None) -> SparseQ:
    """The all-zero "distribution" of batch ``shape`` with ``slots`` empty slots (padding: never drafted)."""
    return SparseQ(
        ids=torch.full((*shape, slots), -1, dtype=torch.long, device=device),  # [..., M]
        values=torch.zeros((*shape, slots), dtype=torch.float32, device=device),  # [..., M]
        fill=torch.zeros(shape, dtype=torch.float32, device=device),  # [...]
        vocab_size=int(vocab_size),
    )


def from_dense(q: torch.Tensor) -> SparseQ:
    """A dense ``[..., V]`` distribution as a SparseQ that lists every token (M = V, fill 0).

    For tests and small vocabularies; the engine never builds a dense q."""
    v = q.shape[-1]
    ids = torch.arange(v, device=q.device).expand(q.shape)  # [..., V]
    return SparseQ(ids=ids, values=q.float(), fill=q.new_zeros(q.shape[:-1], dtype=torch.float32), vocab_size=v)


def stack(qs: list[SparseQ], dim: int) -> SparseQ:
    """Stack SparseQs of equal batch shape and M along a new batch axis ``dim``."""
    if dim < 0:
        raise ValueError("stack along a non-negative batch axis")
    return SparseQ(
        ids=torch.stack([q.ids for q in qs], dim=dim),
        values=torch.stack([q.values for q in qs], dim=dim),
        fill=torch.stack([q.fill for q in qs], dim=dim),
        vocab_size=qs[0].vocab_size,
    )


def densify(q: SparseQ) -> torch.Tensor:
    """The dense ``[..., V]`` float32 tensor of q (for one row per sequence, or tests)."""
    batch, m, v = q.fill.shape, q.ids.shape[-1], q.vocab_size
    n = q.fill.numel()
    # one extra column receives the empty slots, then is dropped
    dense = q.fill.reshape(n, 1).float().expand(n, v + 1).clone()  # [N, V+1]
    slots = torch.where(q.listed, q.ids, torch.full_like(q.ids, v)).reshape(n, m)  # [N, M]
    dense.scatter_(1, slots, q.values.reshape(n, m).float())
    return dense[:, :v].reshape(*batch, v)


def q_at(q: SparseQ, tokens: torch.Tensor) -> torch.Tensor:
    """q(token) per batch element: ``tokens`` [...] long -> [...] float32."""
    hit = q.ids == tokens.long().unsqueeze(-1)  # [..., M]; empty slots (-1) never hit a token >= 0
    listed_value = torch.where(hit, q.values, torch.zeros_like(q.values)).sum(dim=-1)  # [...]
    return torch.where(hit.any(dim=-1), listed_value, q.fill)


def mix(qs: SparseQ, weights: torch.Tensor) -> SparseQ:
    """The mixture ``sum_c weights[..., c] * q_c`` of ``qs`` with batch shape [B, C] -> batch [B].

    ``weights`` [B, C] non-negative (normalised by the caller; a zero weight drops the client).
    q_bar(x) = F + sum_{c lists x} w_c (q_c(x) - f_c), with F = sum_c w_c f_c the value of every
    token nobody listed. The union of the ids is coalesced (sorted, duplicates merged), so the
    result again lists each token once: M = C * M_client slots, no vocabulary axis.
    """
    b, c, m = qs.ids.shape
    w = weights.float()  # [B, C]
    fill = (w * qs.fill).sum(dim=1)  # [B]  F
    keep = qs.listed & (w > 0).unsqueeze(-1)  # [B, C, M] slots of clients that count
    if c == 1:
        # one client: q_bar is its q times its weight, no ids to merge (keeps a dense-as-sparse
        # input with M = V cheap: no sort over the vocabulary)
        values = torch.where(keep, qs.values * w.unsqueeze(-1), torch.zeros_like(qs.values))  # [B, 1, M]
        return SparseQ(
            ids=torch.where(keep, qs.ids, torch.full_like(qs.ids, -1))[:, 0],  # [B, M]
            values=values[:, 0],  # [B, M]
            fill=fill,  # [B]
            vocab_size=qs.vocab_size,
        )
    delta = w.unsqueeze(-1) * (qs.values - qs.fill.unsqueeze(-1))  # [B, C, M] contribution above F
    ids = torch.where(keep, qs.ids, torch.full_like(qs.ids, -1)).reshape(b, c * m)  # [B, CM]
    delta = torch.where(keep, delta, torch.zeros_like(delta)).reshape(b, c * m)  # [B, CM]
    sorted_ids, order = ids.sort(dim=1)  # [B, CM], empty slots (-1) first
    sorted_delta = delta.gather(1, order)  # [B, CM]
    listed = sorted_ids >= 0  # [B, CM]
    new = torch.ones_like(listed)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = listed & new  # [B, CM] first slot of each distinct token
    segment = (first.long().cumsum(dim=1) - 1).clamp_min(0)  # [B, CM] which distinct token a slot belongs to
    merged = torch.zeros_like(sorted_delta).scatter_add_(1, segment, sorted_delta)  # [B, CM] per distinct token
    value = (fill.unsqueeze(1) + merged.gather(1, segment)).clamp_min(0.0)  # [B, CM]
    return SparseQ(
        ids=torch.where(first, sorted_ids, torch.full_like(sorted_ids, -1)),  # [B, CM]
        values=torch.where(first, value, torch.zeros_like(value)),  # [B, CM]
        fill=fill,
        vocab_size=qs.vocab_size,
    )


def sample(q: SparseQ, generator: torch.Generator | None = None, *, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``q`` (batch [N]) drawn from q itself -> [N] long.

    A listed token with probability q(x); otherwise (probability fill * (V - #listed)) one of
    the unlisted tokens uniformly: the r-th unlisted id is r + #{listed s_i with s_i - i <= r}
    over the sorted listed ids s_i (i = rank). Every row must have positive mass.

    ``uniforms`` [N, 2] in [0, 1) (column 0: which slot, by inverse CDF; column 1: which
    unlisted token) makes the draw a pure function of them (position-keyed randomness, see
    ``randomness.py``); without them the draws come from ``generator``.
    """
    n, m = q.ids.shape
    v = q.vocab_size
    listed = q.listed  # [N, M]
    n_listed = listed.sum(dim=1)  # [N]
    rest = q.fill.float() * (v - n_listed).float()  # [N] mass of the unlisted tokens together
    weights = torch.cat([torch.where(listed, q.values.float(), torch.zeros_like(q.values.float())),
                         rest.unsqueeze(1)], dim=1)  # [N, M+1]
    if uniforms is None:
        slot = torch.multinomial(weights, 1, generator=generator).squeeze(1)  # [N]; M = "unlisted"
    else:
        slot = inverse_cdf(weights, uniforms[:, 0])  # [N]; M = "unlisted"
    chosen = q.ids.gather(1, slot.clamp_max(m - 1).unsqueeze(1)).squeeze(1) if m else torch.zeros_like(slot)  # [N]
    unlisted = slot == m  # [N]
    if not bool(unlisted.any()):
        return chosen
    free = (v - n_listed).clamp_min(1)  # [N] how many unlisted tokens there are
    if uniforms is None:
        u = torch.rand(n, generator=generator, device=q.ids.device)  # [N]
    else:
        u = uniforms[:, 1].to(q.ids.device)  # [N] float64
    r = torch.minimum((u * free).long(), free - 1)  # [N] rank among the unlisted tokens
    s = torch.where(listed, q.ids, torch.full_like(q.ids, v)).sort(dim=1).values  # [N, M] listed first, ascending
    rank = torch.arange(m, device=q.ids.device).unsqueeze(0)  # [1, M]
    shift = ((s - rank <= r.unsqueeze(1)) & (s < v)).sum(dim=1)  # [N]
    return torch.where(unlisted, r + shift, chosen)


def sum_min(p: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """``sum_x min(p[n, x], t[n, k])`` for T thresholds per row: p [N, V], t [N, T] -> [N, T].

    Sort the T thresholds, put each p(x) in the bucket r(x) = #{t <= p(x)}, and sum p and count
    per bucket: a threshold t_k (sorted index k) gets p(x) from buckets r <= k and t_k from the
    others. O(N V log T) time and one [N, V] index instead of T passes over the vocabulary.
    """
    n, v = p.shape
    t = thresholds.float()
    if not bool((t > 0).any()):  # exact / temperature rules: every fill is 0
        return torch.zeros_like(t)
    t_sorted, order = t.sort(dim=1)  # [N, T]
    bucket = torch.searchsorted(t_sorted, p.float().contiguous(), right=True)  # [N, V] in 0..T
    buckets = t.shape[1] + 1
    mass = torch.zeros((n, buckets), dtype=torch.float32, device=p.device).scatter_add_(1, bucket, p.float())  # [N, T+1]
    ones = torch.ones((1, 1), dtype=torch.float32, device=p.device).expand(n, v)  # [N, V] view, no memory
    count = torch.zeros((n, buckets), dtype=torch.float32, device=p.device).scatter_add_(1, bucket, ones)  # [N, T+1]
    below = mass.cumsum(dim=1)[:, :-1]  # [N, T] sum of p(x) with r(x) <= k
    above = v - count.cumsum(dim=1)[:, :-1]  # [N, T] number of x with r(x) > k, i.e. p(x) >= t_k
    result_sorted = below + t_sorted * above  # [N, T]
    return torch.empty_like(result_sorted).scatter_(1, order, result_sorted)


def agreement(p: torch.Tensor, q: SparseQ, min_fill: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_x min(p(x), q(x))`` (alpha of q against p): p [N, V], q batch [N, T] -> [N, T].

    = sum_x min(p(x), fill) + sum over listed x of [min(p(x), q(x)) - min(p(x), fill)].
    ``min_fill`` [N, T]: ``sum_min(p, q.fill)`` when the caller already has it.
    """
    n, t = q.fill.shape
    m = q.ids.shape[-1]
    listed = q.listed  # [N, T, M]
    p_listed = p.gather(1, q.ids.clamp_min(0).reshape(n, t * m)).reshape(n, t, m).float()  # [N, T, M]
    fill = q.fill.float().unsqueeze(-1)  # [N, T, 1]
    correction = torch.minimum(p_listed, q.values.float()) - torch.minimum(p_listed, fill)  # [N, T, M]
    correction = torch.where(listed, correction, torch.zeros_like(correction)).sum(dim=-1)  # [N, T]
    return (sum_min(p, q.fill) if min_fill is None else min_fill) + correction
