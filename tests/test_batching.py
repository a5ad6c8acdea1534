"""Batched verification and batched drafting give the per-sequence results.

* ``TargetVerifier.score_batch``: one padded forward for all sequences == one forward per
  sequence (fp32, allclose), over rounds where sequences of different lengths join and leave
  and commit different numbers of accepted tokens;
* ``HFDraftProposer.propose``: one forward per draft step for the batch == the per-sequence
  loop, reply for reply (greedy, sparse and full sampling with the same seeds);
* the whole ``InProcessEngine`` with batched target and drafters still reproduces the target's
  own greedy ``generate`` with fewer active slots than prompts.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specfed_flwr.config import SpecFedConfig
from specfed_flwr.inprocess import InProcessEngine
from specfed_flwr.kvcache import PaddedBatch, returned_cache, supports_padded_batching
from specfed_flwr.proposer import HFDraftProposer
from specfed_flwr.target import TargetVerifier

VOCAB = 1024


def _tiny(seed: int, attn: str | None = None) -> torch.nn.Module:
    try:
        from specfed_flwr.models import tiny_llama
    except ImportError:
        tiny_llama = None
    if tiny_llama is not None and attn is None:
        return tiny_llama(seed=seed, vocab_size=VOCAB)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    if attn is not None:
        config._attn_implementation = attn
    return LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a loaded 2-core machine spinning OpenMP
    threads make each ~1 ms forward take ~30 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return _tiny(0)


@pytest.fixture(scope="module")
def draft():
    return _tiny(1)


def _random_prompt(rng: random.Random, low: int = 1, high: int = 14) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(rng.randint(low, high))]


@pytest.mark.parametrize("attn", [None, "eager"])
def test_score_batch_equals_per_sequence(attn):
    model = _tiny(0, attn)
    batched, looped = TargetVerifier(model, batched=True), TargetVerifier(model, batched=False)
    assert batched.batched and not looped.batched
    rng = random.Random(5)
    active: list[int] = []
    next_id, rounds, worst = 0, 0, 0.0
    for rnd in range(14):
        if rnd % 3 == 0 or len(active) < 2:  # sequences of different lengths join
            for _ in range(rng.randint(1, 3)):
                prompt = _random_prompt(rng)
                batched.start(next_id, prompt)
                looped.start(next_id, prompt)
                active.append(next_id)
                next_id += 1
        if rnd % 4 == 3 and len(active) > 2:  # and leave
            gone = active.pop(rng.randrange(len(active)))
            batched.release(gone)
            looped.release(gone)
        order = active[:]
        rng.shuffle(order)  # the row of a sequence changes from round to round
        paths = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 5))] for _ in order]
        got = batched.score_batch(order, paths)
        want = looped.score_batch(order, paths)
        rounds += 1
        assert got.shape == want.shape == (len(order), max(len(p) for p in paths) + 1, VOCAB)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        worst = max(worst, float((got - want).abs().max()))
        for row, seq_id in enumerate(order):
            # zero padded beyond each path, exactly as before
            assert not got[row, len(paths[row]) + 1 :].any()
            n_acc = rng.randint(0, len(paths[row]))
            token = rng.randrange(VOCAB)
            batched.commit(seq_id, n_acc, token)
            looped.commit(seq_id, n_acc, token)
            assert batched.tokens(seq_id) == looped.tokens(seq_id)
            assert batched._seqs[seq_id].cache_len == looped._seqs[seq_id].cache_len
    assert batched.forward_calls == rounds  # one forward per round
    assert looped.forward_calls > rounds
    assert worst < 1e-4


@pytest.mark.parametrize("batched", [True, False])
def test_prefill_then_score_equals_scoring_the_whole_prompt(batched):
    """``TargetVerifier.prefill`` (run while devices draft) caches all but the newest committed
    token; the next ``score_batch`` then feeds only that token and the path, with the same logits
    as scoring the whole prompt at once, for rows prefilled, not prefilled and half prefilled."""
    model = _tiny(0)
    pre, plain = TargetVerifier(model, batched=batched), TargetVerifier(model, batched=False)
    rng = random.Random(11)
    prompts = [_random_prompt(rng, 1, 14) for _ in range(4)]
    for i, prompt in enumerate(prompts):
        pre.start(i, prompt)
        plain.start(i, prompt)
    fed = pre.prefill([0, 1, 2])  # sequence 3 is left to score
    assert fed == sum(len(p) - 1 for p in prompts[:3])
    assert all(pre.pending_prefill(i) == 0 for i in range(3)) and pre.pending_prefill(3) == len(prompts[3]) - 1
    assert pre.prefill([0, 1, 2]) == 0  # nothing left to feed
    assert pre.forward_calls == 0 and pre.prefill_calls >= 1
    for _ in range(3):
        order = [3, 1, 0, 2]
        paths = [[rng.randrange(VOCAB) for _ in range(rng.randint(0, 4))] for _ in order]
        got, want = pre.score_batch(order, paths), plain.score_batch(order, paths)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        for row, seq_id in enumerate(order):
            n_acc, token = rng.randint(0, len(paths[row])), rng.randrange(VOCAB)
            pre.commit(seq_id, n_acc, token)
            plain.commit(seq_id, n_acc, token)
        assert pre.prefill(order) == 0  # committed tokens are scored with the path, never prefilled


def test_batched_and_single_scoring_mix(target):
    """A sequence can go from the batched path to ``score`` and back (caches stay per sequence)."""
    a, b = TargetVerifier(target), TargetVerifier(target, batched=False)
    prompts = {0: [5, 6, 7], 1: [9] * 11, 2: [3]}
    for seq_id, p in prompts.items():
        a.start(seq_id, p)
        b.start(seq_id, p)
    ids = list(prompts)
    got = a.score_batch(ids, [[1, 2], [3], []])
    want = b.score_batch(ids, [[1, 2], [3], []])
    assert torch.allclose(got, want, atol=1e-4)
    for seq_id, n in zip(ids, [1, 0, 0]):
        a.commit(seq_id, n, 42)
        b.commit(seq_id, n, 42)
    assert torch.allclose(a.score(1, [8, 8]), b.score(1, [8, 8]), atol=1e-4)
    a.commit(1, 2, 4)
    b.commit(1, 2, 4)
    got = a.score_batch(ids, [[7], [7, 7, 7], [7]])
    want = b.score_batch(ids, [[7], [7, 7, 7], [7]])
    assert torch.allclose(got, want, atol=1e-4)


def _drive_proposers(model, temperature: float, sampling: str, k: int = 8, rounds: int = 10):
    batched, looped = HFDraftProposer(model), HFDraftProposer(model, batched=False)
    assert batched.batched and not looped.batched
    rng = random.Random(11)
    committed: dict[int, list[int]] = {}
    next_id = 0
    for rnd in range(rounds):
        for _ in range(rng.randint(0, 3) if committed else 3):
            committed[next_id] = _random_prompt(rng, 1, 12)
            next_id += 1
        if rnd % 3 == 2 and len(committed) > 2:
            gone = next(iter(committed))
            del committed[gone]
            batched.forget(gone)
            looped.forget(gone)
        seq_ids = list(committed)
        rng.shuffle(seq_ids)
        for seq_id in seq_ids:
            for proposer in (batched, looped):
                state = proposer._states.get(seq_id)
                start = 0 if state is None else state.committed
                proposer.sync(seq_id, start, committed[seq_id][start:])
        gammas = [rng.choice([0, 1, 3, 4, 4, 6]) for _ in seq_ids]
        kwargs = dict(temperature=temperature, sampling=sampling, seed=3, round_=rnd)
        got = batched.propose(seq_ids, gammas, k, **kwargs)
        want = looped.propose(seq_ids, gammas, k, **kwargs)
        np.testing.assert_array_equal(got.seq_ids, want.seq_ids)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        # the logits differ by float noise (~1e-7) only; rounding to float16 can then land one
        # ulp apart (2**-10 relative), the drafted tokens and top-K ids do not change
        np.testing.assert_allclose(got.probs.astype(np.float32), want.probs.astype(np.float32), rtol=2e-3, atol=0)
        for row, seq_id in enumerate(seq_ids):
            assert batched._states[seq_id].tokens == looped._states[seq_id].tokens
            assert batched._states[seq_id].cache_len == looped._states[seq_id].cache_len
            # the server accepts a random prefix of the drafts, then a token of its own
            n_acc = rng.randint(0, int(got.lengths[row]))
            committed[seq_id] = committed[seq_id] + got.token_ids[row, :n_acc, 0].astype(int).tolist() + [rng.randrange(VOCAB)]
    return batched, looped


@pytest.mark.parametrize("temperature,sampling", [(0.0, "sparse"), (1.0, "sparse"), (0.7, "full")])
def test_batched_propose_equals_per_sequence(draft, temperature, sampling):
    batched, looped = _drive_proposers(draft, temperature, sampling)
    assert batched.forward_calls < looped.forward_calls


@pytest.mark.parametrize("temperature,sampling", [(0.0, "sparse"), (1.0, "sparse")])
def test_prompts_prefilled_in_length_groups_draft_what_one_sequence_at_a_time_does(draft, temperature, sampling,
                                                                                   monkeypatch):
    """With the grouping thresholds at zero every batched prefill of new prompts is split in two
    groups of similar length (``prefill_groups``); the replies still equal the per-sequence loop's."""
    import specfed_flwr.prefill_groups as groups

    monkeypatch.setattr(groups, "MIN_SAVED_FRACTION", 0.0)
    monkeypatch.setattr(groups, "MIN_SAVED_POSITIONS", 0)
    splits = []
    real = groups.split_by_length

    def spy(lengths, **kwargs):
        out = real(lengths, **kwargs)
        splits.append(len(out))
        return out

    monkeypatch.setattr("specfed_flwr.proposer.split_by_length", spy)
    _drive_proposers(draft, temperature, sampling)
    assert 2 in splits  # some prefill really went in two groups


