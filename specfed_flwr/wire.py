"""The compact per-round reply of one draft client, its strict decoder and byte accounting.

One reply covers B sequences x G positions x K slots (see docs/DESIGN.md, "Wire format"):

- ``seq_ids``   int64   ``[B]``      unique sequence ids
- ``lengths``   int32   ``[B]``      drafted positions per sequence, ``0..G``
- ``token_ids`` uint16 (vocab_size <= 65536) or int32 ``[B, G, K]``; slot 0 is the drafted
  token, slots 1..K-1 the other highest-probability tokens
- ``probs``     float16 ``[B, G, K]`` the draft probabilities of those ids (not renormalised)

Entries at positions ``g >= lengths[b]`` are padding: the decoder ignores them (no value check)
and returns them as zeros.

A position therefore costs ``K * (2 + 2)`` bytes at vocab_size <= 65536 (32 bytes at K=8),
against ``4 * V`` bytes for one dense float32 distribution.

Decoding is strict: exact dtypes (nothing is cast), consistent shapes, limits from the server
(``max_gamma``, ``max_k``, ``expected_k``, ``max_bytes``) and value checks on the valid
positions. Whatever a device sends, :func:`decode_reply` either returns a :class:`DraftReply`
or raises :class:`WireFormatError`, which names the client, the field and the problem.

Probability-sum tolerance
-------------------------
The K probabilities of one position are a subset of a distribution, so their exact sum is at
most 1, but they travel as float16. Rounding a value ``p`` to the nearest float16 gives at most
``p * 2**-11`` (normal range, 11-bit significand) or ``2**-25`` (subnormal range, half of the
smallest subnormal ``2**-24``) too much, so a correctly rounded top-K sums to at most
``1 + 2**-11 + K * 2**-25``. The decoder allows twice that, plus ``2**-8`` for error that comes
before the cast (a float32 softmax that does not sum to exactly 1, a bfloat16 draft whose values
carry ``2**-9`` relative rounding, a producer that raises an underflowed drafted-token
probability to the smallest subnormal)::

    sum(probs[b, g, :]) <= 1 + 2**-10 + K * 2**-24 + 2**-8        (see ``max_kept_mass``)

The sum is taken in float64, so the check itself adds no error. At K=8 the limit is ~1.00488,
at K=1024 ~1.00494: it does not grow with K the way a per-value ``K * 2**-10`` would. Consumers
must still clamp ``1 - sum`` at 0.

Variable-K encodings (``ENCODINGS``)
------------------------------------
``fixed-k`` is the layout above. ``budgeted`` and ``budgeted-compact`` let every drafted position
carry its own number of slots (``counts``), flat in position order (sequence-major, then position,
then slot; slot 0 of every position is the drafted token)::

    budgeted          seq_ids int64 [B], lengths int32 [B], counts uint8 [N],
                      token_ids id_dtype [T], probs float16 [T]
    budgeted-compact  seq_base int64 [1], seq_offsets uint16 (uint32 when an offset exceeds 65535) [B],
                      lengths uint8 [B], counts uint8 [N], token_ids id_dtype [T], prob_codes uint8 [T]

with ``N = sum(lengths)`` drafted positions and ``T = sum(counts)`` slots; ``seq_ids = seq_base +
seq_offsets``. A position costs ``1 + counts * (2 + 2)`` (budgeted) or ``1 + counts * (2 + 1)``
(compact) bytes at V <= 65536, and a compact reply's header is 8 B + 3 B per sequence instead of
12 B per sequence.

``prob_codes`` quantise a probability in the log domain, 16 steps per halving::

    code 0 is refused; code c in 1..255 means  float16(2 ** (-(c - 1) / 16))    (``code_table``)

so 1.0 down to 2**-15.875 (~1.7e-5) with a relative step of 2**(1/16) (~4.4 %). The decoder maps a
code through that fixed float16 table, so device and server hold bit-identical values: the
device samples its draft token from exactly these values renormalised (``draft_payload.sparsify``),
which is why the ``exact`` rule stays lossless after quantisation. Rounding to the nearest code
overstates a value by at most a factor ``2**(1/32)``; the table's float16 rounding adds ``2**-11``
relative, so the compact kept-mass limit is ``2**(1/32) * (1 + 2**-10) + 2**-8`` (~1.0262; see
``max_kept_mass``). Every sent slot must have a positive probability (a slot that would round to
zero is simply not sent), counts are 1..min(max_k, 255), and all decoders return the same
:class:`DraftReply`: ``[B, G, K]`` arrays with ``K = max(counts)``, the unused slots zeroed, and
``counts [B, G]``.

A ``budget`` (config ``uplink-budget``, bytes per drafted position, all-in) becomes a slot
allowance per position (:func:`slot_allowance`: the budget minus the count byte and the headers
amortised over ``gamma`` positions, divided by the bytes of one slot). A reply may carry at most
``max(1, allowance) * N`` slots (:func:`check_budget`).

Modules
-------
This module holds the entry points (:func:`decode_reply`, :func:`make_reply`, :func:`reply_to_arrays`)
and byte accounting; ``wire_base`` the reply type, the error, limits and the checks both layouts
share; ``wire_fixed`` and ``wire_variable`` the layouts. Import every public name from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

# Every name of the format is importable from here; the parts live in (none imports this module):
#   wire_base      DraftReply, WireFormatError, dtypes, limits, kept-mass tolerance, the shared checks
#   wire_fixed     the fixed-k layout: its arrays and its decoder
#   wire_variable  budgeted / budgeted-compact: probability codes, the budget in slots, arrays, decoder
from .wire_base import (  # re-exported
    CODE_STEPS_PER_HALVING,
    ENCODINGS,
    FIELDS,
    FP16_ABS_ROUNDING,
    FP16_REL_ROUNDING,
    ID_DTYPE_LARGE,
    ID_DTYPE_SMALL,
    LAYOUTS,
    LENGTH_DTYPE,
    MAX_BATCH,
    MAX_SLOTS,
    PROB_DTYPE,
    SEQ_ID_DTYPE,
    UPSTREAM_SLACK,
    DraftReply,
    WireFormatError,
    _check_length_range,
    _integers,
    _non_negative_int,
    _numeric,
    _positive_int,
    _raise_at,
    _valid_mask,
    id_dtype,
    max_kept_mass,
)
from .wire_fixed import _check_shapes, decode_fixed, fixed_arrays
from .wire_variable import (  # re-exported
    CODE_DTYPE,
    COMPACT_LENGTH_DTYPE,
    COUNT_DTYPE,
    MAX_COUNT,
    check_budget,
    code_table,
    decode_variable,
    dequantize_probs,
    header_bytes,
    layout_of,
    quantize_probs,
    slot_allowance,
    slot_bytes,
    variable_arrays,
    variable_reply,
)

__all__ = [
    "CODE_STEPS_PER_HALVING",
    "ENCODINGS",
    "FIELDS",
    "LAYOUTS",
    "ID_DTYPE_LARGE",
    "ID_DTYPE_SMALL",
    "MAX_BATCH",
    "MAX_SLOTS",
    "PROB_DTYPE",
    "DraftReply",
    "WireFormatError",
    "bytes_per_position",
    "check_budget",
    "code_table",
    "compression_ratio",
    "dequantize_probs",
    "distribution_bytes",
    "decode_reply",
    "full_distribution_bytes",
    "id_dtype",
    "make_reply",
    "max_kept_mass",
    "payload_bytes",
    "quantize_probs",
    "reply_to_arrays",
    "slot_allowance",
    "slot_bytes",
]


def reply_to_arrays(reply: DraftReply) -> dict[str, np.ndarray]:
    """The arrays of a reply in its encoding's layout, keyed by ``LAYOUTS[reply.encoding]`` (what
    goes into the ArrayRecord). ``decode_reply`` of them gives the reply back."""
    if reply.encoding == "fixed-k":
        return fixed_arrays(reply)
    return variable_arrays(reply)


# ---- byte accounting ------------------------------------------------------------------------------


def payload_bytes(reply_or_arrays: DraftReply | Mapping[str, Any]) -> int:
    """Sum of ``nbytes`` of the arrays that travel (the reply's encoding)."""
    if isinstance(reply_or_arrays, DraftReply):
        arrays = tuple(reply_to_arrays(reply_or_arrays).values())
    else:
        names = {f for layout in LAYOUTS.values() for f in layout}
        arrays = tuple(np.asarray(v) for f, v in reply_or_arrays.items() if f in names)
    return int(sum(int(a.nbytes) for a in arrays))


def distribution_bytes(reply: DraftReply) -> int:
    """Bytes of the distributions alone (no headers, no padding): the valid positions' slots
    (ids + probabilities), plus their count bytes in the variable-K encodings."""
    counts = reply.slot_counts()[reply.valid_mask()]  # [N]
    if reply.encoding == "fixed-k":
        per_slot = reply.token_ids.dtype.itemsize + reply.probs.dtype.itemsize
        return int(counts.size) * reply.k * per_slot
    per_slot = reply.token_ids.dtype.itemsize + (1 if reply.encoding == "budgeted-compact" else 2)
    return int(counts.size) * COUNT_DTYPE.itemsize + int(counts.sum()) * per_slot


def bytes_per_position(k: int, vocab_size: int) -> int:
    """Bytes one drafted position costs: K ids + K float16 probabilities."""
    return int(k) * (id_dtype(vocab_size).itemsize + np.dtype(PROB_DTYPE).itemsize)


_DENSE_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def full_distribution_bytes(vocab_size: int, dtype: str = "float32") -> int:
    """Bytes of one dense distribution over the vocabulary (float32: 4V, float16/bfloat16: 2V)."""
    name = str(dtype).removeprefix("torch.")
    itemsize = _DENSE_ITEMSIZE.get(name)
    if itemsize is None:
        itemsize = np.dtype(name).itemsize
    return int(vocab_size) * int(itemsize)


def compression_ratio(k: int, vocab_size: int, dtype: str = "float32") -> float:
    """Dense distribution bytes over top-K bytes, per position."""
    return full_distribution_bytes(vocab_size, dtype) / bytes_per_position(k, vocab_size)


# ---- building a reply (device side) -------------------------------------------------------------


def make_reply(seq_ids, lengths, token_ids, probs, vocab_size: int, *, client: str = "this device",
               encoding: str = "fixed-k", counts=None) -> DraftReply:
    """Build a reply from any int/float arrays (numpy or lists).

    Casts to the compact dtypes, zeroes the padding (positions >= lengths), then validates with
    the very checks of :func:`decode_reply` (G and K of the arrays themselves as the limits).
    Values that the cast would change (ids out of range, non-integer ids, lengths outside 0..G)
    are refused before casting, never wrapped. Raises :class:`WireFormatError`.

    ``encoding`` (``ENCODINGS``): how the reply will travel. In the variable-K encodings
    ``counts`` [B, G] gives the slots each position sends (default: slot 0 and every slot with
    a positive probability after the cast, in their order); ``budgeted-compact`` puts every probability on the code table (nearest code), so
    a device that samples from the returned ``probs`` samples from what the server reconstructs.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown uplink encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    v = _positive_int(vocab_size, "vocab_size")
    dtype = id_dtype(v)
    seq = _integers(seq_ids, "seq_ids", client, SEQ_ID_DTYPE)
    lens = _integers(lengths, "lengths", client, np.dtype(np.int64))
    tok = _numeric(token_ids, "token_ids", client)
    pr = _numeric(probs, "probs", client)
    b, g, k = _check_shapes({"seq_ids": seq, "lengths": lens, "token_ids": tok, "probs": pr}, client)
    _check_length_range(lens, g, client)
    mask = _valid_mask(lens, g)
    mask3 = np.broadcast_to(mask[:, :, None], (b, g, k))

    tok_valid = tok[mask]
    if tok_valid.size:
        if tok.dtype.kind == "f":
            finite = np.isfinite(tok_valid)
            if not finite.all():
                _raise_at("token_ids", client, ~np.isfinite(tok) & mask3, tok, "is not a finite number")
            if (tok_valid != np.round(tok_valid)).any():
                _raise_at("token_ids", client, (tok != np.round(tok)) & mask3, tok, "is not an integer")
        bad = (tok < 0) | (tok >= v)
        if (bad & mask3).any():
            _raise_at("token_ids", client, bad & mask3, tok, f"is outside 0..{v - 1} (vocab_size {v})")
    tok_out = np.zeros((b, g, k), dtype=dtype)
    tok_out[mask] = tok_valid.astype(dtype)

    pr_out = np.zeros((b, g, k), dtype=PROB_DTYPE)
    with np.errstate(over="ignore", invalid="ignore"):
        pr_out[mask] = pr[mask].astype(PROB_DTYPE)  # overflow -> inf, refused below

    if encoding != "fixed-k":
        reply = variable_reply(seq, lens, tok_out, pr_out, pr, mask, encoding, counts, client)
        try:
            arrays = reply_to_arrays(reply)
        except ValueError as exc:  # a value the layout cannot hold
            raise WireFormatError("reply", client, f"cannot be encoded as {encoding}: {exc}") from None
        return decode_reply(arrays, vocab_size=v, max_k=max(min(k, MAX_COUNT), 1), max_gamma=max(g, 0),
                            client=client, encoding=encoding)
    arrays = {
        "seq_ids": seq.astype(SEQ_ID_DTYPE),
        "lengths": lens.astype(LENGTH_DTYPE),
        "token_ids": tok_out,
        "probs": pr_out,
    }
    return decode_reply(arrays, vocab_size=v, max_k=max(k, 1), max_gamma=g, client=client)


# ---- decoding a reply (server side) -------------------------------------------------------------


def decode_reply(
    arrays: Mapping[str, Any],
    *,
    vocab_size: int,
    max_k: int,
    max_gamma: int,
    client: str = "client",
    expected_k: int | None = None,
    max_bytes: int | None = None,
    encoding: str | None = None,
) -> DraftReply:
    """Validate the raw arrays of one reply and return them as a :class:`DraftReply`.

    Raises :class:`WireFormatError` for anything a device can send that breaks the format (see the
    module docstring); ``ValueError`` only for invalid server-side limits. The returned arrays are
    fresh C-contiguous copies with the padding zeroed.

    ``encoding``: the layout the reply must have; None: told by its fields (``prob_codes``,
    ``seq_base`` or ``seq_offsets``: budgeted-compact; ``counts``: budgeted; else fixed-k).
    ``expected_k`` applies to fixed-k replies only (variable-K replies choose K per position).
    """
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"unknown uplink encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    v = _positive_int(vocab_size, "vocab_size")
    dtype = id_dtype(v)
    limits = {
        "max_k": _positive_int(max_k, "max_k"),
        "max_gamma": _non_negative_int(max_gamma, "max_gamma"),
        "expected_k": None if expected_k is None else _positive_int(expected_k, "expected_k"),
        "max_bytes": None if max_bytes is None else _non_negative_int(max_bytes, "max_bytes"),
    }
    client = str(client)
    try:
        layout = encoding if encoding is not None else layout_of(arrays)
        if layout != "fixed-k":
            del limits["expected_k"]
            return decode_variable(arrays, v, dtype, client, layout, **limits)
        return decode_fixed(arrays, v, dtype, client, **limits)
    except WireFormatError:
        raise
    except Exception as exc:  # a guarantee, not a code path: a device must never crash the server
        detail = f"{type(exc).__name__}: {exc}"[:200]
        raise WireFormatError("reply", client, f"could not be decoded ({detail})") from exc
