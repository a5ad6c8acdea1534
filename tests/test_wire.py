"""The compact draft reply: byte accounting, round trips, one test per decoder rule, and fuzzing."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from specfed_flwr.wire import (
    ENCODINGS,
    FIELDS,
    LAYOUTS,
    MAX_BATCH,
    DraftReply,
    WireFormatError,
    bytes_per_position,
    check_budget,
    code_table,
    compression_ratio,
    dequantize_probs,
    distribution_bytes,
    decode_reply,
    full_distribution_bytes,
    id_dtype,
    make_reply,
    max_kept_mass,
    payload_bytes,
    quantize_probs,
    reply_to_arrays,
    slot_allowance,
)

V = 1000
CLIENT = "edge-7"
LIMITS = dict(vocab_size=V, max_k=64, max_gamma=16, client=CLIENT)


def _random_reply(b=3, g=4, k=5, v=V, seed=0, lengths=None) -> DraftReply:
    """A valid reply: distinct ids per position, probabilities of a random distribution's subset."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(0, g + 1, size=b)
    seq_ids = rng.choice(10_000, size=b, replace=False) - 5_000
    ids = np.zeros((b, g, k), dtype=np.int64)
    probs = np.zeros((b, g, k), dtype=np.float64)
    for i in range(b):
        for j in range(int(lengths[i])):
            ids[i, j] = rng.choice(v, size=k, replace=False)
            p = rng.dirichlet(np.ones(k + 1))[:k]  # one extra category: the mass that is not sent
            p[0] = max(p[0], 1e-3)
            probs[i, j] = p / max(1.0, p.sum())
    return make_reply(seq_ids, lengths, ids, probs, v)


def _arrays(**kw) -> dict[str, np.ndarray]:
    return {name: a.copy() for name, a in reply_to_arrays(_random_reply(**kw)).items()}


def _decode(arrays, **kw):
    return decode_reply(arrays, **{**LIMITS, **kw})


def _rejects(arrays, field: str, *, match: str | None = None, **kw) -> WireFormatError:
    with pytest.raises(WireFormatError) as info:
        _decode(arrays, **kw)
    err = info.value
    assert err.field == field, str(err)
    assert err.client == kw.get("client", CLIENT)
    assert str(err).startswith(f"reply from {err.client}: field '{field}': ")
    if match is not None:
        assert match in err.problem, str(err)
    return err


def _softmax(logits: np.ndarray, dtype=np.float64) -> np.ndarray:
    z = logits.astype(dtype)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _topk_reply(dist: np.ndarray, k: int, seed: int = 0) -> DraftReply:
    """dist [B, G, V] -> a reply carrying each position's top-K (drafted token = top-1)."""
    b, g, v = dist.shape
    order = np.argsort(-dist, axis=-1, kind="stable")[..., :k]
    probs = np.take_along_axis(dist, order, axis=-1)
    return make_reply(np.arange(b) + seed, np.full(b, g), order, probs, v)


# ---- byte accounting ------------------------------------------------------------------------------


def test_position_costs_at_most_32_bytes_at_k8_smollm_vocab():
    assert bytes_per_position(8, 49152) == 32
    reply = _random_reply(b=4, g=8, k=8, v=49152, lengths=np.full(4, 8))
    per_position = (reply.token_ids.nbytes + reply.probs.nbytes) / (4 * 8)
    assert per_position <= 32
    assert reply.token_ids.dtype == np.uint16 and reply.probs.dtype == np.float16
    assert payload_bytes(reply) == 4 * 8 + 4 * 4 + 4 * 8 * 32
    assert payload_bytes(reply_to_arrays(reply)) == payload_bytes(reply)


def test_id_dtype_switches_at_the_uint16_boundary():
    assert id_dtype(2) == np.uint16
    assert id_dtype(49152) == np.uint16
    assert id_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert id_dtype(65537) == np.int32
    assert id_dtype(151_936) == np.int32
    assert bytes_per_position(8, 65536) == 32
    assert bytes_per_position(8, 65537) == 48
    top = make_reply([0], [1], [[[65535, 0]]], [[[0.5, 0.25]]], 65536)
    assert top.token_ids.dtype == np.uint16 and int(top.token_ids[0, 0, 0]) == 65535
    big = make_reply([0], [1], [[[65536, 0]]], [[[0.5, 0.25]]], 65537)
    assert big.token_ids.dtype == np.int32 and int(big.token_ids[0, 0, 0]) == 65536
    with pytest.raises(ValueError):
        id_dtype(0)


def test_compression_ratio_against_dense_distributions():
    assert full_distribution_bytes(49152) == 4 * 49152
    assert full_distribution_bytes(49152, "float16") == 2 * 49152
    assert compression_ratio(8, 49152) >= 6000
    assert compression_ratio(8, 49152) == pytest.approx(4 * 49152 / 32)
    assert compression_ratio(8, 49152, "float16") == pytest.approx(2 * 49152 / 32)


# ---- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [V, 65536, 70_000])
@pytest.mark.parametrize("b,g,k", [(3, 4, 5), (1, 1, 1), (0, 4, 3), (2, 0, 2), (5, 16, 64)])
def test_round_trip(v, b, g, k):
    reply = _random_reply(b=b, g=g, k=k, v=v, seed=b * 100 + g * 10 + k)
    arrays = reply_to_arrays(reply)
    assert set(arrays) == set(FIELDS)
    back = decode_reply(arrays, vocab_size=v, max_k=64, max_gamma=16, client=CLIENT, expected_k=k)
    assert back == reply
    assert (back.batch_size, back.gamma, back.k) == (b, g, k)
    assert back.seq_ids.dtype == np.int64 and back.lengths.dtype == np.int32
    assert back.token_ids.dtype == id_dtype(v) and back.probs.dtype == np.float16
    np.testing.assert_array_equal(back.drafted, reply.token_ids[:, :, 0])


def test_make_reply_accepts_lists_and_zeroes_the_padding():
    reply = make_reply(
        [7, 3],
        [1, 0],
        [[[5, 9], [123456, -4]], [[2, 2], [1, 1]]],  # garbage beyond the lengths
        [[[0.5, 0.25], [float("nan"), -1.0]], [[9.0, 9.0], [0.0, 0.0]]],
        V,
    )
    assert reply.token_ids.tolist() == [[[5, 9], [0, 0]], [[0, 0], [0, 0]]]
    assert reply.probs.tolist() == [[[0.5, 0.25], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]]
    np.testing.assert_array_equal(reply.kept_mass(), np.array([[0.75, 0.0], [0.0, 0.0]], dtype=np.float32))
    assert reply.kept_mass().dtype == np.float32
    np.testing.assert_array_equal(reply.drafted, [[5, 0], [0, 0]])


