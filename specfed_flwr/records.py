"""Our plain dataclasses <-> Flower message records (ArrayRecord / ConfigRecord / MetricRecord)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from .faults import FaultKind
from .protocol import DraftRequest
from .packing import PACKED, PackingError, pack, unpack
from .wire import DraftReply, WireFormatError, reply_to_arrays

DRAFT_MESSAGE = "query.draft"
HANDSHAKE_MESSAGE = "query.handshake"
#: a message the device holds before answering, so its SuperNode is not idle-sleeping when the next
#: request arrives (``strategies/standby.py``)
STANDBY_MESSAGE = "query.standby"
#: set (to "persistent") by ``specfed-flwr device-runtime`` in its own process: the handshake reports
#: it, and only such nodes get standby messages
DEVICE_RUNTIME_ENV = "SPECFED_DEVICE_RUNTIME"


class MissingRecordError(KeyError):
    """A draft reply message without its 'draft' array record (a fault of kind missing-record)."""

    kind = FaultKind.MISSING_RECORD


def array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """All arrays packed into one ``Array`` (``packing``: one Flower object instead of one per array)."""
    return ArrayRecord({PACKED: Array(pack(arrays))})


def record_arrays(record: ArrayRecord, sender: str = "the sender") -> dict[str, np.ndarray]:
    """The named arrays of a record: unpacked from its one ``packed`` array, or (a ClientApp or
    server that does not pack) its arrays as they are."""
    if PACKED in record:
        try:
            return unpack(record[PACKED].numpy())
        except PackingError as exc:
            raise WireFormatError(PACKED, sender, str(exc)) from exc
    return {name: arr.numpy() for name, arr in record.items()}


def _config_value(value: Any) -> Any:
    """ConfigRecord takes python scalars and same-type lists, not numpy scalars."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_config_value(v) for v in value]
    return value


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord({k: _config_value(v) for k, v in values.items() if v is not None})


def request_content(request: DraftRequest, extra: Mapping[str, Any] | None = None) -> RecordDict:
    cfg = dict(request.config())
    cfg.update(extra or {})
    return RecordDict({"request": array_record(request.arrays()), "config": config_record(cfg)})


def request_from_content(content: RecordDict) -> tuple[DraftRequest, dict[str, Any]]:
    arrays = record_arrays(content.array_records["request"])
    cfg = dict(content.config_records["config"])
    return DraftRequest.from_parts(arrays, cfg), cfg


def reply_content(reply: DraftReply | Mapping[str, np.ndarray], metrics: Mapping[str, float | int]) -> RecordDict:
    arrays = reply_to_arrays(reply) if isinstance(reply, DraftReply) else reply
    return RecordDict(
        {
            "draft": array_record(arrays),
            "metrics": MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in metrics.items()}),
        }
    )


def reply_arrays(content: RecordDict, client: str = "the device") -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw arrays and metrics of a draft reply (decoded and validated by ``wire.decode_reply``)."""
    if "draft" not in content.array_records:
        raise MissingRecordError("the reply has no 'draft' array record")
    arrays = record_arrays(content.array_records["draft"], client)
    metrics = dict(content.metric_records["metrics"]) if "metrics" in content.metric_records else {}
    return arrays, metrics
