"""The ``fixed-k`` layout: ``seq_ids [B]``, ``lengths [B]``, ``token_ids [B, G, K]``, ``probs [B, G, K]``
(specified in :mod:`specfed_flwr.wire`'s docstring), its arrays and its strict decoder, as named steps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from .faults import FaultKind
from .wire_base import (
    FIELDS,
    LENGTH_DTYPE,
    MAX_BATCH,
    MAX_SLOTS,
    PROB_DTYPE,
    SEQ_ID_DTYPE,
    DraftReply,
    WireFormatError,
    _arrays_of,
    _check_field_names,
    _check_length_range,
    _check_max_bytes,
    _check_unique_seq_ids,
    _exact_arrays,
    _raise_at,
    _valid_mask,
    max_kept_mass,
)


def fixed_arrays(reply: DraftReply) -> dict[str, np.ndarray]:
    """The arrays of a fixed-k reply, keyed by ``FIELDS``."""
    return dict(zip(FIELDS, _arrays_of(reply)))


def decode_fixed(
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
    """The strict decoder of the fixed-k layout: fields and exact dtypes, the payload limit, shapes
    and the server's limits, unique sequence ids and lengths in range, then the values of the valid
    positions (probabilities, then ids)."""
    _check_field_names(arrays, FIELDS, client, "reply")
    expected = {"seq_ids": ((SEQ_ID_DTYPE,), 1), "lengths": ((LENGTH_DTYPE,), 1),
                "token_ids": ((dtype,), 3), "probs": ((np.dtype(PROB_DTYPE),), 3)}
    got = _exact_arrays(arrays, expected, v, client)
    _check_max_bytes(got, max_bytes, client, kind=FaultKind.LIMIT_MAX_REPLY_BYTES)
    b, g, k = _check_shapes(got, client)
    _check_limits(b, g, k, v, client, max_k=max_k, max_gamma=max_gamma, expected_k=expected_k)

    seq_ids, lengths, tok, probs = (got[name] for name in FIELDS)
    _check_unique_seq_ids(seq_ids, "seq_ids", client)
    _check_length_range(lengths, g, client)
    mask = _valid_mask(lengths, g)
    drafted = bool(mask.any())
    if drafted:
        _check_probs(probs, mask, k, client)
        _check_token_ids(tok, mask, v, client)

    tok_out = np.zeros((b, g, k), dtype=dtype)
    probs_out = np.zeros((b, g, k), dtype=PROB_DTYPE)
    if drafted:
        tok_out[mask] = tok[mask]
        probs_out[mask] = probs[mask]
    return DraftReply(
        seq_ids=np.array(seq_ids, dtype=SEQ_ID_DTYPE, order="C", copy=True),
        lengths=np.array(lengths, dtype=LENGTH_DTYPE, order="C", copy=True),
        token_ids=tok_out,
        probs=probs_out,
    )


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


def _check_limits(b: int, g: int, k: int, v: int, client: str, *, max_k: int, max_gamma: int,
                  expected_k: int | None) -> None:
    """G and K within the server's limits (each with its own fault kind), B and B*G*K within the decoder's."""
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


def _check_probs(probs: np.ndarray, mask: np.ndarray, k: int, client: str) -> None:
    """At the valid positions (``mask [B, G]``): finite, non-negative, slot 0 positive, sum within the tolerance."""
    mask3 = np.broadcast_to(mask[:, :, None], probs.shape)
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


def _check_token_ids(tok: np.ndarray, mask: np.ndarray, v: int, client: str) -> None:
    """At the valid positions (``mask [B, G]``): ids in the vocabulary, unique per position."""
    k = tok.shape[2]
    mask3 = np.broadcast_to(mask[:, :, None], tok.shape)
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
