"""specfed-flwr ClientApp: decode the server's message, draft on the device, reply.

Two query handlers:
* ``query.handshake``: load the draft once for this process, report tokenizer fingerprint,
  draft identity, the node's own settings (node_config) and, in per-device mode, its prompts;
* ``query.draft``: apply the accepted deltas, draft gamma tokens per sequence, reply with the
  compact top-K arrays and metrics.

The work lives in ``device.DeviceRuntime`` (kept per process, so the draft model and the
KV caches stay warm between rounds). In the deployment engine, where every message gets a
fresh ClientApp process, the node's ``worker-address`` (node_config) names a long-lived
draft worker that holds that state instead (see ``worker.py``). A failure becomes a Flower
error reply, never a crash.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .records import config_record, reply_content, request_from_content
from .worker import authkey, call_worker, plain_config

# ``.device`` (torch, transformers, the draft model) is imported only when this process drafts
# itself: with a draft worker the ClientApp process stays thin (numpy + flwr), which matters on
# the deployment engine where every message starts a new ClientApp process.

app = ClientApp()
log = logging.getLogger("specfed_flwr")
_warned = False


def _warn_in_process_load() -> None:
    """A draft message that finds no model in this process had to load it: in the deployment
    engine (a new ClientApp process per message) that happens every round."""
    from .device import RUNTIME

    global _warned
    if not _warned and not RUNTIME.load_counts:
        _warned = True
        log.warning(
            "no draft worker configured for this node (node_config worker-address): loading the draft model "
            "inside the ClientApp process. On Flower's deployment engine every message gets a new process, so "
            "the model is reloaded and the KV caches rebuilt every round; start `specfed-flwr draft-worker "
            "--address 127.0.0.1:PORT` next to the SuperNode and pass --node-config "
            "'worker-address=\"127.0.0.1:PORT\"'")


def _key(message: Message, context: Context) -> tuple[int, int]:
    return (int(message.metadata.run_id), int(context.node_id))


@app.query("handshake")
def handshake(message: Message, context: Context) -> Message:
    server_cfg = plain_config(message.content.config_records["config"])
    address = context.node_config.get("worker-address")
    if address:
        info = call_worker(str(address), ("handshake", _key(message, context), server_cfg,
                                          plain_config(context.node_config)), key=authkey(context.node_config))
    else:
        from .device import RUNTIME, node_settings

        info = RUNTIME.handshake(_key(message, context), node_settings(server_cfg, context.node_config))
    return Message(RecordDict({"info": config_record(info)}), reply_to=message)


@app.query("draft")
def draft(message: Message, context: Context) -> Message:
    request, server_cfg = request_from_content(message.content)
    address = context.node_config.get("worker-address")
    if address:
        reply, metrics = call_worker(
            str(address), ("draft", _key(message, context), plain_config(server_cfg),
                           plain_config(context.node_config), request.arrays(), request.config()),
            key=authkey(context.node_config),
        )
    else:
        from .device import RUNTIME, node_settings

        _warn_in_process_load()
        reply, metrics = RUNTIME.draft(_key(message, context), node_settings(server_cfg, context.node_config), request)
    return Message(reply_content(reply, metrics), reply_to=message)
