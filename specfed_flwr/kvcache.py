"""KV-cache helpers shared by the draft proposer and the target verifier.

Besides cropping, this module batches sequences that each keep their own ``DynamicCache``
(different lengths, joining and leaving at any round) into one forward:

* ``PaddedBatch`` copies the per-sequence caches, **left-padded** to the longest one, into one
  preallocated buffer per layer (``[B, kv_heads, seq, head_dim]``, the transformers 5.x
  ``DynamicLayer`` layout); the new tokens of each row are **right-padded**;
* a 2-D attention mask (0 on padding) and explicit ``position_ids`` per row make every row
  see exactly its own tokens at its own positions: with a cache of length L the model puts the
  query i at key column L + i, and the causal rule ``kv <= L + i`` combined with the padding
  mask leaves each real query only its own cached and new tokens;
* new keys/values are written in place into the preallocated buffer (no ``torch.cat`` of the
  whole cache per layer); several steps can be run on the same batch (drafting);
* ``row_cache`` hands each row its own ``DynamicCache`` back, without the padding.

Padding only adds masked keys (exactly zero attention weight), so the results equal the
per-sequence forwards up to float summation order (~1e-6 in fp32).
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch


def crop_cache(cache, current_len: int, keep: int) -> int:
    """Drop cached positions past ``keep`` of a croppable cache; returns the new length.

    transformers 5.x only crops by a negative count (``crop(-n)`` removes the last n). Callers
    that may hold a cache which cannot be cropped use ``rollback_cache``.
    """
    if cache is not None and current_len > keep:
        cache.crop(-(current_len - keep))
        return keep
    return current_len


def cache_is_croppable(cache) -> bool:
    """Whether ``cache.crop`` rolls back exactly: every layer keeps all its past keys/values.

    A sliding-window layer that forgot the positions before its window, or a linear-attention /
    SSM state that summarises the past, cannot be rolled back (transformers raises, or would
    silently keep the rejected tokens in the state).
    """
    if cache is None:
        return True
    from transformers.cache_utils import DummyLayer, DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    return all(type(layer) is DynamicLayer or type(layer) is DummyLayer or type(layer) is _padded_layer_class()
               for layer in layers)


def rollback_cache(cache, current_len: int, keep: int):
    """Keep the first ``keep`` cached positions exactly; returns (cache, new length).

    A croppable cache is cropped. Otherwise the cache is dropped (``(None, 0)``): the caller's next
    forward re-prefills the kept prefix, which recomputes exactly what the cache held (the cost is
    one forward over the prefix, paid only by models whose cache keeps no full past).
    """
    if cache is None or current_len <= keep:
        return cache, current_len
    if cache_is_croppable(cache):
        cache.crop(-(current_len - keep))
        return cache, keep
    return None, 0


def new_cache(model: torch.nn.Module):
    """The empty KV cache this project gives ``model``'s first forward (``None``: let the model build its own).

    For attention-only models (full, sliding-window or chunked layers) this is a config-less
    ``DynamicCache``: every layer a plain ``DynamicLayer`` that keeps ALL past keys/values, so it
    can be cropped exactly after a rejection. The sliding window is still applied: transformers
    builds the sliding/chunked attention mask from the config and the absolute positions, not from
    what the cache kept, so the model computes exactly what it computes with its own windowed
    cache (``generate``), keeping at most the window more keys per layer in memory.
    Models with recurrent / linear-attention state get ``None`` (their own cache; rolled back by
    re-prefill, see ``rollback_cache``).
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    try:
        probe = DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - an exotic config: the model's own default cache
        return None
    if probe.layers and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in probe.layers):
        return DynamicCache()
    return None


# --------------------------------------------------------------------------- model calls
def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns and goes away
    in 5.40); earlier releases, and custom models, only know ``past_key_values``.
    """
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under either name (see ``cache_argument``)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def forward_with_cache(model: torch.nn.Module, cache, **inputs):
    """``model(**inputs)`` extending ``cache``; returns (output, the cache to keep).

    A first forward (``cache`` None) gets ``new_cache(model)``, a cache that can be rolled back."""
    if cache is None:
        cache = new_cache(model)
    output = model(**inputs, use_cache=True, **{cache_argument(model): cache})
    return output, returned_cache(output)


class UnsupportedModelError(ValueError):
    """A model this project cannot draft or verify with; raised when it is loaded, never mid-run."""


def check_supported(model: torch.nn.Module, role: str = "model") -> None:
    """Refuse, at load, a model whose forward cannot run speculative rounds.

    Needed: a decoder-only causal LM whose forward takes ``input_ids`` and a KV cache. Any
    cache is accepted -- one that cannot be cropped is rolled back by re-prefill (see
    ``rollback_cache``) -- so this refuses only what would fail in the first round anyway.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{role} {name} is an encoder-decoder model; speculative decoding here needs a "
                                    "decoder-only causal LM (AutoModelForCausalLM)")
    params = _forward_parameters(type(model))
    if params and "input_ids" not in params:
        raise UnsupportedModelError(f"{role} {name}: its forward takes no input_ids")
    if params and not {"cache", "past_key_values"} & params and "kwargs" not in params:
        raise UnsupportedModelError(f"{role} {name}: its forward takes no KV cache (cache / past_key_values), so "
                                    "every draft step would recompute the whole sequence")


