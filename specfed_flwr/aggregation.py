"""Bias-aware client weights and the draft path the server verifies.

Weighting rule (documented in docs/THEORY.md):

    w_i  proportional to  (A_i * S_i) ** sharpness,   and 0 when A_i < drop_below

* ``A_i``: exponential moving average of client i's measured agreement with the target,
  sum_x min(p(x), q_hat_i(x)), observed at every position it drafted and the server
  verified. This is the acceptance rate the client alone would get (alpha in the theory),
  so it captures both the draft model's quality and what reconstruction lost. In greedy mode
  the engine observes the indicator "drafted token = target argmax" instead (the greedy
  acceptance rate; reconstruction plays no part there).
* ``S_i``: EMA of the kept mass of its top-K. 1 - S bounds the reconstruction's TV error,
  so a client whose q_hat is mostly inferred rather than sent is trusted less.
* ``sharpness`` > 1 concentrates the weight on the best clients; a client that keeps
  disagreeing (random or adversarial drafts) falls under ``drop_below`` and gets no weight
  until a probe round shows it agreeing again.

Draft path selection (one position at a time, batched over sequences): the clients still
"active" at a position are those whose own drafted prefix equals the path so far. The
aggregate ``q_bar = sum_i w_i q_hat_i / sum_i w_i`` over active clients is what the path
token is verified against, so the scheme that picks the token decides exactness:

* ``consensus``: the server samples the token from q_bar itself. Exact for ANY
  reconstruction rule and any weights (they change speed, never correctness).
* ``pick``: the server picks a client with probability proportional to its weight and takes
  that client's drafted token. If each client sampled from exactly its q_hat (sparse
  sampling + exact reconstruction) this token is a draw from q_bar: exact, and it always
  matches at least one client so drafts run longer. With full-distribution drafts it is the
  paper-faithful (biased, <= 1 - S per position) mode.
* ``vote`` (greedy decoding): the drafted token with the largest total weight among active
  clients. Greedy verification ignores q, so any choice is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SCHEMES = ("consensus", "pick", "vote")


@dataclass
class WeightingConfig:
    ema: float = 0.3  # weight of the newest observation
    prior_agreement: float = 0.8
    prior_kept_mass: float = 1.0
    sharpness: float = 2.0
    drop_below: float = 0.05


@dataclass
class ClientRecord:
    agreement: float
    kept_mass: float
    positions: int = 0
    rounds: int = 0


@dataclass
class BiasAwareWeights:
    config: WeightingConfig = field(default_factory=WeightingConfig)
    records: dict[str, ClientRecord] = field(default_factory=dict)

    def _record(self, client: str) -> ClientRecord:
        if client not in self.records:
            self.records[client] = ClientRecord(self.config.prior_agreement, self.config.prior_kept_mass)
        return self.records[client]

    def observe(self, client: str, agreements: np.ndarray | list[float], kept_mass: np.ndarray | list[float]) -> None:
        """Fold one round's per-position measurements of one client into its averages."""
        rec = self._record(client)
        agreements = np.asarray(agreements, dtype=np.float64)
        kept_mass = np.asarray(kept_mass, dtype=np.float64)
        lam = self.config.ema
        if agreements.size:
            rec.agreement = (1 - lam) * rec.agreement + lam * float(np.clip(agreements.mean(), 0.0, 1.0))
            rec.positions += int(agreements.size)
        if kept_mass.size:
            rec.kept_mass = (1 - lam) * rec.kept_mass + lam * float(np.clip(kept_mass.mean(), 0.0, 1.0))
        rec.rounds += 1

    def raw_weight(self, client: str) -> float:
        rec = self._record(client)
        if rec.agreement < self.config.drop_below:
            return 0.0
        return float((rec.agreement * rec.kept_mass) ** self.config.sharpness)

    def weights(self, clients: list[str]) -> np.ndarray:
        """Normalised weights (all zero only if every client is dropped)."""
        raw = np.array([self.raw_weight(c) for c in clients], dtype=np.float64)
        total = raw.sum()
        return raw / total if total > 0 else raw

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {
            c: {"agreement": r.agreement, "kept_mass": r.kept_mass, "weight": self.raw_weight(c), "positions": r.positions}
            for c, r in self.records.items()
        }


