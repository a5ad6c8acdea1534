"""Draft proposers: what runs on the device.

``DraftProposer`` is the small interface the rest of the system relies on (in the spirit of
transformers' candidate generators): ``sync`` applies the accepted delta the server sent
(cropping the rejected tail of the KV cache), ``propose`` drafts up to gamma tokens for a
batch of sequences and returns the compact top-K reply, ``forget`` frees a sequence.

``sparsify`` is the one place that decides what a drafted position sends:

* greedy: the argmax is drafted (it is the top-1, so it is in slot 0 already);
* ``sparse`` (sparsify-then-sample, exact): the top-K probabilities are rounded to float16
  *first*, and the token is sampled from those rounded values renormalised -- the very
  distribution the server reconstructs with the ``exact`` rule;
* ``full`` (paper-faithful): the token is sampled from the full q; if it is outside the
  top-K it replaces the K-th slot, so the drafted token is always sent.

The drafted token is moved to slot 0 (see docs/DESIGN.md, wire format).

``HFDraftProposer`` drafts all sequences of a request together (``batched=True``, the
default): one forward per draft step for the whole batch -- the first step feeds every
sequence's pending tokens (right-padded, left-padded caches, attention mask and per-row
positions, see ``kvcache.PaddedBatch``), the next gamma-1 steps one token per row; a row whose
gamma is reached idles (masked) until the longest one is done. Each row is still sampled by
``sparsify`` with its own ``sequence_generator(seed, round, seq_id)``, so the reply does not
depend on batching (up to float noise in the logits). ``batched=False`` keeps the
per-sequence loop.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .kvcache import (PaddedBatch, accepts_logits_to_keep, cache_is_batchable, crop_cache, forward_with_cache,
                      supports_padded_batching)
from .wire import DraftReply, make_reply

_FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)


class DraftStateError(ValueError):
    """The server's delta does not fit the sequence state this device holds."""


