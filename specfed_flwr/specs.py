"""Model spec strings used in configs: ``default``, ``tiny:SEED[:VOCAB]``, or an HF id / local path.

``tiny:`` models are random Llamas for tests and CI (no tokenizer); ``default`` is the
embedded SmolLM2 pair; anything else goes through transformers' ``from_pretrained``.

``LoadedModel`` is one model loaded from its spec; ``ModelPair`` (``load_pair``) is a target and
a draft loaded from their specs and checked to share one vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .models import resolve_device, tiny_llama, token_vocab_size

__all__ = ["LoadedModel", "ModelPair", "load_draft_spec", "load_pair", "load_target_spec", "tiny_llama"]


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


@dataclass
class ModelPair:
    """A target and a draft sharing one vocabulary, with what a report says about them."""

    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: Any  # the target's (None for tiny models)
    vocab_size: int  # the shared token ids
    target_spec: str
    draft_spec: str
    target_identity: str
    draft_identity: str
    eos: list[int]  # the ids the target's own ``generate`` stops on ([] for tiny models)
    load_seconds: dict[str, float] = field(default_factory=dict)  # "target", "draft"


def load_pair(target: str = "default", draft: str = "default", draft_quantization: str = "int4",
              device: str = "auto", draft_device: str = "cpu") -> ModelPair:
    """Target (fp32 on ``device``) + quantised draft (on ``draft_device``, the edge device: CPU),
    refused when their token ids would not mean the same (``check_vocab_compatible``)."""
    from .models import check_vocab_compatible
    from .tokens import default_eos_ids

    t = load_target_spec(target, device)
    d = load_draft_spec(draft, draft_quantization, draft_device)
    vocab = check_vocab_compatible((t.model, t.tokenizer), (d.model, d.tokenizer),
                                   target_name=f"target {target!r}", draft_name=f"draft {draft!r}")
    return ModelPair(
        target=t.model.eval(), draft=d.model.eval(), tokenizer=t.tokenizer, vocab_size=int(vocab),
        target_spec=target, draft_spec=draft, target_identity=t.identity, draft_identity=d.identity,
        eos=default_eos_ids(t.model, t.tokenizer), load_seconds={"target": t.load_seconds, "draft": d.load_seconds},
    )
