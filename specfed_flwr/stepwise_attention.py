"""Verification forwards whose numerics equal one-token-at-a-time decoding (``verify-numerics``).

Why: speculative verification scores gamma + 1 positions in one forward, while the target's own
``generate`` scores one position per forward. The linear layers give every row the same bits
either way (each row's dot products are summed in the same order whatever the number of rows;
measured on CPU for the default target in bfloat16, batch 1 and left-padded batches alike), but
attention does not: a query row that shares its forward with later rows runs through another
kernel (a masked multi-row attention instead of a one-row one) over a longer key range, so its
softmax-weighted sum is rounded differently. In float32 that is ~1e-6 and never flips an argmax in
practice; in bfloat16 the top two logits are often equal to the last bit, and the greedy output
drifts from ``generate`` at such near-ties (6 of 10 shipped prompts identical).

``stepwise(model)`` swaps the model's attention function, for the duration of a verification
forward, for one that gives each query row of a forward over a cached prefix its own one-row call
of the model's own attention function, over exactly the key columns that row may see (the causal,
sliding-window and padding masks decide which), with no mask: the call ``generate`` makes for that
position. A forward with no cached prefix (a whole-prompt prefill) goes to the model's own function
unchanged. With this the verifier's logits are bit-for-bit the ones ``generate`` computes
(tested against ``generate``), at the cost of one small attention call per row and layer.

Only the ``sdpa`` and ``eager`` attention implementations are wrapped: for them "attend to exactly
these columns" with no mask is the same function as the masked one. Other implementations (flash
attention kernels, paged attention) are left alone (``supports_stepwise`` says so).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

WRAPPED_IMPLEMENTATIONS = ("sdpa", "eager")
_PREFIX = "specfed_stepwise_"


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation ``model`` runs (``config._attn_implementation``; eager when unset)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


def supports_stepwise(model: torch.nn.Module) -> bool:
    """Whether ``stepwise`` can wrap ``model``'s attention (and this transformers has the
    attention and mask interfaces it registers with)."""
    if attention_implementation(model) not in WRAPPED_IMPLEMENTATIONS:
        return False
    try:
        from transformers import AttentionInterface  # noqa: F401
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: F401
    except ImportError:  # pragma: no cover - older transformers
        return False
    return True


def _allowed_columns(attention_mask: torch.Tensor | None, b: int, q: int, kv: int, device) -> torch.Tensor:
    """Bool [B, 1, q, kv]: which key columns each query row attends to."""
    if attention_mask is None:  # causal over a cached prefix: row r sees columns <= kv - q + r
        return torch.ones((b, 1, q, kv), dtype=torch.bool, device=device).tril(kv - q)
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask == 0  # additive float mask: 0 where attended, the dtype's minimum elsewhere


@functools.lru_cache(maxsize=None)
def _register(base_name: str) -> str:
    """Register the row-by-row wrapper of ``base_name`` (and its mask builder); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base_name == "eager":
        base = None  # each model's own eager function: taken from the module at call time
    else:
        base = ALL_ATTENTION_FUNCTIONS[base_name]

    def row_by_row(module, query, key, value, attention_mask, *args, **kwargs):
        # query [B, H, q, D]; key, value [B, Hkv, kv, D]; attention_mask [B, 1|H, q, kv] or None
        own = base if base is not None else _eager_of(module)
        b, _, q, _ = query.shape
        kv = key.shape[2]
        if kv == q:  # a whole-prefix prefill: what generate itself runs
            return own(module, query, key, value, attention_mask, *args, **kwargs)
        # One row too goes row by row: generate's decode step sees only the columns it may attend
        # to (a sliding-window cache keeps no others) and no mask, while this cache keeps them all.
        allowed = _allowed_columns(attention_mask, b, q, kv, query.device)  # [B, 1|H, q, kv]
        kwargs.pop("is_causal", None)
        out = None  # [B, q, H, D], the layout attention functions return
        for row in range(b):
            for r in range(q):
                columns = allowed[row, 0, r]  # [kv]
                if not bool(columns[kv - q + r]):
                    continue  # a padding query (it does not see itself): nothing reads its output
                index = columns.nonzero().flatten()  # [n]: the columns this row sees
                single, _ = own(module, query[row : row + 1, :, r : r + 1], key[row : row + 1, :, index],
                                value[row : row + 1, :, index], None, *args, **kwargs)  # [1, 1, H, D]
                if out is None:
                    out = single.new_zeros((b, q) + tuple(single.shape[2:]))
                out[row, r] = single[0, 0]
        if out is None:  # every row was padding
            return own(module, query, key, value, attention_mask, *args, **kwargs)
        return out, None

    name = _PREFIX + base_name
    AttentionInterface.register(name, row_by_row)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    return name


def _eager_of(module: torch.nn.Module):
    """The eager attention function of ``module``'s own modeling file (models define their own)."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def _configs(model: torch.nn.Module) -> list:
    """Every distinct config object the model's modules read their attention implementation from."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextlib.contextmanager
def stepwise(model: torch.nn.Module) -> Iterator[None]:
    """Run the forwards inside with row-by-row attention (see the module docstring); restores after."""
    base = attention_implementation(model)
    if base not in WRAPPED_IMPLEMENTATIONS:
        raise ValueError(f"stepwise verification wraps {' or '.join(WRAPPED_IMPLEMENTATIONS)} attention; "
                         f"{type(model).__name__} runs {base!r}")
    name = _register(base)
    configs = _configs(model)
    previous = [config._attn_implementation for config in configs]
    try:
        for config in configs:
            config._attn_implementation = name
        yield
    finally:
        for config, value in zip(configs, previous):
            config._attn_implementation = value