def test_make_reply_refuses_values_that_a_cast_would_change():
    # 70000 would wrap to 4464 in uint16, a valid id: it must be refused before the cast
    with pytest.raises(WireFormatError, match="token_ids"):
        make_reply([0], [1], [[[70000, 1]]], [[[0.5, 0.1]]], V)
    with pytest.raises(WireFormatError, match="token_ids"):
        make_reply([0], [1], [[[1.5, 2]]], [[[0.5, 0.1]]], V)
    with pytest.raises(WireFormatError, match="lengths"):
        make_reply([0], [2], [[[1, 2]]], [[[0.5, 0.1]]], V)
    with pytest.raises(WireFormatError, match="seq_ids"):
        make_reply([2**70], [1], [[[1, 2]]], [[[0.5, 0.1]]], V)
    with pytest.raises(WireFormatError, match="probs"):  # overflows float16 -> inf -> refused
        make_reply([0], [1], [[[1, 2]]], [[[1e6, 0.1]]], V)
    with pytest.raises(WireFormatError, match="probs"):
        make_reply([0], [1], [[[1, 2]]], [[[0.0, 0.1]]], V)


@pytest.mark.parametrize("k", [1, 2, 8, 64, 1024])
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0, 30.0])
@pytest.mark.parametrize("softmax_dtype", [np.float64, np.float32])
def test_round_trip_of_a_real_softmax_topk(k, scale, softmax_dtype):
    v = 1024
    rng = np.random.default_rng(int(k * 7 + scale * 13))
    dist = _softmax(rng.normal(size=(4, 5, v)) * scale, softmax_dtype)
    reply = _topk_reply(dist, k)
    back = decode_reply(reply_to_arrays(reply), vocab_size=v, max_k=v, max_gamma=16, client=CLIENT)
    assert back == reply
    sums = back.probs.astype(np.float64).sum(-1)
    assert (sums <= max_kept_mass(k)).all()
    if k == v:
        assert np.allclose(back.kept_mass(), 1.0, atol=2e-3)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    v=st.sampled_from([2, 16, 257, 2048]),
    k_frac=st.floats(0.0, 1.0),
    scale=st.floats(0.0, 50.0),
)
def test_any_correctly_rounded_topk_decodes(seed, v, k_frac, scale):
    rng = np.random.default_rng(seed)
    k = max(1, min(v, int(round(k_frac * v))))
    dist = _softmax(rng.standard_normal((2, 3, v)) * scale, np.float32)
    reply = _topk_reply(dist, k)
    assert decode_reply(reply_to_arrays(reply), vocab_size=v, max_k=v, max_gamma=3) == reply


def test_rounding_up_past_one_is_within_tolerance():
    # 1023 values just above a float16 rounding midpoint (each rounds UP by ~2^-11 relative),
    # the last one takes the rest: the exact sum is 1, the float16 sum is ~1 + 2^-11
    v = k = 1024
    p = np.full(k, 2.0**-10 * (1 + 2.0**-11 + 2.0**-16))
    p[-1] = 1.0 - p[:-1].sum()
    assert p.min() > 0 and abs(p.sum() - 1.0) < 1e-12
    reply = make_reply([0], [1], np.arange(k)[None, None, :], p[None, None, :], v)
    s = reply.probs.astype(np.float64).sum()
    assert s > 1.0 + 2.0**-12
    assert s <= max_kept_mass(k)


def test_tolerance_rule():
    for k in (1, 8, 64, 1024):
        limit = max_kept_mass(k)
        assert limit == 1 + 2.0**-10 + k * 2.0**-24 + 2.0**-8
        # at least the worst case of rounding an exact sub-distribution to float16
        assert limit >= 1 + 2.0**-11 + k * 2.0**-25
    assert max_kept_mass(1024) < 1.005


def test_decode_returns_fresh_arrays_with_zeroed_padding():
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([1, 3]))
    arrays["probs"][0, 2] = np.nan  # padding: ignored
    arrays["token_ids"][0, 1] = 99999 % 65536  # padding: ignored (an out-of-range id)
    reply = _decode(arrays)
    assert (reply.probs[0, 1:] == 0).all() and (reply.token_ids[0, 1:] == 0).all()
    arrays["probs"][1, 0, 0] = 0.0
    assert reply.probs[1, 0, 0] > 0  # decoupled from the caller's buffers
    assert all(a.flags.c_contiguous and a.flags.owndata for a in reply_to_arrays(reply).values())


def test_error_message_format_and_pickling():
    err = WireFormatError("probs", "node 12", "value nan at [0, 1, 2] is not finite")
    assert str(err) == "reply from node 12: field 'probs': value nan at [0, 1, 2] is not finite"
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.field, back.client, back.problem, str(back)) == (err.field, err.client, err.problem, str(err))


def test_invalid_server_limits_are_plain_value_errors():
    arrays = _arrays()
    for bad in (dict(vocab_size=0), dict(max_k=0), dict(max_gamma=-1), dict(expected_k=0), dict(max_bytes=-1)):
        with pytest.raises(ValueError):
            _decode(arrays, **bad)


def test_decode_is_fast_at_the_largest_sizes():
    v = k = 1024
    rng = np.random.default_rng(0)
    b, g = 64, 16
    ids = np.argsort(rng.random((b, g, v)), axis=-1)[..., :k].astype(np.uint16)
    probs = np.full((b, g, k), 1.0 / k, dtype=np.float16)
    arrays = {"seq_ids": np.arange(b, dtype=np.int64), "lengths": np.full(b, g, dtype=np.int32), "token_ids": ids, "probs": probs}
    _decode(arrays, vocab_size=v, max_k=v)  # warm-up
    start = time.perf_counter()
    reply = _decode(arrays, vocab_size=v, max_k=v)
    elapsed = time.perf_counter() - start
    assert reply.k == k
    assert elapsed < 2.0, f"decode of {b}x{g}x{k} took {elapsed:.2f} s"


# ---- one test per rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("arrays", [None, [1, 2], "seq_ids", np.zeros(4), 3])
def test_rule_reply_must_be_a_mapping(arrays):
    _rejects(arrays, "reply", match="mapping")


@pytest.mark.parametrize("field", FIELDS)
def test_rule_missing_field(field):
    arrays = _arrays()
    del arrays[field]
    _rejects(arrays, field, match="missing")


