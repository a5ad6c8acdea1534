"""The variable-K layouts ``budgeted`` and ``budgeted-compact`` (specified in :mod:`specfed_flwr.wire`'s
docstring): their log-domain probability codes, the byte budget in slots, their arrays, and their
strict decoder as named steps. Every position carries its own number of slots (``counts``), flat in
position order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .faults import FaultKind
from .wire_base import (
    CODE_STEPS_PER_HALVING,
    LAYOUTS,
    LENGTH_DTYPE,
    MAX_BATCH,
    MAX_SLOTS,
    PROB_DTYPE,
    SEQ_ID_DTYPE,
    DraftReply,
    WireFormatError,
    _check_field_names,
    _check_max_bytes,
    _check_unique_seq_ids,
    _exact_arrays,
    _integers,
    id_dtype,
    max_kept_mass,
)

COUNT_DTYPE = np.dtype(np.uint8)
CODE_DTYPE = np.dtype(np.uint8)
COMPACT_LENGTH_DTYPE = np.dtype(np.uint8)
MAX_COUNT = int(np.iinfo(np.uint8).max)  # slots per position in the variable-K layouts
_CODE_TABLE = np.zeros(256, dtype=np.float16)
_CODE_TABLE[1:] = (2.0 ** (-np.arange(255, dtype=np.float64) / CODE_STEPS_PER_HALVING)).astype(np.float16)
_CODE_TABLE.flags.writeable = False
# below half a step under the smallest code a probability is not sent (code 0)
_CODE_FLOOR = 2.0 ** (-(254 + 0.5) / CODE_STEPS_PER_HALVING)


# ---- log-domain probability codes (budgeted-compact) ---------------------------------------------


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


# ---- the byte budget in slots ---------------------------------------------------------------------


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


# ---- encoding (device side) -----------------------------------------------------------------------


def variable_arrays(reply: DraftReply) -> dict[str, np.ndarray]:
    """The flat arrays of a budgeted / budgeted-compact reply, keyed by ``LAYOUTS[reply.encoding]``.
    Raises ValueError for a value the layout cannot hold."""
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


def variable_reply(seq, lens, tok_out, pr_out, pr, mask, encoding, counts, client) -> DraftReply:
    """The variable-K part of ``make_reply``, before its validation: quantisation (compact), the
    slots each position sends (``counts``, default: slot 0 and the positive ones), unused slots zeroed.
    ``tok_out`` / ``pr_out`` are the cast [B, G, K] arrays (changed in place), ``pr`` the raw probabilities."""
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
    return DraftReply(seq_ids=seq.astype(SEQ_ID_DTYPE), lengths=lens.astype(LENGTH_DTYPE), token_ids=tok_out,
                      probs=pr_out, counts=cnt.astype(np.int32), encoding=encoding)


# ---- decoding (server side) -----------------------------------------------------------------------


def layout_of(arrays: Any) -> str:
    """The encoding a reply's field names say it has (a non-mapping is left to the fixed-k checks)."""
    if not isinstance(arrays, Mapping):
        return "fixed-k"
    keys = set(k for k in arrays.keys() if isinstance(k, str))
    if keys & {"seq_base", "seq_offsets", "prob_codes"}:
        return "budgeted-compact"
    if "counts" in keys:
        return "budgeted"
    return "fixed-k"


