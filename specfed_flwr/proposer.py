"""Draft proposers: what runs on the device.

``DraftProposer`` is the small interface the rest of the system relies on (in the spirit of
transformers' candidate generators): ``sync`` applies the accepted delta the server sent
(cropping the rejected tail of the KV cache), ``propose`` drafts up to gamma tokens for a
batch of sequences and returns the compact top-K reply, ``forget`` frees a sequence.
``draft_ahead`` (optional) keeps drafting while the device waits for the server.

What a drafted position sends (top-K, float16 rounding, sampling, per-position K under a byte
budget) is ``draft_payload.py``.

Randomness is keyed by position: the uniform that samples position ``p`` of a sequence is
``draft_payload.position_uniform(key, p)``, ``key`` being the sequence's randomness key the server sends per
row (``DraftRequest.keys``: the prompt's own seed, or the run's seed and the prompt's index; see
``randomness.py``). A reply therefore does not depend on batching, on the round number, on the
other sequences or on whether the position was drafted ahead of time. Reusing the uniform of a position
that is drafted again after a rejection is sound: the server only tests positions up to the
first rejection, so a position is drafted again only if its earlier draft was never tested,
and its uniform never influenced any outcome.

``HFDraftProposer`` drafts all sequences of a request together (``batched=True``, the
default): one forward per draft step for the whole batch -- the first step feeds every
sequence's pending tokens (right-padded, left-padded caches, attention mask and per-row
positions, see ``kvcache.PaddedBatch``), the next steps one token per row; a row that has all it
needs idles (masked) until the longest one is done. ``batched=False`` keeps the per-sequence loop.

**Drafting ahead** (proactive drafting). After a reply the device may keep drafting on the
assumption that every draft is accepted and that the server's bonus token is its own next draft:
``draft_ahead`` drafts that guess plus ``gamma`` more positions. Each drafted position keeps its
top-K (``_SequenceState.dists``). When the next delta confirms the guess (``sync`` finds the
delta equal to what the device had drafted), ``propose`` serves those positions without a
forward; otherwise they are dropped. Served and dropped rows are counted (``stats``).
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from .draft_payload import sparsify
from .kvcache import (PaddedBatch, accepts_logits_to_keep, cache_is_batchable, check_supported, forward_with_cache,
                      rollback_cache, supports_padded_batching)
from .prefill_groups import split_by_length
from .randomness import DRAFT, counter_uniforms, sequence_key
from .sampling import SamplingSettings, seen_mask, warped_probs
from .wire import DraftReply, make_reply, slot_allowance

#: a forward that feeds some row at least this many tokens is counted as prefill (a prompt, or a
#: long delta the device catches up on), not as a draft step: its cost grows with those tokens
PREFILL_TOKENS = 8


class DraftStateError(ValueError):
    """The server's delta does not fit the sequence state this device holds."""


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
        warp: "SamplingSettings | None" = None,
        encoding: str = "fixed-k",
        budget: float = 0.0,
        keys: Sequence[int] | None = None,
        row_warps: "Sequence[SamplingSettings] | None" = None,
    ) -> DraftReply:
        """Draft ``gammas[b]`` tokens after each sequence's committed prefix; ``warp`` (temperature
        aside) is the target's sampler, which proposers should apply to their own law too.
        ``encoding`` / ``budget``: how the reply travels and its bytes per drafted position (0: K
        slots per position) -- see ``wire.py`` and the module docstring.

        ``keys[b]``: row b's randomness key (default: from ``seed`` and the sequence id);
        ``row_warps[b]``: row b's own sampler, temperature included (a prompt's own temperature /
        top-p; default: ``warp`` at ``temperature`` for every row). Both only matter when sampling."""

    @abc.abstractmethod
    def forget(self, seq_id: int) -> None:
        """Free the state of a finished sequence."""

    def known_sequences(self) -> list[int]:
        return []

    def draft_ahead(self, seq_ids: Sequence[int], extra: int, stop: threading.Event | None = None) -> int:
        """Keep drafting ``extra`` positions past each sequence's drafts (see module docstring);
        returns the positions drafted. Proposers that cannot draft ahead draft nothing."""
        return 0

    @property
    def stats(self) -> dict[str, int]:
        """Counters of drafting ahead: rows served from drafts made ahead, rows whose were dropped."""
        return {"proactive_hits": 0, "proactive_misses": 0, "proactive_positions": 0}


