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
device samples its draft token from exactly these values renormalised (``proposer.sparsify``),
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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .faults import FaultKind

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

ID_DTYPE_SMALL = np.uint16
ID_DTYPE_LARGE = np.int32
PROB_DTYPE = np.float16
FIELDS = ("seq_ids", "lengths", "token_ids", "probs")

SEQ_ID_DTYPE = np.dtype(np.int64)
LENGTH_DTYPE = np.dtype(np.int32)

ENCODINGS = ("fixed-k", "budgeted", "budgeted-compact")
LAYOUTS = {
    "fixed-k": FIELDS,
    "budgeted": ("seq_ids", "lengths", "counts", "token_ids", "probs"),
    "budgeted-compact": ("seq_base", "seq_offsets", "lengths", "counts", "token_ids", "prob_codes"),
}
COUNT_DTYPE = np.dtype(np.uint8)
CODE_DTYPE = np.dtype(np.uint8)
COMPACT_LENGTH_DTYPE = np.dtype(np.uint8)
MAX_COUNT = int(np.iinfo(np.uint8).max)  # slots per position in the variable-K layouts
CODE_STEPS_PER_HALVING = 16
_CODE_TABLE = np.zeros(256, dtype=np.float16)
_CODE_TABLE[1:] = (2.0 ** (-np.arange(255, dtype=np.float64) / CODE_STEPS_PER_HALVING)).astype(np.float16)
_CODE_TABLE.flags.writeable = False
# below half a step under the smallest code a probability is not sent (code 0)
_CODE_FLOOR = 2.0 ** (-(254 + 0.5) / CODE_STEPS_PER_HALVING)

# float16 rounding bounds and the slack for error made before the cast (module docstring)
FP16_REL_ROUNDING = 2.0**-11  # relative error of round-to-nearest, normal range
FP16_ABS_ROUNDING = 2.0**-25  # absolute error of round-to-nearest, subnormal range
UPSTREAM_SLACK = 2.0**-8

# Hard caps that hold whatever the server's limits are: a numpy view (np.broadcast_to) can claim
# a huge shape without the memory behind it, and the decoder must refuse it before touching values.
MAX_BATCH = 1 << 20  # sequences in one reply
MAX_SLOTS = 1 << 28  # B * G * K

_SMALL_VOCAB_LIMIT = int(np.iinfo(np.uint16).max) + 1  # 65536 ids: 0..65535
_MAX_VOCAB = int(np.iinfo(np.int32).max) + 1


class WireFormatError(ValueError):
    """A draft reply that the server refuses; names the client, the field and the problem."""

    def __init__(self, field: str, client: str, problem: str, kind: FaultKind = FaultKind.WIRE_FORMAT):
        self.field = str(field)
        self.client = str(client)
        self.problem = str(problem)
        self.kind = FaultKind(kind)  # the fault this stands for (a limit's own kind, else wire-format)
        super().__init__(f"reply from {self.client}: field '{self.field}': {self.problem}")

    def __reduce__(self):  # picklable across processes (Ray actors, subprocesses)
        return (type(self), (self.field, self.client, self.problem, self.kind))


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536, ids < 65536), else int32."""
    v = _positive_int(vocab_size, "vocab_size")
    if v > _MAX_VOCAB:
        raise ValueError(f"vocab_size {v} does not fit int32 token ids")
    return np.dtype(ID_DTYPE_SMALL) if v <= _SMALL_VOCAB_LIMIT else np.dtype(ID_DTYPE_LARGE)


def max_kept_mass(k: int, encoding: str = "fixed-k") -> float:
    """The largest per-position sum of K probabilities that the decoder accepts (module docstring):
    float16 rounding for ``fixed-k`` / ``budgeted``, half a quantisation step for ``budgeted-compact``."""
    if encoding == "budgeted-compact":
        return 2.0 ** (0.5 / CODE_STEPS_PER_HALVING) * (1.0 + 2.0 * FP16_REL_ROUNDING) + UPSTREAM_SLACK
    return 1.0 + 2.0 * FP16_REL_ROUNDING + int(k) * 2.0 * FP16_ABS_ROUNDING + UPSTREAM_SLACK


def code_table() -> np.ndarray:
    """float16 ``[256]``: the probability each ``prob_codes`` value stands for (code 0: not a probability)."""
    return _CODE_TABLE


def quantize_probs(probs: Any) -> np.ndarray:
    """Probabilities (any shape, float) -> uint8 codes of the nearest value in the log domain.

    0 (not sent) below half a step under the smallest code; values above 1 take code 1 (1.0).
    Idempotent on the table: ``quantize_probs(code_table()[c]) == c`` for every c >= 1."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = -np.log2(np.where(p > 0, p, 1.0)) * CODE_STEPS_PER_HALVING  # 0 at p = 1
    codes = np.clip(np.rint(steps), 0, 254).astype(np.int64) + 1
    codes = np.where((p >= _CODE_FLOOR) & np.isfinite(p), codes, 0)
    return codes.astype(CODE_DTYPE)


