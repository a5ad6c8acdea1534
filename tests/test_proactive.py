"""Drafting ahead (proactive drafting) on the device.

A device that drafted ahead must send exactly what a device that did not would send for the
same committed prefix (greedy and sampling: randomness is keyed by position), with fewer
forwards when its guess was confirmed; a wrong guess is dropped and counted.
"""

from __future__ import annotations

import numpy as np
import pytest

from specfed_flwr.client_core import DraftClient
from specfed_flwr.models import tiny_llama
from specfed_flwr.protocol import DraftRequest
from specfed_flwr.proposer import HFDraftProposer

VOCAB = 1024
GAMMA = 4


@pytest.fixture(scope="module")
def draft():
    return tiny_llama(seed=1, vocab_size=VOCAB)


def _prompts(n: int) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, VOCAB, size=int(rng.integers(3, 9))).tolist() for _ in range(n)]


def _propose(proposer: HFDraftProposer, seq_ids, temperature: float, sampling: str = "sparse"):
    return proposer.propose(seq_ids, [GAMMA] * len(seq_ids), 8, temperature=temperature, sampling=sampling, seed=7)


def _same_reply(a, b) -> None:
    np.testing.assert_array_equal(a.seq_ids, b.seq_ids)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.token_ids, b.token_ids)
    np.testing.assert_allclose(a.probs.astype(np.float32), b.probs.astype(np.float32), rtol=2e-3, atol=0)


@pytest.mark.parametrize("temperature,sampling", [(0.0, "sparse"), (1.0, "sparse"), (0.8, "full")])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_confirmed_guess_is_served_without_forwards_and_equals_fresh_drafting(draft, temperature, sampling, rows):
    ahead, fresh = HFDraftProposer(draft), HFDraftProposer(draft)
    seq_ids = list(range(rows))
    prompts = _prompts(rows)
    for proposer in (ahead, fresh):
        for s, p in zip(seq_ids, prompts):
            proposer.sync(s, 0, p)
    first = _propose(ahead, seq_ids, temperature, sampling)
    _same_reply(first, _propose(fresh, seq_ids, temperature, sampling))
    assert ahead.draft_ahead(seq_ids, GAMMA + 1) == rows * (GAMMA + 1)
    # the server accepts every draft, and its bonus token is the device's own next draft
    for s, p in zip(seq_ids, prompts):
        guess = ahead.drafted_tokens(s)[: GAMMA + 1]
        for proposer in (ahead, fresh):
            proposer.sync(s, len(p), guess)
    calls = ahead.forward_calls
    second = _propose(ahead, seq_ids, temperature, sampling)
    assert ahead.forward_calls == calls  # every position was drafted ahead
    _same_reply(second, _propose(fresh, seq_ids, temperature, sampling))
    assert ahead.stats["proactive_hits"] == rows and ahead.stats["proactive_misses"] == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_wrong_guess_is_dropped_and_counted(draft, temperature):
    ahead, fresh = HFDraftProposer(draft), HFDraftProposer(draft)
    (prompt,) = _prompts(1)
    for proposer in (ahead, fresh):
        proposer.sync(0, 0, prompt)
    _propose(ahead, [0], temperature)
    _propose(fresh, [0], temperature)
    ahead.draft_ahead([0], GAMMA + 1)
    drafts = ahead.drafted_tokens(0)
    # two drafts accepted, then the target's own (different) token
    delta = drafts[:2] + [(drafts[2] + 1) % VOCAB]
    for proposer in (ahead, fresh):
        proposer.sync(0, len(prompt), delta)
    assert ahead.drafted_tokens(0) == [] and ahead.committed_length(0) == len(prompt) + 3
    _same_reply(_propose(ahead, [0], temperature), _propose(fresh, [0], temperature))
    assert ahead.stats == {"proactive_hits": 0, "proactive_misses": 1, "proactive_positions": GAMMA + 1}


