"""What one batched draft step and one batched verify step cost, against the bare model forward.

The device's draft step (``HFDraftProposer.propose``) and the server's verify step
(``TargetVerifier.score_batch`` + ``commit``) wrap a model forward in bookkeeping: per-row KV
caches gathered into a padded batch, attention masks and positions, top-K, float16 rounding,
sampling, cache crops. That bookkeeping must stay a small margin on top of the forward, or
batching more sequences buys nothing. This module measures it the way a user would check it:

* **draft**: ``batch`` sequences of equal length are synced and drafted once (prefill). Every
  repetition then accepts all ``gamma`` drafts plus a bonus token (the delta a device gets after
  a fully accepted round) and drafts ``gamma`` tokens again. The *raw* twin runs the same model on
  the same shapes with a plain ``DynamicCache`` and nothing else: one forward of the two
  not-yet-cached tokens, then ``gamma - 1`` one-token forwards, the cache growing by ``gamma + 1``
  positions per repetition as the proposer's does.
* **verify**: ``batch`` sequences scored on a ``gamma``-token path and committed with every
  position accepted; the raw twin is one forward of ``gamma + 1`` tokens over a plain cache.

Repetitions of the wrapped and the raw step are interleaved, so a noisy machine slows both alike;
medians are reported. Rows have equal lengths so that the raw forward needs no padding: the
padding, mask and position handling the real step needs for ragged rows is counted as overhead.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..kvcache import forward_with_cache
from ..proposer import HFDraftProposer
from ..target import TargetVerifier


@dataclass
class StepCost:
    component: str  # "draft" or "verify"
    batch: int
    gamma: int
    context: int  # tokens per row before the first measured repetition
    reps: int
    step_ms: float  # median wall time of one wrapped step (a draft step = one drafted position)
    raw_forward_ms: float  # median wall time of the bare forward(s) on the same shapes, per step

    @property
    def ratio(self) -> float:
        return self.step_ms / self.raw_forward_ms if self.raw_forward_ms > 0 else float("inf")

    def as_record(self) -> dict:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["overhead_pct"] = 100.0 * (self.ratio - 1.0)
        return out


def equal_length_rows(prompts: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """``batch`` rows cycled from ``prompts``, each cut to the shortest prompt's length."""
    if not prompts:
        raise ValueError("need at least one prompt")
    rows = [list(prompts[i % len(prompts)]) for i in range(batch)]
    n = min(len(r) for r in rows)
    if n < 2:
        raise ValueError("prompts must have at least 2 tokens")
    return [r[:n] for r in rows]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@torch.inference_mode()
def _raw_cache(model: torch.nn.Module, rows: list[list[int]], device: torch.device):
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    _, cache = forward_with_cache(model, None, input_ids=ids)
    return cache


def draft_step_cost(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, batch: int, gamma: int = 4,
                    reps: int = 5, k: int = 8, temperature: float = 1.0, vocab_size: int | None = None) -> StepCost:
    """Median cost of one drafted position at ``batch`` rows, wrapped vs raw (see module docstring)."""
    rows = equal_length_rows(prompts, batch)
    proposer = HFDraftProposer(model, vocab_size=vocab_size)
    device = proposer.device
    seq_ids = list(range(batch))
    for s, row in zip(seq_ids, rows):
        proposer.sync(s, 0, row)
    proposer.propose(seq_ids, [gamma] * batch, k, temperature=temperature, sampling="sparse")
    raw = _raw_cache(model, [r[:-1] for r in rows], device)
    feed = torch.tensor([[r[-1], r[-1]] for r in rows], dtype=torch.long, device=device)
    one = feed[:, :1]

    def accept_all() -> None:
        for s in seq_ids:
            tokens = proposer.drafted_tokens(s)
            proposer.sync(s, proposer.committed_length(s), tokens + tokens[-1:])

    @torch.inference_mode()
    def raw_round() -> None:
        nonlocal raw
        _, raw = forward_with_cache(model, raw, input_ids=feed)
        for _ in range(gamma - 1):
            _, raw = forward_with_cache(model, raw, input_ids=one)

    wrapped, bare = [], []
    for rep in range(reps):
        accept_all()
        wrapped.append(_timed(lambda: proposer.propose(seq_ids, [gamma] * batch, k, temperature=temperature,
                                                       sampling="sparse", round_=rep + 1)))
        bare.append(_timed(raw_round))
    return StepCost("draft", batch, gamma, len(rows[0]), reps,
                    1000 * statistics.median(wrapped) / gamma, 1000 * statistics.median(bare) / gamma)