def dequantize_probs(codes: Any) -> np.ndarray:
    """uint8 codes -> their float16 table values (the values both sides compute with)."""
    return _CODE_TABLE[np.asarray(codes, dtype=np.int64)]


def slot_bytes(encoding: str, vocab_size: int) -> int:
    """Bytes of one slot: an id plus a float16 probability (a uint8 code in ``budgeted-compact``)."""
    prob = 1 if encoding == "budgeted-compact" else np.dtype(PROB_DTYPE).itemsize
    return int(id_dtype(vocab_size).itemsize + prob)


def header_bytes(encoding: str, sequences: int) -> int:
    """Bytes a reply spends besides its slots and counts: the per-sequence header (+ the compact base)."""
    b = int(sequences)
    if encoding == "budgeted-compact":
        return 8 + 3 * b  # seq_base int64, uint16 offset + uint8 length per sequence
    return 12 * b  # int64 seq id + int32 length


def slot_allowance(budget: float, encoding: str, vocab_size: int, gamma: int) -> float:
    """Slots per drafted position that ``budget`` bytes per position (all-in) pay for.

    budget minus the count byte and one sequence's header amortised over ``gamma`` positions (a
    reply of one sequence drafting gamma positions spends exactly the budget; more sequences share
    the compact base and spend less), over :func:`slot_bytes`. Fixed-K pays no count byte."""
    g = max(1, int(gamma))
    per_position = float(budget) - (0 if encoding == "fixed-k" else 1) - header_bytes(encoding, 1) / g
    return max(0.0, per_position / slot_bytes(encoding, vocab_size))


@dataclass(frozen=True, eq=False)
class DraftReply:
    seq_ids: np.ndarray  # int64 [B], unique
    lengths: np.ndarray  # int32 [B], drafted positions per sequence, 0..G
    token_ids: np.ndarray  # id_dtype [B, G, K]; slot 0 = drafted token; zeros beyond lengths
    probs: np.ndarray  # float16 [B, G, K]; draft probabilities (not renormalised); zeros beyond lengths
    # int32 [B, G]: slots sent per position (0 beyond lengths; slots >= counts are zero) -- None: fixed K
    counts: np.ndarray | None = None
    encoding: str = "fixed-k"  # how it travels (reply_to_arrays)

    @property
    def batch_size(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def gamma(self) -> int:
        return int(self.token_ids.shape[1])

    @property
    def k(self) -> int:
        return int(self.token_ids.shape[2])

    @property
    def drafted(self) -> np.ndarray:
        """The drafted tokens ``[B, G]`` (slot 0; zeros beyond lengths)."""
        return self.token_ids[:, :, 0]

    def valid_mask(self) -> np.ndarray:
        """bool ``[B, G]``: position g of sequence b was drafted (g < lengths[b])."""
        return np.arange(self.gamma)[None, :] < self.lengths.astype(np.int64)[:, None]

    def slot_counts(self) -> np.ndarray:
        """int64 ``[B, G]``: slots sent per position (K at valid positions for fixed K, 0 beyond lengths)."""
        if self.counts is not None:
            return self.counts.astype(np.int64)
        return np.where(self.valid_mask(), self.k, 0).astype(np.int64)

    def slot_mask(self) -> np.ndarray:
        """bool ``[B, G, K]``: the slot was sent."""
        return np.arange(self.k)[None, None, :] < self.slot_counts()[:, :, None]

    def kept_mass(self) -> np.ndarray:
        """float32 ``[B, G]``: the sum of the K probabilities (0 where the position is padding)."""
        mass = self.probs.astype(np.float32).sum(axis=-1, dtype=np.float32)
        return np.where(self.valid_mask(), mass, np.float32(0.0)).astype(np.float32)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DraftReply):
            return NotImplemented
        if self.encoding != other.encoding or (self.counts is None) != (other.counts is None):
            return False
        return all(
            a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            for a, b in zip(_arrays_of(self), _arrays_of(other))
        ) and (self.counts is None or np.array_equal(self.counts, other.counts))

    __hash__ = None  # type: ignore[assignment]


def _arrays_of(reply: DraftReply) -> tuple[np.ndarray, ...]:
    return (reply.seq_ids, reply.lengths, reply.token_ids, reply.probs)