def test_a_partly_drafted_guess_is_finished_by_propose(draft):
    ahead, fresh = HFDraftProposer(draft), HFDraftProposer(draft)
    (prompt,) = _prompts(1)
    for proposer in (ahead, fresh):
        proposer.sync(0, 0, prompt)
        _propose(proposer, [0], 0.0)
    ahead.draft_ahead([0], 2)  # the guess and one more draft: the next reply needs 4
    guess = ahead.drafted_tokens(0)[: GAMMA + 1]
    for proposer in (ahead, fresh):
        proposer.sync(0, len(prompt), guess)
    calls = ahead.forward_calls
    _same_reply(_propose(ahead, [0], 0.0), _propose(fresh, [0], 0.0))
    assert ahead.forward_calls - calls == GAMMA - 1


def test_draft_client_drafts_ahead_in_the_background_and_reports_hits(draft):
    prompts = _prompts(2)
    client = DraftClient(HFDraftProposer(draft), draft_ahead=True)
    plain = DraftClient(HFDraftProposer(draft))
    entries = [(s, 0, p, GAMMA) for s, p in enumerate(prompts)]
    request = DraftRequest.build(entries, k=8, temperature=0.0, sampling="sparse", seed=0, round=1)
    reply, metrics = client.handle(request)
    plain_reply, _ = plain.handle(request)
    _same_reply(reply, plain_reply)
    assert metrics.proactive_hits == 0
    client._ahead.join(timeout=60)  # let the guess finish (the next handle would stop it)
    # the server accepts every draft and its bonus is the device's guess
    proposer = client.proposer
    entries = [(s, len(p), reply.token_ids[s, :, 0].tolist() + [proposer.drafted_tokens(s)[GAMMA]], GAMMA)
               for s, p in enumerate(prompts)]
    request = DraftRequest.build(entries, k=8, temperature=0.0, sampling="sparse", seed=0, round=2)
    reply, metrics = client.handle(request)
    plain_reply, plain_metrics = plain.handle(request)
    _same_reply(reply, plain_reply)
    assert metrics.proactive_hits == 2 and plain_metrics.proactive_hits == 0
    # what the device really spent since its first reply: the GAMMA + 1 batched forwards it drafted
    # ahead (none at request time: the drafts were there), far more than serving the reply took
    assert metrics.forward_steps == GAMMA + 1
    assert metrics.compute_seconds > metrics.draft_seconds
    # a device without drafting ahead drafts at request time: its compute is its drafting
    assert plain_metrics.forward_steps >= GAMMA
    assert plain_metrics.compute_seconds == pytest.approx(plain_metrics.draft_seconds)
    client.stop_ahead()
    assert client._ahead is None


def test_prompt_forwards_are_reported_as_prefill_not_as_draft_steps(draft):
    """A request with new prompts of PREFILL_TOKENS tokens or more spends forwards feeding them; the
    device reports those apart (the controller takes them out of its draft step cost), and a
    decoding request reports none."""
    from specfed_flwr.proposer import PREFILL_TOKENS

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, size=PREFILL_TOKENS + 4).tolist() for _ in range(2)]
    client = DraftClient(HFDraftProposer(draft))
    entries = [(s, 0, p, GAMMA) for s, p in enumerate(prompts)]
    reply, metrics = client.handle(DraftRequest.build(entries, k=8, temperature=0.0, sampling="sparse", seed=0,
                                                      round=1))
    assert metrics.prefill_forwards == 1 and 0 < metrics.prefill_seconds < metrics.draft_seconds
    assert metrics.forward_steps == GAMMA  # the prompt forward also drafted the first position
    entries = [(s, len(p), reply.token_ids[s, :2, 0].tolist(), GAMMA) for s, p in enumerate(prompts)]
    _, metrics = client.handle(DraftRequest.build(entries, k=8, temperature=0.0, sampling="sparse", seed=0, round=2))
    assert metrics.prefill_forwards == 0 and metrics.prefill_seconds == 0.0
