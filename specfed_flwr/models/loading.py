"""Loading a target or a draft: any HF causal LM, or the embedded default (``gguf``). The target in
fp32 (or ``target-dtype``) on a device or an accelerate device map; the draft in fp32 with
weight-only quantised linears (``quantized``). Each model carries ``specfed_info`` (name, source,
dtype, device, quantization, parameter bytes, load seconds)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .gguf import DEFAULT_LABEL, default_model_dir
from .quantized import INT4_GROUP_SIZE, model_nbytes, quantize_linear_weights

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_NAME = "default"
QUANTIZATIONS = ("int8", "int4", "none")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` (and other torch devices)."""
    if isinstance(spec, torch.device):
        return spec
    text = str(spec).strip().lower()
    if text in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def _is_default(name_or_path: str) -> bool:
    return str(name_or_path).strip().lower() in (DEFAULT_NAME, "smollm2", "smollm2-135m-instruct")


def _resolve_source(name_or_path: str) -> tuple[str, str]:
    """(what from_pretrained gets, a label for info)."""
    if _is_default(name_or_path):
        return str(default_model_dir()), DEFAULT_LABEL
    return str(name_or_path), str(name_or_path)


def _load_float(name_or_path: str, dtype: torch.dtype, device_map: str | None = None
                ) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase", str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, label = _resolve_source(name_or_path)
    extra = {"device_map": device_map} if device_map else {}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    from ..kvcache import check_supported

    check_supported(model, str(name_or_path))  # refused here, at load, rather than in the first round
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.eval(), tokenizer, label


def _annotate(model: nn.Module, **info: Any) -> None:
    existing = dict(getattr(model, "specfed_info", {}) or {})
    existing.update(info)
    model.specfed_info = existing


TARGET_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def target_dtype(name: str | torch.dtype) -> torch.dtype:
    """``target-dtype`` (float32 | bfloat16 | float16) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return TARGET_DTYPES[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown target dtype {name!r}: expected one of {', '.join(TARGET_DTYPES)}") from None


def load_target(name_or_path: str = DEFAULT_NAME, device: str = "auto", dtype: torch.dtype | str = torch.float32,
                device_map: str | None = None):
    """The target model in ``dtype`` (default fp32) with its tokenizer: on ``resolve_device(device)``,
    or placed by accelerate when ``device_map`` is given (e.g. ``auto``: split over several GPUs)."""
    started = time.perf_counter()
    dtype = target_dtype(dtype)
    model, tokenizer, label = _load_float(name_or_path, dtype, device_map or None)
    if device_map:
        target_device = next(model.parameters()).device  # where the inputs go (the embedding's device)
    else:
        target_device = resolve_device(device)
        model.to(target_device)
    _annotate(model, name=str(name_or_path), source=label, dtype=str(dtype).replace("torch.", ""),
              device=str(target_device), device_map=str(device_map or ""), quantization="none", parameter_bytes=model_nbytes(model),
              load_seconds=round(time.perf_counter() - started, 3))
    return model, tokenizer


def load_draft(name_or_path: str = DEFAULT_NAME, quantization: str = "int4", device: str = "cpu"):
    """The draft: the checkpoint in fp32 with weight-only quantised linears.

    ``int8``: int8 body and head (embedding shares the head's int8 table); ``int4``: int4 body
    (groups of 32) + int8 head; ``none``: plain fp32.
    """
    quantization = str(quantization).strip().lower()
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown draft quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    started = time.perf_counter()
    draft_device = resolve_device(device)
    model, tokenizer, label = _load_float(name_or_path, torch.float32)
    float_bytes = model_nbytes(model)
    if quantization == "int8":
        quantize_linear_weights(model, bits=8, head_bits=8)
    elif quantization == "int4":
        quantize_linear_weights(model, bits=4, head_bits=8)
    model.to(draft_device)
    weights = {"int8": "int8 per-row linears + int8 embedding (shares the lm_head table when tied)",
               "int4": f"int4 (groups of {INT4_GROUP_SIZE}) body linears + int8 lm_head + int8 embedding",
               "none": "float32"}[quantization]
    _annotate(model, name=str(name_or_path), source=label, dtype="float32", device=str(draft_device),
              quantization=quantization, weights=weights, parameter_bytes=model_nbytes(model), float_parameter_bytes=float_bytes,
              load_seconds=round(time.perf_counter() - started, 3))
    return model, tokenizer
