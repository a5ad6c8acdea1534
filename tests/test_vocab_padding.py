"""Pairs that share a tokenizer but pad their embedding matrices differently (Qwen2.5 0.5B vs 7B).

The tiny models here have 256 real token ids; the target's head has 320 rows, the draft's 288,
and the padding rows are scaled copies of real rows, so they win the argmax: anything that lets
a padding row into a distribution emits ids >= 256 (or faults the draft's replies on the wire).
"""

from __future__ import annotations

import copy

import pytest
import torch

from specfed_flwr.config import SpecFedConfig
from specfed_flwr.inprocess import InProcessEngine
from specfed_flwr.models import VocabularyMismatchError, check_vocab_compatible, tiny_model, token_vocab_size

VOCAB, TARGET_ROWS, DRAFT_ROWS = 256, 320, 288
NEW_TOKENS = 10


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=words[0])


WORDS = [f"w{i}" for i in range(VOCAB)]


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama", 0, VOCAB, padded_vocab_size=TARGET_ROWS)
    draft = tiny_model("llama", 0, VOCAB, padded_vocab_size=DRAFT_ROWS)
    # the draft: the target's real weights plus noise (so drafts are accepted and rejected), own padding
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for (name, p), (_, q) in zip(draft.named_parameters(), target.named_parameters()):
            if p.shape == q.shape:
                p.copy_(q + (0.3 * q.std() * torch.randn(q.shape, generator=g) if q.dim() >= 2 else 0))
            else:  # embedding / head: real rows from the target, padding rows stay 3 x real rows
                p[:VOCAB] = q[:VOCAB] + 0.3 * q.std() * torch.randn(p[:VOCAB].shape, generator=g)
                p[VOCAB:] = 3.0 * p[: p.shape[0] - VOCAB]
    return target, draft


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(9)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 3, 11)]


def _generate(model, prompt, suppress: bool):
    ids = torch.tensor([prompt])
    extra = {"suppress_tokens": list(range(VOCAB, model.config.vocab_size))} if suppress else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, eos_token_id=None, **extra)
    return out[0, len(prompt):].tolist()


def test_same_tokenizer_different_padding_is_accepted():
    tok_a, tok_b = _tokenizer(WORDS), _tokenizer(WORDS)
    target = tiny_model("llama", 0, VOCAB, padded_vocab_size=TARGET_ROWS)
    draft = tiny_model("gpt2", 1, VOCAB, padded_vocab_size=DRAFT_ROWS)
    assert check_vocab_compatible((target, tok_a), (draft, tok_b)) == VOCAB
    assert token_vocab_size(target, tok_a) == VOCAB and token_vocab_size(target) == TARGET_ROWS
    # without tokenizers nothing shows which rows are padding: refused, and the message says how to fix it
    with pytest.raises(VocabularyMismatchError, match="320.*288.*give both tokenizers"):
        check_vocab_compatible(target, draft)


def test_different_tokenizers_are_refused_naming_both():
    target = tiny_model("llama", 0, VOCAB, padded_vocab_size=TARGET_ROWS)
    draft = tiny_model("llama", 1, VOCAB, padded_vocab_size=TARGET_ROWS)
    other = _tokenizer(WORDS[:-1] + ["different"])
    with pytest.raises(VocabularyMismatchError, match="target 'org/big'.*draft 'org/small'"):
        check_vocab_compatible((target, _tokenizer(WORDS)), (draft, other), target_name="target 'org/big'",
                               draft_name="draft 'org/small'")


def test_a_draft_without_a_row_per_token_is_refused():
    small = tiny_model("llama", 1, 200)
    with pytest.raises(VocabularyMismatchError, match="only 200 output rows"):
        check_vocab_compatible((tiny_model("llama", 0, VOCAB), _tokenizer(WORDS)), (small, _tokenizer(WORDS)))


def test_padded_pair_is_greedy_exact(pair, prompts):
    target, draft = pair
    expected = [_generate(target, p, suppress=True) for p in prompts]
    # not vacuous: left in, the padding rows would take over the target's greedy output
    assert any(t >= VOCAB for p in prompts for t in _generate(target, p, suppress=False))
    cfg = SpecFedConfig(top_k=8, draft_length=4, max_new_tokens=NEW_TOKENS, max_active_sequences=4, max_k=VOCAB,
                        temperature=0.0)
    result = InProcessEngine(target, [draft, copy.deepcopy(draft)], cfg, eos_token_ids=[], vocab_size=VOCAB).generate(prompts)
    assert result.token_ids == expected
    for name in ("drafter-0", "drafter-1"):
        client = result.metrics["clients"][name]
        assert client["faults"] == [] and client["rounds_replied"] > 0
    assert 0.0 < result.metrics["acceptance_rate"] < 1.0


def test_padded_pair_sampling_never_emits_padding(pair, prompts):
    target, draft = pair
    cfg = SpecFedConfig(top_k=8, draft_length=4, max_new_tokens=NEW_TOKENS, max_active_sequences=4, max_k=VOCAB,
                        temperature=1.0, reconstruction="exact", draft_sampling="sparse")
    result = InProcessEngine(target, [draft], cfg, eos_token_ids=[], vocab_size=VOCAB).generate(prompts)
    assert all(0 <= t < VOCAB for ids in result.token_ids for t in ids)
    assert result.metrics["clients"]["drafter-0"]["faults"] == []


def test_engine_takes_the_tokenizer_vocabulary(pair):
    target, _ = pair
    engine = InProcessEngine(target, [], SpecFedConfig(), tokenizer=_tokenizer(WORDS), eos_token_ids=[])
    assert engine.target.vocab_size == VOCAB
