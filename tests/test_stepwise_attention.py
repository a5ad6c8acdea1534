"""``verify-numerics=stepwise``: the verifier's logits are bit-for-bit the ones the target's own
``generate`` computes, in bfloat16, batched or not, over rounds of ragged draft paths.

The oracle is ``generate(output_logits=True)``: the logits it scored each new token with. With the
``batched`` numerics the same comparison is NOT bit-exact (checked, so the oracle is known to see
the difference the wrapper removes).
"""

from __future__ import annotations

import types

import pytest
import torch

from specfed_flwr.config import SpecFedConfig
from specfed_flwr.inprocess import InProcessEngine
from specfed_flwr.kvcache import UnsupportedModelError
from specfed_flwr.models import tiny_llama
from specfed_flwr.models.tiny import TINY_ARCHITECTURES, tiny_model
from specfed_flwr.stepwise_attention import stepwise
from specfed_flwr.target import TargetVerifier, resolve_numerics

VOCAB = 512
NEW = 14
PROMPTS = [[5, 17, 99, 3, 250], [7] * 3 + [41, 300, 12, 8, 77, 5], [int(t) for t in torch.arange(13) * 31 % VOCAB + 1]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bf16_target(attn: str = "sdpa", seed: int = 3) -> torch.nn.Module:
    model = tiny_llama(seed=seed, vocab_size=VOCAB, hidden_size=128, num_layers=3, num_heads=4)
    model.config._attn_implementation = attn
    return model.to(torch.bfloat16)


def _generate(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """The greedy tokens and the float32 logits [NEW, V] generate scored them with."""
    x = torch.tensor([prompt])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), torch.stack([step[0].float() for step in out.logits])


def _verify_along(verifier: TargetVerifier, oracle: list[tuple[list[int], torch.Tensor]], batched: bool) -> bool:
    """Score each prompt's generate continuation in ragged rounds (path lengths 0-4, all accepted,
    the bonus token generate's next one); True when every scored row equals generate's logits."""
    for seq_id, prompt in enumerate(PROMPTS):
        verifier.start(seq_id, prompt)
    position = [0] * len(PROMPTS)
    identical = True
    round_ = 0
    while any(p < NEW for p in position):
        live = [s for s in range(len(PROMPTS)) if position[s] < NEW]
        paths = [oracle[s][0][position[s]: min(NEW - 1, position[s] + (s + round_) % 5)] for s in live]
        if batched:
            scored = verifier.score_batch(live, paths)  # [B, G+1, V]
            rows = [scored[i, : len(path) + 1] for i, path in enumerate(paths)]
        else:
            rows = [verifier.score(s, path) for s, path in zip(live, paths)]
        for s, path, logits in zip(live, paths, rows):
            want = oracle[s][1][position[s]: position[s] + len(path) + 1]  # [len(path)+1, V]
            identical &= torch.equal(logits, want)
            verifier.commit(s, len(path), oracle[s][0][position[s] + len(path)])
            position[s] += len(path) + 1
        round_ += 1
    return identical


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched-forward", "per-sequence"])
def test_stepwise_verification_logits_are_generates_bit_for_bit(attn, batched):
    model = _bf16_target(attn)
    with torch.inference_mode():
        oracle = [_generate(model, p) for p in PROMPTS]
        verifier = TargetVerifier(model, vocab_size=VOCAB, numerics="stepwise", batched=batched)
        assert _verify_along(verifier, oracle, batched)
    assert model.config._attn_implementation == attn  # restored after every forward


def test_batched_numerics_are_not_bit_exact_in_bf16():
    """The oracle sees the rounding the stepwise wrapper removes: without it the same rounds differ."""
    model = _bf16_target()
    with torch.inference_mode():
        oracle = [_generate(model, p) for p in PROMPTS]
        assert not _verify_along(TargetVerifier(model, vocab_size=VOCAB, numerics="batched"), oracle, True)


def test_auto_numerics_follow_the_target_dtype():
    fp32 = tiny_llama(seed=0, vocab_size=VOCAB)
    assert resolve_numerics(fp32, "auto") == "batched"
    assert TargetVerifier(fp32, numerics="auto").stepwise is False
    assert resolve_numerics(fp32, "stepwise") == "stepwise"
    bf16 = _bf16_target()
    assert resolve_numerics(bf16, "auto") == "stepwise"
    assert resolve_numerics(bf16, "batched") == "batched"
    with pytest.raises(ValueError, match="verify-numerics: 'fast'"):
        resolve_numerics(bf16, "fast")


def test_stepwise_is_refused_at_load_for_attention_it_cannot_wrap():
    flash = torch.nn.Linear(2, 2).to(torch.bfloat16)
    flash.config = types.SimpleNamespace(_attn_implementation="flash_attention_2")
    assert resolve_numerics(flash, "auto") == "batched"  # auto: the fast path, no error
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        resolve_numerics(flash, "stepwise")


def test_the_attention_implementation_is_restored_after_an_error():
    model = _bf16_target()
    with pytest.raises(RuntimeError, match="inside"):
        with stepwise(model):
            assert model.config._attn_implementation.startswith("specfed_stepwise_")
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_bf16_engine_greedy_output_is_generates_with_several_drafters():
    target = _bf16_target()
    drafts = [tiny_llama(seed=s, vocab_size=VOCAB) for s in (1, 2)]
    with torch.inference_mode():
        expected = [_generate(target, p)[0] for p in PROMPTS]
    cfg = SpecFedConfig(temperature=0.0, max_new_tokens=NEW, max_active_sequences=len(PROMPTS), draft_length=3,
                        target_dtype="bfloat16", adaptive=False)
    result = InProcessEngine(target, drafts, cfg, eos_token_ids=[], vocab_size=VOCAB).generate(PROMPTS)
    assert result.token_ids == expected


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_bf16_architecture_matrix_greedy_equals_generate(arch):
    """Every architecture of the matrix in bfloat16, sliding-window ones with prompts longer than
    their window (6): stepwise numerics reproduce generate (batched numerics missed one of three
    Phi-3 prompts when this was written)."""
    target = tiny_model(arch, seed=1, vocab_size=256, hidden_size=64, num_heads=4).to(torch.bfloat16)
    prompts = [[int(t) for t in torch.arange(n) * 37 % 255 + 1] for n in (9, 14, 20)]
    with torch.inference_mode():
        expected = []
        for prompt in prompts:
            x = torch.tensor([prompt])
            out = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    cfg = SpecFedConfig(temperature=0.0, max_new_tokens=12, max_active_sequences=3, draft_length=4, adaptive=False)
    engine = InProcessEngine(target, [tiny_model(arch, seed=2, vocab_size=256)], cfg, eos_token_ids=[], vocab_size=256)
    assert engine.target.stepwise  # auto, for a bfloat16 target
    assert engine.generate(prompts).token_ids == expected
