"""A fault-injecting ClientApp for tests and demos: the real handlers, broken on purpose.

``make_fault_client_app({partition_id: kind, ...})`` wraps ``client_app.handshake`` and
``client_app.draft``; the node whose ``partition-id`` (simulation node_config) maps to a kind
misbehaves that way, and so does a node whose own node_config sets ``fault = "<kind>"`` (how a
SuperNode of the deployment engine is told: ``--node-config 'fault="random"'``, running the
module-level ``app``); every other node is honest:

* ``crash``    raises from round ``crash_round`` on (Flower turns it into an error reply);
* ``nan``      sends NaN probabilities (odd rounds) or out-of-range token ids (even rounds);
* ``random``   sends well-formed but random, confident drafts (``adversarial.RandomDraftProposer``);
* ``slow``     answers every draft request ``slow_seconds`` late (set it above the round deadline);
* ``replay``   sends its first reply again every round (old sequence ids, old drafts);
* ``mismatch`` loads ``mismatch_draft`` (e.g. another vocabulary size) for its handshake.

It lives in the package (not in tests/) because the simulation engine pickles the ClientApp
into Ray actor processes, which must be able to import what it refers to.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from .records import array_record, record_arrays

FAULT_KINDS = ("crash", "nan", "random", "slow", "replay", "mismatch")


def _partition(context: Context) -> int:
    try:
        return int(context.node_config.get("partition-id", -1))
    except (TypeError, ValueError):
        return -1


def _fault_of(faults: Mapping[int, str], context: Context) -> str | None:
    """This node's fault: by partition id, else its own node_config's ``fault``."""
    kind = faults.get(_partition(context))
    if kind is None and context.node_config.get("fault"):
        kind = str(context.node_config["fault"])
        if kind not in FAULT_KINDS:
            raise ValueError(f"node_config fault={kind!r} is not one of {FAULT_KINDS}")
    return kind


def _broken(arrays: dict[str, np.ndarray], round_: int, vocab_size: int) -> dict[str, np.ndarray]:
    """The honest reply's arrays, broken: a NaN / refused probability (odd rounds) or a token id
    outside the vocabulary (even rounds) at the first drafted slot, in whichever layout it travels
    (fixed-k ``[B, G, K]`` arrays, or the flat arrays of the variable-K encodings)."""
    from .wire import layout_of

    ids = arrays["token_ids"]
    if layout_of(arrays) == "fixed-k":
        lengths, probs = arrays["lengths"], arrays["probs"]
        if not np.any(lengths > 0) or ids.ndim != 3 or ids.shape[1] == 0:
            if lengths.size == 0:
                return arrays
            # nothing drafted this round: claim one position anyway, so the reply stays broken
            b, k = lengths.shape[0], max(1, ids.shape[-1] if ids.ndim == 3 else 1)
            ids = arrays["token_ids"] = np.zeros((b, 1, k), dtype=ids.dtype)
            probs = arrays["probs"] = np.zeros((b, 1, k), dtype=probs.dtype)
            lengths[0] = 1
        at = (int(np.argmax(lengths > 0)), 0, 0)
        prob_name, bad_prob = "probs", np.nan
    else:
        if ids.size == 0:
            # nothing drafted: an id array that does not match the counts is broken too
            arrays["token_ids"] = np.zeros(1, dtype=ids.dtype)
            return arrays
        at = (0,)
        prob_name = "prob_codes" if "prob_codes" in arrays else "probs"
        bad_prob = 0 if prob_name == "prob_codes" else np.nan  # code 0 is refused, like a NaN
    if round_ % 2:
        arrays[prob_name][at] = bad_prob
    else:
        arrays["token_ids"][at] = min(vocab_size + 7, int(np.iinfo(ids.dtype).max))
    return arrays


def _random_like(arrays: dict[str, np.ndarray], round_: int, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Well-formed, confident random drafts (``adversarial.RandomDraftProposer``) in the shape and
    layout of the honest reply."""
    from .adversarial import RandomDraftProposer
    from .wire import MAX_COUNT, decode_reply, layout_of, make_reply, reply_to_arrays

    honest = decode_reply(arrays, vocab_size=vocab_size, max_k=MAX_COUNT, max_gamma=MAX_COUNT, encoding=layout_of(arrays))
    k = max(1, honest.k)
    fake = RandomDraftProposer(vocab_size, seed=seed).propose(
        honest.seq_ids.tolist(), honest.lengths.tolist(), k, temperature=0.0, sampling="sparse")
    g = honest.token_ids.shape[1]
    ids = np.zeros((honest.batch_size, g, k), dtype=np.int64)
    probs = np.zeros((honest.batch_size, g, k), dtype=np.float32)
    ids[:, : fake.token_ids.shape[1]] = fake.token_ids[:, :g, :k]
    probs[:, : fake.probs.shape[1]] = fake.probs[:, :g, :k]
    counts = None if honest.counts is None else np.minimum(honest.counts, k)
    return reply_to_arrays(make_reply(honest.seq_ids, honest.lengths, ids, probs, vocab_size,
                                      encoding=honest.encoding, counts=counts))


def _with_arrays(reply: Message, arrays: Mapping[str, np.ndarray]) -> Message:
    reply.content["draft"] = array_record(arrays)
    return reply


def make_fault_client_app(
    faults: Mapping[int, str],
    *,
    crash_round: int = 3,
    slow_seconds: float = 2.0,
    vocab_size: int = 1024,
    mismatch_draft: str = "tiny:0:512",
    seed: int = 0,
) -> ClientApp:
    faults = {int(p): str(k) for p, k in faults.items()}
    unknown = sorted(set(faults.values()) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; choose from {FAULT_KINDS}")
    app = ClientApp()
    replayed: dict[tuple[int, int], RecordDict] = {}

    @app.query("handshake")
    def handshake(message: Message, context: Context) -> Message:
        from . import client_app as real

        if _fault_of(faults, context) == "mismatch":
            context.node_config["draft"] = mismatch_draft
        reply = real.handshake(message, context)
        if not reply.has_error():
            reply.content.config_records["info"]["partition-id"] = _partition(context)  # for the tests' bookkeeping
        return reply

    @app.query("draft")
    def draft(message: Message, context: Context) -> Message:
        from . import client_app as real

        kind = _fault_of(faults, context)
        round_ = int(message.content.config_records["config"].get("round", 0))
        if kind == "crash" and round_ >= crash_round:
            raise RuntimeError(f"injected crash at round {round_}")
        if kind == "slow":
            time.sleep(slow_seconds)
        if kind == "replay":
            key = (int(message.metadata.run_id), int(context.node_id))
            if key in replayed:
                return Message(replayed[key], reply_to=message)
            reply = real.draft(message, context)
            replayed[key] = reply.content
            return reply
        reply = real.draft(message, context)
        if kind not in ("nan", "random"):
            return reply
        arrays = record_arrays(reply.content.array_records["draft"])  # fresh, writable copies
        if kind == "nan":
            return _with_arrays(reply, _broken(arrays, round_, vocab_size))
        return _with_arrays(reply, _random_like(arrays, round_, vocab_size, seed * 100_003 + round_ * 1009 + _partition(context)))

    return app


#: every node honest unless its node_config names a fault (``fault = "random"``, ...): the
#: ClientApp a deployment test gives its device runtimes (``--app specfed_flwr.faultapp:app``)
app = make_fault_client_app({})
