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
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .kvcache import (PaddedBatch, accepts_logits_to_keep, cache_is_batchable, check_supported, forward_with_cache,
                      rollback_cache, supports_padded_batching)


@dataclass
class _TargetSequence:
    tokens: list[int]
    cache: object | None = None
    cache_len: int = 0
    scored_path: list[int] = field(default_factory=list)


class TargetVerifier:
    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int | None = None,
        device: str | torch.device | None = None,
        *,
        batched: bool = True,
    ):
        check_supported(model, "target")
        self.model = model.eval()
        self.batched = bool(batched) and supports_padded_batching(model)
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
        pending = seq.tokens[seq.cache_len :] + [int(t) for t in path]
        started = time.perf_counter()
        input_ids = torch.tensor([pending], dtype=torch.long, device=self.device)
        keep = len(path) + 1
        extra = {"logits_to_keep": keep} if len(pending) > keep and accepts_logits_to_keep(self.model) else {}
        out, seq.cache = forward_with_cache(self.model, seq.cache, input_ids=input_ids, **extra)
        self.forward_calls += 1
        seq.cache_len += len(pending)
        seq.scored_path = [int(t) for t in path]
        logits = out.logits[0, -(len(path) + 1) :, : self.vocab_size].float().cpu()
        self.forward_seconds += time.perf_counter() - started
        return logits

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
        pending = [seq.tokens[seq.cache_len :] + path for seq, path in zip(seqs, paths)]
        keep = [list(range(len(p) - len(path) - 1, len(p))) for p, path in zip(pending, paths)]
        started = time.perf_counter()
        batch = PaddedBatch(
            [seq.cache for seq in seqs],
            [seq.cache_len for seq in seqs],
            device=self.device,
            reserve=max(len(p) for p in pending),
        )
        logits = batch.step(self.model, pending, keep)
        self.forward_calls += 1
        # [B, G+1, V]: a view of the forward's own logits when they are float32 on the CPU already
        out = logits[:, : g + 1, : self.vocab_size].float().cpu()
        if out.shape[1] < g + 1:
            out = torch.cat([out, out.new_zeros((out.shape[0], g + 1 - out.shape[1], out.shape[2]))], dim=1)
        for row, (seq, path) in enumerate(zip(seqs, paths)):
            seq.cache = batch.row_cache(row)
            seq.cache_len += len(pending[row])
            seq.scored_path = path
            if len(path) < g:
                out[row, len(path) + 1 :] = 0.0  # nothing was scored past this row's path
        self.forward_seconds += time.perf_counter() - started
        return out

    def pending_prefill(self, seq_id: int) -> int:
        """Committed tokens of a sequence not in its cache yet, apart from the newest (which
        ``score`` feeds together with the draft path): what ``prefill`` would feed."""
        seq = self._seqs.get(int(seq_id))
        return 0 if seq is None else max(0, len(seq.tokens) - 1 - seq.cache_len)

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
