"""Speculative verification as a pure tensors-in, tensors-out function.

Given the target's distributions at every drafted position (plus one past the end), the
distribution each draft token was sampled from, and the draft tokens, decide how many draft
tokens are accepted and which correction or bonus token follows. Batched over sequences;
each sequence has its own draft length (padding beyond it is ignored).

Sampling path (Leviathan et al. / Chen et al.): accept x with probability
min(1, p(x)/q(x)); at the first rejection sample from norm(max(0, p - q)); if every draft
token is accepted, sample a bonus token from p at the next position. The output is then
distributed exactly as the target, provided q is the distribution x was actually drawn from.

Greedy path: accept while the draft token equals the target's argmax; the target's argmax
at the first mismatch (or after the last draft) is emitted. Draft distributions are not
needed, so whatever clients send cannot change the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .randomness import inverse_cdf
from .sparse import SparseQ, densify, q_at


@dataclass
class VerificationResult:
    num_accepted: torch.Tensor  # [B] long: accepted draft tokens
    tokens: torch.Tensor  # [B, G+1] long: accepted drafts then the correction/bonus token, -1 padded
    accepted: torch.Tensor  # [B, G] bool: per-position acceptance (False beyond the first rejection)

    @property
    def num_tokens(self) -> torch.Tensor:
        return self.num_accepted + 1

    def tokens_of(self, row: int) -> list[int]:
        return self.tokens[row, : int(self.num_accepted[row]) + 1].tolist()


def _first_rejection(accepted: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Index of the first non-accepted valid position, or the length when all are accepted."""
    b, g = accepted.shape
    if g == 0:
        return torch.zeros(b, dtype=torch.long, device=accepted.device)
    positions = torch.arange(g, device=accepted.device).expand(b, g)
    valid = positions < lengths.unsqueeze(1)
    rejected = valid & ~accepted
    first = torch.where(rejected, positions, torch.full_like(positions, g)).min(dim=1).values
    return torch.minimum(first, lengths)


def _assemble(draft_tokens: torch.Tensor, n: torch.Tensor, last_token: torch.Tensor) -> VerificationResult:
    b, g = draft_tokens.shape
    positions = torch.arange(g + 1, device=draft_tokens.device).expand(b, g + 1)
    padded = torch.cat([draft_tokens, torch.full((b, 1), -1, dtype=torch.long, device=draft_tokens.device)], dim=1)
    tokens = torch.where(positions < n.unsqueeze(1), padded, torch.full_like(padded, -1))
    tokens = tokens.scatter(1, n.unsqueeze(1), last_token.unsqueeze(1))
    accepted = positions[:, :g] < n.unsqueeze(1)
    return VerificationResult(num_accepted=n, tokens=tokens, accepted=accepted)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor, lengths: torch.Tensor) -> VerificationResult:
    """``target_logits`` [B, G+1, V] (logits or probabilities), ``draft_tokens`` [B, G], ``lengths`` [B]."""
    draft_tokens = draft_tokens.long()
    lengths = lengths.long()
    choice = target_logits.argmax(dim=-1)  # [B, G+1]
    g = draft_tokens.shape[1]
    matches = draft_tokens == choice[:, :g]
    n = _first_rejection(matches, lengths)
    last = choice.gather(1, n.unsqueeze(1)).squeeze(1)
    return _assemble(draft_tokens, n, last)


def verify_sampling(
    target_probs: torch.Tensor,
    draft_probs: SparseQ | torch.Tensor,
    draft_tokens: torch.Tensor,
    lengths: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    accept_uniforms: torch.Tensor | None = None,
    sample_uniforms: torch.Tensor | None = None,
) -> VerificationResult:
    """``target_probs`` [B, G+1, V], ``draft_probs`` the distribution each draft token was drawn
    from: a SparseQ of batch [B, G] (what the server has, see ``sparse.py``) or a dense [B, G, V]
    tensor; ``draft_tokens`` [B, G], ``lengths`` [B].

    The accept test needs q only at the drafted tokens ([B, G]) and the residual
    norm(max(0, p - q)) only at each row's first rejection, so at most one dense [B, V] row of q
    is ever built.

    Randomness: ``accept_uniforms`` [B, G] (the accept test at each path position) and
    ``sample_uniforms`` [B, G+1] (the correction/bonus token, drawn by inverse CDF with the
    uniform of the position it lands on) make the result a pure function of them; the engine
    passes position-keyed uniforms (``randomness.py``). Each uniform influences at most one
    outcome: only positions up to the first rejection count. Without them (both None) draws
    come from ``generator``.
    """
    if (accept_uniforms is None) != (sample_uniforms is None):
        raise ValueError("pass both accept_uniforms and sample_uniforms, or neither")
    draft_tokens = draft_tokens.long()
    lengths = lengths.long()
    b, g = draft_tokens.shape
    device = target_probs.device
    if g > 0:
        safe_tokens = draft_tokens.clamp_min(0)  # [B, G]
        p_x = target_probs[:, :g].gather(2, safe_tokens.unsqueeze(-1)).squeeze(-1)  # [B, G]
        q_x = _q_at_tokens(draft_probs, safe_tokens).to(p_x.dtype)  # [B, G]
        if accept_uniforms is None:
            u = torch.rand((b, g), generator=generator, device=device, dtype=p_x.dtype)  # [B, G]
        else:  # float64 (53-bit) uniforms: compare in float64, so u never rounds up to 1
            u = accept_uniforms[:, :g].to(device)  # [B, G]
            p_x, q_x = p_x.double(), q_x.double()
        # u < p/q  <=>  u*q < p, which also accepts (prob. 1) when q(x) = 0 and p(x) > 0.
        accepted = u * q_x < p_x  # [B, G]
        n = _first_rejection(accepted, lengths)  # [B]
    else:
        n = torch.zeros(b, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)
    p_n = target_probs[rows, n]  # [B, V]
    rejected = n < lengths  # [B]
    if g > 0:
        q_n = _q_row(draft_probs, rows, n.clamp_max(g - 1)).to(p_n.dtype)  # [B, V]
        residual = (p_n - q_n).clamp_min(0.0)  # [B, V]
        has_residual = residual.sum(dim=1, keepdim=True) > 0  # [B, 1]
        residual = torch.where(has_residual, residual, p_n)
        sample_from = torch.where(rejected.unsqueeze(1), residual, p_n)  # [B, V]
    else:
        sample_from = p_n
    if sample_uniforms is None:
        last = torch.multinomial(sample_from, 1, generator=generator).squeeze(1)  # [B]
    else:
        u_last = sample_uniforms.to(device).gather(1, n.unsqueeze(1)).squeeze(1)  # [B]: the uniform of position n
        last = inverse_cdf(sample_from, u_last)  # [B]
    return _assemble(draft_tokens, n, last)


def _q_at_tokens(q: SparseQ | torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """q at one token per position: [B, G] long -> [B, G]."""
    if isinstance(q, SparseQ):
        return q_at(q, tokens)
    return q.gather(2, tokens.unsqueeze(-1)).squeeze(-1)


def _q_row(q: SparseQ | torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The dense [B, V] row of q at one position per sequence."""
    if isinstance(q, SparseQ):
        return densify(q[rows, positions])
    return q[rows, positions]
