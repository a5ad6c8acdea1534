"""``packing``: named arrays as one uint8 array (one Flower object per message part instead of one
per array), and its strict reader."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from specfed_flwr.packing import DTYPES, MAX_NDIM, PackingError, pack, unpack
from specfed_flwr.records import record_arrays
from specfed_flwr.wire import WireFormatError


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "seq_ids": np.arange(5, dtype=np.int64),
        "token_ids": rng.integers(0, 60000, (5, 4, 8)).astype(np.uint16),
        "probs": rng.random((5, 4, 8)).astype(np.float16),
        "empty": np.zeros((0, 3), dtype=np.int32),
        "flag": np.array(True),
    }


def test_round_trip_keeps_names_order_dtypes_shapes_and_values():
    arrays = _arrays()
    out = unpack(pack(arrays))
    assert list(out) == list(arrays)
    for name, a in arrays.items():
        assert out[name].dtype == a.dtype and out[name].shape == a.shape
        assert np.array_equal(out[name], a)
        assert out[name].flags.writeable


def test_every_listed_dtype_packs():
    for dtype in DTYPES:
        a = np.ones((2, 3), dtype=dtype)
        assert unpack(pack({"a": a}))["a"].dtype == dtype


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b[:-1], "header ends early"),
    (lambda b: b + b"\x00", "bytes after the last array"),
    (lambda b: b[:1] + b[1:2] + b"x" * b[1] + bytes([200]) + b[3 + b[1]:], "unknown dtype code 200"),
    (lambda b: bytes([255]) + b[1:], "255 arrays"),
])
def test_malformed_buffers_are_refused_with_the_reason(mutate, match):
    good = pack({"a": np.arange(4, dtype=np.int32)}).tobytes()
    with pytest.raises(PackingError, match=match):
        unpack(np.frombuffer(mutate(good), dtype=np.uint8))


def test_repeated_names_too_many_dimensions_and_unknown_dtypes_are_refused():
    one = pack({"a": np.zeros(1, np.int8)}).tobytes()
    twice = bytes([2]) + one[1:one.index(b"a") + 3 + 4] * 2  # header of "a" twice, no payload yet
    with pytest.raises(PackingError):
        unpack(np.frombuffer(twice + b"\x00\x00", dtype=np.uint8))
    with pytest.raises(PackingError, match="dimensions"):
        pack({"a": np.zeros((1,) * (MAX_NDIM + 1))})
    with pytest.raises(PackingError, match="cannot be packed"):
        pack({"a": np.array(["x"])})
    with pytest.raises(PackingError, match="1-D uint8"):
        unpack(np.zeros(3, dtype=np.int16))


def test_fuzz_random_and_flipped_buffers_only_ever_raise_packing_errors():
    rng = np.random.default_rng(1)
    good = pack(_arrays())
    for _ in range(3000):
        if rng.random() < 0.5:
            buf = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8)
        else:
            buf = good.copy()
            idx = rng.integers(0, len(buf), int(rng.integers(1, 4)))
            buf[idx] = rng.integers(0, 256, len(idx), dtype=np.uint8)
        try:
            out = unpack(buf)
        except PackingError:
            continue
        assert all(isinstance(a, np.ndarray) for a in out.values())


def test_records_read_packed_and_unpacked_layouts_and_name_the_sender_on_errors():
    arrays = _arrays()
    packed = ArrayRecord({"packed": Array(pack(arrays))})
    plain = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items() if a.ndim})
    assert set(record_arrays(packed)) == set(arrays)
    assert set(record_arrays(plain)) == {n for n, a in arrays.items() if a.ndim}
    broken = ArrayRecord({"packed": Array(np.frombuffer(b"\x01\x05", dtype=np.uint8))})
    with pytest.raises(WireFormatError, match="node 7: field 'packed'"):
        record_arrays(broken, "node 7")


def test_a_forged_huge_shape_is_refused_without_allocating():
    buf = bytes([1, 1]) + b"a" + bytes([7, 8]) + np.full(8, 2**32 - 1, dtype="<u4").tobytes()
    with pytest.raises(PackingError, match="ends early"):
        unpack(np.frombuffer(buf, dtype=np.uint8))
