"""Model spec strings used in configs: ``default``, ``tiny:SEED[:VOCAB]``, or an HF id / local path.

``tiny:`` models are random Llamas for tests and CI (no tokenizer); ``default`` is the
embedded SmolLM2 pair; anything else goes through transformers' ``from_pretrained``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any  # None for tiny models
    identity: str
    load_seconds: float
    vocab_size: int


def tiny_llama(seed: int = 0, vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2,
               num_heads: int = 4) -> torch.nn.Module:
    """A random fp32 Llama, deterministic from ``seed``: builds in milliseconds, for tests and CI."""
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


def _tiny(spec: str) -> LoadedModel:
    parts = spec.split(":")
    try:
        seed = int(parts[1]) if len(parts) > 1 and parts[1] else 0
        vocab = int(parts[2]) if len(parts) > 2 else 1024
    except ValueError:
        raise ValueError(f"model spec {spec!r}: expected tiny:SEED[:VOCAB] with integers") from None
    started = time.perf_counter()
    model = tiny_llama(seed=seed, vocab_size=vocab)
    return LoadedModel(model, None, spec, time.perf_counter() - started, vocab)


def load_target_spec(spec: str, device: str = "auto") -> LoadedModel:
    if spec.startswith("tiny"):
        loaded = _tiny(spec)
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        loaded.model.to(torch.device(auto if device == "auto" else device))
        return loaded
    from .models import load_target

    started = time.perf_counter()
    model, tokenizer = load_target(spec, device=device)
    return LoadedModel(model, tokenizer, f"{spec} (fp32)", time.perf_counter() - started, int(model.config.vocab_size))


def load_draft_spec(spec: str, quantization: str = "int8", device: str = "cpu") -> LoadedModel:
    if spec.startswith("tiny"):
        return _tiny(spec)
    from .models import load_draft

    started = time.perf_counter()
    model, tokenizer = load_draft(spec, quantization=quantization, device=device)
    return LoadedModel(model, tokenizer, f"{spec} ({quantization})", time.perf_counter() - started, int(model.config.vocab_size))