# --------------------------------------------------------------------------- batching
def _cache_classes():
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return DynamicCache, DynamicLayer


def cache_is_batchable(cache) -> bool:
    """A cache ``PaddedBatch`` can take: none yet, or a ``DynamicCache`` of plain full-attention layers."""
    if cache is None:
        return True
    DynamicCache, DynamicLayer = _cache_classes()
    if not isinstance(cache, DynamicCache):
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def supports_padded_batching(model: torch.nn.Module) -> bool:
    """Whether ``model`` can run ``PaddedBatch`` forwards.

    Needs ``attention_mask`` and ``position_ids`` in its forward and a cache made only of
    full-attention ``DynamicLayer`` s (sliding-window, linear-attention or hybrid caches crop or
    summarise the past in ways that padding would change): otherwise callers loop per sequence.
    """
    params = _forward_parameters(type(model))
    if not {"attention_mask", "position_ids"} <= params or not {"cache", "past_key_values"} & params:
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    DynamicCache, DynamicLayer = _cache_classes()
    try:
        probe = DynamicCache(config=config)
    except Exception:  # noqa: BLE001 - an exotic config: stay on the per-sequence path
        return False
    return all(type(layer) is DynamicLayer for layer in probe.layers)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in _forward_parameters(type(model))


@functools.lru_cache(maxsize=None)
def _padded_layer_class() -> type:
    """``PaddedLayer`` is built on first use so that importing this module does not import transformers."""
    _, DynamicLayer = _cache_classes()

    class PaddedLayer(DynamicLayer):
        """One layer of a left-padded batch: preallocated buffer, new keys/values written in place."""

        def __init__(self, segments=(), offset: int = 0, capacity: int = 0):
            super().__init__()
            self._segments = list(segments)  # (row, keys [1, H, n, D], values [1, H, n, Dv])
            self._filled = int(offset)
            self._capacity = int(capacity)
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            b = key_states.shape[0]
            cap = max(self._capacity, self._filled + key_states.shape[-2])
            self._k = key_states.new_zeros((b, key_states.shape[1], cap, key_states.shape[-1]))
            self._v = value_states.new_zeros((b, value_states.shape[1], cap, value_states.shape[-1]))
            end = self._filled
            for row, keys, values in self._segments:
                n = keys.shape[-2]
                if n:
                    self._k[row, :, end - n : end] = keys[0]
                    self._v[row, :, end - n : end] = values[0]
            self._segments = []
            self.keys = self._k[:, :, :end]
            self.values = self._v[:, :, :end]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start, n = self._filled, key_states.shape[-2]
            end = start + n
            if end > self._k.shape[-2]:  # grow geometrically (rare: callers reserve enough)
                extra = max(end, 2 * self._k.shape[-2]) - self._k.shape[-2]
                self._k = torch.cat([self._k, self._k.new_zeros(self._k.shape[:2] + (extra, self._k.shape[-1]))], dim=2)
                self._v = torch.cat([self._v, self._v.new_zeros(self._v.shape[:2] + (extra, self._v.shape[-1]))], dim=2)
            self._k[:, :, start:end] = key_states
            self._v[:, :, start:end] = value_states
            self._filled = end
            self.keys = self._k[:, :, :end]
            self.values = self._v[:, :, :end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._filled

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self._filled + query_length, 0

        def crop(self, tokens_to_remove: int) -> None:  # pragma: no cover - never cropped while batched
            raise NotImplementedError("a padded batch is not cropped; crop the per-sequence caches instead")

    return PaddedLayer


def _new_padded_layer(segments=(), offset: int = 0, capacity: int = 0):
    return _padded_layer_class()(segments, offset=offset, capacity=capacity)


class PaddedBatch:
    """Several sequences' caches as one left-padded batch, for one or more batched forwards.

    ``caches[b]`` is row b's ``DynamicCache`` (or ``None``) holding ``lengths[b]`` positions.
    ``reserve`` is how many new columns the forwards will add (a hint: the buffer grows if needed).
    """

    def __init__(self, caches: Sequence, lengths: Sequence[int], *, device: torch.device, reserve: int = 0):
        DynamicCache, _ = _cache_classes()
        self.batch = len(caches)
        self.device = device
        self.lengths = [int(n) for n in lengths]
        offset = max(self.lengths, default=0)
        self.offset = offset
        n_layers = max((len(c.layers) for c in caches if c is not None), default=0)
        layers = []
        for layer_idx in range(n_layers):
            segments = []
            for row, (cache, n) in enumerate(zip(caches, self.lengths)):
                if cache is None or n == 0:
                    continue
                layer = cache.layers[layer_idx]
                if layer.keys is None or layer.keys.shape[-2] != n:
                    raise ValueError(f"row {row}: cache holds {None if layer.keys is None else layer.keys.shape[-2]} positions, expected {n}")
                segments.append((row, layer.keys, layer.values))
            layers.append(_new_padded_layer(segments, offset=offset, capacity=offset + int(reserve)))
        self.cache = DynamicCache()
        self.cache.layers = layers
        self.cache.layer_class_to_replicate = functools.partial(_new_padded_layer, (), offset, offset + int(reserve))
        # which key columns are real, per row; grows with every step
        mask = torch.zeros((self.batch, offset), dtype=torch.bool)
        for row, n in enumerate(self.lengths):
            if n:
                mask[row, offset - n :] = True
        self.mask = mask
        self.next_position = list(self.lengths)
        self.steps = 0

    def step(
        self,
        model: torch.nn.Module,
        tokens: Sequence[Sequence[int]],
        keep: Sequence[Sequence[int]],
        *,
        pad_token_id: int = 0,
    ) -> torch.Tensor:
        """Feed ``tokens[b]`` (may be empty: the row idles) to row b; logits at row b's positions ``keep[b]``.

        ``keep[b]`` indexes ``tokens[b]``; the result is ``[B, max len(keep), V]`` (rows with
        fewer kept positions are padded by repeating their last one; empty rows are zeros).
        """
        if len(tokens) != self.batch or len(keep) != self.batch:
            raise ValueError("one token list and one keep list per row")
        width = max((len(t) for t in tokens), default=0)
        if width == 0:
            raise ValueError("nothing to feed")
        input_ids = torch.full((self.batch, width), int(pad_token_id), dtype=torch.long)
        position_ids = torch.zeros((self.batch, width), dtype=torch.long)
        new_mask = torch.zeros((self.batch, width), dtype=torch.bool)
        for row, toks in enumerate(tokens):
            n = len(toks)
            if n == 0:
                continue
            input_ids[row, :n] = torch.tensor([int(t) for t in toks], dtype=torch.long)
            start = self.next_position[row]
            position_ids[row, :n] = torch.arange(start, start + n)
            new_mask[row, :n] = True
            self.next_position[row] = start + n
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        n_keep = max((len(k) for k in keep), default=0)
        gather = torch.zeros((self.batch, max(n_keep, 1)), dtype=torch.long)
        for row, idx in enumerate(keep):
            if idx:
                row_idx = [int(i) for i in idx]
                if min(row_idx) < 0 or max(row_idx) >= len(tokens[row]):
                    raise ValueError(f"row {row}: kept positions {row_idx} outside its {len(tokens[row])} new tokens")
                gather[row] = torch.tensor(row_idx + [row_idx[-1]] * (gather.shape[1] - len(row_idx)))
        kwargs = {}
        union = torch.unique(gather)
        local = gather
        if accepts_logits_to_keep(model) and union.numel() < width:
            kwargs["logits_to_keep"] = union.to(self.device)
            local = torch.searchsorted(union, gather)
        out, _ = forward_with_cache(
            model,
            self.cache,
            input_ids=input_ids.to(self.device),
            attention_mask=self.mask.to(device=self.device, dtype=torch.long),
            position_ids=position_ids.to(self.device),
            **kwargs,
        )
        self.steps += 1
        if n_keep == 0:
            return out.logits[:, :0]
        if bool((local == torch.arange(out.logits.shape[1]).unsqueeze(0)).all()) if local.shape[1] == out.logits.shape[1] else False:
            # every row keeps the same positions, in order: the forward's logits already are the result
            # (no [B, n_keep, V] gather copy; this is the common verify case)
            logits = out.logits
        else:
            # advanced indexing, not take_along_dim: the latter broadcasts the [B, n_keep, 1] index to
            # an int64 [B, n_keep, V] tensor first (twice the size of the logits it gathers)
            rows = torch.arange(self.batch, device=out.logits.device).unsqueeze(1)  # [B, 1]
            logits = out.logits[rows, local.to(out.logits.device)]  # [B, n_keep, V]
        empty = [row for row, k in enumerate(keep) if not k]
        if empty:
            logits = logits.clone() if logits is out.logits else logits
            logits[empty] = 0.0
        return logits

    def row_length(self, row: int) -> int:
        return int(self.mask[row].sum())

    def row_cache(self, row: int):
        """Row ``row``'s own ``DynamicCache`` (real positions only, padding dropped)."""
        DynamicCache, DynamicLayer = _cache_classes()
        cols = torch.nonzero(self.mask[row], as_tuple=False).flatten()
        n = int(cols.numel())
        contiguous = n == 0 or int(cols[-1]) - int(cols[0]) + 1 == n
        first = int(cols[0]) if n else 0
        index = None if contiguous else cols.to(self.device)
        cache = DynamicCache()
        layers = []
        for padded in self.cache.layers:
            keys, values = padded.keys[row : row + 1], padded.values[row : row + 1]
            if contiguous:
                keys, values = keys[:, :, first : first + n], values[:, :, first : first + n]
            else:
                keys, values = keys.index_select(2, index), values.index_select(2, index)
            layer = DynamicLayer()
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            layers.append(layer)
        cache.layers = layers
        return cache