def reply_to_arrays(reply: DraftReply) -> dict[str, np.ndarray]:
    """The arrays of a reply in its encoding's layout, keyed by ``LAYOUTS[reply.encoding]`` (what
    goes into the ArrayRecord). ``decode_reply`` of them gives the reply back."""
    if reply.encoding == "fixed-k":
        return dict(zip(FIELDS, _arrays_of(reply)))
    counts = reply.slot_counts()  # [B, G]
    valid = reply.valid_mask()  # [B, G]
    slots = reply.slot_mask()  # [B, G, K]
    out: dict[str, np.ndarray] = {}
    if reply.encoding == "budgeted":
        out["seq_ids"] = np.ascontiguousarray(reply.seq_ids, dtype=SEQ_ID_DTYPE)
        out["lengths"] = np.ascontiguousarray(reply.lengths, dtype=LENGTH_DTYPE)
    else:
        base = int(reply.seq_ids.min()) if reply.seq_ids.size else 0
        offsets = reply.seq_ids.astype(np.int64) - base
        top = int(offsets.max()) if offsets.size else 0
        if top > int(np.iinfo(np.uint32).max):
            raise ValueError(f"sequence ids span {top}, more than uint32 offsets hold")
        out["seq_base"] = np.array([base], dtype=SEQ_ID_DTYPE)
        out["seq_offsets"] = offsets.astype(np.uint16 if top <= int(np.iinfo(np.uint16).max) else np.uint32)
        out["lengths"] = reply.lengths.astype(COMPACT_LENGTH_DTYPE)
    out["counts"] = counts[valid].astype(COUNT_DTYPE)  # [N]
    out["token_ids"] = np.ascontiguousarray(reply.token_ids[slots])  # [T]
    if reply.encoding == "budgeted":
        out["probs"] = np.ascontiguousarray(reply.probs[slots])  # [T]
    else:
        values = reply.probs[slots]  # [T] float16, on the code table
        codes = quantize_probs(values)
        if not np.array_equal(dequantize_probs(codes), values):
            raise ValueError("a budgeted-compact reply holds a probability that is not on the code table")
        out["prob_codes"] = codes
    return out


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


def check_budget(reply: DraftReply, budget: float, gamma: int, vocab_size: int, client: str = "client") -> None:
    """Refuse a reply that carries more slots than ``budget`` bytes per position pays for: at most
    ``max(1, slot_allowance(...)) * N`` slots over its N drafted positions. Raises WireFormatError."""
    if budget <= 0:
        return
    counts = reply.slot_counts()[reply.valid_mask()]  # [N]
    allowance = max(1.0, slot_allowance(budget, reply.encoding, vocab_size, gamma))
    limit = allowance * counts.size
    total = int(counts.sum())
    if total > limit + 1e-6:
        field = "token_ids" if reply.encoding == "fixed-k" else "counts"
        raise WireFormatError(
            field, client,
            f"{total} slots over {counts.size} drafted positions exceeds the budget of {budget:g} bytes per position "
            f"({allowance:.3f} slots per position at gamma={gamma}, {reply.encoding})",
        )


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
        return _make_variable(seq, lens, tok_out, pr_out, pr, mask, v, encoding, counts, client)
    arrays = {
        "seq_ids": seq.astype(SEQ_ID_DTYPE),
        "lengths": lens.astype(LENGTH_DTYPE),
        "token_ids": tok_out,
        "probs": pr_out,
    }
    return decode_reply(arrays, vocab_size=v, max_k=max(k, 1), max_gamma=g, client=client)


