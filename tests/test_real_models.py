"""The embedded default pair (SmolLM2-135M-Instruct fp32 target + int4 draft), offline.

The first run converts the GGUF once into the cache (30-60 s); later runs load in about a second.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from specfed_flwr import models as M
from specfed_flwr.models import gguf as G
from specfed_flwr.specs import load_pair
from specfed_flwr.tokens import format_prompt

pytestmark = pytest.mark.real_model

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in simple terms.",
    "List three tips for learning Python.",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def offline():
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        M.gguf_path()
    except FileNotFoundError as exc:
        if not (M.cache_dir() / M.DEFAULT_DIRNAME / G._MARKER).is_file():
            pytest.skip(str(exc))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def pair(offline):
    return load_pair()


@pytest.fixture(scope="module")
def greedy(pair):
    """The target's own greedy continuations (prompt ids, continuation ids) of the chat prompts."""
    outs = []
    with torch.inference_mode():
        for text in PROMPTS:
            ids = format_prompt(pair.tokenizer, text)
            x = torch.tensor([ids], device=next(pair.target.parameters()).device)
            gen = pair.target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                       do_sample=False)
            outs.append((ids, gen[0, len(ids):].tolist()))
    return outs


def _agreement(draft, device, greedy) -> float:
    agree = total = 0
    with torch.inference_mode():
        for ids, cont in greedy:
            full = torch.tensor([ids + cont], device=device)
            pred = draft(full).logits[0, len(ids) - 1:-1].argmax(-1).tolist()
            agree += sum(int(p == t) for p, t in zip(pred, cont))
            total += len(cont)
    return agree / total


def test_default_pair_loads_offline(pair):
    assert pair.vocab_size == 49152
    assert pair.target.config.vocab_size == 49152 and pair.draft.config.vocab_size == 49152
    assert next(pair.target.parameters()).device.type == M.resolve_device("auto").type
    assert all(p.dtype == torch.float32 for p in pair.target.parameters())
    quantised = [m for m in pair.draft.modules() if isinstance(m, M.QuantLinear)]
    # int4 body (30 layers x 7 linears), int8 vocabulary-sized head
    assert len(quantised) == 30 * 7 + 1
    assert sorted({m.bits for m in quantised if m.out_features != 49152}) == [4]
    assert [m.bits for m in quantised if m.out_features == 49152] == [8]
    assert not any(isinstance(m, torch.nn.Linear) for m in pair.draft.modules())
    target_bytes, draft_bytes = pair.target.specfed_info["parameter_bytes"], pair.draft.specfed_info["parameter_bytes"]
    assert target_bytes == M.model_nbytes(pair.target) > 500e6
    assert draft_bytes == M.model_nbytes(pair.draft) < 0.3 * target_bytes
    assert pair.draft.specfed_info["quantization"] == "int4" and pair.target.specfed_info["dtype"] == "float32"
    json.dumps([pair.target.specfed_info, pair.draft.specfed_info])


def test_tokenizer_and_chat_prompt(pair):
    fp = M.tokenizer_fingerprint(pair.tokenizer)
    assert fp["vocab_size"] == 49152
    ids = format_prompt(pair.tokenizer, "Hi")
    assert ids[0] == pair.tokenizer.convert_tokens_to_ids("<|im_start|>") == 1
    assert pair.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert pair.target.generation_config.eos_token_id == 2 == pair.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_int4_draft_agrees_with_the_target(pair, greedy):
    assert _agreement(pair.draft, next(pair.draft.parameters()).device, greedy) >= 0.85


def test_int8_draft_loads_larger_and_also_agrees(offline, pair, greedy):
    draft, tokenizer = M.load_draft("default", quantization="int8")
    assert M.check_vocab_compatible((pair.target, pair.tokenizer), (draft, tokenizer)) == 49152
    assert M.model_nbytes(draft) > pair.draft.specfed_info["parameter_bytes"]
    assert _agreement(draft, torch.device("cpu"), greedy[:2]) >= 0.75


def test_the_cached_conversion_is_reused(offline):
    first = M.default_model_dir()
    marker = first / G._MARKER
    stamp = marker.stat().st_mtime_ns
    conversions = G.CONVERSIONS
    started = time.perf_counter()
    again = M.default_model_dir()
    assert time.perf_counter() - started < 1.0
    assert again == first and G.CONVERSIONS == conversions and marker.stat().st_mtime_ns == stamp
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert (first / "generation_config.json").is_file()
    config = json.loads((first / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152


BF16_PROMPTS = 10
BF16_NEW_TOKENS = 24


def test_bfloat16_target_greedy_matches_its_own_generate(offline):
    """``target-dtype=bfloat16`` on CPU runs the default pair; its greedy output is compared with
    the bf16 target's own ``generate`` on the first 10 shipped prompts (issue: >= 9 of 10). The
    default ``verify-numerics=auto`` verifies a reduced-precision target stepwise, whose logits are
    bit-for-bit generate's (``stepwise_attention``): 10/10 when this was written (6/10 with the
    batched numerics, every divergence at a top-two gap of 0 or 1 bf16 step). Any divergence left
    must still be such a near-tie: at the first differing position the bf16 target's top two
    logits (as ``generate`` computes them) are within a few bf16 rounding steps."""
    from specfed_flwr.config import SpecFedConfig
    from specfed_flwr.inprocess import InProcessEngine
    from specfed_flwr.prompts import load_prompts
    from specfed_flwr.specs import load_draft_spec, load_target_spec

    target = load_target_spec("default", "cpu", "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in target.model.parameters())
    draft = load_draft_spec("default", "int4")
    prompts = [format_prompt(target.tokenizer, text) for text in load_prompts("default")[:BF16_PROMPTS]]
    expected = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = target.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=BF16_NEW_TOKENS,
                                        do_sample=False, eos_token_id=None)
            expected.append(out[0, len(ids):].tolist())
    cfg = SpecFedConfig(target_dtype="bfloat16", max_new_tokens=BF16_NEW_TOKENS, max_active_sequences=BF16_PROMPTS,
                        temperature=0.0, top_k=8, draft_length=4)
    engine = InProcessEngine(target.model, [draft.model], cfg, tokenizer=target.tokenizer, eos_token_ids=[],
                             vocab_size=target.vocab_size)
    assert engine.target.stepwise
    result = engine.generate(prompts)
    same = [got == want for got, want in zip(result.token_ids, expected)]
    explanations = []
    for ids, got, want, ok in zip(prompts, result.token_ids, expected, same):
        if ok:
            continue
        at = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        with torch.inference_mode():
            logits = target.model(torch.tensor([ids + want[:at]])).logits[0, -1].float()
        top2 = torch.topk(logits, 2)
        gap = float(top2.values[0] - top2.values[1])
        ulp = 2.0 ** (torch.floor(torch.log2(top2.values[0].abs())) - 7)  # bf16 spacing at that magnitude
        explanations.append({"position": at, "generate": want[at], "speculative": got[at], "gap": gap,
                             "bf16_steps": gap / float(ulp), "near_tie": {want[at], got[at]} <= set(top2.indices.tolist())
                             or gap <= 4 * float(ulp)})
    print(f"bf16: {sum(same)}/{len(same)} prompts identical; divergences: {explanations}")
    assert sum(same) >= 9, explanations
    assert all(e["near_tie"] and e["bf16_steps"] <= 4 for e in explanations), explanations
