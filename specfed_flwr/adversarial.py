"""Broken or malicious draft proposers, for fault-injection tests and benchmarks.

They speak the protocol correctly (their replies pass the wire checks) but draft garbage,
so they exercise what the server must guarantee: the output never changes (greedy: the
target's own tokens; sampling, exact mode: the target's law) and their weight collapses.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .proposer import DraftProposer
from .wire import DraftReply, make_reply


class RandomDraftProposer(DraftProposer):
    """Drafts uniformly random tokens with random (but well-formed) top-K probabilities."""

    def __init__(self, vocab_size: int, seed: int = 0, confident: bool = True):
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(seed)
        self.confident = confident  # claim high probability for the garbage (worst case for weights)
        self._known: dict[int, int] = {}

    def known_sequences(self) -> list[int]:
        return list(self._known)

    def sync(self, seq_id: int, start: int, tokens: Sequence[int]) -> None:
        self._known[seq_id] = start + len(tokens)

    def forget(self, seq_id: int) -> None:
        self._known.pop(seq_id, None)

    def propose(self, seq_ids, gammas, k, *, temperature, sampling, seed=0, round_=0, warp=None,
                encoding="fixed-k", budget=0.0, keys=None, row_warps=None) -> DraftReply:
        b = len(seq_ids)
        k = min(int(k), self.vocab_size)
        if encoding != "fixed-k":
            from .wire import MAX_COUNT, slot_allowance

            k = min(k, MAX_COUNT)  # counts are uint8
            if budget > 0:  # stay within the budget (the server checks it)
                k = max(1, min(k, int(slot_allowance(budget, encoding, self.vocab_size, max(gammas, default=1)))))
        g = max([int(x) for x in gammas], default=0)
        ids = np.zeros((b, g, k), dtype=np.int64)
        probs = np.zeros((b, g, k), dtype=np.float32)
        for row, gamma in enumerate(gammas):
            for j in range(int(gamma)):
                ids[row, j] = self.rng.choice(self.vocab_size, size=k, replace=False)
                raw = self.rng.random(k) + (5.0 * (np.arange(k) == 0) if self.confident else 0.0)
                probs[row, j] = raw / raw.sum() * (0.99 if self.confident else self.rng.random())
                probs[row, j, 0] = max(probs[row, j, 0], 1e-3)
        return make_reply(np.array(seq_ids, dtype=np.int64), np.array(gammas, dtype=np.int32), ids, probs, self.vocab_size,
                          encoding=encoding)
