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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .faults import FaultKind

__all__ = [
    "FIELDS",
    "ID_DTYPE_LARGE",
    "ID_DTYPE_SMALL",
    "MAX_BATCH",
    "MAX_SLOTS",
    "PROB_DTYPE",
    "DraftReply",
    "WireFormatError",
    "bytes_per_position",
    "compression_ratio",
    "decode_reply",
    "full_distribution_bytes",
    "id_dtype",
    "make_reply",
    "max_kept_mass",
    "payload_bytes",
    "reply_to_arrays",
]

ID_DTYPE_SMALL = np.uint16
ID_DTYPE_LARGE = np.int32
PROB_DTYPE = np.float16
FIELDS = ("seq_ids", "lengths", "token_ids", "probs")

SEQ_ID_DTYPE = np.dtype(np.int64)
LENGTH_DTYPE = np.dtype(np.int32)

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


def max_kept_mass(k: int) -> float:
    """The largest per-position sum of K float16 probabilities that the decoder accepts."""
    return 1.0 + 2.0 * FP16_REL_ROUNDING + int(k) * 2.0 * FP16_ABS_ROUNDING + UPSTREAM_SLACK


@dataclass(frozen=True, eq=False)
class DraftReply:
    seq_ids: np.ndarray  # int64 [B], unique
    lengths: np.ndarray  # int32 [B], drafted positions per sequence, 0..G
    token_ids: np.ndarray  # id_dtype [B, G, K]; slot 0 = drafted token; zeros beyond lengths
    probs: np.ndarray  # float16 [B, G, K]; draft probabilities (not renormalised); zeros beyond lengths

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

    def kept_mass(self) -> np.ndarray:
        """float32 ``[B, G]``: the sum of the K probabilities (0 where the position is padding)."""
        mass = self.probs.astype(np.float32).sum(axis=-1, dtype=np.float32)
        return np.where(self.valid_mask(), mass, np.float32(0.0)).astype(np.float32)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DraftReply):
            return NotImplemented
        return all(
            a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            for a, b in zip(_arrays_of(self), _arrays_of(other))
        )

    __hash__ = None  # type: ignore[assignment]


def _arrays_of(reply: DraftReply) -> tuple[np.ndarray, ...]:
    return (reply.seq_ids, reply.lengths, reply.token_ids, reply.probs)


def reply_to_arrays(reply: DraftReply) -> dict[str, np.ndarray]:
    """The four arrays of a reply, keyed by :data:`FIELDS` (what goes into the ArrayRecord)."""
    return dict(zip(FIELDS, _arrays_of(reply)))


def payload_bytes(reply_or_arrays: DraftReply | Mapping[str, Any]) -> int:
    """Sum of ``nbytes`` of the four arrays."""
    if isinstance(reply_or_arrays, DraftReply):
        arrays = _arrays_of(reply_or_arrays)
    else:
        arrays = tuple(np.asarray(reply_or_arrays[f]) for f in FIELDS if f in reply_or_arrays)
    return int(sum(int(a.nbytes) for a in arrays))


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


def make_reply(seq_ids, lengths, token_ids, probs, vocab_size: int, *, client: str = "this device") -> DraftReply:
    """Build a reply from any int/float arrays (numpy or lists).

    Casts to the compact dtypes, zeroes the padding (positions >= lengths), then validates with
    the very checks of :func:`decode_reply` (G and K of the arrays themselves as the limits).
    Values that the cast would change (ids out of range, non-integer ids, lengths outside 0..G)
    are refused before casting, never wrapped. Raises :class:`WireFormatError`.
    """
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

    arrays = {
        "seq_ids": seq.astype(SEQ_ID_DTYPE),
        "lengths": lens.astype(LENGTH_DTYPE),
        "token_ids": tok_out,
        "probs": pr_out,
    }
    return decode_reply(arrays, vocab_size=v, max_k=max(k, 1), max_gamma=g, client=client)


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
) -> DraftReply:
    """Validate the raw arrays of one reply and return them as a :class:`DraftReply`.

    Raises :class:`WireFormatError` for anything a device can send that breaks the format (see the
    module docstring); ``ValueError`` only for invalid server-side limits. The returned arrays are
    fresh C-contiguous copies with the padding zeroed.
    """
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