@pytest.mark.parametrize("extra", ["drafted", "", 7, ("probs",)])
def test_rule_unexpected_field(extra):
    arrays = _arrays()
    arrays[extra] = np.zeros(3)
    err = _rejects(arrays, extra if isinstance(extra, str) else repr(extra), match="unexpected")
    assert CLIENT in str(err)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("make", [lambda a: a.tolist(), lambda a: None, lambda a: b"\x00" * 8, lambda a: memoryview(a)])
def test_rule_value_must_be_an_ndarray(field, make):
    arrays = _arrays()
    arrays[field] = make(arrays[field])
    _rejects(arrays, field, match="numpy array")


@pytest.mark.parametrize("field", FIELDS)
def test_rule_object_arrays(field):
    arrays = _arrays()
    arrays[field] = arrays[field].astype(object)
    _rejects(arrays, field, match="dtype object")


@pytest.mark.parametrize(
    "field,dtype",
    [
        ("seq_ids", np.int32),
        ("seq_ids", np.uint64),
        ("seq_ids", np.float64),
        ("seq_ids", ">i8"),  # big-endian int64 is not int64 on the wire
        ("lengths", np.int64),
        ("lengths", np.uint8),
        ("token_ids", np.int32),  # V < 65536: uint16 is required
        ("token_ids", np.int64),
        ("token_ids", np.float16),
        ("probs", np.float32),  # not silently cast
        ("probs", np.float64),
        ("probs", np.uint16),
    ],
)
def test_rule_exact_dtypes(field, dtype):
    arrays = _arrays()
    arrays[field] = arrays[field].astype(dtype)
    _rejects(arrays, field, match="dtype")


def test_rule_large_vocab_requires_int32_ids():
    reply = _random_reply(v=70_000)
    arrays = reply_to_arrays(reply)
    arrays["token_ids"] = arrays["token_ids"].astype(np.uint16)
    _rejects(arrays, "token_ids", match="int32", vocab_size=70_000)
    arrays["token_ids"] = reply.token_ids.astype(np.int64)
    _rejects(arrays, "token_ids", match="int32", vocab_size=70_000)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("how", ["0-d", "extra axis", "flat"])
def test_rule_wrong_ndim(field, how):
    arrays = _arrays()
    a = arrays[field]
    arrays[field] = {"0-d": a.reshape(-1)[:1].reshape(()), "extra axis": a[None], "flat": a.reshape(-1)[None, :]}[how]
    if arrays[field].ndim == a.ndim:  # "flat" of a 1-d field is 2-d; of a 3-d field, 2-d too
        pytest.skip("same ndim")
    _rejects(arrays, field, match="-d")


@pytest.mark.parametrize("field", FIELDS)
def test_rule_batch_size_mismatch(field):
    arrays = _arrays(b=3)
    arrays[field] = arrays[field][:2]
    _rejects(arrays, field, match="rows")


@pytest.mark.parametrize("axis", [1, 2])
def test_rule_probs_shape_must_match_token_ids(axis):
    arrays = _arrays(b=3, g=4, k=5)
    arrays["probs"] = np.delete(arrays["probs"], 0, axis=axis)
    err = _rejects(arrays, "probs", match="token_ids shape")
    assert "token_ids" in str(err)


def test_rule_gamma_above_max_gamma():
    arrays = _arrays(g=5)
    _decode(arrays, max_gamma=5)
    _rejects(arrays, "token_ids", match="max_gamma", max_gamma=4)


def test_rule_k_below_one():
    arrays = _arrays(k=3)
    arrays["token_ids"] = arrays["token_ids"][:, :, :0]
    arrays["probs"] = arrays["probs"][:, :, :0]
    _rejects(arrays, "token_ids", match="K=0")


def test_rule_k_above_max_k():
    arrays = _arrays(k=9)
    _decode(arrays, max_k=9)
    _rejects(arrays, "token_ids", match="max_k", max_k=8)


def test_rule_k_above_vocab_size():
    arrays = {
        "seq_ids": np.array([1], dtype=np.int64),
        "lengths": np.array([0], dtype=np.int32),
        "token_ids": np.zeros((1, 2, 5), dtype=np.uint16),
        "probs": np.zeros((1, 2, 5), dtype=np.float16),
    }
    _rejects(arrays, "token_ids", match="vocab_size", vocab_size=4, max_k=8)


def test_rule_k_must_equal_expected_k():
    arrays = _arrays(k=5)
    _decode(arrays, expected_k=5)
    _rejects(arrays, "token_ids", match="expected K=4", expected_k=4)


@pytest.mark.parametrize("value", [-1, 5, 2**31 - 1, -(2**31)])
def test_rule_lengths_out_of_range(value):
    arrays = _arrays(b=3, g=4)
    arrays["lengths"][1] = value
    err = _rejects(arrays, "lengths", match="outside 0..4")
    assert f"lengths[1] = {value}" in str(err)


def test_rule_duplicate_seq_ids():
    arrays = _arrays(b=4)
    arrays["seq_ids"][3] = arrays["seq_ids"][1]
    err = _rejects(arrays, "seq_ids", match="duplicate")
    assert str(int(arrays["seq_ids"][1])) in err.problem


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("slot", [0, 3])
def test_rule_non_finite_probs(value, slot):
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([3, 2]))
    arrays["probs"][1, 1, slot] = value
    err = _rejects(arrays, "probs", match="not finite")
    assert f"[1, 1, {slot}]" in err.problem


@pytest.mark.parametrize("value", [-0.25, -6e-8])
def test_rule_negative_probs(value):
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([3, 2]))
    arrays["probs"][0, 2, 2] = value
    err = _rejects(arrays, "probs", match="negative")
    assert "[0, 2, 2]" in err.problem


def test_rule_sum_above_one_beyond_tolerance():
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([3, 3]))
    arrays["probs"][1, 2] = np.array([0.5, 0.25, 0.25, 0.0], dtype=np.float16)
    _decode(arrays)  # exactly 1
    arrays["probs"][1, 2] = np.array([0.5, 0.25, 0.25, 0.0078125], dtype=np.float16)
    err = _rejects(arrays, "probs", match="sum to")
    assert "[1, 2]" in err.problem and "limit" in err.problem


def test_rule_sum_boundary_is_the_documented_limit():
    k = 2
    limit = max_kept_mass(k)
    below = np.float16(limit - 1.0 - 2.0**-12)  # 1 + below <= limit
    above = np.float16(limit - 1.0 + 2.0**-10)  # 1 + above > limit
    assert 1.0 + float(below) <= limit < 1.0 + float(above)
    base = {"seq_ids": np.array([0], dtype=np.int64), "lengths": np.array([1], dtype=np.int32),
            "token_ids": np.array([[[3, 4]]], dtype=np.uint16)}
    _decode({**base, "probs": np.array([[[1.0, below]]], dtype=np.float16)})
    _rejects({**base, "probs": np.array([[[1.0, above]]], dtype=np.float16)}, "probs", match="sum to")