def verify_step_cost(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, batch: int, gamma: int = 4,
                     reps: int = 5, vocab_size: int | None = None) -> StepCost:
    """Median cost of one batched verify (score ``gamma`` drafts + commit), wrapped vs raw."""
    rows = equal_length_rows(prompts, batch)
    verifier = TargetVerifier(model, vocab_size=vocab_size)
    device = verifier.device
    seq_ids = list(range(batch))
    for s, row in zip(seq_ids, rows):
        verifier.start(s, row)
    paths = [[r[-1]] * gamma for r in rows]
    verifier.score_batch(seq_ids, paths)  # prefill
    for s, path in zip(seq_ids, paths):
        verifier.commit(s, gamma, path[-1])
    raw = _raw_cache(model, [r + [r[-1]] * gamma for r in rows], device)
    feed = torch.tensor([[r[-1]] * (gamma + 1) for r in rows], dtype=torch.long, device=device)

    def wrapped_round() -> None:
        verifier.score_batch(seq_ids, paths)
        for s, path in zip(seq_ids, paths):
            verifier.commit(s, gamma, path[-1])

    @torch.inference_mode()
    def raw_round() -> None:
        nonlocal raw
        out, raw = forward_with_cache(model, raw, input_ids=feed)
        out.logits.float().cpu()

    wrapped, bare = [], []
    for _ in range(reps):
        wrapped.append(_timed(wrapped_round))
        bare.append(_timed(raw_round))
    return StepCost("verify", batch, gamma, len(rows[0]), reps,
                    1000 * statistics.median(wrapped), 1000 * statistics.median(bare))


@dataclass
class NumericsCost:
    """One verify step of a reduced-precision target with ``verify-numerics`` batched vs stepwise."""

    dtype: str
    batch: int
    gamma: int
    reps: int
    batched_ms: float  # median wall time of one verify step (score + commit), one attention call per forward
    stepwise_ms: float  # the same with one attention call per position (``stepwise_attention``)

    def as_record(self) -> dict:
        out = asdict(self)
        out["ratio"] = self.stepwise_ms / self.batched_ms if self.batched_ms > 0 else float("inf")
        return out


def numerics_cost(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, batch: int, gamma: int = 4,
                  reps: int = 5, vocab_size: int | None = None) -> NumericsCost:
    """Median cost of one verify step of ``model`` (already in its reduced dtype) with each
    ``verify-numerics``, their repetitions interleaved."""
    rows = equal_length_rows(prompts, batch)
    seq_ids = list(range(batch))
    paths = [[r[-1]] * gamma for r in rows]
    verifiers = {n: TargetVerifier(model, vocab_size=vocab_size, numerics=n) for n in ("batched", "stepwise")}

    def round_of(verifier: TargetVerifier):
        def run() -> None:
            verifier.score_batch(seq_ids, paths)
            for s, path in zip(seq_ids, paths):
                verifier.commit(s, gamma, path[-1])
        return run

    for verifier in verifiers.values():
        for s, row in zip(seq_ids, rows):
            verifier.start(s, row)
        round_of(verifier)()  # prefill
    times: dict[str, list[float]] = {n: [] for n in verifiers}
    for _ in range(reps):
        for n, verifier in verifiers.items():
            times[n].append(_timed(round_of(verifier)))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return NumericsCost(dtype, batch, gamma, reps, 1000 * statistics.median(times["batched"]),
                        1000 * statistics.median(times["stepwise"]))


def step_costs(draft: torch.nn.Module, target: torch.nn.Module, prompts: Sequence[Sequence[int]], *,
               batches: Sequence[int] = (1, 4, 16), gamma: int = 4, reps: int = 5,
               vocab_size: int | None = None) -> list[StepCost]:
    """Draft and verify step costs at every batch size (the bench's step records)."""
    out: list[StepCost] = []
    for b in batches:
        out.append(draft_step_cost(draft, prompts, batch=b, gamma=gamma, reps=reps, vocab_size=vocab_size))
        out.append(verify_step_cost(target, prompts, batch=b, gamma=gamma, reps=reps, vocab_size=vocab_size))
    return out
