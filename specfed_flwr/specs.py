"""Model spec strings used in configs: ``default``, ``tiny:SEED[:VOCAB]``, or an HF id / local path.

``tiny:`` models are random Llamas for tests and CI (no tokenizer); ``default`` is the
embedded SmolLM2 pair; anything else goes through transformers' ``from_pretrained``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .models import resolve_device, tiny_llama, token_vocab_size

__all__ = ["LoadedModel", "load_draft_spec", "load_target_spec", "tiny_llama"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any  # None for tiny models
    identity: str
    load_seconds: float
    vocab_size: int  # token ids its distributions cover (padding rows of the head excluded)


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


def load_target_spec(spec: str, device: str = "auto", dtype: str = "float32", device_map: str = "") -> LoadedModel:
    """The target of a run: ``target``, ``device``, ``target-dtype`` and ``target-device-map``."""
    from .models import load_target, target_dtype

    torch_dtype = target_dtype(dtype)
    if spec.startswith("tiny"):
        loaded = _tiny(spec)
        loaded.model.to(device=resolve_device(device), dtype=torch_dtype)
        return loaded
    started = time.perf_counter()
    model, tokenizer = load_target(spec, device=device, dtype=torch_dtype, device_map=device_map or None)
    label = str(torch_dtype).replace("torch.", "") + (f", device_map={device_map}" if device_map else "")
    return LoadedModel(model, tokenizer, f"{spec} ({label})", time.perf_counter() - started,
                       token_vocab_size(model, tokenizer))


def load_draft_spec(spec: str, quantization: str = "int4", device: str = "cpu") -> LoadedModel:
    if spec.startswith("tiny"):
        return _tiny(spec)
    from .models import load_draft

    started = time.perf_counter()
    model, tokenizer = load_draft(spec, quantization=quantization, device=device)
    return LoadedModel(model, tokenizer, f"{spec} ({quantization})", time.perf_counter() - started,
                       token_vocab_size(model, tokenizer))