@pytest.mark.parametrize("value", [0.0, -0.0])
def test_rule_drafted_token_needs_positive_probability(value):
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([3, 2]))
    arrays["probs"][1, 0, 0] = value
    err = _rejects(arrays, "probs", match="slot 0")
    assert "[1, 0, 0]" in err.problem
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([3, 2]))
    arrays["probs"][1, 0, 3] = 0.0  # a zero in another slot is fine
    _decode(arrays)


@pytest.mark.parametrize("value", [V, V + 1, 65535])
def test_rule_ids_at_or_above_vocab_size(value):
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([3, 2]))
    arrays["token_ids"][0, 1, 2] = value
    err = _rejects(arrays, "token_ids", match=f"outside 0..{V - 1}")
    assert str(value) in err.problem and "[0, 1, 2]" in err.problem


@pytest.mark.parametrize("value", [-1, -(2**31), 70_000, 2**31 - 1])
def test_rule_int32_ids_negative_or_too_large(value):
    arrays = _arrays(b=2, g=3, k=4, v=70_000, lengths=np.array([3, 2]))
    arrays["token_ids"][1, 1, 0] = value
    err = _rejects(arrays, "token_ids", match="outside 0..69999", vocab_size=70_000)
    assert str(value) in err.problem


def test_rule_duplicate_ids_within_a_position():
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([3, 2]))
    arrays["token_ids"][1, 1, 3] = arrays["token_ids"][1, 1, 1]
    err = _rejects(arrays, "token_ids", match="appears twice")
    assert "[1, 1]" in err.problem and "slots [1, 3]" in err.problem
    # the same duplicate at a padding position is ignored
    arrays = _arrays(b=2, g=3, k=4, lengths=np.array([3, 1]))
    arrays["token_ids"][1, 2] = 7
    assert _decode(arrays).token_ids[1, 2].tolist() == [0, 0, 0, 0]


def test_rule_max_bytes():
    arrays = _arrays(b=3, g=4, k=5)
    total = payload_bytes(arrays)
    _decode(arrays, max_bytes=total)
    err = _rejects(arrays, "payload", match=f"{total} bytes", max_bytes=total - 1)
    assert "max_bytes" in err.problem


def test_rule_huge_shapes_claimed_are_refused_without_touching_values():
    def view(dtype, shape):
        return np.broadcast_to(np.zeros((), dtype=dtype), shape)

    n = 10**12
    huge_b = {"seq_ids": view(np.int64, (n,)), "lengths": view(np.int32, (n,)),
              "token_ids": view(np.uint16, (n, 4, 8)), "probs": view(np.float16, (n, 4, 8))}
    start = time.perf_counter()
    _rejects(huge_b, "seq_ids", match="limit")
    _rejects(huge_b, "payload", max_bytes=10**6)
    huge_g = {"seq_ids": np.arange(2, dtype=np.int64), "lengths": np.ones(2, dtype=np.int32),
              "token_ids": view(np.uint16, (2, n, 8)), "probs": view(np.float16, (2, n, 8))}
    _rejects(huge_g, "token_ids", match="max_gamma")
    huge_k = {**huge_g, "token_ids": view(np.uint16, (2, 4, n)), "probs": view(np.float16, (2, 4, n))}
    _rejects(huge_k, "token_ids", match="K=", vocab_size=65536, max_k=10**13)
    assert MAX_BATCH < n
    assert time.perf_counter() - start < 1.0


def test_client_name_appears_in_every_error():
    arrays = _arrays()
    arrays["probs"] = arrays["probs"].astype(np.float32)
    with pytest.raises(WireFormatError) as info:
        decode_reply(arrays, vocab_size=V, max_k=64, max_gamma=16, client="node 4711")
    assert str(info.value).startswith("reply from node 4711: field 'probs': ")


# ---- fuzzing ----------------------------------------------------------------------------------------


def _check_outcome(arrays, **kw):
    """Decode: success (then the reply is self-consistent) or a WireFormatError of a known rule."""
    try:
        reply = decode_reply(arrays, **kw)
    except WireFormatError as err:
        assert not err.problem.startswith("could not be decoded"), f"unhandled input: {err}"
        assert str(err).startswith(f"reply from {kw['client']}: field '")
        return None
    assert isinstance(reply, DraftReply)
    assert reply.seq_ids.dtype == np.int64 and reply.lengths.dtype == np.int32
    assert reply.token_ids.dtype == id_dtype(kw["vocab_size"]) and reply.probs.dtype == np.float16
    assert (reply.kept_mass() <= max_kept_mass(reply.k, reply.encoding)).all()
    assert decode_reply(reply_to_arrays(reply), **kw) == reply
    return reply


_ANY_DTYPES = [np.int64, np.int32, np.uint16, np.float16, np.float32, np.float64, np.bool_, np.int8,
               np.uint64, np.complex64, ">i8", ">f2", "<U2", "S2", "m8[s]", "M8[D]"]

_small_shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
_any_arrays = st.one_of(
    hnp.arrays(st.sampled_from(_ANY_DTYPES), _small_shapes),
    hnp.arrays(object, _small_shapes, elements=st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=2))),
    st.builds(
        lambda dt, shape: np.broadcast_to(np.zeros((), dtype=dt), shape),
        st.sampled_from([np.int64, np.int32, np.uint16, np.float16]),
        st.sampled_from([(), (10**12,), (10**9, 3), (10**12, 4, 8), (2, 10**9, 8), (2, 4, 10**9), (0, 10**12, 3)]),
    ),
)
_any_values = st.one_of(
    _any_arrays, st.none(), st.integers(), st.floats(), st.text(max_size=4), st.binary(max_size=4),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
_any_keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=4), st.integers(), st.none())


