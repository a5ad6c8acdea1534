"""Weight-only quantised layers of the draft: ``QuantLinear`` (int8 per-row or int4 per-group
weights, fast CPU kernels where torch has them), ``QuantEmbedding`` (int8 rows, sharing the int8
lm_head storage when the head is tied), ``quantize_linear_weights`` (a model's linears swapped in
place) and ``model_nbytes``. Why these kernels and not others: docs/MODELS_NOTES.md."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

INT4_GROUP_SIZE = 32


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
    #: (1536x576 layer, 1 thread, medians: 540 rows 24 ms vs 10 ms + ~1.2 ms to dequantise; 96
    #: rows 4.2 vs 1.9 + 1.2 ms; about equal at 48-64 rows)
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
        # codes * scale + offset as a multiply that reads the uint8 codes directly (type promotion
        # in the loop) and an in-place add: ~2.5x faster than casting the codes to a float copy and
        # ``addcmul`` (0.29 vs 0.74 ms for a 1536x576 layer, 1 thread), and this runs for every
        # layer of every prefill-sized forward (about a fifth of an int4 prefill before)
        weight = torch.mul(codes.view(self.out_features, -1, self.group_size), scale)  # [out, groups, group]
        return weight.add_(offset).reshape(self.out_features, self.in_features).to(dtype)

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
