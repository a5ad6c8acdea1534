"""What every reply layout shares: the :class:`DraftReply` type, :class:`WireFormatError`, the dtypes
and hard limits, the float16 kept-mass tolerance, and the checks both decoders run.

The format itself (fields, layouts, tolerances) is specified in :mod:`specfed_flwr.wire`'s docstring;
the layouts live in :mod:`specfed_flwr.wire_fixed` and :mod:`specfed_flwr.wire_variable`. Import
the public names from :mod:`specfed_flwr.wire`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .faults import FaultKind

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
# resolution of budgeted-compact's log-domain probability codes (wire_variable); it bounds their kept mass
CODE_STEPS_PER_HALVING = 16

# float16 rounding bounds and the slack for error made before the cast (wire module docstring)
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
    """The largest per-position sum of K probabilities that the decoder accepts (wire module docstring):
    float16 rounding for ``fixed-k`` / ``budgeted``, half a quantisation step for ``budgeted-compact``."""
    if encoding == "budgeted-compact":
        return 2.0 ** (0.5 / CODE_STEPS_PER_HALVING) * (1.0 + 2.0 * FP16_REL_ROUNDING) + UPSTREAM_SLACK
    return 1.0 + 2.0 * FP16_REL_ROUNDING + int(k) * 2.0 * FP16_ABS_ROUNDING + UPSTREAM_SLACK


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


# ---- checks every decoder runs, in this order ------------------------------------------------------


def _check_field_names(arrays: Any, fields: tuple[str, ...], client: str, what: str) -> None:
    """A mapping with exactly ``fields`` (``what``: "reply", "budgeted reply", ... in the messages)."""
    listing = ", ".join(fields)
    if not isinstance(arrays, Mapping):
        raise WireFormatError("reply", client, f"expected a mapping of the fields {listing}; got {type(arrays).__name__}")
    keys = list(arrays.keys())
    for name in fields:
        if name not in keys:
            raise WireFormatError(name, client, f"missing (a {what} has exactly the fields {listing})")
    for key in keys:
        if not (isinstance(key, str) and key in fields):
            raise WireFormatError(_key_name(key), client, f"unexpected field (a {what} has exactly the fields {listing})")


def _exact_arrays(
    arrays: Mapping[str, Any],
    expected: Mapping[str, tuple[tuple[np.dtype, ...], int]],
    v: int,
    client: str,
) -> dict[str, np.ndarray]:
    """Each field (in ``expected``'s order) a numpy array of one of its dtypes (never cast) and its ndim."""
    got: dict[str, np.ndarray] = {}
    for name, (dtypes, ndim) in expected.items():
        value = arrays[name]
        if not isinstance(value, np.ndarray):
            raise WireFormatError(name, client, f"expected a numpy array, got {type(value).__name__}")
        value = np.asarray(value)  # subclasses (memmap, matrix, ...) as plain ndarrays
        if value.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            why = f" for vocab_size {v}" if name == "token_ids" else ""
            raise WireFormatError(name, client, f"dtype {value.dtype}, expected {want}{why} (dtypes are exact, nothing is cast)")
        if value.ndim != ndim:
            raise WireFormatError(name, client, f"{value.ndim}-d array of shape {value.shape}, expected {ndim}-d")
        got[name] = value
    return got


def _check_max_bytes(got: Mapping[str, np.ndarray], max_bytes: int | None, client: str, kind: FaultKind) -> None:
    if max_bytes is not None:
        sizes = {name: int(a.nbytes) for name, a in got.items()}
        total = sum(sizes.values())
        if total > max_bytes:
            parts = ", ".join(f"{n} {s}" for n, s in sizes.items())
            raise WireFormatError("payload", client, f"{total} bytes ({parts}) exceeds max_bytes={max_bytes}", kind=kind)


def _check_unique_seq_ids(seq_ids: np.ndarray, field: str, client: str) -> None:
    if seq_ids.shape[0] > 1:
        ordered = np.sort(seq_ids, kind="stable")
        dup = np.flatnonzero(ordered[1:] == ordered[:-1])
        if dup.size:
            value = int(ordered[dup[0]])
            where = np.flatnonzero(seq_ids == value)[:2].tolist()
            raise WireFormatError(field, client, f"duplicate sequence id {value} at indices {where}")


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


# ---- arguments and device-side inputs -------------------------------------------------------------


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