@st.composite
def _near_valid(draw):
    """The four fields with the right dtypes, mostly consistent shapes and limits, wild values."""
    v = draw(st.sampled_from([6, 65536, 70_000]))
    b, g, k = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.sampled_from([1, 1, 2, 3, 4, 0]))
    shape3 = draw(st.sampled_from([(b, g, k)] * 8 + [(b, g, k + 1), (b + 1, g, k), (b, g + 1, k)]))
    dt = id_dtype(v)
    lo = 0 if dt == np.uint16 else -3
    hi = min(v + 2, int(np.iinfo(dt).max))
    seq_ids = draw(hnp.arrays(np.int64, (b,), elements=st.integers(-3, 3), unique=draw(st.booleans())))
    lengths = draw(hnp.arrays(np.int32, draw(st.sampled_from([(b,)] * 8 + [(b + 1,)])),
                              elements=st.one_of(st.integers(0, g), st.integers(-1, g + 1))))
    token_ids = draw(hnp.arrays(dt, (b, g, k), elements=st.one_of(st.integers(0, 5), st.integers(lo, hi))))
    probs = draw(hnp.arrays(np.float16, shape3, elements=st.one_of(
        st.sampled_from([0.01, 0.1, 0.2, 0.25, 0.3]),
        st.sampled_from([0.0, -0.0, 6e-8, 0.5, 0.9, 1.0, 1.5, -0.1, np.nan, np.inf, -np.inf]),
        st.floats(width=16),
    )))
    arrays = {"seq_ids": seq_ids, "lengths": lengths, "token_ids": token_ids, "probs": probs}
    limits = dict(vocab_size=v, max_k=draw(st.sampled_from([max(k, 1)] * 4 + [1, 5])),
                  max_gamma=draw(st.sampled_from([g] * 4 + [max(g - 1, 0), 4])),
                  expected_k=draw(st.sampled_from([None] * 4 + [max(k, 1), 2])),
                  max_bytes=draw(st.sampled_from([None] * 6 + [64])), client="fuzz")
    return arrays, limits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=st.one_of(
    st.dictionaries(_any_keys, _any_values, max_size=6),
    st.fixed_dictionaries({f: _any_values for f in FIELDS}),
    _any_values,
))
def test_fuzz_arbitrary_input_only_raises_wire_format_error(arrays):
    _check_outcome(arrays, vocab_size=V, max_k=8, max_gamma=4, client="fuzz")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_near_valid())
def test_fuzz_near_valid_input_only_raises_wire_format_error(case):
    arrays, limits = case
    _check_outcome(arrays, **limits)


_MUTATIONS = ["dtype", "ndim", "rows", "gk", "missing", "extra", "not_array",
              "prob_nonfinite", "prob_negative", "prob_big", "slot0_zero",
              "id_out_of_range", "id_duplicate", "length_out_of_range", "seq_duplicate"]
_OTHER_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                 np.float16, np.float32, np.float64, np.bool_, object, np.complex64, ">i8", ">i4", ">f2", ">u2"]


@st.composite
def _valid_case(draw):
    v = draw(st.sampled_from([50, 70_000]))
    b, g = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    lengths = np.array(draw(st.lists(st.integers(0, g), min_size=b, max_size=b)))
    lengths[draw(st.integers(0, b - 1))] = draw(st.integers(1, g))  # at least one valid position
    seed = draw(st.integers(0, 2**32 - 1))
    return v, _random_reply(b=b, g=g, k=k, v=v, seed=seed, lengths=lengths)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_valid_case(), kind=st.sampled_from(_MUTATIONS), data=st.data())
def test_fuzz_one_mutation_of_a_valid_reply_is_named(case, kind, data):
    v, reply = case
    limits = dict(vocab_size=v, max_k=8, max_gamma=8, client="mutant")
    assert decode_reply(reply_to_arrays(reply), **limits) == reply
    arrays = {name: a.copy() for name, a in reply_to_arrays(reply).items()}
    b, g, k = reply.token_ids.shape
    valid = np.argwhere(reply.valid_mask())
    bi, gi = (int(x) for x in valid[data.draw(st.integers(0, len(valid) - 1))])
    slot = data.draw(st.integers(0, k - 1))
    field = data.draw(st.sampled_from(FIELDS))
    exact = True  # the error's field must be exactly the mutated one

    if kind == "dtype":
        new = np.dtype(data.draw(st.sampled_from(_OTHER_DTYPES)))
        if new == arrays[field].dtype:
            new = np.dtype(np.float64)
        arrays[field] = arrays[field].astype(new)
    elif kind == "ndim":
        a = arrays[field]
        how = data.draw(st.sampled_from(["front", "back", "scalar"]))
        arrays[field] = a[None] if how == "front" else a[..., None] if how == "back" else a.reshape(-1)[:1].reshape(())
    elif kind == "rows":
        a = arrays[field]
        arrays[field] = a[1:] if data.draw(st.booleans()) else np.concatenate([a, a[:1]])
    elif kind == "gk":
        field = data.draw(st.sampled_from(["token_ids", "probs"]))
        axis = data.draw(st.sampled_from([1, 2]))
        a = arrays[field]
        arrays[field] = np.delete(a, 0, axis=axis) if data.draw(st.booleans()) else np.concatenate([a, a], axis=axis)
        exact = False  # token_ids vs probs: the error names both
    elif kind == "missing":
        del arrays[field]
    elif kind == "extra":
        field = data.draw(st.sampled_from(["drafted", "probs_", "x"]))
        arrays[field] = np.zeros(1)
    elif kind == "not_array":
        arrays[field] = data.draw(st.sampled_from([lambda a: a.tolist(), lambda a: None, lambda a: 0]))(arrays[field])
    elif kind == "prob_nonfinite":
        field = "probs"
        arrays[field][bi, gi, slot] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "prob_negative":
        field = "probs"
        arrays[field][bi, gi, slot] = -data.draw(st.floats(2.0**-24, 65504, width=16))
    elif kind == "prob_big":
        field = "probs"
        arrays[field][bi, gi, slot] = data.draw(st.floats(1.0 + 2.0**-7, 65504, width=16))
    elif kind == "slot0_zero":
        field = "probs"
        arrays[field][bi, gi, 0] = data.draw(st.sampled_from([0.0, -0.0]))
    elif kind == "id_out_of_range":
        field = "token_ids"
        if arrays[field].dtype == np.uint16:
            bad = data.draw(st.integers(v, 65535))
        else:
            bad = data.draw(st.one_of(st.integers(-(2**31), -1), st.integers(v, 2**31 - 1)))
        arrays[field][bi, gi, slot] = bad
    elif kind == "id_duplicate":
        field = "token_ids"
        if k < 2:
            arrays[field][bi, gi, slot] = v  # K=1 has no duplicate: go out of range instead
        else:
            other = (slot + data.draw(st.integers(1, k - 1))) % k
            arrays[field][bi, gi, other] = arrays[field][bi, gi, slot]
    elif kind == "length_out_of_range":
        field = "lengths"
        arrays[field][data.draw(st.integers(0, b - 1))] = data.draw(
            st.one_of(st.integers(-(2**31), -1), st.integers(g + 1, 2**31 - 1))
        )
    elif kind == "seq_duplicate":
        field = "seq_ids"
        if b < 2:
            arrays[field] = arrays[field].astype(np.int32)  # one row cannot repeat: break the dtype
        else:
            i, j = data.draw(st.lists(st.integers(0, b - 1), min_size=2, max_size=2, unique=True))
            arrays[field][j] = arrays[field][i]

    with pytest.raises(WireFormatError) as info:
        decode_reply(arrays, **limits)
    err = info.value
    assert str(err).startswith("reply from mutant: field '")
    assert not err.problem.startswith("could not be decoded"), str(err)
    if exact:
        assert err.field == field, f"{kind} of {field}: {err}"
    else:
        assert err.field in ("token_ids", "probs") and field in str(err), f"{kind} of {field}: {err}"


