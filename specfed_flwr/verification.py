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
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    lengths: torch.Tensor,
    generator: torch.Generator | None = None,
) -> VerificationResult:
    """``target_probs`` [B, G+1, V], ``draft_probs`` [B, G, V], ``draft_tokens`` [B, G], ``lengths`` [B]."""
    draft_tokens = draft_tokens.long()
    lengths = lengths.long()
    b, g = draft_tokens.shape
    device = target_probs.device
    if g > 0:
        safe_tokens = draft_tokens.clamp_min(0).unsqueeze(-1)
        p_x = target_probs[:, :g].gather(2, safe_tokens).squeeze(-1)
        q_x = draft_probs.gather(2, safe_tokens).squeeze(-1)
        u = torch.rand((b, g), generator=generator, device=device, dtype=p_x.dtype)
        # u < p/q  <=>  u*q < p, which also accepts (prob. 1) when q(x) = 0 and p(x) > 0.
        accepted = u * q_x < p_x
        n = _first_rejection(accepted, lengths)
    else:
        n = torch.zeros(b, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)
    p_n = target_probs[rows, n]  # [B, V]
    rejected = n < lengths
    if g > 0:
        q_n = draft_probs[rows, n.clamp_max(g - 1)]
        residual = (p_n - q_n).clamp_min(0.0)
        has_residual = residual.sum(dim=1, keepdim=True) > 0
        residual = torch.where(has_residual, residual, p_n)
        sample_from = torch.where(rejected.unsqueeze(1), residual, p_n)
    else:
        sample_from = p_n
    last = torch.multinomial(sample_from, 1, generator=generator).squeeze(1)
    return _assemble(draft_tokens, n, last)


def verify(
    target: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_tokens: torch.Tensor,
    lengths: torch.Tensor,
    *,
    greedy: bool,
    generator: torch.Generator | None = None,
) -> VerificationResult:
    """Greedy path when ``greedy`` (``target`` may be logits), else the sampling path (``target`` = probabilities)."""
    if greedy:
        return verify_greedy(target, draft_tokens, lengths)
    if draft_probs is None:
        raise ValueError("sampling verification needs the draft distributions")
    return verify_sampling(target, draft_probs, draft_tokens, lengths, generator)
