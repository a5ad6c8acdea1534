"""The architecture matrix: every listed decoder family works as target and as draft.

Tiny random fp32 models of each family (``models.tiny_model``); the sliding-window ones
(Qwen2 upper layers, Gemma 2/3 alternating, Mistral and Phi-3 every layer) use a window of 6
while prompts + generated tokens reach 24 positions, so rejected drafts must be rolled back
in caches that are past their window. Greedy output must equal the target's own ``generate``
(which uses transformers' windowed caches) token for token, with 1 and 3 drafters (the 3: a
same-family draft, a draft of ANOTHER family sharing the ids, and a garbage drafter), K in
{1, 8}, gamma in {3, 7}.
"""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch

from specfed_flwr import kvcache
from specfed_flwr.adversarial import RandomDraftProposer
from specfed_flwr.client_core import DraftClient
from specfed_flwr.config import SpecFedConfig
from specfed_flwr.inprocess import InProcessEngine
from specfed_flwr.models import TINY_ARCHITECTURES, tiny_model

VOCAB = 256
NEW_TOKENS = 12
WINDOW = 6
SLIDING = ("qwen2", "gemma2", "gemma3", "mistral", "phi3")
PROMPT_LENGTHS = (12, 4)  # one prompt alone is past the window; the other gets there while generating


@functools.lru_cache(maxsize=None)
def _model(arch: str, seed: int):
    return tiny_model(arch, seed=seed, vocab_size=VOCAB, window=WINDOW)


@functools.lru_cache(maxsize=None)
def _near_draft(arch: str):
    """The target with noisy weights: agrees often but not always, so drafts are both accepted
    and rejected (a random draft of a random model is almost always rejected)."""
    draft = copy.deepcopy(_model(arch, 0))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in draft.parameters():
            if p.dim() >= 2:  # matrices only: norm gains (Gemma: 1 + w) stay as they are
                p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std())
    return draft


@functools.lru_cache(maxsize=None)
def _prompts() -> tuple[tuple[int, ...], ...]:
    g = torch.Generator().manual_seed(5)
    return tuple(tuple(torch.randint(1, VOCAB, (n,), generator=g).tolist()) for n in PROMPT_LENGTHS)


def _generate(model, prompt) -> list[int]:
    ids = torch.tensor([list(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@functools.lru_cache(maxsize=None)
def _oracle(arch: str) -> list[list[int]]:
    return [_generate(_model(arch, 0), p) for p in _prompts()]


def _run(arch: str, drafters: int, k: int, gamma: int):
    cfg = SpecFedConfig(top_k=k, draft_length=gamma, max_new_tokens=NEW_TOKENS, max_active_sequences=4, max_k=VOCAB,
                        temperature=0.0)
    drafts = [_near_draft(arch)]
    extra = {}
    if drafters == 3:
        other = TINY_ARCHITECTURES[(TINY_ARCHITECTURES.index(arch) + 1) % len(TINY_ARCHITECTURES)]
        drafts.append(_model(other, 2))
        extra["garbage"] = DraftClient(RandomDraftProposer(VOCAB, seed=3))
    engine = InProcessEngine(_model(arch, 0), drafts, cfg, eos_token_ids=[], clients=extra)
    return engine.generate([list(p) for p in _prompts()])


@pytest.mark.parametrize("arch,drafters,k,gamma",
                         list(itertools.product(TINY_ARCHITECTURES, [1, 3], [1, 8], [3, 7])))
def test_greedy_equals_generate(arch, drafters, k, gamma):
    result = _run(arch, drafters, k, gamma)
    assert result.token_ids == _oracle(arch)
    if drafters == 1:  # drafts were both accepted and rejected (so rollbacks past the window happened)
        assert 0.0 < result.metrics["acceptance_rate"] < 1.0
    else:
        assert all(result.metrics["clients"][c]["rounds_replied"] > 0 for c in ("drafter-0", "drafter-1", "garbage"))


@pytest.mark.parametrize("arch", SLIDING)
def test_the_window_matters(arch):
    """The matrix is not vacuous for the sliding families: their window changes the target's output
    on these prompts (the same weights without a window generate differently)."""
    model = _model(arch, 0)
    config = model.config
    assert getattr(config, "sliding_window", None) == WINDOW
    unwindowed = type(model)(type(config)(**{**config.to_dict(), "sliding_window": 10_000}))  # never reached
    unwindowed.load_state_dict(model.state_dict())
    unwindowed.eval()
    assert [_generate(unwindowed, p) for p in _prompts()] != _oracle(arch)


def test_rollback_by_re_prefill_is_exact(monkeypatch):
    """A cache that cannot be cropped (the model's own windowed cache here) is rolled back by
    re-prefilling the accepted prefix: output unchanged."""
    monkeypatch.setattr(kvcache, "new_cache", lambda model: None)
    result = _run("gemma2", 1, 8, 7)
    assert result.token_ids == _oracle("gemma2")


def test_rollback_cache_units():
    from transformers.cache_utils import DynamicCache

    model = _model("mistral", 0)
    windowed = DynamicCache(config=model.config)
    model(torch.arange(1, 11).unsqueeze(0), use_cache=True, **{kvcache.cache_argument(model): windowed})
    assert not kvcache.cache_is_croppable(windowed)  # past its window: the first positions are gone
    assert kvcache.rollback_cache(windowed, 10, 8) == (None, 0)
    full = kvcache.new_cache(model)
    out, full = kvcache.forward_with_cache(model, full, input_ids=torch.arange(1, 11).unsqueeze(0))
    assert kvcache.cache_is_croppable(full)
    cache, n = kvcache.rollback_cache(full, 10, 8)
    assert cache is full and n == 8 and full.get_seq_length() == 8
    assert kvcache.rollback_cache(full, 8, 8) == (full, 8)  # nothing to drop


def test_an_encoder_decoder_is_refused_at_load():
    from transformers import T5Config, T5ForConditionalGeneration

    from specfed_flwr.proposer import HFDraftProposer
    from specfed_flwr.target import TargetVerifier

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(kvcache.UnsupportedModelError, match="target T5ForConditionalGeneration is an encoder-decoder"):
        TargetVerifier(t5)
    with pytest.raises(kvcache.UnsupportedModelError, match="draft T5ForConditionalGeneration is an encoder-decoder"):
        HFDraftProposer(t5)