def decode_variable(
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
    """The strict decoder of the variable-K layouts (wire module docstring): every field 1-d with its
    exact dtype, the payload limit, lengths, counts that add up to the flat arrays, unique sequence
    ids, then the value checks of fixed K on the flat slots."""
    fields = LAYOUTS[layout]
    compact = layout == "budgeted-compact"
    _check_field_names(arrays, fields, client, f"{layout} reply")
    got = _exact_arrays(arrays, {name: (_dtypes(name, dtype, compact), 1) for name in fields}, v, client)
    # a variable-K reply over max_bytes is a wire-format fault (fixed-k's carries LIMIT_MAX_REPLY_BYTES)
    _check_max_bytes(got, max_bytes, client, kind=FaultKind.WIRE_FORMAT)

    id_field = "seq_offsets" if compact else "seq_ids"
    lengths = _check_lengths(got, id_field, compact, max_gamma, client)  # [B]
    counts, g, k = _check_counts(got, lengths, compact, max_k, v, client)  # [N]
    seq_ids = _sequence_ids(got, compact, client)
    _check_unique_seq_ids(seq_ids, id_field, client)

    valid = np.arange(g, dtype=np.int64)[None, :] < lengths[:, None]  # [B, G]
    flat = _FlatIndex.of(valid, counts)
    values = _slot_values(got, compact, flat, client)  # [T] float16
    if counts.shape[0]:
        _check_sums(values, flat, k, layout, client)
        _check_slot_ids(got["token_ids"], flat, v, client)

    b = int(lengths.shape[0])
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


def _dtypes(name: str, dtype: np.dtype, compact: bool) -> tuple[np.dtype, ...]:
    """The dtypes a field of a variable-K layout may have (``dtype``: the ids' for this vocabulary)."""
    return {
        "seq_ids": (SEQ_ID_DTYPE,), "seq_base": (SEQ_ID_DTYPE,),
        "seq_offsets": (np.dtype(np.uint16), np.dtype(np.uint32)),
        "lengths": (COMPACT_LENGTH_DTYPE,) if compact else (LENGTH_DTYPE,),
        "counts": (COUNT_DTYPE,), "token_ids": (dtype,), "probs": (np.dtype(PROB_DTYPE),), "prob_codes": (CODE_DTYPE,),
    }[name]


def _check_lengths(got: Mapping[str, np.ndarray], id_field: str, compact: bool, max_gamma: int,
                   client: str) -> np.ndarray:
    """The per-sequence header: one compact base, as many lengths as ids, B and the lengths within the
    limits. Returns the lengths as int64 ``[B]``."""
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
    return lengths


def _check_counts(got: Mapping[str, np.ndarray], lengths: np.ndarray, compact: bool, max_k: int, v: int,
                  client: str) -> tuple[np.ndarray, int, int]:
    """One count per drafted position, each in 1..min(max_k, V), adding up to the flat slot arrays;
    N, T and B*G*K within the decoder's limits. Returns (counts int64 ``[N]``, G, K)."""
    b = int(lengths.shape[0])
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
    for name in ("token_ids", "prob_codes" if compact else "probs"):
        if got[name].shape[0] != t:
            raise WireFormatError(name, client, f"{got[name].shape[0]} entries, but counts add up to {t} slots")
    g = int(lengths.max()) if b else 0
    k = int(counts.max()) if n else 1
    if b * g * k > MAX_SLOTS:
        raise WireFormatError("counts", client, f"B*G*K = {b * g * k} slots exceeds the decoder's limit of {MAX_SLOTS}")
    return counts, g, k


def _sequence_ids(got: Mapping[str, np.ndarray], compact: bool, client: str) -> np.ndarray:
    """int64 ``[B]``: the ids as sent, or the compact base plus each offset (refused if that overflows)."""
    if not compact:
        return got["seq_ids"].astype(np.int64)
    base = int(got["seq_base"][0])
    top = int(got["seq_offsets"].max()) if got["seq_offsets"].shape[0] else 0
    if base > int(np.iinfo(np.int64).max) - top:
        raise WireFormatError("seq_base", client, f"{base} + offset {top} overflows int64 sequence ids")
    return got["seq_offsets"].astype(np.int64) + base


@dataclass(frozen=True)
class _FlatIndex:
    """Where each flat entry sits: ``where_pos [N, 2]`` the (b, g) of each drafted position,
    ``position [T]`` the flat position of each slot, ``starts [N]`` each position's first slot."""

    where_pos: np.ndarray
    position: np.ndarray
    starts: np.ndarray

    @classmethod
    def of(cls, valid: np.ndarray, counts: np.ndarray) -> _FlatIndex:
        n = int(counts.shape[0])
        return cls(
            where_pos=np.argwhere(valid),
            position=np.repeat(np.arange(n, dtype=np.int64), counts),
            starts=np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, dtype=np.int64),
        )

    def at(self, slot: int) -> str:
        """A flat slot index in words, for the messages."""
        bi, gi = (int(x) for x in self.where_pos[self.position[slot]])
        return f"slot {slot - int(self.starts[self.position[slot]])} of position [{bi}, {gi}] (flat index {slot})"


def _slot_values(got: Mapping[str, np.ndarray], compact: bool, flat: _FlatIndex, client: str) -> np.ndarray:
    """float16 ``[T]``: the probabilities sent (finite and > 0), or the table values of the codes (!= 0)."""
    if compact:
        codes = got["prob_codes"]
        if codes.shape[0] and (codes == 0).any():
            i = int(np.flatnonzero(codes == 0)[0])
            raise WireFormatError("prob_codes", client, f"code 0 at {flat.at(i)} is not a probability (codes are 1..255)")
        return dequantize_probs(codes)
    values = got["probs"]
    if values.shape[0]:
        if not np.isfinite(values).all():
            i = int(np.flatnonzero(~np.isfinite(values))[0])
            raise WireFormatError("probs", client, f"value {float(values[i])} at {flat.at(i)} is not finite")
        if (values <= 0).any():
            i = int(np.flatnonzero(values <= 0)[0])
            raise WireFormatError("probs", client, f"value {float(values[i])} at {flat.at(i)} is not > 0 "
                                  "(every sent slot carries a positive probability)")
    return values


def _check_sums(values: np.ndarray, flat: _FlatIndex, k: int, layout: str, client: str) -> None:
    """Each drafted position's probabilities sum within the layout's tolerance (``max_kept_mass``)."""
    sums = np.add.reduceat(values.astype(np.float64), flat.starts)  # [N]
    limit = max_kept_mass(k, layout)
    if (sums > limit).any():
        row = int(np.flatnonzero(sums > limit)[0])
        bi, gi = (int(x) for x in flat.where_pos[row])
        field = "prob_codes" if layout == "budgeted-compact" else "probs"
        raise WireFormatError(field, client, f"probabilities at [{bi}, {gi}] sum to {float(sums[row]):.6g}, "
                              f"above 1 beyond the {layout} tolerance (limit {limit:.6g})")


def _check_slot_ids(ids: np.ndarray, flat: _FlatIndex, v: int, client: str) -> None:
    """Every sent id in the vocabulary, unique within its position."""
    bad_ids = ids >= v
    if ids.dtype.kind == "i":
        bad_ids |= ids < 0
    if bad_ids.any():
        i = int(np.flatnonzero(bad_ids)[0])
        raise WireFormatError("token_ids", client, f"value {int(ids[i])} at {flat.at(i)} is outside 0..{v - 1} (vocab_size {v})")
    position = flat.position
    order = np.lexsort((ids.astype(np.int64), position))  # by position, then id
    same = (position[order][1:] == position[order][:-1]) & (ids[order][1:] == ids[order][:-1])
    if same.any():
        i = int(order[int(np.flatnonzero(same)[0]) + 1])
        raise WireFormatError("token_ids", client, f"token id {int(ids[i])} appears twice at {flat.at(i)}")
