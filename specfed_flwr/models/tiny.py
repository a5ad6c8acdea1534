"""Tiny random models for tests and CI: built in milliseconds, deterministic from a seed (the
global RNG left untouched), no tokenizer; ``tiny_model`` covers the decoder architectures of the
test matrix, optionally with an embedding matrix padded past the real vocabulary."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM


def tiny_llama(seed: int = 0, vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4) -> "LlamaForCausalLM":
    """A random fp32 Llama, deterministic from ``seed`` (the global RNG is left untouched): builds in
    milliseconds, for tests and CI. No tokenizer; no eos/bos; pad id 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model.to(torch.float32).eval()


# The decoder architectures the test matrix covers, with tiny shapes. ``window`` is the sliding
# window of the architectures that have one (every layer for Mistral / Phi-3, alternating for
# Gemma 2/3, the upper layers for Qwen2), so tests can make prompts longer than it.
TINY_ARCHITECTURES = ("llama", "gpt2", "gpt_neox", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3")


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 1024, *, hidden_size: int = 32,
               num_layers: int = 2, num_heads: int = 2, window: int = 6, padded_vocab_size: int | None = None):
    """A random fp32 causal LM of architecture ``arch`` (see ``TINY_ARCHITECTURES``), deterministic
    from ``seed`` (global RNG untouched). ``padded_vocab_size`` gives the embedding matrix more rows
    than the ``vocab_size`` real tokens use, as padded checkpoints do (e.g. Qwen2.5 0.5B vs 7B): the
    padding rows are scaled copies of real rows, so they win the argmax: a pipeline that forgets to
    drop them fails."""
    import transformers as tf

    rows = int(padded_vocab_size or vocab_size)
    inter = 2 * hidden_size
    head_dim = hidden_size // num_heads
    common = dict(vocab_size=rows, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=None, eos_token_id=None)
    llama_like = dict(hidden_size=hidden_size, intermediate_size=inter, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_heads, **common)
    if arch == "llama":
        config, cls = tf.LlamaConfig(**llama_like), tf.LlamaForCausalLM
    elif arch == "gpt2":
        config = tf.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=512,
                               vocab_size=rows, bos_token_id=None, eos_token_id=None, pad_token_id=0)
        cls = tf.GPT2LMHeadModel
    elif arch == "gpt_neox":
        config, cls = tf.GPTNeoXConfig(**llama_like), tf.GPTNeoXForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=1, **llama_like)
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        config, cls = tf.Qwen3Config(head_dim=head_dim, **llama_like), tf.Qwen3ForCausalLM
    elif arch == "gemma2":
        config = tf.Gemma2Config(head_dim=head_dim, sliding_window=window, query_pre_attn_scalar=head_dim,
                                 layer_types=["sliding_attention", "full_attention"] * (num_layers // 2), **llama_like)
        cls = tf.Gemma2ForCausalLM
    elif arch == "gemma3":
        config = tf.Gemma3TextConfig(head_dim=head_dim, sliding_window=window, query_pre_attn_scalar=head_dim,
                                     layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
                                     **llama_like)
        cls = tf.Gemma3ForCausalLM
    elif arch == "mistral":
        config, cls = tf.MistralConfig(sliding_window=window, head_dim=head_dim, **llama_like), tf.MistralForCausalLM
    elif arch == "phi3":
        config, cls = tf.Phi3Config(sliding_window=window, **llama_like), tf.Phi3ForCausalLM
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}: expected one of {', '.join(TINY_ARCHITECTURES)}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    if rows > vocab_size:
        with torch.no_grad():  # padding row j = 3 x real row j: beats every real logit whose max is > 0
            head = model.get_output_embeddings()
            extra = torch.arange(rows - vocab_size) % vocab_size
            head.weight[vocab_size:] = 3.0 * head.weight[extra]
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model.to(torch.float32).eval()
