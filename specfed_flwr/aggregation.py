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

from .config import SpecFedConfig
from .randomness import inverse_cdf
from .sparse import (SparseQ, agreement as sparse_agreement, from_dense, mix, q_at, sample, stack, sum_min,
                     zeros as sparse_zeros)

SCHEMES = ("consensus", "pick", "vote")


@dataclass
class WeightingConfig:
    """The weights' settings; the run's three come from ``SpecFedConfig`` (their one source)."""

    ema: float = SpecFedConfig.weight_ema  # weight of the newest observation
    prior_agreement: float = 0.8
    prior_kept_mass: float = 1.0
    sharpness: float = SpecFedConfig.weight_sharpness
    drop_below: float = SpecFedConfig.weight_drop_below

    @classmethod
    def from_config(cls, config: SpecFedConfig) -> "WeightingConfig":
        return cls(ema=config.weight_ema, sharpness=config.weight_sharpness, drop_below=config.weight_drop_below)


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
    q_bar: SparseQ  # batch [B, G], M = C * K slots: the distribution each path token is verified against

    def trimmed(self) -> "DraftPath":
        """The path cut to its longest row (G = max(lengths)): positions nobody reached go."""
        g = int(self.lengths.max()) if self.lengths.numel() else 0
        return DraftPath(tokens=self.tokens[:, :g], lengths=self.lengths, q_bar=self.q_bar[:, :g])