def sparsify(
    q: torch.Tensor, k: int, mode: str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` [N, V] -> (ids [N, K] long, probs [N, K] float16, drafted [N] long); drafted token in slot 0.

    ``mode`` is ``greedy``, ``sparse`` or ``full`` (see module docstring).
    """
    n, v = q.shape
    k = min(int(k), v)
    vals, ids = torch.topk(q.float(), k, dim=1)
    probs = vals.to(torch.float16)
    rows = torch.arange(n)
    if mode == "greedy":
        return ids, probs, ids[:, 0].clone()
    if mode == "sparse":
        weights = probs.float()
        slot = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    elif mode == "full":
        drafted = torch.multinomial(q.float(), 1, generator=generator).squeeze(1)
        hit = ids == drafted.unsqueeze(1)
        in_top = hit.any(dim=1)
        slot = torch.where(in_top, hit.float().argmax(dim=1), torch.full_like(drafted, k - 1))
        missing = ~in_top
        if bool(missing.any()):
            ids = ids.clone()
            probs = probs.clone()
            ids[missing, k - 1] = drafted[missing]
            outside = q[missing, drafted[missing]].to(torch.float16).clamp_min(_FP16_TINY)
            probs[missing, k - 1] = outside
    else:
        raise ValueError(f"unknown draft sampling mode {mode!r}; choose greedy, sparse or full")
    # move the drafted slot to slot 0
    first_ids, first_probs = ids[:, 0].clone(), probs[:, 0].clone()
    ids = ids.clone()
    probs = probs.clone()
    ids[rows, 0] = ids[rows, slot]
    probs[rows, 0] = probs[rows, slot]
    ids[rows, slot] = torch.where(slot == 0, ids[rows, 0], first_ids)
    probs[rows, slot] = torch.where(slot == 0, probs[rows, 0], first_probs)
    return ids, probs, ids[:, 0].clone()


def sequence_generator(seed: int, round_: int, seq_id: int, salt: str = "") -> torch.Generator:
    """Per (seed, round, sequence) randomness: independent of how sequences are batched."""
    digest = hashlib.blake2b(f"{seed}:{round_}:{seq_id}:{salt}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class DraftProposer(abc.ABC):
    """Device-side drafting with a KV cache kept per sequence."""

    vocab_size: int

    @abc.abstractmethod
    def sync(self, seq_id: int, start: int, tokens: Sequence[int]) -> None:
        """The committed sequence is now ``committed[:start] + tokens``."""

    @abc.abstractmethod
    def propose(
        self,
        seq_ids: Sequence[int],
        gammas: Sequence[int],
        k: int,
        *,
        temperature: float,
        sampling: str,
        seed: int = 0,
        round_: int = 0,
    ) -> DraftReply:
        """Draft ``gammas[b]`` tokens after each sequence's committed prefix."""

    @abc.abstractmethod
    def forget(self, seq_id: int) -> None:
        """Free the state of a finished sequence."""

    def known_sequences(self) -> list[int]:
        return []


@dataclass
class _SequenceState:
    tokens: list[int] = field(default_factory=list)  # committed prefix, then this device's drafts
    committed: int = 0
    cache: object | None = None
    cache_len: int = 0  # positions whose keys/values are in the cache (a prefix of tokens)


class HFDraftProposer(DraftProposer):
    """Drafts with any Hugging Face causal LM; one DynamicCache per sequence."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int | None = None,
        device: str | torch.device | None = None,
        *,
        batched: bool = True,
    ):
        self.model = model.eval()
        self.vocab_size = int(vocab_size or model.config.vocab_size)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batched = bool(batched) and supports_padded_batching(model)
        self._states: dict[int, _SequenceState] = {}
        self.forward_calls = 0

    def known_sequences(self) -> list[int]:
        return list(self._states)

    def committed_length(self, seq_id: int) -> int:
        """Tokens of ``seq_id`` the server has committed (as far as this device knows)."""
        return self._states[seq_id].committed

    def drafted_tokens(self, seq_id: int) -> list[int]:
        """This device's latest drafts for ``seq_id`` (past the committed prefix)."""
        state = self._states[seq_id]
        return state.tokens[state.committed:]

    def sync(self, seq_id: int, start: int, tokens: Sequence[int]) -> None:
        tokens = [int(t) for t in tokens]
        state = self._states.get(seq_id)
        if state is None or start == 0:
            if start != 0:
                raise DraftStateError(
                    f"sequence {seq_id}: delta starts at {start} but this device holds no state for it "
                    "(the server should resend the whole sequence with start 0)"
                )
            state = self._states[seq_id] = _SequenceState() if state is None else state
        if start > state.committed:
            raise DraftStateError(
                f"sequence {seq_id}: delta starts at {start} but this device only has {state.committed} committed tokens"
            )
        new_tokens = state.tokens[:start] + tokens
        # keep the cached keys/values of the longest prefix that is unchanged
        keep = start
        for old, new in zip(state.tokens[start:], tokens):
            if old != new:
                break
            keep += 1
        state.cache_len = crop_cache(state.cache, state.cache_len, keep)
        state.tokens = new_tokens
        state.committed = len(new_tokens)

    def forget(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    @torch.inference_mode()
    def _next_distribution(self, state: _SequenceState, temperature: float) -> torch.Tensor:
        if state.cache_len >= len(state.tokens):
            # every token is cached: recompute the last one to get its logits
            state.cache_len = crop_cache(state.cache, state.cache_len, len(state.tokens) - 1)
        pending = torch.tensor([state.tokens[state.cache_len :]], dtype=torch.long, device=self.device)
        # only the last position's distribution is needed: skip the vocabulary-sized head elsewhere
        # (a prompt's prefill would otherwise compute [prompt length, V] logits)
        keep = {"logits_to_keep": 1} if pending.shape[1] > 1 and accepts_logits_to_keep(self.model) else {}
        out, state.cache = forward_with_cache(self.model, state.cache, input_ids=pending, **keep)
        self.forward_calls += 1
        state.cache_len = len(state.tokens)
        logits = out.logits[0, -1, : self.vocab_size].float()
        scale = temperature if temperature > 0 else 1.0
        return torch.softmax(logits / scale, dim=-1).cpu()

    def _distribution(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        scale = temperature if temperature > 0 else 1.0
        return torch.softmax(logits[: self.vocab_size].float() / scale, dim=-1).cpu()

    def propose(self, seq_ids, gammas, k, *, temperature, sampling, seed=0, round_=0) -> DraftReply:
        seq_ids = [int(s) for s in seq_ids]
        gammas = [int(g) for g in gammas]
        if len(gammas) != len(seq_ids):
            raise ValueError(f"{len(seq_ids)} sequences but {len(gammas)} draft lengths")
        g_max = max(gammas, default=0)
        k = min(int(k), self.vocab_size)
        b = len(seq_ids)
        ids_out = np.zeros((b, g_max, k), dtype=np.int64)
        probs_out = np.zeros((b, g_max, k), dtype=np.float16)
        lengths = np.zeros(b, dtype=np.int32)
        mode = "greedy" if temperature <= 0 else sampling
        states = []
        for seq_id in seq_ids:
            state = self._states.get(seq_id)
            if state is None:
                raise DraftStateError(f"sequence {seq_id}: asked to draft a sequence this device has never seen")
            states.append(state)
        drafting = [row for row in range(b) if gammas[row] > 0]
        if (
            self.batched
            and len(drafting) > 1
            and len({seq_ids[row] for row in drafting}) == len(drafting)
            and all(cache_is_batchable(states[row].cache) for row in drafting)
        ):
            for state in states:
                self._restart_from_committed(state)
            self._propose_padded(
                [seq_ids[r] for r in drafting], [states[r] for r in drafting], [gammas[r] for r in drafting],
                drafting, k, mode, temperature, seed, round_, ids_out, probs_out, lengths,
            )
            return make_reply(np.array(seq_ids, dtype=np.int64), lengths, ids_out, probs_out, self.vocab_size)
        for row, (seq_id, gamma) in enumerate(zip(seq_ids, gammas)):
            state = states[row]
            self._restart_from_committed(state)
            generator = sequence_generator(seed, round_, seq_id)
            for j in range(int(gamma)):
                q = self._next_distribution(state, temperature).unsqueeze(0)
                ids, probs, drafted = sparsify(q, k, mode, generator)
                ids_out[row, j] = ids[0].numpy()
                probs_out[row, j] = probs[0].numpy()
                state.tokens.append(int(drafted[0]))
            lengths[row] = int(gamma)
        return make_reply(np.array(seq_ids, dtype=np.int64), lengths, ids_out, probs_out, self.vocab_size)

    @staticmethod
    def _restart_from_committed(state: _SequenceState) -> None:
        """Drafting starts from the committed prefix, whatever was drafted before."""
        if len(state.tokens) > state.committed:
            state.tokens = state.tokens[: state.committed]
            state.cache_len = crop_cache(state.cache, state.cache_len, state.committed)

    @torch.inference_mode()
    def _propose_padded(self, seq_ids, states, gammas, out_rows, k, mode, temperature, seed, round_, ids_out, probs_out, lengths):
        """One batched forward per draft step for all ``states`` (every gamma >= 1)."""
        for state in states:
            if state.cache_len >= len(state.tokens):
                # every token is cached: recompute the last one to get its logits
                state.cache_len = crop_cache(state.cache, state.cache_len, len(state.tokens) - 1)
        pending = [state.tokens[state.cache_len :] for state in states]
        g_max = max(gammas)
        batch = PaddedBatch(
            [state.cache for state in states],
            [state.cache_len for state in states],
            device=self.device,
            reserve=max(len(p) for p in pending) + g_max - 1,
        )
        generators = [sequence_generator(seed, round_, seq_id) for seq_id in seq_ids]
        feed = pending
        for j in range(g_max):
            keep = [[len(toks) - 1] if toks else [] for toks in feed]
            logits = batch.step(self.model, feed, keep)
            self.forward_calls += 1
            next_feed: list[list[int]] = []
            for i, state in enumerate(states):
                if not feed[i]:
                    next_feed.append([])
                    continue
                q = self._distribution(logits[i, 0], temperature).unsqueeze(0)
                ids, probs, drafted = sparsify(q, k, mode, generators[i])
                row = out_rows[i]
                ids_out[row, j] = ids[0].numpy()
                probs_out[row, j] = probs[0].numpy()
                token = int(drafted[0])
                state.tokens.append(token)
                next_feed.append([token] if j + 1 < gammas[i] else [])
            feed = next_feed
            if not any(feed):
                break
        for i, state in enumerate(states):
            state.cache = batch.row_cache(i)
            state.cache_len = batch.row_length(i)
            lengths[out_rows[i]] = gammas[i]