def _make_variable(seq, lens, tok_out, pr_out, pr, mask, v, encoding, counts, client) -> DraftReply:
    """The variable-K tail of :func:`make_reply`: counts, quantisation, then the strict decoder."""
    b, g, k = tok_out.shape
    if encoding == "budgeted-compact":
        with np.errstate(over="ignore", invalid="ignore"):
            raw = pr[mask].astype(np.float64)
        quantised = dequantize_probs(quantize_probs(raw))
        # keep what the decoder must refuse (negative, non-finite) visible as such
        pr_out[mask] = np.where(np.isfinite(raw) & (raw >= 0), quantised, raw.astype(PROB_DTYPE))
        if g > MAX_COUNT:
            raise WireFormatError("lengths", client, f"G={g} positions; budgeted-compact lengths are uint8 (<= {MAX_COUNT})")
    if counts is None:
        # a slot whose probability is (or rounds to) zero is not sent: the positive slots move up
        # (slot 0, the drafted token, stays; a bad slot-0 value is left for the decoder to name)
        positive = pr_out > 0  # [B, G, K]
        positive[:, :, 0] = True
        order = np.argsort(~positive, axis=2, kind="stable")  # [B, G, K] positive slots first
        tok_out[:] = np.take_along_axis(tok_out, order, axis=2)
        pr_out[:] = np.take_along_axis(pr_out, order, axis=2)
        cnt = np.where(mask, positive.sum(axis=2), 0)
    else:
        cnt = _integers(counts, "counts", client, np.dtype(np.int64))
        if cnt.shape != (b, g):
            raise WireFormatError("counts", client, f"shape {cnt.shape}, expected {(b, g)} (sequences x positions)")
        cnt = np.where(mask, cnt, 0)
        if ((cnt < 1) & mask).any() or (cnt > k).any():
            i = tuple(int(x) for x in np.argwhere(((cnt < 1) & mask) | (cnt > k))[0])
            raise WireFormatError("counts", client, f"value {int(cnt[i])} at {list(i)} is outside 1..{k}")
    if k > MAX_COUNT and (cnt > MAX_COUNT).any():
        raise WireFormatError("counts", client, f"more than {MAX_COUNT} slots at a position (counts are uint8)")
    unused = np.arange(k)[None, None, :] >= cnt[:, :, None]  # [B, G, K]
    tok_out[unused] = 0
    pr_out[unused] = 0
    reply = DraftReply(seq_ids=seq.astype(SEQ_ID_DTYPE), lengths=lens.astype(LENGTH_DTYPE), token_ids=tok_out,
                       probs=pr_out, counts=cnt.astype(np.int32), encoding=encoding)
    try:
        arrays = reply_to_arrays(reply)
    except ValueError as exc:  # a value the layout cannot hold
        raise WireFormatError("reply", client, f"cannot be encoded as {encoding}: {exc}") from None
    return decode_reply(arrays, vocab_size=v, max_k=max(min(k, MAX_COUNT), 1), max_gamma=max(g, 0), client=client,
                        encoding=encoding)