@dataclass
class DraftPath:
    tokens: torch.Tensor  # [B, G] long (0 beyond lengths)
    lengths: torch.Tensor  # [B] long
    q_bar: torch.Tensor  # [B, G, V] float: the distribution each path token is verified against


def select_draft_path(
    client_tokens: torch.Tensor,
    client_q: torch.Tensor,
    client_lengths: torch.Tensor,
    weights: torch.Tensor,
    scheme: str,
    generator: torch.Generator | None = None,
) -> DraftPath:
    """Build each sequence's draft path from C clients' drafts.

    ``client_tokens`` [B, C, G] drafted tokens, ``client_q`` [B, C, G, V] reconstructed q_hat,
    ``client_lengths`` [B, C] drafted positions (0 = no draft from that client),
    ``weights`` [C] or [B, C] non-negative.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown draft selection scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    b, c, g = client_tokens.shape
    v = client_q.shape[-1]
    device = client_q.device
    client_tokens = client_tokens.long()
    w = weights.to(device=device, dtype=torch.float32)
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(b, c)
    active = (client_lengths > 0) & (w > 0)
    alive = torch.ones(b, dtype=torch.bool, device=device)
    tokens = torch.zeros((b, g), dtype=torch.long, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    q_bar = torch.zeros((b, g, v), dtype=torch.float32, device=device)
    for j in range(g):
        active = active & (client_lengths > j)
        w_act = w * active
        total = w_act.sum(dim=1)
        alive = alive & (total > 0)
        if not bool(alive.any()):
            break
        w_norm = torch.where(alive.unsqueeze(1), w_act / total.clamp_min(1e-30).unsqueeze(1), torch.zeros_like(w_act))
        q_j = torch.einsum("bc,bcv->bv", w_norm, client_q[:, :, j].float())
        drafted_j = client_tokens[:, :, j]
        safe_rows = torch.where(alive.unsqueeze(1), q_j, torch.full_like(q_j, 1.0 / v))
        if scheme == "consensus":
            token = torch.multinomial(safe_rows, 1, generator=generator).squeeze(1)
        elif scheme == "pick":
            pick_w = torch.where(alive.unsqueeze(1), w_norm, torch.full_like(w_norm, 1.0 / c))
            chosen = torch.multinomial(pick_w, 1, generator=generator)
            token = drafted_j.gather(1, chosen).squeeze(1)
        else:  # vote
            votes = torch.zeros((b, v), dtype=torch.float32, device=device)
            votes.scatter_add_(1, drafted_j.clamp(0, v - 1), w_norm)
            # q_bar breaks ties between equally weighted drafted tokens
            token = (votes + 1e-6 * safe_rows).argmax(dim=1)
        token = torch.where(alive, token, torch.zeros_like(token))
        tokens[:, j] = token
        q_bar[:, j] = torch.where(alive.unsqueeze(1), q_j, torch.zeros_like(q_j))
        lengths = lengths + alive.long()
        active = active & (drafted_j == token.unsqueeze(1))
    return DraftPath(tokens=tokens, lengths=lengths, q_bar=q_bar)


def prefix_match(
    client_tokens: torch.Tensor, client_lengths: torch.Tensor, path_tokens: torch.Tensor, path_lengths: torch.Tensor
) -> torch.Tensor:
    """[B, C, G] bool: client c drafted position g of the path from the path's own prefix.

    That is where its q_hat is conditioned on the same context as the target's p, so
    sum_x min(p, q_hat) there measures the client -- whatever weight it had this round
    (a dropped client is measured too, which is how it can rejoin).
    """
    b, c, g = client_tokens.shape
    if g == 0:
        return torch.zeros((b, c, 0), dtype=torch.bool)
    same = client_tokens.long() == path_tokens.long().unsqueeze(1)  # [B, C, G]
    # position j needs tokens 0..j-1 equal: exclusive cumulative product
    prior_equal = torch.cumprod(torch.cat([torch.ones_like(same[:, :, :1]), same[:, :, :-1]], dim=2).int(), dim=2).bool()
    positions = torch.arange(g)
    drafted = positions.view(1, 1, g) < client_lengths.unsqueeze(2)
    on_path = (positions.view(1, g) < path_lengths.unsqueeze(1)).unsqueeze(1)
    return prior_equal & drafted & on_path


def agreement(target_probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_x min(p(x), q(x)) along the last axis: the acceptance probability alpha of q against p."""
    return torch.minimum(target_probs, q).sum(dim=-1)
