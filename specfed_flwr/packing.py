"""Several named numpy arrays as ONE uint8 array: a strict little codec for Flower messages.

Why: Flower (1.42) stores every ``Array`` of a message as its own object. ``push_messages`` makes
a message pullable first and uploads its objects afterwards, one call each, and a receiver that
pulls inside that window finds objects missing and backs off 1 s (``PULL_INITIAL_BACKOFF``); a
draft request of ten arrays is fourteen objects. One packed array makes it five, which shortens
that window on both directions of every deployment round (measured in docs/DEPLOYMENT.md).

Layout (all little-endian)::

    uint8  count of arrays
    per array:  uint8 name length, name (ASCII), uint8 dtype code (``DTYPES``), uint8 ndim,
                uint32 per dimension
    then the arrays' raw bytes, in the same order, C order, no gaps

``unpack`` is strict: known dtype codes only, at most ``MAX_ARRAYS`` arrays and ``MAX_NDIM``
dimensions, names unique, and the payload exactly as long as the shapes say. It raises
``PackingError`` naming what is wrong; the wire decoder then checks the arrays themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

#: dtype codes: the wire's dtypes and a few more, little-endian only
DTYPES = (np.dtype("bool"), np.dtype("<i1"), np.dtype("<u1"), np.dtype("<i2"), np.dtype("<u2"), np.dtype("<i4"),
          np.dtype("<u4"), np.dtype("<i8"), np.dtype("<u8"), np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8"))
MAX_ARRAYS = 64
MAX_NDIM = 8
#: the one array of a packed record carries this name
PACKED = "packed"


class PackingError(ValueError):
    """A packed buffer that does not follow the layout."""


def _code(dtype: np.dtype) -> int:
    le = dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype
    for code, known in enumerate(DTYPES):
        if le == known:
            return code
    raise PackingError(f"dtype {dtype} cannot be packed (known: {', '.join(str(d) for d in DTYPES)})")


def pack(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """uint8 [n]: the arrays, in order, with the header that ``unpack`` reads back."""
    if len(arrays) > MAX_ARRAYS:
        raise PackingError(f"{len(arrays)} arrays; at most {MAX_ARRAYS}")
    header = bytearray([len(arrays)])
    payload = []
    for name, value in arrays.items():
        a = np.asarray(value)
        raw = name.encode("ascii")
        if not 0 < len(raw) < 256 or a.ndim > MAX_NDIM:
            raise PackingError(f"array {name!r}: name of 1..255 ASCII bytes and at most {MAX_NDIM} dimensions")
        code = _code(a.dtype)
        header += bytes([len(raw)]) + raw + bytes([code, a.ndim])
        header += np.asarray(a.shape, dtype="<u4").tobytes()
        payload.append(np.ascontiguousarray(a, dtype=DTYPES[code]).tobytes())
    return np.frombuffer(bytes(header) + b"".join(payload), dtype=np.uint8)


def unpack(buffer: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a ``pack``ed uint8 buffer (copies, writable), in order."""
    buf = np.asarray(buffer)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise PackingError(f"a packed buffer is a 1-D uint8 array, got {buf.dtype} {list(buf.shape)}")
    data = buf.tobytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise PackingError(f"the header ends early (byte {pos} of {len(data)})")
        out = data[pos:pos + n]
        pos += n
        return out

    count = take(1)[0]
    if count > MAX_ARRAYS:
        raise PackingError(f"{count} arrays; at most {MAX_ARRAYS}")
    specs = []
    for _ in range(count):
        name = take(take(1)[0]).decode("ascii", errors="replace")
        code, ndim = take(2)
        if code >= len(DTYPES):
            raise PackingError(f"array {name!r}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise PackingError(f"array {name!r}: {ndim} dimensions; at most {MAX_NDIM}")
        shape = tuple(int(d) for d in np.frombuffer(take(4 * ndim), dtype="<u4"))
        if not name or any(name == s[0] for s in specs):
            raise PackingError(f"array name {name!r} is empty or repeated")
        specs.append((name, DTYPES[code], shape))
    out = {}
    for name, dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize  # Python ints: a forged shape cannot overflow
        out[name] = np.frombuffer(take(size), dtype=dtype).reshape(shape).copy()
    if pos != len(data):
        raise PackingError(f"{len(data) - pos} bytes after the last array")
    return out