def test_split_by_length_groups_similar_lengths_only_when_it_saves_enough():
    from specfed_flwr.prefill_groups import split_by_length

    shipped = [46, 44, 72, 37] * 4  # the shipped prompts at concurrency 16: 1152 padded, 840 in two groups
    a, b = split_by_length(shipped)
    assert sorted(a + b) == list(range(16)) and {shipped[i] for i in b} == {72} and max(shipped[i] for i in a) == 46
    assert split_by_length([40, 41, 42, 44]) == [[0, 1, 2, 3]]  # nothing worth a second forward
    assert split_by_length([5, 300], min_positions=0) == [[0], [1]]
    assert split_by_length([7]) == [[0]] and split_by_length([]) == [[]]
    # never worse than one padded forward, whatever the lengths
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(2, 20))]
        parts = split_by_length(lengths, min_fraction=0.0, min_positions=0)
        assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
        assert sum(len(p) * max(lengths[i] for i in p) for p in parts) <= len(lengths) * max(lengths)


def test_padded_batch_row_caches_have_no_padding(target):
    """``row_cache`` returns exactly each row's own positions, contiguous or not."""
    rows = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    batch = PaddedBatch([None, None, None], [0, 0, 0], device=torch.device("cpu"), reserve=6)
    batch.step(target, rows, [[len(r) - 1] for r in rows])
    # row 1 idles; row 2 now has a hole (its right padding of the first step): index_select path
    batch.step(target, [[10], [], [11]], [[0], [], [0]])
    extras = {0: [10], 1: [], 2: [11]}
    for row, toks in enumerate(rows):
        cache = batch.row_cache(row)
        extra = extras[row]
        assert batch.row_length(row) == len(toks) + len(extra) == cache.get_seq_length()
        ref = returned_cache(target(input_ids=torch.tensor([toks + extra]), use_cache=True))
        for got, want in zip(cache.layers, ref.layers):
            assert torch.allclose(got.keys, want.keys, atol=1e-5)
            assert torch.allclose(got.values, want.values, atol=1e-5)


