"""Greedy exactness against transformers' own ``generate(do_sample=False)`` of the target.

Tiny random fp32 Llama target, a differently-seeded draft, >= 20 prompts, every
reconstruction rule, K in {1, 4, V}, gamma in {1, 4, 8}, 1 and 3 drafters (one of which
drafts random garbage). The output must be token-for-token the target's greedy output.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from specfed_flwr.adversarial import RandomDraftProposer
from specfed_flwr.client_core import DraftClient
from specfed_flwr.config import SpecFedConfig
from specfed_flwr.inprocess import InProcessEngine
from specfed_flwr.specs import tiny_llama

VOCAB = 1024
NEW_TOKENS = 12
NUM_PROMPTS = 20


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(seed=0, vocab_size=VOCAB)
    draft_a = tiny_llama(seed=1, vocab_size=VOCAB)
    draft_b = tiny_llama(seed=2, vocab_size=VOCAB)
    return target, draft_a, draft_b


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def oracle(models, prompts):
    target = models[0]
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        outs.append(gen[0, len(p):].tolist())
    return outs


def _engine(models, drafters: int, rule: str, k: int, gamma: int, encoding: str = "auto",
            adaptive: bool = False) -> InProcessEngine:
    """``k`` and ``gamma`` every round (``adaptive`` False), or as the controller's starting values."""
    target, draft_a, draft_b = models
    cfg = SpecFedConfig(top_k=k, draft_length=gamma, reconstruction=rule, max_new_tokens=NEW_TOKENS,
                        max_active_sequences=NUM_PROMPTS, max_k=VOCAB, temperature=0.0, uplink_encoding=encoding,
                        adaptive=adaptive)
    draft_models = [draft_a] if drafters == 1 else [draft_a, draft_b]
    extra = {}
    if drafters == 3:
        extra["garbage"] = DraftClient(RandomDraftProposer(VOCAB, seed=7))
    return InProcessEngine(target, draft_models, cfg, eos_token_ids=[], clients=extra)


@pytest.mark.parametrize(
    "rule,k,gamma,drafters",
    list(itertools.product(["uniform", "temperature", "exact"], [1, 4, VOCAB], [1, 4, 8], [1, 3])),
)
def test_greedy_output_equals_target_generate(models, prompts, oracle, rule, k, gamma, drafters):
    result = _engine(models, drafters, rule, k, gamma).generate(prompts)
    assert [s.token_ids for s in result.sequences] == oracle
    if drafters == 3:
        assert result.metrics["clients"]["garbage"]["rounds_replied"] > 0


@pytest.mark.parametrize("encoding,rule", list(itertools.product(
    ["fixed-k", "budgeted", "budgeted-compact"], ["uniform", "temperature", "exact"])))
def test_greedy_output_equals_target_generate_for_every_uplink_encoding(models, prompts, oracle, encoding, rule):
    result = _engine(models, 3, rule, 4, 4, encoding).generate(prompts)
    assert [s.token_ids for s in result.sequences] == oracle
    clients = result.metrics["clients"]
    assert clients["garbage"]["rounds_replied"] > 0
    drafter = clients["drafter-0"]
    per_position = drafter["bytes_per_position_all_in"]
    distribution = drafter["topk_bytes"] / drafter["positions"]
    if encoding == "fixed-k":
        assert distribution == 4 * (2 + 2) and per_position > distribution  # K=4 uint16 + float16, + headers
    else:  # greedy variable K: one slot per position (count + id + probability) plus the headers
        assert distribution == (1 + 2 + 1 if encoding == "budgeted-compact" else 1 + 2 + 2)
        assert per_position < 4 * (2 + 2)


@pytest.mark.parametrize("drafters", [1, 3])
def test_greedy_output_equals_target_generate_with_adaptive_settings(models, prompts, oracle, drafters):
    """The default: gamma and K chosen per client every round; the output is still the target's."""
    result = _engine(models, drafters, "exact", 8, 3, adaptive=True).generate(prompts)
    assert [s.token_ids for s in result.sequences] == oracle
    assert result.metrics["settings"]["drafter-0"]["rounds"] > 0


def test_drafts_are_actually_used(models, prompts, oracle):
    """The exactness above is not vacuous: drafts are accepted and rounds are saved."""
    engine = InProcessEngine(models[0], [models[0]], SpecFedConfig(top_k=4, draft_length=4, max_new_tokens=NEW_TOKENS,
                                                                  max_active_sequences=NUM_PROMPTS, adaptive=False),
                             eos_token_ids=[])
    result = engine.generate(prompts)
    assert result.token_ids == oracle
    # a draft identical to the target accepts everything: 5 tokens per round of each sequence
    assert result.metrics["acceptance_rate"] > 0.95
    assert max(s.rounds for s in result.sequences) <= -(-NEW_TOKENS // 5) + 1


def test_eos_stops_like_generate(models, prompts):
    target = models[0]
    # choose as EOS a token the target emits mid-way through the first prompt's greedy output
    ids = torch.tensor([prompts[0]])
    free = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[0, len(prompts[0]):].tolist()
    eos = free[NEW_TOKENS // 2]
    expected = []
    for p in prompts:
        x = torch.tensor([p])
        out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, eos_token_id=eos)[0, len(p):].tolist()
        if eos in out:  # generate pads finished rows in a batch; single rows end at EOS
            out = out[: out.index(eos) + 1]
        expected.append(out)
    cfg = SpecFedConfig(top_k=4, draft_length=4, max_new_tokens=NEW_TOKENS, max_active_sequences=NUM_PROMPTS)
    result = InProcessEngine(target, [models[1]], cfg, eos_token_ids=[eos]).generate(prompts)
    assert result.token_ids == expected
    assert any(s.finish_reason == "eos" for s in result.sequences)