def _numeric(x: Any, name: str, client: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise WireFormatError(name, client, f"is not an array ({type(exc).__name__}: {exc})") from None
    if arr.dtype.kind not in "iuf":
        raise WireFormatError(name, client, f"dtype {arr.dtype} is not an integer or float dtype")
    return arr


def _integers(x: Any, name: str, client: str, target: np.dtype) -> np.ndarray:
    arr = _numeric(x, name, client)
    if arr.dtype.kind == "f":
        if arr.size and not np.isfinite(arr).all():
            raise WireFormatError(name, client, "holds a value that is not a finite number")
        if arr.size and (arr != np.round(arr)).any():
            raise WireFormatError(name, client, "holds a value that is not an integer")
        info = np.iinfo(target)
        if arr.size and ((arr < info.min) | (arr > info.max)).any():
            raise WireFormatError(name, client, f"holds a value outside the range of {target}")
        return arr.astype(target)
    if arr.size and arr.dtype != target:
        info = np.iinfo(target)
        lo, hi = arr.min(), arr.max()
        if int(lo) < info.min or int(hi) > info.max:
            raise WireFormatError(name, client, f"holds a value outside the range of {target}")
    return arr.astype(target)


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
        layout = encoding if encoding is not None else _layout_of(arrays)
        if layout != "fixed-k":
            del limits["expected_k"]
            return _decode_variable(arrays, v, dtype, client, layout, **limits)
        return _decode(arrays, v, dtype, client, **limits)
    except WireFormatError:
        raise
    except Exception as exc:  # a guarantee, not a code path: a device must never crash the server
        detail = f"{type(exc).__name__}: {exc}"[:200]
        raise WireFormatError("reply", client, f"could not be decoded ({detail})") from exc


def _decode(
    arrays: Any,
    v: int,
    dtype: np.dtype,
    client: str,
    *,
    max_k: int,
    max_gamma: int,
    expected_k: int | None,
    max_bytes: int | None,
) -> DraftReply:
    if not isinstance(arrays, Mapping):
        raise WireFormatError(
            "reply", client, f"expected a mapping of the fields {', '.join(FIELDS)}; got {type(arrays).__name__}"
        )
    keys = list(arrays.keys())
    for name in FIELDS:
        if name not in keys:
            raise WireFormatError(name, client, f"missing (a reply has exactly the fields {', '.join(FIELDS)})")
    for key in keys:
        if not (isinstance(key, str) and key in FIELDS):
            raise WireFormatError(
                _key_name(key), client, f"unexpected field (a reply has exactly the fields {', '.join(FIELDS)})"
            )

    expected = {"seq_ids": (SEQ_ID_DTYPE, 1), "lengths": (LENGTH_DTYPE, 1), "token_ids": (dtype, 3), "probs": (np.dtype(PROB_DTYPE), 3)}
    got: dict[str, np.ndarray] = {}
    for name in FIELDS:
        value = arrays[name]
        want_dtype, want_ndim = expected[name]
        if not isinstance(value, np.ndarray):
            raise WireFormatError(name, client, f"expected a numpy array, got {type(value).__name__}")
        value = np.asarray(value)  # subclasses (memmap, matrix, ...) as plain ndarrays
        if value.dtype != want_dtype:
            why = f" for vocab_size {v}" if name == "token_ids" else ""
            raise WireFormatError(name, client, f"dtype {value.dtype}, expected {want_dtype}{why} (dtypes are exact, nothing is cast)")
        if value.ndim != want_ndim:
            raise WireFormatError(name, client, f"{value.ndim}-d array of shape {value.shape}, expected {want_ndim}-d")
        got[name] = value

    if max_bytes is not None:
        sizes = {name: int(a.nbytes) for name, a in got.items()}
        total = sum(sizes.values())
        if total > max_bytes:
            parts = ", ".join(f"{n} {s}" for n, s in sizes.items())
            raise WireFormatError("payload", client, f"{total} bytes ({parts}) exceeds max_bytes={max_bytes}",
                                  kind=FaultKind.LIMIT_MAX_REPLY_BYTES)

    b, g, k = _check_shapes(got, client)
    if g > max_gamma:
        raise WireFormatError("token_ids", client, f"G={g} positions exceeds max_gamma={max_gamma}",
                              kind=FaultKind.LIMIT_MAX_GAMMA)
    if k < 1:
        raise WireFormatError("token_ids", client, f"K={k} slots; at least 1 (the drafted token) is needed")
    if k > v:
        raise WireFormatError("token_ids", client, f"K={k} slots exceeds vocab_size={v}")
    if k > max_k:
        raise WireFormatError("token_ids", client, f"K={k} slots exceeds max_k={max_k}",
                              kind=FaultKind.LIMIT_MAX_K)
    if expected_k is not None and k != expected_k:
        raise WireFormatError("token_ids", client, f"K={k} slots, expected K={expected_k}")
    if b > MAX_BATCH:
        raise WireFormatError("seq_ids", client, f"{b} sequences exceeds the decoder's limit of {MAX_BATCH}")
    if b * g * k > MAX_SLOTS:
        raise WireFormatError("token_ids", client, f"B*G*K = {b * g * k} slots exceeds the decoder's limit of {MAX_SLOTS}")

    seq_ids, lengths, tok, probs = (got[name] for name in FIELDS)

    # seq_ids: unique
    if b > 1:
        order = np.argsort(seq_ids, kind="stable")
        ordered = seq_ids[order]
        dup = np.flatnonzero(ordered[1:] == ordered[:-1])
        if dup.size:
            value = int(ordered[dup[0]])
            where = np.flatnonzero(seq_ids == value)[:2].tolist()
            raise WireFormatError("seq_ids", client, f"duplicate sequence id {value} at indices {where}")

    _check_length_range(lengths, g, client)
    mask = _valid_mask(lengths, g)
    n_valid = int(mask.sum())

    if n_valid:
        mask3 = np.broadcast_to(mask[:, :, None], (b, g, k))
        pv = probs[mask]  # [N, K] float16, valid positions only
        if not np.isfinite(pv).all():
            _raise_at("probs", client, ~np.isfinite(probs) & mask3, probs, "is not finite")
        if (pv < 0).any():
            _raise_at("probs", client, (probs < 0) & mask3, probs, "is negative")
        if (pv[:, 0] <= 0).any():
            bad = (probs[:, :, 0] <= 0) & mask
            bi, gi = (int(x) for x in np.argwhere(bad)[0])
            raise WireFormatError(
                "probs", client,
                f"the drafted token (slot 0) has probability {float(probs[bi, gi, 0])} at [{bi}, {gi}, 0]; it must be > 0",
            )
        limit = max_kept_mass(k)
        sums = pv.astype(np.float64).sum(axis=1)
        if (sums > limit).any():
            row = int(np.flatnonzero(sums > limit)[0])
            bi, gi = (int(x) for x in np.argwhere(mask)[row])
            raise WireFormatError(
                "probs", client,
                f"probabilities at [{bi}, {gi}] sum to {float(sums[row]):.6g}, above 1 beyond the float16 tolerance "
                f"(limit {limit:.6g} for K={k})",
            )

        tv = tok[mask]  # [N, K]
        bad_ids = tv >= v
        if tv.dtype.kind == "i":
            bad_ids |= tv < 0
        if bad_ids.any():
            full_bad = (tok >= v) | (tok < 0) if tok.dtype.kind == "i" else tok >= v
            _raise_at("token_ids", client, full_bad & mask3, tok, f"is outside 0..{v - 1} (vocab_size {v})")
        if k > 1:
            st = np.sort(tv, axis=1)
            dup_rows = (st[:, 1:] == st[:, :-1]).any(axis=1)
            if dup_rows.any():
                row = int(np.flatnonzero(dup_rows)[0])
                srow = st[row]
                value = int(srow[1:][srow[1:] == srow[:-1]][0])
                bi, gi = (int(x) for x in np.argwhere(mask)[row])
                slots = np.flatnonzero(tok[bi, gi] == value)[:2].tolist()
                raise WireFormatError(
                    "token_ids", client, f"token id {value} appears twice at position [{bi}, {gi}] (slots {slots})"
                )

    tok_out = np.zeros((b, g, k), dtype=dtype)
    probs_out = np.zeros((b, g, k), dtype=PROB_DTYPE)
    if n_valid:
        tok_out[mask] = tok[mask]
        probs_out[mask] = probs[mask]
    return DraftReply(
        seq_ids=np.array(seq_ids, dtype=SEQ_ID_DTYPE, order="C", copy=True),
        lengths=np.array(lengths, dtype=LENGTH_DTYPE, order="C", copy=True),
        token_ids=tok_out,
        probs=probs_out,
    )


def _layout_of(arrays: Any) -> str:
    """The encoding a reply's field names say it has (a non-mapping is left to the fixed-k checks)."""
    if not isinstance(arrays, Mapping):
        return "fixed-k"
    keys = set(k for k in arrays.keys() if isinstance(k, str))
    if keys & {"seq_base", "seq_offsets", "prob_codes"}:
        return "budgeted-compact"
    if "counts" in keys:
        return "budgeted"
    return "fixed-k"


def _decode_variable(
    arrays: Any,
    v: int,
    dtype: np.dtype,
    client: str,
    layout: str,
    *,
    max_k: int,
    max_gamma: int,
    max_bytes: int | None,
) -> DraftReply:
    """The strict decoder of the variable-K layouts (module docstring): every field 1-d with its
    exact dtype, counts that add up to the flat arrays, then the value checks of fixed K."""
    fields = LAYOUTS[layout]
    compact = layout == "budgeted-compact"
    listing = ", ".join(fields)
    if not isinstance(arrays, Mapping):
        raise WireFormatError("reply", client, f"expected a mapping of the fields {listing}; got {type(arrays).__name__}")
    keys = list(arrays.keys())
    for name in fields:
        if name not in keys:
            raise WireFormatError(name, client, f"missing (a {layout} reply has exactly the fields {listing})")
    for key in keys:
        if not (isinstance(key, str) and key in fields):
            raise WireFormatError(_key_name(key), client, f"unexpected field (a {layout} reply has exactly the fields {listing})")
    expected = {
        "seq_ids": (SEQ_ID_DTYPE,), "seq_base": (SEQ_ID_DTYPE,),
        "seq_offsets": (np.dtype(np.uint16), np.dtype(np.uint32)),
        "lengths": (COMPACT_LENGTH_DTYPE,) if compact else (LENGTH_DTYPE,),
        "counts": (COUNT_DTYPE,), "token_ids": (dtype,), "probs": (np.dtype(PROB_DTYPE),), "prob_codes": (CODE_DTYPE,),
    }
    got: dict[str, np.ndarray] = {}
    for name in fields:
        value = arrays[name]
        if not isinstance(value, np.ndarray):
            raise WireFormatError(name, client, f"expected a numpy array, got {type(value).__name__}")
        value = np.asarray(value)
        if value.dtype not in expected[name]:
            want = " or ".join(str(d) for d in expected[name])
            why = f" for vocab_size {v}" if name == "token_ids" else ""
            raise WireFormatError(name, client, f"dtype {value.dtype}, expected {want}{why} (dtypes are exact, nothing is cast)")
        if value.ndim != 1:
            raise WireFormatError(name, client, f"{value.ndim}-d array of shape {value.shape}, expected 1-d")
        got[name] = value

    if max_bytes is not None:
        sizes = {name: int(a.nbytes) for name, a in got.items()}
        total = sum(sizes.values())
        if total > max_bytes:
            parts = ", ".join(f"{n} {s}" for n, s in sizes.items())
            raise WireFormatError("payload", client, f"{total} bytes ({parts}) exceeds max_bytes={max_bytes}")

    id_field = "seq_offsets" if compact else "seq_ids"
    b = int(got[id_field].shape[0])
    if compact and got["seq_base"].shape != (1,):
        raise WireFormatError("seq_base", client, f"shape {got['seq_base'].shape}, expected (1,)")
    if got["lengths"].shape[0] != b:
        raise WireFormatError("lengths", client, f"{got['lengths'].shape[0]} rows (batch size) does not match {id_field} ({b})")
    if b > MAX_BATCH:
        raise WireFormatError(id_field, client, f"{b} sequences exceeds the decoder's limit of {MAX_BATCH}")

    lengths = got["lengths"].astype(np.int64)  # [B]
    if b:
        if (lengths < 0).any():
            i = int(np.flatnonzero(lengths < 0)[0])
            raise WireFormatError("lengths", client, f"lengths[{i}] = {int(lengths[i])} is negative")
        if (lengths > max_gamma).any():
            i = int(np.flatnonzero(lengths > max_gamma)[0])
            raise WireFormatError("lengths", client, f"lengths[{i}] = {int(lengths[i])} positions exceeds max_gamma={max_gamma}")
    n = int(lengths.sum())
    counts = got["counts"].astype(np.int64)  # [N]
    if counts.shape[0] != n:
        raise WireFormatError("counts", client, f"{counts.shape[0]} entries, but lengths add up to {n} drafted positions")
    if n:
        for bad, problem in ((counts < 1, "is 0: a drafted position sends at least its drafted token"),
                             (counts > min(max_k, v), f"slots exceeds max_k={max_k}" if max_k <= v
                              else f"slots exceeds vocab_size={v}")):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise WireFormatError("counts", client, f"counts[{i}] = {int(counts[i])} {problem}")
    t = int(counts.sum())
    if t > MAX_SLOTS:
        raise WireFormatError("counts", client, f"{t} slots exceeds the decoder's limit of {MAX_SLOTS}")
    prob_field = "prob_codes" if compact else "probs"
    for name in ("token_ids", prob_field):
        if got[name].shape[0] != t:
            raise WireFormatError(name, client, f"{got[name].shape[0]} entries, but counts add up to {t} slots")
    g = int(lengths.max()) if b else 0
    k = int(counts.max()) if n else 1
    if b * g * k > MAX_SLOTS:
        raise WireFormatError("counts", client, f"B*G*K = {b * g * k} slots exceeds the decoder's limit of {MAX_SLOTS}")

    if compact:
        base = int(got["seq_base"][0])
        top = int(got["seq_offsets"].max()) if b else 0
        if base > int(np.iinfo(np.int64).max) - top:
            raise WireFormatError("seq_base", client, f"{base} + offset {top} overflows int64 sequence ids")
        seq_ids = got["seq_offsets"].astype(np.int64) + base
    else:
        seq_ids = got["seq_ids"].astype(np.int64)
    if b > 1:
        ordered = np.sort(seq_ids, kind="stable")
        dup = np.flatnonzero(ordered[1:] == ordered[:-1])
        if dup.size:
            value = int(ordered[dup[0]])
            where = np.flatnonzero(seq_ids == value)[:2].tolist()
            raise WireFormatError(id_field, client, f"duplicate sequence id {value} at indices {where}")

    valid = np.arange(g, dtype=np.int64)[None, :] < lengths[:, None]  # [B, G]
    where_pos = np.argwhere(valid)  # [N, 2]: (b, g) of each flat position
    position = np.repeat(np.arange(n, dtype=np.int64), counts)  # [T] flat position of each slot
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, dtype=np.int64)  # [N]

    def at(slot: int) -> str:
        bi, gi = (int(x) for x in where_pos[position[slot]])
        return f"slot {slot - int(starts[position[slot]])} of position [{bi}, {gi}] (flat index {slot})"

    if compact:
        codes = got["prob_codes"]
        if t and (codes == 0).any():
            i = int(np.flatnonzero(codes == 0)[0])
            raise WireFormatError("prob_codes", client, f"code 0 at {at(i)} is not a probability (codes are 1..255)")
        values = dequantize_probs(codes)  # [T] float16
    else:
        values = got["probs"]
        if t:
            if not np.isfinite(values).all():
                i = int(np.flatnonzero(~np.isfinite(values))[0])
                raise WireFormatError("probs", client, f"value {float(values[i])} at {at(i)} is not finite")
            if (values <= 0).any():
                i = int(np.flatnonzero(values <= 0)[0])
                raise WireFormatError("probs", client, f"value {float(values[i])} at {at(i)} is not > 0 "
                                      "(every sent slot carries a positive probability)")
    if n:
        sums = np.add.reduceat(values.astype(np.float64), starts)  # [N]
        limit = max_kept_mass(k, layout)
        if (sums > limit).any():
            row = int(np.flatnonzero(sums > limit)[0])
            bi, gi = (int(x) for x in where_pos[row])
            raise WireFormatError(prob_field, client, f"probabilities at [{bi}, {gi}] sum to {float(sums[row]):.6g}, "
                                  f"above 1 beyond the {layout} tolerance (limit {limit:.6g})")
        ids = got["token_ids"]
        bad_ids = ids >= v
        if ids.dtype.kind == "i":
            bad_ids |= ids < 0
        if bad_ids.any():
            i = int(np.flatnonzero(bad_ids)[0])
            raise WireFormatError("token_ids", client, f"value {int(ids[i])} at {at(i)} is outside 0..{v - 1} (vocab_size {v})")
        order = np.lexsort((ids.astype(np.int64), position))  # by position, then id
        same = (position[order][1:] == position[order][:-1]) & (ids[order][1:] == ids[order][:-1])
        if same.any():
            i = int(order[int(np.flatnonzero(same)[0]) + 1])
            raise WireFormatError("token_ids", client, f"token id {int(ids[i])} appears twice at {at(i)}")

    counts_out = np.zeros((b, g), dtype=np.int32)
    counts_out[valid] = counts
    slots = np.arange(k)[None, None, :] < counts_out[:, :, None]  # [B, G, K]
    tok_out = np.zeros((b, g, k), dtype=dtype)
    probs_out = np.zeros((b, g, k), dtype=PROB_DTYPE)
    tok_out[slots] = got["token_ids"]
    probs_out[slots] = values
    return DraftReply(
        seq_ids=np.array(seq_ids, dtype=SEQ_ID_DTYPE, order="C", copy=True),
        lengths=np.array(lengths, dtype=LENGTH_DTYPE, order="C", copy=True),
        token_ids=tok_out,
        probs=probs_out,
        counts=counts_out,
        encoding=layout,
    )


