"""specfed-flwr ClientApp: decode the server's message, draft on the device, reply.

Three query handlers:
* ``query.handshake``: load the draft once for this process, report tokenizer fingerprint,
  draft identity, the node's own settings (node_config) and, in per-device mode, its prompts;
* ``query.draft``: apply the accepted deltas, draft gamma tokens per sequence, reply with the
  compact top-K arrays and metrics (with this process's pid and draft-load count);
* ``query.standby``: hold the message for the time the server asks, then answer it empty, so
  the SuperNode is busy (not in its 3 s idle sleep) when the next request arrives
  (``strategies/standby.py``).

The work lives in ``device.RUNTIME`` (one per process), so the draft model and the KV caches stay
warm for as long as the process lives. On the deployment engine that is the whole run when the
SuperNode's messages go through ``specfed-flwr device-runtime`` (one long-lived process, see
``persistent_runtime.py``); on Flower's stock path every message gets a fresh ``flwr-clientapp``
process, which then loads the draft again (correct, slow: warned once per process). A failure
becomes a Flower error reply, never a crash.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .records import config_record, reply_content, request_from_content

# ``.device`` (torch, transformers, the draft model) is imported by the first handler call, not at
# import time: loading the app (``flwr-clientapp``, the device runtime, a Ray actor) stays cheap.

#: a device never holds a standby longer than this, whatever a server asks (s)
STANDBY_HOLD_LIMIT_S = 5.0

app = ClientApp()
log = logging.getLogger("specfed_flwr")
_warned = False
#: (run, node) -> time.monotonic() when this process answered that node's last standby; the next
#: draft request's arrival measures the gap the server needs to judge its hold (``standby_gap_s``)
_standby_answered: dict[tuple[int, int], float] = {}


def _warn_in_process_load() -> None:
    """A draft message that finds no model in this process had to load it: on the deployment
    engine's stock path (a new ClientApp process per message) that happens every round."""
    from .device import RUNTIME

    global _warned
    if not _warned and not RUNTIME.load_counts:
        _warned = True
        log.warning(
            "this ClientApp process has no draft model yet: loading it for this draft message (a device runtime "
            "restarted mid-run does this once). On Flower's deployment engine's stock path every message gets a "
            "new process, so the model is reloaded and the "
            "KV caches rebuilt every round; start the SuperNode with --isolation process and run "
            "`specfed-flwr device-runtime --runtime-api-address 127.0.0.1:PORT --insecure` next to it "
            "(PORT = the SuperNode's --port), which keeps one ClientApp process for all messages")


def _key(message: Message, context: Context) -> tuple[int, int]:
    return (int(message.metadata.run_id), int(context.node_id))


@app.query("handshake")
def handshake(message: Message, context: Context) -> Message:
    from .device import RUNTIME, node_settings

    server_cfg = dict(message.content.config_records["config"])
    info = RUNTIME.handshake(_key(message, context), node_settings(server_cfg, context.node_config))
    return Message(RecordDict({"info": config_record(info)}), reply_to=message)


@app.query("draft")
def draft(message: Message, context: Context) -> Message:
    from .device import RUNTIME, node_settings

    arrived = time.monotonic()
    key = _key(message, context)
    request, server_cfg = request_from_content(message.content)
    _warn_in_process_load()
    reply, metrics = RUNTIME.draft(key, node_settings(server_cfg, context.node_config), request)
    answered = _standby_answered.pop(key, None)
    if answered is not None:
        # from this node's standby answer to this request: ~0.5 s when the request was already
        # queued, the SuperNode's 3 s idle sleep and more when the hold ended too early
        metrics = {**metrics, "standby_gap_s": arrived - answered}
    return Message(reply_content(reply, metrics), reply_to=message)


@app.query("standby")
def standby(message: Message, context: Context | None) -> Message:
    hold = float(message.content.config_records["standby"]["hold_s"])
    hold = min(max(hold, 0.0), STANDBY_HOLD_LIMIT_S) if hold == hold else 0.0  # NaN holds nothing
    time.sleep(hold)
    if context is not None:
        _standby_answered[_key(message, context)] = time.monotonic()
    return Message(RecordDict({"standby": ConfigRecord({"held_s": hold})}), reply_to=message)
