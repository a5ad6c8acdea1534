"""The steps of one server round, after validation: gather the drafts (sparse q_hat per client),
select the draft path, score it (one target forward), verify, observe agreement, commit.

``RoundSteps`` is a part of ``Coordinator`` (a mixin: it uses the Coordinator's target, config,
weights and sequences); kept apart so that each file holds one idea: ``coordinator.py``
plans rounds and keeps the books, this file turns one round's replies into committed tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .aggregation import DraftPath, path_agreement, prefix_match, select_draft_path
from .randomness import ACCEPT, RESIDUAL, SELECT, SELECT_RANK, keyed_uniforms
from .reconstruction import reconstruct_sparse
from .round_report import SequenceResult
from .sampling import SamplingSettings, path_seen, penalize, warped_probs
from .sparse import SparseQ, zeros as sparse_zeros
from .verification import VerificationResult, verify_greedy, verify_sampling
from .wire import DraftReply


@dataclass
class _Sequence:
    seq_id: int
    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    owner: str | None
    prompt: str | None
    cohort: int = 0  # the cohort whose rounds this sequence goes through (see pipeline.py)
    generated: list[int] = field(default_factory=list)
    client_known: dict[str, int] = field(default_factory=dict)  # committed length each client holds
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    alpha_sum: float = 0.0
    alpha_n: int = 0
    stop: tuple[str, ...] = ()  # stop strings of this sequence (run's ``stop`` or its prompt's own)
    sampling: SamplingSettings | None = None  # this prompt's own temperature / top-p (None: the run's)
    key: int = 0  # randomness key (``randomness.sequence_key``): every draw of this sequence is keyed by it
    seeded: bool = False  # the prompt has its own seed: drafts with the fixed settings (``ClientSettings.fixed``)

    @property
    def committed(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.generated)


@dataclass
class RoundDrafts:
    """One round's valid drafts as tensors (rows = active sequences, columns = replying clients)."""

    clients: list[str]
    tokens: torch.Tensor  # [B, C, G] long: drafted tokens (0 beyond lengths)
    lengths: torch.Tensor  # [B, C] long: drafted positions (0 = no draft)
    q: SparseQ  # batch [B, C, G], M = max K: reconstructed q_hat, all-zero where nothing was drafted
    kept_mass: dict[str, np.ndarray]  # client -> [N] kept mass S of each position it drafted
    weights: torch.Tensor  # [C] float32: bias-aware weights this round (before observing it)