def test_sliding_window_models_fall_back_to_the_loop():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
    )).eval()
    assert not supports_padded_batching(model)
    verifier = TargetVerifier(model)
    assert not verifier.batched
    verifier.start(0, [1, 2, 3])
    verifier.start(1, [4])
    assert verifier.score_batch([0, 1], [[5], []]).shape == (2, 2, 128)
    assert supports_padded_batching(_tiny(0))


NUM_PROMPTS = 10
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(7)
    return [_random_prompt(rng, 2, 20) for _ in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def oracle(target, prompts):
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        outs.append(gen[0, len(p):].tolist())
    return outs


def _engine(target, drafts, gamma: int, temperature: float = 0.0, batched: bool = True, **extra) -> InProcessEngine:
    # strict rounds (pipeline-depth 1): every active sequence in each round's batch
    cfg = SpecFedConfig(top_k=4, draft_length=gamma, max_new_tokens=NEW_TOKENS, max_active_sequences=4,
                        max_k=VOCAB, temperature=temperature, seed=5, pipeline_depth="1", **extra)
    engine = InProcessEngine(target, drafts, cfg, eos_token_ids=[])
    engine.target.batched = batched
    for client in engine.clients.values():
        client.proposer.batched = batched
    return engine


@pytest.mark.parametrize("gamma", [1, 4])
def test_engine_with_batching_reproduces_target_greedy(target, draft, prompts, oracle, gamma):
    engine = _engine(target, [draft, _tiny(2)], gamma)
    assert engine.target.batched
    assert all(c.proposer.batched for c in engine.clients.values())
    result = engine.generate(prompts)
    assert [s.token_ids for s in result.sequences] == oracle
    # one target forward per round, however many sequences are active
    assert engine.target.forward_calls == len(result.rounds)
    assert max(r.active_sequences for r in result.rounds) == 4


def test_engine_with_the_target_as_draft_accepts_everything(target, prompts, oracle):
    result = _engine(target, [target], 4).generate(prompts)
    assert [s.token_ids for s in result.sequences] == oracle
    assert sum(r.accepted for r in result.rounds) == sum(r.drafted for r in result.rounds) > 0


def test_engine_sampling_is_the_same_batched_or_not(target, draft, prompts):
    """Same seeds, sampling mode: batching changes the logits only by float noise."""
    # weight_drop_below=0 keeps the (random, poorly agreeing) drafter in the path every round
    runs = [
        _engine(target, [draft], 4, temperature=1.0, batched=b, weight_drop_below=0.0).generate(prompts)
        for b in (True, False)
    ]
    assert sum(r.drafted for r in runs[0].rounds) > 0
    assert [s.token_ids for s in runs[0].sequences] == [s.token_ids for s in runs[1].sequences]
