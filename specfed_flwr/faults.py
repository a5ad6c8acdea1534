"""Typed faults and events: what went wrong with a device's reply, and what the server did about it.

A fault is decided where it happens (the transport that saw no reply, ``wire.decode_reply`` that
refused a field, the Coordinator that found a reply answering another question) and travels as a
``Fault``: a ``FaultKind`` plus the human-readable reason. Nothing downstream reads the reason to
find the kind again, so rewording a message cannot change the summary's counts
(``tests/test_faults.py`` checks that no kind is derived from text).

The kinds are ``str`` enums whose values are the summary's keys (``summary["faults"][client]``:
kind -> count), e.g. ``"deadline"``, ``"wire-format"``, ``"limit:max-k"``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FaultKind(str, enum.Enum):
    """Why a device's reply was dropped for a round (the summary counts faults per kind)."""

    DEADLINE = "deadline"  # no reply in time, the request or reply expired, or the node is gone
    ERROR_REPLY = "error-reply"  # the device answered with an error (its drafter raised)
    WIRE_FORMAT = "wire-format"  # ``wire.decode_reply`` refused the reply's arrays
    MISSING_RECORD = "missing-record"  # the message carries no 'draft' array record
    PROTOCOL = "protocol"  # a well-formed reply that does not answer what was asked
    INVALID_REPLY = "invalid-reply"  # anything else a device sent that could not be read
    LIMIT_MAX_K = "limit:max-k"  # more top-K slots per position than max-k
    LIMIT_MAX_GAMMA = "limit:max-gamma"  # more drafted positions than max-gamma
    LIMIT_MAX_REPLY_BYTES = "limit:max-reply-bytes"  # a reply larger than max-reply-bytes

    @property
    def limit(self) -> str | None:
        """The config key of the limit this fault hit (counted in the summary's ``limits``), if any."""
        return _LIMIT_KEYS.get(self)


_LIMIT_KEYS = {
    FaultKind.LIMIT_MAX_K: "max_k",
    FaultKind.LIMIT_MAX_GAMMA: "max_gamma",
    FaultKind.LIMIT_MAX_REPLY_BYTES: "max_reply_bytes",
}


class EventKind(str, enum.Enum):
    """Something the server did about a device (counted next to the faults in the summary)."""

    DESELECTED = "deselected"  # missed rounds in a row: benched, probed later (``roster.py``)
    REJOINED = "rejoined"  # a probe answered in time
    WEIGHT_COLLAPSED = "weight-collapsed"  # its agreement fell below weight-drop-below
    WEIGHT_RESTORED = "weight-restored"  # ...and came back
    RESTARTED = "restarted"  # it answered from a new process: its draft caches are gone
    HANDSHAKE_REFUSED = "handshake-refused"  # excluded at the handshake


@dataclass(frozen=True)
class Fault:
    """One dropped reply: its kind (decided where the fault was seen) and the reason to show."""

    kind: FaultKind
    reason: str

    def __str__(self) -> str:
        return self.reason

    @classmethod
    def from_exception(cls, exc: BaseException, reason: str | None = None) -> "Fault":
        """The fault an exception raised while reading a reply stands for: its own ``kind``
        attribute when it has one (``wire.WireFormatError``, ``records.MissingRecordError``),
        else ``INVALID_REPLY``. ``reason`` defaults to the exception's message."""
        kind = getattr(exc, "kind", None)
        return cls(kind if isinstance(kind, FaultKind) else FaultKind.INVALID_REPLY,
                   str(exc) if reason is None else reason)


__all__ = ["EventKind", "Fault", "FaultKind"]