# ---- variable-K layouts (budgeted, budgeted-compact) --------------------------------------------------

VARIABLE = ("budgeted", "budgeted-compact")


def _variable_reply(encoding, b=3, g=4, k=6, v=V, seed=0, lengths=None) -> DraftReply:
    """A valid variable-K reply: each position sends 1..k slots (a random subset of a distribution)."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(0, g + 1, size=b)
    ids = np.zeros((b, g, k), dtype=np.int64)
    probs = np.zeros((b, g, k), dtype=np.float64)
    for i in range(b):
        for j in range(int(lengths[i])):
            c = int(rng.integers(1, k + 1))
            ids[i, j] = rng.choice(v, size=k, replace=False)
            p = rng.dirichlet(np.ones(c + 1))[:c]
            probs[i, j, :c] = np.maximum(p, 1e-3) / max(1.0, np.maximum(p, 1e-3).sum())
    seq_ids = rng.choice(10_000, size=b, replace=False) + 100
    return make_reply(seq_ids, lengths, ids, probs, v, encoding=encoding)


def _variable_arrays(encoding, **kw) -> dict[str, np.ndarray]:
    return {name: a.copy() for name, a in reply_to_arrays(_variable_reply(encoding, **kw)).items()}


def test_code_table_is_a_strictly_decreasing_log_grid_and_quantisation_is_idempotent():
    table = code_table().astype(np.float64)
    assert table[0] == 0 and table[1] == 1.0
    assert (np.diff(table[1:]) < 0).all()
    ratio = table[1:-1] / table[2:]
    assert np.allclose(ratio[:200], 2 ** (1 / 16), rtol=2e-3)
    np.testing.assert_array_equal(quantize_probs(code_table()[1:]), np.arange(1, 256))
    p = np.random.default_rng(0).random(10_000) ** 8
    back = dequantize_probs(quantize_probs(p)).astype(np.float64)
    sent = back > 0
    assert (np.abs(np.log2(back[sent] / p[sent])) <= 1 / 32 + 2e-3).all()  # nearest code in the log domain
    assert (p[~sent] < 2.0 ** -15.875).all()


@pytest.mark.parametrize("encoding", VARIABLE)
@pytest.mark.parametrize("v", [V, 70_000])
@pytest.mark.parametrize("b,g,k", [(3, 4, 6), (1, 1, 1), (0, 4, 3), (2, 0, 2), (5, 16, 64)])
def test_variable_round_trip(encoding, v, b, g, k):
    reply = _variable_reply(encoding, b=b, g=g, k=k, v=v, seed=b * 100 + g * 10 + k)
    arrays = reply_to_arrays(reply)
    assert tuple(arrays) == LAYOUTS[encoding]
    assert all(a.ndim == 1 for a in arrays.values())
    assert decode_reply(arrays, vocab_size=v, max_k=64, max_gamma=16, client=CLIENT) == reply
    assert decode_reply(arrays, vocab_size=v, max_k=64, max_gamma=16, client=CLIENT, encoding=encoding) == reply
    assert reply.encoding == encoding and reply.counts.dtype == np.int32
    assert (reply.counts[~reply.valid_mask()] == 0).all() and (reply.counts[reply.valid_mask()] >= 1).all()
    assert not reply.probs[~reply.slot_mask()].any() and (reply.probs[reply.slot_mask()] > 0).all()
    if encoding == "budgeted-compact":
        assert np.isin(reply.probs[reply.slot_mask()], code_table()[1:]).all()
    n, t = int(reply.lengths.sum()), int(reply.counts.sum())
    per_slot = (2 if v <= 65536 else 4) + (1 if encoding == "budgeted-compact" else 2)
    assert distribution_bytes(reply) == n + t * per_slot
    header = 8 + b * (2 + 1) if encoding == "budgeted-compact" else 12 * b
    assert payload_bytes(reply) == header + distribution_bytes(reply)


def test_greedy_compact_position_costs_4_bytes_plus_a_small_header():
    # 1 slot: count (1) + uint16 id (2) + uint8 code (1); 12 sequences x 4 positions: 8 + 36 B of header
    reply = make_reply(np.arange(12) + 1, np.full(12, 4), np.arange(48).reshape(12, 4, 1), np.full((12, 4, 1), 0.7),
                       49152, encoding="budgeted-compact")
    assert distribution_bytes(reply) == 48 * 4
    assert payload_bytes(reply) == 48 * 4 + 8 + 12 * 3
    assert payload_bytes(reply) / 48 <= 8


def test_make_reply_drops_slots_that_round_to_zero_and_keeps_the_drafted_one_first():
    probs = np.array([[[0.5, 0.0, 1e-9, 0.25]]])
    for encoding in VARIABLE:
        reply = make_reply([3], [1], [[[10, 11, 12, 13]]], probs, V, encoding=encoding)
        assert reply.counts.tolist() == [[2]]
        assert reply.token_ids[0, 0].tolist() == [10, 13]


@pytest.mark.parametrize("encoding", VARIABLE)
def test_variable_rule_counts_must_add_up(encoding):
    arrays = _variable_arrays(encoding, lengths=np.array([3, 1, 2]))
    bad = {**arrays, "counts": arrays["counts"][:-1]}
    _rejects(bad, "counts", match="lengths add up to 6")
    bad = {**arrays, "token_ids": arrays["token_ids"][:-1]}
    _rejects(bad, "token_ids", match="counts add up to")
    prob_field = LAYOUTS[encoding][-1]
    bad = {**arrays, prob_field: np.concatenate([arrays[prob_field], arrays[prob_field][:1]])}
    _rejects(bad, prob_field, match="counts add up to")
    counts = arrays["counts"].copy()
    counts[2] = 0
    _rejects({**arrays, "counts": counts}, "counts", match="at least its drafted token")
    counts[2] = 9
    _rejects({**arrays, "counts": counts}, "counts", match="exceeds max_k=8", max_k=8)


@pytest.mark.parametrize("encoding", VARIABLE)
def test_variable_rule_fields_dtypes_and_shapes(encoding):
    arrays = _variable_arrays(encoding, lengths=np.array([3, 1, 2]))
    for name in LAYOUTS[encoding]:
        missing = {n: a for n, a in arrays.items() if n != name}
        _rejects(missing, name, match="missing", encoding=encoding)
        wrong = {**arrays, name: arrays[name].astype(np.float64)}
        _rejects(wrong, name, match="dtypes are exact")
        _rejects({**arrays, name: arrays[name][None]}, name, match="expected 1-d")
    _rejects({**arrays, "extra": np.zeros(1)}, "extra", match="unexpected field")
    _rejects({**arrays, "lengths": arrays["lengths"][:2]}, "lengths", match="does not match")
    other = "budgeted" if encoding == "budgeted-compact" else "budgeted-compact"
    with pytest.raises(WireFormatError) as info:
        _decode(arrays, encoding=other)
    assert info.value.field in set(LAYOUTS[other]) ^ set(LAYOUTS[encoding])
    with pytest.raises(WireFormatError):
        _decode(reply_to_arrays(_random_reply()), encoding=encoding)


def test_compact_rules_codes_seq_ids_and_lengths():
    arrays = _variable_arrays("budgeted-compact", lengths=np.array([3, 1, 2]))
    codes = arrays["prob_codes"].copy()
    codes[4] = 0
    _rejects({**arrays, "prob_codes": codes}, "prob_codes", match="code 0")
    codes = np.ones_like(arrays["prob_codes"])  # every slot 1.0: sums above 1
    _rejects({**arrays, "prob_codes": codes}, "prob_codes", match="sum to")
    _rejects({**arrays, "seq_base": np.zeros(2, dtype=np.int64)}, "seq_base", match="expected (1,)")
    _rejects({**arrays, "seq_base": np.array([2**63 - 2], dtype=np.int64)}, "seq_base", match="overflows")
    offsets = arrays["seq_offsets"].copy()
    offsets[1] = offsets[0]
    _rejects({**arrays, "seq_offsets": offsets}, "seq_offsets", match="duplicate sequence id")
    _decode({**arrays, "seq_offsets": arrays["seq_offsets"].astype(np.uint32)})  # either offset width
    lengths = arrays["lengths"].copy()
    lengths[0] = 17
    _rejects({**arrays, "lengths": lengths}, "lengths", match="exceeds max_gamma=16")


def test_budgeted_rules_probs_and_ids():
    arrays = _variable_arrays("budgeted", lengths=np.array([3, 1, 2]))
    for value, match in ((np.nan, "not finite"), (np.inf, "not finite"), (0.0, "not > 0"), (-0.5, "not > 0")):
        probs = arrays["probs"].copy()
        probs[3] = value
        _rejects({**arrays, "probs": probs}, "probs", match=match)
    ids = arrays["token_ids"].copy()
    ids[0] = V
    _rejects({**arrays, "token_ids": ids}, "token_ids", match="outside 0..999")
    counts = arrays["counts"]
    first = int(np.flatnonzero(counts >= 2)[0])
    start = int(counts[:first].sum())
    ids = arrays["token_ids"].copy()
    ids[start + 1] = ids[start]
    _rejects({**arrays, "token_ids": ids}, "token_ids", match="appears twice")


@pytest.mark.parametrize("encoding", VARIABLE)
def test_budget_is_checked_in_slots_per_drafted_position(encoding):
    reply = _variable_reply(encoding, b=2, g=4, k=8, lengths=np.array([4, 4]), seed=3)
    n, t = int(reply.lengths.sum()), int(reply.counts.sum())
    per_slot = 2 + (1 if encoding == "budgeted-compact" else 2)
    header = 11 if encoding == "budgeted-compact" else 12
    enough = 1 + header / 4 + per_slot * t / n
    check_budget(reply, enough + 1e-6, 4, V, CLIENT)
    assert slot_allowance(enough, encoding, V, 4) == pytest.approx(t / n)
    with pytest.raises(WireFormatError) as info:
        check_budget(reply, enough - 0.5, 4, V, CLIENT)
    assert info.value.field == "counts" and "exceeds the budget" in info.value.problem
    check_budget(reply, 0.0, 4, V, CLIENT)  # 0 = off
    with pytest.raises(WireFormatError):  # fixed K is counted too (a device ignoring the encoding)
        check_budget(_random_reply(b=2, g=4, k=8, lengths=np.array([4, 4])), 8.0, 4, V, CLIENT)


_VARIABLE_MUTATIONS = ["dtype", "ndim", "missing", "extra", "not_array", "count_zero", "count_big",
                       "count_sum", "flat_len", "code_zero", "prob_bad", "id_out_of_range", "id_duplicate",
                       "length_big", "seq_duplicate"]


@st.composite
def _variable_case(draw):
    encoding = draw(st.sampled_from(VARIABLE))
    v = draw(st.sampled_from([50, 70_000]))
    b, g = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    k = draw(st.integers(1, 5))
    lengths = np.array(draw(st.lists(st.integers(0, g), min_size=b, max_size=b)))
    lengths[draw(st.integers(0, b - 1))] = draw(st.integers(1, g))
    seed = draw(st.integers(0, 2**32 - 1))
    return encoding, v, _variable_reply(encoding, b=b, g=g, k=k, v=v, seed=seed, lengths=lengths)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_variable_case(), kind=st.sampled_from(_VARIABLE_MUTATIONS), data=st.data())
def test_fuzz_one_mutation_of_a_variable_reply_is_named(case, kind, data):
    encoding, v, reply = case
    limits = dict(vocab_size=v, max_k=8, max_gamma=8, client="mutant")
    assert decode_reply(reply_to_arrays(reply), **limits) == reply
    arrays = {name: a.copy() for name, a in reply_to_arrays(reply).items()}
    fields = LAYOUTS[encoding]
    prob_field = fields[-1]
    t = arrays["token_ids"].shape[0]
    n = arrays["counts"].shape[0]
    slot = data.draw(st.integers(0, t - 1))
    pos = data.draw(st.integers(0, n - 1))
    field = data.draw(st.sampled_from(fields))
    if kind == "dtype":
        new = np.dtype(data.draw(st.sampled_from(_OTHER_DTYPES)))
        if new == arrays[field].dtype or (field == "seq_offsets" and new in (np.uint16, np.uint32)):
            new = np.dtype(np.float64)
        arrays[field] = arrays[field].astype(new)
    elif kind == "ndim":
        arrays[field] = arrays[field][None] if data.draw(st.booleans()) else arrays[field].reshape(-1)[:1].reshape(())
    elif kind == "missing":
        del arrays[field]
        if encoding == "budgeted" and field == "counts":
            # without counts a budgeted reply has exactly the fixed-k field names: it is read as a
            # fixed-k reply whose token_ids are 1-d
            field = "token_ids"
    elif kind == "extra":
        field = data.draw(st.sampled_from(["drafted", "probs_", "x"]))
        arrays[field] = np.zeros(1)
    elif kind == "not_array":
        arrays[field] = data.draw(st.sampled_from([lambda a: a.tolist(), lambda a: None, lambda a: 0]))(arrays[field])
    elif kind == "count_zero":
        field = "counts"
        arrays[field][pos] = 0
    elif kind == "count_big":
        field = "counts"
        arrays[field][pos] = data.draw(st.integers(9, 255))
    elif kind == "count_sum":
        field = "counts"
        arrays[field] = arrays[field][:-1] if data.draw(st.booleans()) else np.concatenate([arrays[field], [1]]).astype(np.uint8)
    elif kind == "flat_len":
        field = data.draw(st.sampled_from(["token_ids", prob_field]))
        a = arrays[field]
        arrays[field] = a[:-1] if data.draw(st.booleans()) else np.concatenate([a, a[:1]])
    elif kind in ("code_zero", "prob_bad"):
        field = prob_field
        if encoding == "budgeted-compact":
            arrays[field][slot] = 0
        else:
            arrays[field][slot] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0, -0.25, 2.0]))
    elif kind == "id_out_of_range":
        field = "token_ids"
        if arrays[field].dtype == np.uint16:
            arrays[field][slot] = data.draw(st.integers(v, 65535))
        else:
            arrays[field][slot] = data.draw(st.one_of(st.integers(-(2**31), -1), st.integers(v, 2**31 - 1)))
    elif kind == "id_duplicate":
        field = "token_ids"
        counts = arrays["counts"].astype(np.int64)
        multi = np.flatnonzero(counts >= 2)
        if multi.size == 0:
            arrays[field][slot] = v if v < 65536 else v + 1  # no position to repeat in: go out of range
        else:
            p = int(multi[data.draw(st.integers(0, multi.size - 1))])
            start = int(counts[:p].sum())
            arrays[field][start + 1] = arrays[field][start]
    elif kind == "length_big":
        field = "lengths"
        arrays[field][0] = 9  # > max_gamma (then also the counts no longer add up: lengths is checked first)
    elif kind == "seq_duplicate":
        field = "seq_offsets" if encoding == "budgeted-compact" else "seq_ids"
        if arrays[field].shape[0] < 2:
            arrays[field] = arrays[field].astype(np.int8)  # one row cannot repeat: break the dtype
        else:
            arrays[field][1] = arrays[field][0]

    with pytest.raises(WireFormatError) as info:
        decode_reply(arrays, **limits)
    err = info.value
    assert str(err).startswith("reply from mutant: field '")
    assert not err.problem.startswith("could not be decoded"), str(err)
    assert err.field == field, f"{kind} of {field} ({encoding}): {err}"


@st.composite
def _near_valid_variable(draw):
    """The variable-K fields with the right dtypes, wild lengths, counts and values."""
    encoding = draw(st.sampled_from(VARIABLE))
    v = draw(st.sampled_from([6, 65536, 70_000]))
    b = draw(st.integers(0, 3))
    dt = id_dtype(v)
    lengths = draw(hnp.arrays(np.uint8 if encoding == "budgeted-compact" else np.int32,
                              draw(st.sampled_from([(b,)] * 6 + [(b + 1,)])), elements=st.integers(0, 4)))
    n = int(lengths.astype(np.int64).sum()) + draw(st.sampled_from([0] * 6 + [-1, 1]))
    counts = draw(hnp.arrays(np.uint8, (max(n, 0),), elements=st.one_of(st.integers(1, 3), st.integers(0, 255))))
    t = int(counts.astype(np.int64).sum()) + draw(st.sampled_from([0] * 6 + [-1, 1]))
    t = max(t, 0)
    lo, hi = (0, min(v + 2, 65535)) if dt == np.uint16 else (-3, v + 2)
    arrays = {"lengths": lengths, "counts": counts,
              "token_ids": draw(hnp.arrays(dt, (t,), elements=st.one_of(st.integers(0, 5), st.integers(lo, hi))))}
    if encoding == "budgeted-compact":
        arrays["seq_base"] = draw(hnp.arrays(np.int64, draw(st.sampled_from([(1,)] * 6 + [(0,), (2,)])),
                                             elements=st.integers(-(2**63), 2**63 - 1)))
        arrays["seq_offsets"] = draw(hnp.arrays(draw(st.sampled_from([np.uint16, np.uint32])), (b,),
                                                elements=st.integers(0, 5)))
        arrays["prob_codes"] = draw(hnp.arrays(np.uint8, (t,), elements=st.one_of(st.integers(20, 255), st.integers(0, 255))))
    else:
        arrays["seq_ids"] = draw(hnp.arrays(np.int64, (b,), elements=st.integers(-3, 3)))
        arrays["probs"] = draw(hnp.arrays(np.float16, (t,), elements=st.one_of(
            st.sampled_from([0.01, 0.1, 0.2]), st.sampled_from([0.0, -0.0, 6e-8, 1.0, 1.5, np.nan, np.inf]),
            st.floats(width=16))))
    limits = dict(vocab_size=v, max_k=draw(st.sampled_from([3, 255, 1])), max_gamma=draw(st.sampled_from([4, 2])),
                  max_bytes=draw(st.sampled_from([None] * 6 + [40])), client="fuzz",
                  encoding=draw(st.sampled_from([None, None, encoding, "fixed-k"])))
    return arrays, limits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_near_valid_variable())
def test_fuzz_near_valid_variable_input_only_raises_wire_format_error(case):
    arrays, limits = case
    reply = _check_outcome(arrays, **limits)
    if reply is not None:
        assert reply.encoding in ENCODINGS and (reply.counts is None) == (reply.encoding == "fixed-k")


_variable_keys = st.sampled_from(sorted({f for layout in LAYOUTS.values() for f in layout}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=st.dictionaries(_variable_keys, _any_values, max_size=7),
       encoding=st.sampled_from([None, "budgeted", "budgeted-compact"]))
def test_fuzz_arbitrary_variable_fields_only_raise_wire_format_error(arrays, encoding):
    _check_outcome(arrays, vocab_size=V, max_k=8, max_gamma=4, client="fuzz", encoding=encoding)