class RoundSteps:
    """The named steps of ``Coordinator.complete_round`` (see the module docstring)."""

    def _gather_drafts(self, seqs: list[_Sequence], replies: dict[str, DraftReply]) -> RoundDrafts:
        """The valid replies as tensors: rows = active sequences, columns = replying clients.

        Each client's K ids + probabilities are reconstructed in closed form
        (``reconstruct_sparse``), one call per client over all its drafted positions; nothing
        here has a vocabulary axis."""
        clients = list(replies)
        b, c, v = len(seqs), len(clients), self.vocab_size
        g = max([int(r.lengths.max()) if r.lengths.size else 0 for r in replies.values()], default=0)
        slots = max([r.k for r in replies.values()], default=1)
        tokens = torch.zeros((b, c, g), dtype=torch.long)  # [B, C, G] drafted tokens
        lengths = torch.zeros((b, c), dtype=torch.long)  # [B, C] drafted positions
        q = sparse_zeros((b, c, g), slots, v)  # batch [B, C, G], M = max K: q_hat (all-zero where not drafted)
        kept: dict[str, np.ndarray] = {}
        row_of = {s.seq_id: i for i, s in enumerate(seqs)}
        for ci, client in enumerate(clients):
            reply = replies[client]
            rows = np.array([row_of.get(int(s), -1) for s in reply.seq_ids], dtype=np.int64)  # [B_r]
            drafted = reply.valid_mask() & (rows >= 0)[:, None]  # [B_r, G_r]
            r_idx, j_idx = np.nonzero(drafted)  # [N] each: the drafted (row, position) pairs
            kept[client] = np.zeros(0, dtype=np.float32)
            if not r_idx.size:
                continue
            ids = torch.from_numpy(reply.token_ids[r_idx, j_idx].astype(np.int64))  # [N, K_r]
            probs = torch.from_numpy(reply.probs[r_idx, j_idx].astype(np.float32))  # [N, K_r]
            counts = None if reply.counts is None else torch.from_numpy(reply.counts[r_idx, j_idx].astype(np.int64))  # [N]
            q_hat = reconstruct_sparse(ids, probs, v, self.config.reconstruction, counts)  # batch [N], M = K_r
            at_b, at_j = torch.from_numpy(rows[r_idx]), torch.from_numpy(j_idx)  # [N], [N]
            tokens[at_b, ci, at_j] = ids[:, 0]
            q.ids[at_b, ci, at_j, : ids.shape[1]] = q_hat.ids
            q.values[at_b, ci, at_j, : ids.shape[1]] = q_hat.values
            q.fill[at_b, ci, at_j] = q_hat.fill
            answered = rows >= 0
            lengths[torch.from_numpy(rows[answered]), ci] = torch.from_numpy(reply.lengths[answered].astype(np.int64))
            kept[client] = probs.sum(dim=1).numpy()
        weights = torch.from_numpy(self.weights.weights(clients)).float() if c else torch.zeros(0)  # [C]
        return RoundDrafts(clients=clients, tokens=tokens, lengths=lengths, q=q, kept_mass=kept, weights=weights)

    def _skip_decoded(self, seqs: list[_Sequence], drafts: RoundDrafts) -> RoundDrafts:
        """Drop from each client's drafts the positions the server decoded itself while this
        round's requests were out (``Coordinator.step_in_flight``: m tokens past the planned
        prefix). A client's drafts stay usable only if their first m tokens are exactly those
        tokens; the rest is then shifted to start at the new prefix. Exact: a draft token at
        position m + j was drawn given the drafted prefix, which equals the committed one, so its
        law (and its q_hat) are those of a draft made from the new prefix; a client whose prefix
        differs drops out of the row, as in consensus selection."""
        for i, seq in enumerate(seqs):
            planned = self._planned_committed.get(seq.seq_id)
            m = len(seq.committed) - planned if planned is not None else 0
            if m <= 0:
                continue
            done = torch.tensor(seq.committed[planned:], dtype=torch.long)  # [m]
            for c in range(len(drafts.clients)):
                n = int(drafts.lengths[i, c])
                keep = n > m and torch.equal(drafts.tokens[i, c, :m], done)
                g = drafts.tokens.shape[-1]
                if keep:
                    drafts.tokens[i, c, : g - m] = drafts.tokens[i, c, m:].clone()
                    drafts.q.ids[i, c, : g - m] = drafts.q.ids[i, c, m:].clone()
                    drafts.q.values[i, c, : g - m] = drafts.q.values[i, c, m:].clone()
                    drafts.q.fill[i, c, : g - m] = drafts.q.fill[i, c, m:].clone()
                start = n - m if keep else 0
                drafts.tokens[i, c, start:] = 0
                drafts.q.ids[i, c, start:] = -1
                drafts.q.values[i, c, start:] = 0.0
                drafts.q.fill[i, c, start:] = 0.0
                drafts.lengths[i, c] = n - m if keep else 0
        return drafts

    @staticmethod
    def _uniforms(seqs: list[_Sequence], width: int, stream: int) -> torch.Tensor:
        """[B, width] float64: each sequence's uniforms of ``stream`` at its next ``width``
        absolute positions (from its committed length), keyed by its own key."""
        return keyed_uniforms([s.key for s in seqs], [len(s.committed) for s in seqs], width, stream)

    def _select_path(self, seqs: list[_Sequence], drafts: RoundDrafts) -> DraftPath:
        """The draft path each sequence verifies (scheme: ``config.selection_scheme()``), cut to
        its longest row so the target scores no position that nobody reached. The selection's
        draws are position-keyed per sequence (``randomness.py``)."""
        scheme = self.config.selection_scheme()
        uniforms = None
        if scheme != "vote":
            g = drafts.tokens.shape[2]
            uniforms = torch.stack([self._uniforms(seqs, g, SELECT), self._uniforms(seqs, g, SELECT_RANK)],
                                   dim=-1)  # [B, G, 2]
        path = select_draft_path(drafts.tokens, drafts.q, drafts.lengths, drafts.weights, scheme, uniforms=uniforms)
        return path.trimmed()

    def _score(self, seqs: list[_Sequence], path: DraftPath) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """ONE target forward over every sequence's path: the logits [B, G+1, V], in sampling
        mode also the target's sampling law [B, G+1, V] (None in greedy mode, which needs only
        the argmax), and the seconds the forward took.

        The law is the target's own sampler under the run's settings (``sampling.warp``:
        repetition penalty per position from the row's committed tokens + path prefix, then
        temperature, top-k-sampling, top-p, min-p), so the accept test keeps exactly that law.
        Greedy applies only the repetition penalty, like ``generate(do_sample=False)``."""
        g = path.tokens.shape[1]
        paths = [path.tokens[i, : int(path.lengths[i])].tolist() for i in range(len(seqs))]
        verify_started = time.perf_counter()
        logits = self.target.score_batch([s.seq_id for s in seqs], paths)  # [B, G'+1, V], G' = longest path
        verify_seconds = time.perf_counter() - verify_started
        logits = logits[:, : g + 1]  # [B, G+1, V] (a wrapped scorer may pad wider)
        settings = SamplingSettings.from_config(self.config)
        seen = None
        if settings.penalizes:
            seen = path_seen([s.committed for s in seqs], path.tokens, path.lengths, logits.shape[-1])  # [B, G+1, V]
        if self.config.greedy:
            return (penalize(logits, seen, settings.repetition_penalty) if seen is not None else logits), None, verify_seconds
        if any(s.sampling is not None for s in seqs):  # some rows have their own temperature / top-p
            probs = torch.stack([warped_probs(logits[i], s.sampling or settings, None if seen is None else seen[i])
                                 for i, s in enumerate(seqs)])  # [B, G+1, V]
        elif not settings.truncates and seen is None:
            temperature = settings.temperature
            probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # [B, G+1, V]
        else:
            probs = warped_probs(logits, settings, seen)  # [B, G+1, V]
        return logits, probs, verify_seconds

    def _verify(self, seqs: list[_Sequence], logits: torch.Tensor, probs: torch.Tensor | None,
                path: DraftPath) -> VerificationResult:
        """The accept test: greedy (target argmax) or speculative sampling against q_bar, with
        each sequence's accept and correction/bonus uniforms keyed by its key and the absolute
        position (so the output does not depend on the batch, the cohorts or the round order)."""
        if probs is None:
            return verify_greedy(logits, path.tokens, path.lengths)
        g = path.tokens.shape[1]
        return verify_sampling(probs, path.q_bar, path.tokens, path.lengths,
                               accept_uniforms=self._uniforms(seqs, g, ACCEPT),  # [B, G]
                               sample_uniforms=self._uniforms(seqs, g + 1, RESIDUAL))  # [B, G+1]

    def _observe_agreement(
        self, drafts: RoundDrafts, path: DraftPath, logits: torch.Tensor, probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Measure alpha of q_bar per path position ([B, G]) and fold each client's agreement,
        at the path positions it drafted from the path's own prefix, into its bias-aware weight.

        Greedy: a drafted token is accepted iff it is the target's argmax, so that indicator is
        the client's acceptance rate (sum min(p, q_hat) would judge a correct but flat draft as
        bad and a confident wrong one as fair); alpha of q_bar is still measured, against
        softmax(logits). Sampling: sum_x min(p(x), q_hat(x)), from the sparse form. Returns
        (alpha_bar [B, G], mean agreement per client this round)."""
        g = path.tokens.shape[1]
        tokens = drafts.tokens[:, :, :g]  # [B, C, G]
        greedy = probs is None
        if greedy:
            alpha_bar, client_alpha = path_agreement(logits, path.q_bar, logits=True)
        else:
            alpha_bar, client_alpha = path_agreement(probs, path.q_bar, drafts.q[:, :, :g])
        matched = prefix_match(tokens, drafts.lengths, path.tokens, path.lengths)  # [B, C, G]
        target_top = logits[:, :g].argmax(dim=-1) if greedy else None  # [B, G]
        agreements: dict[str, float] = {}
        for ci, client in enumerate(drafts.clients):
            mask = matched[:, ci, :]  # [B, G]
            if target_top is not None:
                values = (tokens[:, ci] == target_top).float()[mask]
            else:
                values = client_alpha[:, ci][mask]
            self.weights.observe(client, values.numpy(), drafts.kept_mass.get(client, np.zeros(0)))
            if values.numel():
                agreements[client] = float(values.mean())
        return alpha_bar, agreements

    def _commit(
        self, seqs: list[_Sequence], path: DraftPath, result: VerificationResult, alpha_bar: torch.Tensor
    ) -> tuple[int, list[SequenceResult]]:
        """Append each sequence's accepted drafts and correction/bonus token (up to its budget,
        stopping at EOS), crop the target's cache, and finish sequences. Returns (tokens
        emitted, sequences finished this round)."""
        valid_pos = torch.arange(path.tokens.shape[1]).unsqueeze(0) < path.lengths.unsqueeze(1)  # [B, G]
        emitted = 0
        finished: list[SequenceResult] = []
        for i, seq in enumerate(seqs):
            new_tokens = result.tokens_of(i)
            n_acc = int(result.num_accepted[i])
            self.target.commit(seq.seq_id, n_acc, new_tokens[-1])
            seq.rounds += 1
            seq.drafted += int(path.lengths[i])
            seq.accepted += n_acc
            row_alpha = alpha_bar[i][valid_pos[i]]
            seq.alpha_sum += float(row_alpha.sum())
            seq.alpha_n += int(row_alpha.numel())
            reason = None
            for tok in new_tokens:
                if seq.remaining <= 0:
                    break
                seq.generated.append(tok)
                emitted += 1
                if tok in self.eos_token_ids:
                    reason = "eos"
                    break
                if seq.stop and self._stopped(seq):
                    reason = "stop"
                    break
            if reason is None and seq.remaining <= 0:
                reason = "length"
                self.hit_limit("max_new_tokens", f"sequence {seq.index} stopped at {seq.max_new_tokens} new tokens")
            if reason is not None:
                finished.append(self._finish(seq, reason))
        return emitted, finished

    def _stopped(self, seq: _Sequence) -> bool:
        """Whether the output now contains one of the sequence's stop strings (checked after every
        token, so the output ends with the token that completes it, as generate's ``stop_strings``).
        Only the tail that can hold a new match is decoded."""
        longest = max(len(s) for s in seq.stop)
        tail = seq.generated[-(longest + 8):]  # a token decodes to >= 1 character (+ slack for merges)
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in seq.stop)

    def _finish(self, seq: _Sequence, reason: str) -> SequenceResult:
        del self._active[seq.seq_id]
        self.target.release(seq.seq_id)
        for client in seq.client_known:
            self._to_release.setdefault(client, set()).add(seq.seq_id)
        result = SequenceResult(
            index=seq.index,
            seq_id=seq.seq_id,
            prompt_ids=seq.prompt_ids,
            token_ids=list(seq.generated),
            finish_reason=reason,
            rounds=seq.rounds,
            drafted=seq.drafted,
            accepted=seq.accepted,
            alpha=seq.alpha_sum / seq.alpha_n if seq.alpha_n else None,
            owner=seq.owner,
            prompt=seq.prompt,
        )
        self.finished.append(result)
        return result