def select_draft_path(
    client_tokens: torch.Tensor,
    client_q: SparseQ | torch.Tensor,
    client_lengths: torch.Tensor,
    weights: torch.Tensor,
    scheme: str,
    generator: torch.Generator | None = None,
    *,
    uniforms: torch.Tensor | None = None,
) -> DraftPath:
    """Build each sequence's draft path from C clients' drafts.

    ``client_tokens`` [B, C, G] drafted tokens; ``client_q`` the reconstructed q_hat, a SparseQ
    of batch [B, C, G] (``reconstruction.reconstruct_sparse``; a dense [B, C, G, V] tensor is
    accepted for tests and small vocabularies); ``client_lengths`` [B, C] drafted positions
    (0 = no draft from that client); ``weights`` [C] or [B, C] non-negative.

    Works on the sparse form only: per position the aggregate q_bar is the weighted mixture
    of the active clients' q_hat (``sparse.mix``: the union of their K ids plus one fill
    value), the consensus token is drawn from it (``sparse.sample``), pick and vote need only
    the drafted tokens. Memory and time are O(B * C * G * K) (vote: O(B * C^2 * G)), with no
    vocabulary axis.

    Randomness: ``uniforms`` [B, G, 2] in [0, 1) are the draws of each row and path position
    (consensus: column 0 picks the slot, column 1 the unlisted token; pick: column 0 picks the
    client; vote: unused), so the path is a pure function of them -- the engine passes
    position-keyed uniforms (``randomness.py``). Without them draws come from ``generator``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown draft selection scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if isinstance(client_q, torch.Tensor):
        client_q = from_dense(client_q)
    b, c, g = client_tokens.shape
    v = client_q.vocab_size
    device = client_q.values.device
    client_tokens = client_tokens.long()
    w = weights.to(device=device, dtype=torch.float32)  # [C] or [B, C]
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(b, c)  # [B, C]
    active = (client_lengths > 0) & (w > 0)  # [B, C] drafted this far from the path's own prefix
    alive = torch.ones(b, dtype=torch.bool, device=device)  # [B] the path goes on
    tokens = torch.zeros((b, g), dtype=torch.long, device=device)  # [B, G]
    lengths = torch.zeros(b, dtype=torch.long, device=device)  # [B]
    q_bars: list[SparseQ] = []
    for j in range(g):
        active = active & (client_lengths > j)
        w_act = w * active  # [B, C]
        total = w_act.sum(dim=1)  # [B]
        alive = alive & (total > 0)
        if not bool(alive.any()):
            break
        w_norm = torch.where(alive.unsqueeze(1), w_act / total.clamp_min(1e-30).unsqueeze(1),
                             torch.zeros_like(w_act))  # [B, C]
        q_j = mix(client_q[:, :, j], w_norm)  # batch [B]: q_bar at position j (all-zero on dead rows)
        drafted_j = client_tokens[:, :, j]  # [B, C]
        u_j = None if uniforms is None else uniforms[:, j]  # [B, 2]
        token = _path_token(scheme, q_j, drafted_j, w_norm, alive, generator, u_j)  # [B]
        token = torch.where(alive, token, torch.zeros_like(token))
        tokens[:, j] = token
        q_bars.append(q_j)
        lengths = lengths + alive.long()
        active = active & (drafted_j == token.unsqueeze(1))
    slots = client_q.ids.shape[-1] * (c if c > 1 else 1)  # what ``mix`` returns
    while len(q_bars) < g:  # the path ended early everywhere: all-zero positions
        q_bars.append(sparse_zeros((b,), slots, v, device))
    q_bar = stack(q_bars, dim=1) if q_bars else sparse_zeros((b, 0), slots, v, device)  # batch [B, G]
    return DraftPath(tokens=tokens, lengths=lengths, q_bar=q_bar)


def _path_token(scheme: str, q_j: SparseQ, drafted_j: torch.Tensor, w_norm: torch.Tensor, alive: torch.Tensor,
                generator: torch.Generator | None, u_j: torch.Tensor | None) -> torch.Tensor:
    """The path token of one position -> [B] long: ``q_j`` batch [B] (q_bar there), ``drafted_j``
    [B, C] the clients' tokens, ``w_norm`` [B, C] the active clients' normalised weights,
    ``alive`` [B] rows whose path goes on, ``u_j`` [B, 2] the position's uniforms (or None:
    draws from ``generator``)."""
    c = drafted_j.shape[1]
    if scheme == "consensus":
        return sample(_with_uniform_rows(q_j, ~alive), generator, uniforms=u_j)  # [B]
    if scheme == "pick":
        pick_w = torch.where(alive.unsqueeze(1), w_norm, torch.full_like(w_norm, 1.0 / c))  # [B, C]
        if u_j is None:
            chosen = torch.multinomial(pick_w, 1, generator=generator)  # [B, 1]
        else:
            chosen = inverse_cdf(pick_w, u_j[:, 0]).unsqueeze(1)  # [B, 1]
        return drafted_j.gather(1, chosen).squeeze(1)  # [B]
    # vote
    same = drafted_j.unsqueeze(2) == drafted_j.unsqueeze(1)  # [B, C, C]
    votes = (same.float() * w_norm.unsqueeze(1)).sum(dim=2)  # [B, C] weight behind client c's token
    # q_bar breaks ties between equally weighted drafted tokens
    score = torch.where(w_norm > 0, votes + 1e-6 * q_at(q_j[:, None], drafted_j),
                        torch.full_like(votes, float("-inf")))  # [B, C]
    return drafted_j.gather(1, score.argmax(dim=1, keepdim=True)).squeeze(1)  # [B]


def _with_uniform_rows(q: SparseQ, rows: torch.Tensor) -> SparseQ:
    """``q`` (batch [B]) with the ``rows`` [B] bool replaced by the uniform distribution, so that
    every row can be sampled (a dead row's token is discarded)."""
    r = rows.unsqueeze(1)  # [B, 1]
    return SparseQ(
        ids=torch.where(r, torch.full_like(q.ids, -1), q.ids),  # [B, M]
        values=torch.where(r, torch.zeros_like(q.values), q.values),  # [B, M]
        fill=torch.where(rows, torch.full_like(q.fill, 1.0 / q.vocab_size), q.fill),  # [B]
        vocab_size=q.vocab_size,
    )


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
    """sum_x min(p(x), q(x)) along the last axis: the acceptance probability alpha of q against p (dense)."""
    return torch.minimum(target_probs, q).sum(dim=-1)


def path_agreement(
    target: torch.Tensor,
    q_bar: SparseQ,
    client_q: SparseQ | None = None,
    *,
    logits: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Measured agreement sum_x min(p(x), q(x)) at every path position, from the sparse form.

    ``target`` [B, G', V] (G' >= G): the target's probabilities p, or its logits when
    ``logits`` (then p = softmax(logits / temperature), one position at a time, so greedy mode
    never holds a dense probability tensor); ``q_bar`` batch [B, G] (the path's aggregate);
    ``client_q`` batch [B, C, G] or None -> (alpha of q_bar [B, G], alpha of each client's
    q_hat [B, C, G] or None). The only vocabulary-sized temporaries are [B, V]; the fills of all
    C + 1 distributions share one pass over p (``sparse.sum_min``).
    """
    b, g = q_bar.shape
    c = client_q.shape[1] if client_q is not None else 0
    alpha_bar = torch.zeros((b, g), dtype=torch.float32)  # [B, G]
    alpha_clients = torch.zeros((b, c, g), dtype=torch.float32) if client_q is not None else None  # [B, C, G]
    for j in range(g):
        p_j = torch.softmax(target[:, j].float() / temperature, dim=-1) if logits else target[:, j]  # [B, V]
        fills = [q_bar.fill[:, j : j + 1]] + ([client_q.fill[:, :, j]] if client_q is not None else [])
        min_fill = sum_min(p_j, torch.cat(fills, dim=1))  # [B, 1 + C]
        alpha_bar[:, j] = sparse_agreement(p_j, q_bar[:, j : j + 1], min_fill[:, :1])[:, 0]
        if client_q is not None:
            alpha_clients[:, :, j] = sparse_agreement(p_j, client_q[:, :, j], min_fill[:, 1:])
    return alpha_bar, alpha_clients