# ---- shared checks --------------------------------------------------------------------------------


def _check_shapes(got: Mapping[str, np.ndarray], client: str) -> tuple[int, int, int]:
    """ndim and shape consistency; returns (B, G, K). Only shapes are read, never values."""
    for name, ndim in (("seq_ids", 1), ("lengths", 1), ("token_ids", 3), ("probs", 3)):
        arr = got[name]
        if arr.ndim != ndim:
            raise WireFormatError(name, client, f"{arr.ndim}-d array of shape {arr.shape}, expected {ndim}-d")
    rows = {name: int(got[name].shape[0]) for name in FIELDS}
    counts = Counter(rows.values())
    top = max(counts.values())
    # the batch size most fields agree on; on a tie, the one of seq_ids
    majority = rows["seq_ids"] if counts[rows["seq_ids"]] == top else counts.most_common(1)[0][0]
    for name in FIELDS:
        if rows[name] != majority:
            others = ", ".join(f"{n}: {r}" for n, r in rows.items() if n != name)
            raise WireFormatError(name, client, f"{rows[name]} rows (batch size) does not match the other fields ({others})")
    if got["probs"].shape != got["token_ids"].shape:
        raise WireFormatError(
            "probs", client, f"shape {tuple(got['probs'].shape)} does not match token_ids shape {tuple(got['token_ids'].shape)}"
        )
    b, g, k = (int(x) for x in got["token_ids"].shape)
    return b, g, k


def _check_length_range(lengths: np.ndarray, g: int, client: str) -> None:
    if lengths.size:
        bad = (lengths < 0) | (lengths > g)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise WireFormatError("lengths", client, f"lengths[{i}] = {int(lengths[i])} is outside 0..{g} (G={g})")


def _valid_mask(lengths: np.ndarray, g: int) -> np.ndarray:
    return np.arange(g, dtype=np.int64)[None, :] < lengths.astype(np.int64)[:, None]


def _raise_at(field: str, client: str, bad: np.ndarray, values: np.ndarray, problem: str) -> None:
    idx = tuple(int(x) for x in np.argwhere(bad)[0])
    value = values[idx]
    shown = float(value) if values.dtype.kind == "f" else int(value)
    raise WireFormatError(field, client, f"value {shown} at {list(idx)} {problem}")


def _key_name(key: Any) -> str:
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= 64 else text[:61] + "..."


def _positive_int(x: Any, name: str) -> int:
    value = _non_negative_int(x, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {x!r}")
    return value


def _non_negative_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {x!r}")
    value = int(x)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {x!r}")
    return value