@dataclass(frozen=True)
class _DraftKey:
    """What a drafted position's top-K depends on besides the prefix: reused only if unchanged."""

    k: int
    mode: str
    temperature: float  # the request's (0 = greedy run)
    rng: int  # the row's randomness key
    warp: SamplingSettings = SamplingSettings()  # the row's sampler: temperature, top-k/top-p/min-p, penalty
    encoding: str = "fixed-k"
    allowance: float | None = None  # slots per drafted position under a byte budget (None: K each)


@dataclass
class _SequenceState:
    tokens: list[int] = field(default_factory=list)  # committed prefix, then this device's drafts
    committed: int = 0
    cache: object | None = None
    cache_len: int = 0  # positions whose keys/values are in the cache (a prefix of tokens)
    # position -> (ids [K], probs [K] float16) of each drafted position (>= committed), for ``key``
    dists: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    key: _DraftKey | None = None
    ahead: int = 0  # positions past the last reply that were drafted ahead

    @property
    def drafted(self) -> int:
        """Drafted positions past the committed prefix whose top-K is known."""
        n = 0
        while self.committed + n < len(self.tokens) and (self.committed + n) in self.dists:
            n += 1
        return n

    def truncate(self, length: int) -> None:
        """Keep ``tokens[:length]`` (and the cache and top-Ks that belong to it)."""
        if len(self.tokens) > length:
            del self.tokens[length:]
        self.cache, self.cache_len = rollback_cache(self.cache, self.cache_len, length)
        for pos in [p for p in self.dists if p >= length]:
            del self.dists[pos]


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
        check_supported(model, "draft")
        self.model = model.eval()
        self.vocab_size = int(vocab_size or model.config.vocab_size)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batched = bool(batched) and supports_padded_batching(model)
        self._states: dict[int, _SequenceState] = {}
        self.forward_calls = 0
        # forwards that fed some row at least PREFILL_TOKENS tokens (a prompt, or a long catch-up
        # delta) and their seconds: work of a new prompt, not of drafting (``DraftMetrics``)
        self.prefill_forwards = 0
        self.prefill_seconds = 0.0
        self._stats = {"proactive_hits": 0, "proactive_misses": 0, "proactive_positions": 0}

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

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
        # keep the cached keys/values (and drafted top-Ks) of the longest prefix that is unchanged
        keep = start
        for old, new in zip(state.tokens[start:], tokens):
            if old != new:
                break
            keep += 1
        end = start + len(tokens)
        ahead = state.ahead
        if keep == end and len(state.tokens) > end:
            # the delta is exactly what this device drafted: the drafts past it stay (drafted ahead)
            if ahead:
                self._stats["proactive_hits"] += 1
        else:
            if ahead and len(state.tokens) > keep:
                self._stats["proactive_misses"] += 1
            state.truncate(keep)
            state.tokens.extend(tokens[keep - start:])
        state.ahead = 0
        state.committed = end
        for pos in [p for p in state.dists if p < end]:
            del state.dists[pos]

    def forget(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    # ---- drafting ------------------------------------------------------------------------
    def propose(self, seq_ids, gammas, k, *, temperature, sampling, seed=0, round_=0, warp=None,
                encoding="fixed-k", budget=0.0, keys=None, row_warps=None) -> DraftReply:
        seq_ids = [int(s) for s in seq_ids]
        gammas = [int(g) for g in gammas]
        if len(gammas) != len(seq_ids):
            raise ValueError(f"{len(seq_ids)} sequences but {len(gammas)} draft lengths")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one request")
        if keys is not None and len(keys) != len(seq_ids) or row_warps is not None and len(row_warps) != len(seq_ids):
            raise ValueError("one randomness key and one sampler per sequence")
        k = min(int(k), self.vocab_size)
        if temperature <= 0 and encoding != "fixed-k":
            # greedy, variable K: the drafted token and its probability are all the server uses
            k, budget = 1, 0.0
        allowance = None
        if encoding != "fixed-k" and budget > 0:
            allowance = max(1.0, slot_allowance(float(budget), encoding, self.vocab_size, max(gammas, default=1)))
        states = []
        for row, seq_id in enumerate(seq_ids):
            state = self._states.get(seq_id)
            if state is None:
                raise DraftStateError(f"sequence {seq_id}: asked to draft a sequence this device has never seen")
            key = self._row_key(k, temperature, sampling, warp if row_warps is None else row_warps[row],
                                sequence_key(None, seed, seq_id) if keys is None else int(keys[row]),
                                own_temperature=row_warps is not None, encoding=str(encoding), allowance=allowance)
            if state.key != key:  # drafted under other settings: nothing of it can be reused
                state.truncate(state.committed)
                state.key = key
            else:
                state.truncate(state.committed + state.drafted)
            states.append(state)
        missing = [max(0, g - st.drafted) for g, st in zip(gammas, states)]
        self._extend(seq_ids, states, missing, states[0].key if states else None)
        g_max = max(gammas, default=0)
        b = len(seq_ids)
        ids_out = np.zeros((b, g_max, k), dtype=np.int64)  # [B, G, K]
        probs_out = np.zeros((b, g_max, k), dtype=np.float16)  # [B, G, K]
        for row, (state, gamma) in enumerate(zip(states, gammas)):
            for j in range(gamma):
                ids_out[row, j], probs_out[row, j] = state.dists[state.committed + j]
        return make_reply(np.array(seq_ids, dtype=np.int64), np.array(gammas, dtype=np.int32), ids_out, probs_out,
                          self.vocab_size, encoding=str(encoding))

    @staticmethod
    def _row_key(k: int, temperature: float, sampling: str, warp: SamplingSettings | None, rng: int, *,
                 own_temperature: bool, encoding: str = "fixed-k", allowance: float | None = None) -> _DraftKey:
        """What a row's drafts depend on: greedy (request temperature 0: only the repetition
        penalty changes the argmax, as in ``generate``) or the row's sampler; ``own_temperature``:
        ``warp`` carries the row's temperature, else the request's applies; plus how the reply
        travels (``encoding``, slots ``allowance`` per position under a budget)."""
        warp = warp or SamplingSettings()
        if temperature <= 0:
            return _DraftKey(k, "greedy", 0.0, rng, SamplingSettings(repetition_penalty=warp.repetition_penalty),
                             encoding, allowance)
        if not own_temperature:
            warp = replace(warp, temperature=float(temperature))
        return _DraftKey(k, str(sampling), float(temperature), rng, warp, encoding, allowance)

    def draft_ahead(self, seq_ids: Sequence[int], extra: int, stop: threading.Event | None = None) -> int:
        """Draft ``extra`` more positions past every listed sequence's drafts, stopping early
        between two forwards when ``stop`` is set; returns the positions drafted."""
        rows = [(int(s), self._states[int(s)]) for s in seq_ids if int(s) in self._states]
        rows = [(s, st) for s, st in rows if st.key is not None]
        if not rows or extra <= 0:
            return 0
        done = self._extend([s for s, _ in rows], [st for _, st in rows], [extra] * len(rows), None, stop=stop)
        for (_, st), n in zip(rows, done):
            st.ahead += n
        self._stats["proactive_positions"] += sum(done)
        return sum(done)

    def _extend(self, seq_ids: list[int], states: list[_SequenceState], counts: list[int], key: _DraftKey | None,
                stop: threading.Event | None = None) -> list[int]:
        """Draft ``counts[i]`` more positions at the end of ``states[i].tokens``; returns how many each got."""
        todo = [i for i, n in enumerate(counts) if n > 0]
        if not todo:
            return [0] * len(states)
        # positions drafted for this reply share its budget (carry); drafted ahead: capped per row
        joint = key is not None
        if (self.batched and len(todo) > 1
                and all(cache_is_batchable(states[i].cache) for i in todo)):
            self._prefill_grouped([states[i] for i in todo])
            got = self._extend_padded([seq_ids[i] for i in todo], [states[i] for i in todo],
                                      [counts[i] for i in todo], stop, joint)
        else:
            got = [self._extend_one(seq_ids[i], states[i], counts[i], stop, joint) for i in todo]
        out = [0] * len(states)
        for i, n in zip(todo, got):
            out[i] = n
        return out

    def _sample(self, seq_ids: Sequence[int], states: Sequence[_SequenceState], logits: torch.Tensor,
                slot_budget: float | None = None) -> tuple[list[int], int]:
        """Sparsify one position of every row (``logits`` [R, V]), record it, append the drafted token.

        ``slot_budget``: the slots these R rows may spend together (budgeted keys on the reply
        path); None with a budgeted key: at most ``floor(allowance)`` per row. Returns the drafted
        tokens and the slots spent."""
        key = states[0].key  # k, mode, encoding and allowance are the request's: the same for every row
        logits = logits[:, : self.vocab_size].float()  # [R, V]
        q = torch.empty_like(logits, device="cpu")  # [R, V]
        groups: dict[SamplingSettings, list[int]] = {}
        for r, st in enumerate(states):
            groups.setdefault(st.key.warp, []).append(r)
        for warp, rows in groups.items():  # each row drafts from its own sampler (rows sharing one together)
            at = torch.tensor(rows, dtype=torch.long)
            part = logits[at.to(logits.device)]  # [R_g, V]
            if warp.truncates or warp.penalizes:
                # the sampler on the draft's logits: the repetition penalty sees this row's
                # sequence so far (prompt, committed tokens and the drafts before this position)
                seen = seen_mask([states[r].tokens for r in rows], self.vocab_size) if warp.penalizes else None
                q[at] = warped_probs(part, warp, None if seen is None else seen.to(part.device)).cpu()
            else:
                scale = warp.temperature if warp.temperature > 0 else 1.0
                q[at] = torch.softmax(part / scale, dim=-1).cpu()
        uniforms = None
        if key.mode != "greedy":
            rng = np.array([st.key.rng for st in states], dtype=np.uint64)  # [R]
            positions = np.array([len(st.tokens) for st in states], dtype=np.int64)  # [R]
            uniforms = torch.from_numpy(counter_uniforms(rng, positions, DRAFT))  # [R] float64
        k, slots = key.k, None
        if key.allowance is not None:
            if slot_budget is None:
                k, slots = max(1, min(key.k, int(np.floor(key.allowance + 1e-9)))), float("inf")
            else:
                slots = slot_budget
        ids, probs, drafted = sparsify(q, k, key.mode, uniforms=uniforms, slots=slots,
                                       compact=key.encoding == "budgeted-compact")  # [R, K'], [R, K'], [R]
        if k < key.k:  # every cached position has key.k slots (the unsent ones zero)
            pad = key.k - k
            ids = torch.cat([ids, ids.new_zeros((ids.shape[0], pad))], dim=1)
            probs = torch.cat([probs, probs.new_zeros((probs.shape[0], pad))], dim=1)
        ids_np, probs_np = ids.numpy(), probs.numpy()
        spent = int((probs > 0).sum()) if key.encoding != "fixed-k" else probs.numel()
        tokens = drafted.tolist()
        for r, (state, token) in enumerate(zip(states, tokens)):
            state.dists[len(state.tokens)] = (ids_np[r], probs_np[r])
            state.tokens.append(int(token))
        return tokens, spent

    @torch.inference_mode()
    def _extend_one(self, seq_id: int, state: _SequenceState, count: int, stop: threading.Event | None,
                    joint: bool = True) -> int:
        allowance = state.key.allowance if joint and state.key is not None else None
        carry = 0.0
        for j in range(count):
            if j and stop is not None and stop.is_set():
                return j
            if state.cache_len >= len(state.tokens):
                # every token is cached: recompute the last one to get its logits
                state.cache, state.cache_len = rollback_cache(state.cache, state.cache_len, len(state.tokens) - 1)
            pending = torch.tensor([state.tokens[state.cache_len:]], dtype=torch.long, device=self.device)
            # only the last position's distribution is needed: skip the vocabulary-sized head elsewhere
            keep = {"logits_to_keep": 1} if pending.shape[1] > 1 and accepts_logits_to_keep(self.model) else {}
            started = time.perf_counter()
            out, state.cache = forward_with_cache(self.model, state.cache, input_ids=pending, **keep)
            self._count_forward(started, prefill=pending.shape[1] >= PREFILL_TOKENS)
            state.cache_len = len(state.tokens)
            budget = None if allowance is None else allowance + carry
            _, spent = self._sample([seq_id], [state], out.logits[:, -1], budget)
            if budget is not None:
                carry = max(0.0, budget - spent)
        return count

    def _count_forward(self, started: float, *, prefill: bool) -> None:
        """Count one forward that began at ``started`` (``prefill``: it fed a prompt)."""
        self.forward_calls += 1
        if prefill:
            self.prefill_forwards += 1
            self.prefill_seconds += time.perf_counter() - started

    @torch.inference_mode()
    def _prefill_grouped(self, states: list[_SequenceState]) -> None:
        """Feed the rows with several tokens pending (new prompts) all but their last one, in two
        groups of similar length when that pads much less (``prefill_groups``); the draft steps
        then feed one token per row. One group: nothing here, the first draft step feeds it all."""
        rows = [st for st in states if len(st.tokens) - st.cache_len >= 2]
        groups = split_by_length([len(st.tokens) - st.cache_len - 1 for st in rows]) if len(rows) > 1 else []
        if len(groups) < 2:
            return
        for group in groups:
            members = [rows[i] for i in group]
            feed = [st.tokens[st.cache_len:-1] for st in members]
            batch = PaddedBatch([st.cache for st in members], [st.cache_len for st in members], device=self.device,
                                reserve=max(len(f) for f in feed))
            started = time.perf_counter()
            batch.step(self.model, feed, [[] for _ in members])
            self._count_forward(started, prefill=True)  # drafts nothing: all of it is the prompts' work
            for i, st in enumerate(members):
                st.cache, st.cache_len = batch.row_cache(i), batch.row_length(i)

    @torch.inference_mode()
    def _extend_padded(self, seq_ids: list[int], states: list[_SequenceState], counts: list[int],
                       stop: threading.Event | None, joint: bool = True) -> list[int]:
        """One batched forward per draft step for all ``states`` (every count >= 1); ``joint``:
        the rows of a step water-fill one budget, carried over steps (see the module docstring)."""
        key = states[0].key
        allowance = key.allowance if joint and key is not None else None
        carry = 0.0
        for state in states:
            if state.cache_len >= len(state.tokens):
                state.cache, state.cache_len = rollback_cache(state.cache, state.cache_len, len(state.tokens) - 1)
        feed = [state.tokens[state.cache_len:] for state in states]
        batch = PaddedBatch(
            [state.cache for state in states],
            [state.cache_len for state in states],
            device=self.device,
            reserve=max(len(p) for p in feed) + max(counts) - 1,
        )
        done = [0] * len(states)
        for step in range(max(counts)):
            if step and stop is not None and stop.is_set():
                break
            live = [i for i, toks in enumerate(feed) if toks]
            keep = [[len(toks) - 1] if toks else [] for toks in feed]
            started = time.perf_counter()
            widest = max(len(toks) for toks in feed)
            logits = batch.step(self.model, feed, keep)  # [B, 1, V]
            self._count_forward(started, prefill=widest >= PREFILL_TOKENS)
            live_t = torch.tensor(live, dtype=torch.long)
            budget = None if allowance is None else allowance * len(live) + carry
            tokens, spent = self._sample([seq_ids[i] for i in live], [states[i] for i in live], logits[live_t, 0], budget)
            if budget is not None:
                carry = max(0.0, budget - spent)
            feed = [[] for _ in states]
            for i, token in zip(live, tokens):
                done[i] += 1
                if done[i] < counts[i]:
                    feed[i] = [token]
            if not any(feed):
                break
        for i, state in enumerate(states):
            state.cache = batch.row_cache(i)
            state.cache_len = batch.row_length(i)
        return done
