"""The target model on the server: one forward over each sequence's draft path.

The cache of a sequence holds the keys/values of its committed tokens except the newest
one (which has not been fed yet). Scoring feeds the not-yet-cached committed tokens plus the
draft path in one forward and returns the logits predicting every path position and one
past it. Committing crops the cache back to the accepted prefix.

``score_batch`` scores every active sequence in ONE forward (``batched=True``, the default):
the per-sequence caches are left-padded into one batch, each row's pending tokens are
right-padded, a 2-D attention mask and per-row ``position_ids`` keep the rows apart (see
``kvcache.PaddedBatch``), and the new keys/values go back into each sequence's own cache.
Sequences keep their own state, so they can join or leave at any round; ``batched=False``
(or a model whose cache cannot be padded, e.g. sliding-window layers) loops over ``score``.

``numerics="stepwise"`` (the default for a bfloat16/float16 target) makes every logit bit-for-bit
the one the target's own ``generate`` computes (``stepwise_attention``): each sequence's prompt is
prefilled alone and whole, as ``generate`` does, and the logits predicting its first new token are
kept from that forward (``next_logits``); every later forward gives each row its own attention
call. The sequence's first score then feeds only the draft path.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from .kvcache import (PaddedBatch, UnsupportedModelError, accepts_logits_to_keep, cache_is_batchable, check_supported, forward_with_cache,
                      rollback_cache, supports_padded_batching)
from .stepwise_attention import attention_implementation, stepwise, supports_stepwise

NUMERICS = ("auto", "batched", "stepwise")
REDUCED_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class _TargetSequence:
    tokens: list[int]
    cache: object | None = None
    cache_len: int = 0
    scored_path: list[int] = field(default_factory=list)
    next_logits: torch.Tensor | None = None  # [V] float32: stepwise prefill's last row, until scored


class TargetVerifier:
    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int | None = None,
        device: str | torch.device | None = None,
        *,
        batched: bool = True,
        numerics: str = "auto",
    ):
        check_supported(model, "target")
        self.model = model.eval()
        self.batched = bool(batched) and supports_padded_batching(model)
        self.stepwise = resolve_numerics(model, numerics) == "stepwise"
        self.vocab_size = int(vocab_size or model.config.vocab_size)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._seqs: dict[int, _TargetSequence] = {}
        self.forward_calls = 0  # scoring forwards (one per verified round when batched)
        self.forward_seconds = 0.0
        self.prefill_calls = 0  # prompt prefills run while waiting for drafts (``prefill``)
        self.prefill_seconds = 0.0

    def start(self, seq_id: int, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError(f"sequence {seq_id}: the prompt is empty")
        self._seqs[seq_id] = _TargetSequence(tokens=[int(t) for t in prompt_ids])

    def release(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)

    def tokens(self, seq_id: int) -> list[int]:
        return list(self._seqs[seq_id].tokens)

    @torch.inference_mode()
    def score(self, seq_id: int, path: list[int]) -> torch.Tensor:
        """Float32 logits [len(path) + 1, V] on the CPU."""
        seq = self._seqs[seq_id]
        path = [int(t) for t in path]
        self._prefill_new([seq])
        pending = seq.tokens[seq.cache_len :] + path
        rows = [] if seq.next_logits is None else [seq.next_logits.unsqueeze(0)]  # [1, V]
        keep = len(path) + 1 - len(rows)  # rows the forward must give
        if pending:
            started = time.perf_counter()
            input_ids = torch.tensor([pending], dtype=torch.long, device=self.device)
            extra = {"logits_to_keep": keep} if len(pending) > keep and accepts_logits_to_keep(self.model) else {}
            with self._numerics():
                out, seq.cache = forward_with_cache(self.model, seq.cache, input_ids=input_ids, **extra)
            self.forward_calls += 1
            seq.cache_len += len(pending)
            if keep > 0:
                rows.append(out.logits[0, -keep:, : self.vocab_size].float().cpu())  # [keep, V]
            self.forward_seconds += time.perf_counter() - started
        seq.next_logits = None
        seq.scored_path = path
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def score_batch(self, seq_ids: list[int], paths: list[list[int]]) -> torch.Tensor:
        """Logits [B, G+1, V] (zero padded beyond each path) for several sequences."""
        seq_ids = [int(s) for s in seq_ids]
        if len(seq_ids) != len(paths):
            raise ValueError(f"{len(seq_ids)} sequences but {len(paths)} paths")
        g = max((len(p) for p in paths), default=0)
        if self._can_batch(seq_ids):
            return self._score_padded(seq_ids, paths, g)
        out = torch.zeros((len(seq_ids), g + 1, self.vocab_size), dtype=torch.float32)
        for row, (seq_id, path) in enumerate(zip(seq_ids, paths)):
            out[row, : len(path) + 1] = self.score(seq_id, path)
        return out

    def _can_batch(self, seq_ids: list[int]) -> bool:
        return (
            self.batched
            and len(seq_ids) > 1
            and len(set(seq_ids)) == len(seq_ids)
            and all(cache_is_batchable(self._seqs[s].cache) for s in seq_ids)
        )

    @torch.inference_mode()
    def _score_padded(self, seq_ids: list[int], paths: list[list[int]], g: int) -> torch.Tensor:
        seqs = [self._seqs[s] for s in seq_ids]
        paths = [[int(t) for t in p] for p in paths]
        self._prefill_new(seqs)
        if any(seq.next_logits is not None for seq in seqs):
            return self._score_padded_with_heads(seqs, paths, g)
        pending = [seq.tokens[seq.cache_len :] + path for seq, path in zip(seqs, paths)]
        keep = [list(range(len(p) - len(path) - 1, len(p))) for p, path in zip(pending, paths)]
        started = time.perf_counter()
        batch = self._padded_batch(seqs, pending)
        with self._numerics():
            logits = batch.step(self.model, pending, keep)
        self.forward_calls += 1
        # [B, G+1, V]: a view of the forward's own logits when they are float32 on the CPU already
        out = logits[:, : g + 1, : self.vocab_size].float().cpu()
        if out.shape[1] < g + 1:
            out = torch.cat([out, out.new_zeros((out.shape[0], g + 1 - out.shape[1], out.shape[2]))], dim=1)
        for row, (seq, path) in enumerate(zip(seqs, paths)):
            self._advance(batch, row, seq, len(pending[row]), path)
            if len(path) < g:
                out[row, len(path) + 1 :] = 0.0  # nothing was scored past this row's path
        self.forward_seconds += time.perf_counter() - started
        return out

    def _score_padded_with_heads(self, seqs: list[_TargetSequence], paths: list[list[int]], g: int) -> torch.Tensor:
        """``_score_padded`` when some rows hold ``next_logits`` (their prompt was just prefilled
        whole): those rows feed only their path, and their first logits row is the kept one."""
        heads = [0 if seq.next_logits is None else 1 for seq in seqs]
        pending = [seq.tokens[seq.cache_len :] + path for seq, path in zip(seqs, paths)]
        out = torch.zeros((len(seqs), g + 1, self.vocab_size), dtype=torch.float32)  # [B, G+1, V]
        for row, seq in enumerate(seqs):
            if heads[row]:
                out[row, 0] = seq.next_logits
        if any(pending):
            started = time.perf_counter()
            needed = [len(path) + 1 - head for path, head in zip(paths, heads)]
            keep = [list(range(len(p) - n, len(p))) for p, n in zip(pending, needed)]
            batch = self._padded_batch(seqs, pending)
            with self._numerics():
                logits = batch.step(self.model, pending, keep)  # [B, max needed, V]
            self.forward_calls += 1
            for row, seq in enumerate(seqs):
                if needed[row]:
                    out[row, heads[row] : heads[row] + needed[row]] = logits[row, : needed[row], : self.vocab_size].float().cpu()
                self._advance(batch, row, seq, len(pending[row]), paths[row])
            self.forward_seconds += time.perf_counter() - started
        for seq, path in zip(seqs, paths):
            seq.next_logits = None
            seq.scored_path = path
        return out

    def _padded_batch(self, seqs: list[_TargetSequence], pending: list[list[int]]) -> PaddedBatch:
        return PaddedBatch([seq.cache for seq in seqs], [seq.cache_len for seq in seqs], device=self.device,
                           reserve=max(len(p) for p in pending))

    @staticmethod
    def _advance(batch: PaddedBatch, row: int, seq: _TargetSequence, fed: int, path: list[int]) -> None:
        """Hand row ``row`` of a scored batch its cache back and record what it scored."""
        if fed:
            seq.cache = batch.row_cache(row)
            seq.cache_len += fed
        seq.scored_path = path

    def _numerics(self):
        return stepwise(self.model) if self.stepwise else contextlib.nullcontext()

    def _prefill_new(self, seqs: list[_TargetSequence]) -> None:
        """``stepwise``: prefill (``_prefill_whole``) the sequences with nothing cached yet."""
        if self.stepwise:
            for seq in seqs:
                if seq.cache_len == 0:
                    self._prefill_whole(seq)

    def _prefill_whole(self, seq: _TargetSequence) -> None:
        """``stepwise``: feed a sequence's committed tokens alone and whole, as ``generate``
        prefills a prompt, keeping the logits that predict its next token (``next_logits``)."""
        started = time.perf_counter()
        input_ids = torch.tensor([seq.tokens], dtype=torch.long, device=self.device)
        extra = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
        with self._numerics():
            out, seq.cache = forward_with_cache(self.model, None, input_ids=input_ids, **extra)
        seq.cache_len = len(seq.tokens)
        seq.next_logits = out.logits[0, -1, : self.vocab_size].float().cpu()  # [V]
        self.prefill_calls += 1
        self.prefill_seconds += time.perf_counter() - started

    def pending_prefill(self, seq_id: int) -> int:
        """Committed tokens of a sequence not in its cache yet, apart from the newest (which
        ``score`` feeds together with the draft path): what ``prefill`` would feed."""
        seq = self._seqs.get(int(seq_id))
        if seq is None:
            return 0
        if self.stepwise:  # the whole sequence, once (``_prefill_whole``)
            return len(seq.tokens) if seq.cache_len == 0 else 0
        return max(0, len(seq.tokens) - 1 - seq.cache_len)

    @torch.inference_mode()
    def prefill(self, seq_ids: list[int]) -> int:
        """Feed the committed tokens of ``seq_ids`` that are not cached yet (all but the newest),
        so that their next ``score`` only feeds the newest token and the draft path.

        Why: a new sequence's first verify otherwise runs the whole prompt through the target
        right when its drafts arrive, on the round's critical path. Prefilling while the devices
        prefill and draft (the pipeline's idle step) takes it off that path. One forward for all
        rows (padded) where the caches allow it; returns the tokens fed. Exactness is unchanged:
        the cache then holds the same keys/values that ``score`` would have computed."""
        rows = [int(s) for s in seq_ids if self.pending_prefill(s) > 0]
        if not rows:
            return 0
        if self.stepwise:  # pending here means nothing cached yet
            fed = sum(self.pending_prefill(s) for s in rows)
            self._prefill_new([self._seqs[s] for s in rows])
            return fed
        started = time.perf_counter()
        seqs = [self._seqs[s] for s in rows]
        feed = [seq.tokens[seq.cache_len:-1] for seq in seqs]
        if self._can_batch(rows):
            batch = PaddedBatch([seq.cache for seq in seqs], [seq.cache_len for seq in seqs], device=self.device,
                                reserve=max(len(f) for f in feed))
            batch.step(self.model, feed, [[] for _ in feed])
            self.prefill_calls += 1
            for row, seq in enumerate(seqs):
                seq.cache = batch.row_cache(row)
                seq.cache_len += len(feed[row])
        else:
            for seq, tokens in zip(seqs, feed):
                input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
                extra = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
                _, seq.cache = forward_with_cache(self.model, seq.cache, input_ids=input_ids, **extra)
                self.prefill_calls += 1
                seq.cache_len += len(tokens)
        self.prefill_seconds += time.perf_counter() - started
        return sum(len(f) for f in feed)

    def commit(self, seq_id: int, num_accepted: int, new_token: int) -> None:
        """Keep ``num_accepted`` tokens of the last scored path, then append ``new_token``."""
        seq = self._seqs[seq_id]
        accepted = seq.scored_path[:num_accepted]
        keep = len(seq.tokens) + len(accepted)
        seq.cache, seq.cache_len = rollback_cache(seq.cache, seq.cache_len, keep)
        seq.tokens.extend(accepted)
        seq.tokens.append(int(new_token))
        seq.scored_path = []
        seq.next_logits = None


def resolve_numerics(model: torch.nn.Module, numerics: str) -> str:
    """``verify-numerics`` for ``model``: ``batched`` or ``stepwise``.

    ``auto`` is ``stepwise`` for a bfloat16/float16 target whose attention can be wrapped (where
    rounding differences flip near-tie argmaxes; see ``stepwise_attention``), ``batched`` otherwise
    (float32: ~1e-6, no cost paid for it). An explicit ``stepwise`` that cannot be honoured is
    refused here, at load."""
    if numerics not in NUMERICS:
        raise ValueError(f"verify-numerics: {numerics!r} is not one of {', '.join(NUMERICS)}")
    if numerics == "batched":
        return numerics
    if numerics == "stepwise":
        if not supports_stepwise(model):
            raise UnsupportedModelError(
                f"verify-numerics=stepwise: target {type(model).__name__} runs {attention_implementation(model)!r} "
                "attention; stepwise verification wraps sdpa or eager attention (load the target with "
                "attn_implementation='sdpa', or use verify-numerics=batched)")
        return numerics
    dtype = next(model.parameters()).dtype
    return "stepwise" if dtype in REDUCED_PRECISION and supports_stepwise(model) else "batched"
