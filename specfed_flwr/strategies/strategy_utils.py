"""What ``SpecFedStrategy`` needs besides its hooks: Flower's grid as a pipeline transport, the
one mapping of Flower error replies to faults, and the tracking of which process answered.

Kept apart so that the Strategy reads as Flower's own do: a short loop over configure/aggregate
hooks (``SpecFedStrategy.configure_draft`` / ``aggregate_draft``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any, Callable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from ..faults import EventKind, Fault, FaultKind
from ..pipeline import InFlight
from ..protocol import DraftRequest, RoundPlan
from ..records import STANDBY_MESSAGE
from .reply_puller import ReplyPuller
from .standby import StandbyPlanner

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from ..coordinator import Coordinator


def short_reason(reason: object, limit: int = 240) -> str:
    """One line out of an error reply's reason (Flower puts whole remote tracebacks there):
    the innermost exception's message when it can be found, cut to ``limit`` characters."""
    text = str(reason)
    marker = "Message: "
    if marker in text:  # ClientAppException: "... occurred. Message: <the ClientApp's own error>"
        text = text[text.rfind(marker) + len(marker):]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("^~ ")]
    text = lines[0] if lines else ""
    text = text.rstrip("'>").strip()
    return text[:limit] + ("..." if len(text) > limit else "")


#: Flower error codes that mean "no reply came" (the message or its reply expired in the SuperLink:
#: requests carry ttl = the deadline; or the node is gone), as opposed to a device error
_EXPIRED_CODES = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
_GONE_CODES = (ErrorCode.NODE_UNAVAILABLE,)


def error_reply_fault(message: Message, deadline_s: float, what: str = "round") -> Fault:
    """The fault an error reply stands for: the one mapping of Flower's error codes, for
    handshake and draft replies alike. Expired or node gone -> ``DEADLINE``; anything else is
    the device's own error -> ``ERROR_REPLY``."""
    code = int(getattr(message.error, "code", -1))
    if code in _EXPIRED_CODES:
        return Fault(FaultKind.DEADLINE, f"no reply within the {deadline_s:g} s {what} deadline (expired)")
    if code in _GONE_CODES:
        return Fault(FaultKind.DEADLINE, "no reply: the SuperLink reports the node unavailable")
    return Fault(FaultKind.ERROR_REPLY, f"error reply from the device: {short_reason(message.error.reason)}")


def _standby_gap(reply: Message) -> float | None:
    """The ``standby_gap_s`` a device reports in a draft reply (None: none, or not a draft reply)."""
    try:
        metrics = reply.content.metric_records.get("metrics") if not reply.has_error() else None
        gap = metrics.get("standby_gap_s") if metrics is not None else None
        return float(gap) if gap is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def standby_message(node_id: int, hold_s: float, round_: int, ttl: float) -> Message:
    """A ``query.standby`` message: the device answers it after holding it ``hold_s`` seconds
    (``standby.py`` says why)."""
    content = RecordDict({"standby": ConfigRecord({"hold_s": float(hold_s)})})
    return Message(content, dst_node_id=int(node_id), message_type=STANDBY_MESSAGE, group_id=str(round_),
                   ttl=float(ttl))


class GridTransport:
    """Flower's grid (simulation or deployment) as a ``pipeline.Transport``: ``push_messages`` and
    ``pull_messages`` never block, so several rounds can be in flight.

    ``standby``: on the deployment engine, which nodes get a standby message queued behind their
    draft request (``standby.StandbyPlanner``); None sends none. ``puller``: on the deployment
    engine, replies are pulled one call per node in background threads (``reply_puller.py``: a
    reply whose objects never arrive must not hold up the other nodes'); None pulls all in one call."""

    def __init__(self, grid: "Grid", configure: Callable[[RoundPlan], dict[str, Message]],
                 aggregate: Callable[[dict[str, DraftRequest], dict[str, Message]], tuple], poll_interval: float,
                 *, standby: StandbyPlanner | None = None, standby_ttl: float = 60.0,
                 puller: ReplyPuller | None = None):
        self.grid = grid
        self.configure = configure
        self.aggregate = aggregate
        self.poll_interval = poll_interval
        self.standby = standby
        self.standby_ttl = standby_ttl
        self.puller = puller
        self._standby_ids: dict[str, str] = {}  # pushed standby -> node, until its reply is pulled (and dropped)

    def push(self, plan: RoundPlan, timeout: float) -> InFlight:
        now = time.perf_counter()
        messages = self.configure(plan)
        flight = InFlight(plan, now, now + timeout, set())
        if not messages:
            return flight
        holds = self.standby.plan(list(messages), now) if self.standby is not None else {}
        standbys = [standby_message(int(name), hold, plan.round, self.standby_ttl) for name, hold in holds.items()]
        try:
            ids = [str(i) for i in self.grid.push_messages(list(messages.values()) + standbys) if i]
        except Exception as exc:  # a transport hiccup costs this round's drafts, not the run
            log(WARNING, "pushing %d message(s) failed (%s: %s); this round goes without them",
                len(messages), type(exc).__name__, exc)
            if self.standby is not None:
                self.standby.closed(list(messages))
            return flight
        # map replies to nodes by the id each pushed message got (a grid returns only the ids it
        # stored, so the position in the returned list is not enough)
        stored = set(ids)
        node_of = {m.metadata.message_id: name for name, m in messages.items() if m.metadata.message_id in stored}
        if not node_of and len(ids) == len(messages) + len(standbys):
            node_of = dict(zip(ids, messages))
        self._standby_ids.update({m.metadata.message_id: str(int(m.metadata.dst_node_id)) for m in standbys
                                  if m.metadata.message_id in stored})
        flight.handles = node_of
        flight.expected = set(node_of.values())
        if self.standby is not None:
            self.standby.closed([name for name in messages if name not in flight.expected])  # never stored
        return flight

    def pull(self, flights: list[InFlight]) -> None:
        pending = {mid: f for f in flights for mid, name in f.handles.items() if name not in f.raw}
        if not pending and not self._standby_ids:
            return
        if self.puller is None:
            replies = self.grid.pull_messages(list(pending) + list(self._standby_ids))
        else:
            by_node: dict[str, list[str]] = {}
            for mid, flight in pending.items():
                by_node.setdefault(flight.handles[mid], []).append(mid)
            for mid, node in self._standby_ids.items():
                by_node.setdefault(node, []).append(mid)
            replies = self.puller.pull(by_node)
        for reply in replies:
            mid = reply.metadata.reply_to_message_id
            if mid in self._standby_ids:  # a standby's answer carries nothing: drop it
                del self._standby_ids[mid]
                continue
            flight = pending.pop(mid, None)
            if flight is not None:
                name = flight.handles[mid]
                now = time.perf_counter()
                flight.raw[name] = reply
                flight.arrivals[name] = now
                if self.standby is not None:
                    self.standby.delivered(name, now, standby_gap=_standby_gap(reply))

    def discard(self, flight: InFlight) -> None:
        """A round nobody will decode: its nodes' standby bookkeeping closes as for a lost reply
        (a late reply stays on the SuperLink until its ttl)."""
        if self.standby is not None:
            self.standby.closed([name for name in flight.handles.values() if name not in flight.raw])

    def decode(self, flight: InFlight):
        if self.standby is not None:
            self.standby.closed([name for name in flight.handles.values() if name not in flight.raw])
        return self.aggregate(flight.plan.requests, flight.raw)

    def wait(self, seconds: float) -> None:
        time.sleep(seconds)


@dataclass
class NodeProcesses:
    """Which process answered each node's messages.

    One process id per node for the whole run is what a warm device runtime gives. One change is
    a restarted device process (its caches are gone); changes in a row mean a new ClientApp
    process per message (Flower's stock deployment path) or, in simulation, several Ray actors
    serving the node: deltas are useless then, so whole sequences are sent from now on."""

    simulation: bool
    last: dict[str, Any] = field(default_factory=dict)  # node -> newest pid
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> pid -> replies
    changes: dict[str, int] = field(default_factory=dict)  # pid changes in a row
    ephemeral: set[str] = field(default_factory=set)  # nodes that keep nothing between messages

    def start(self, infos: dict[str, dict[str, Any]]) -> None:
        for name, info in infos.items():
            pid = info.get("pid")
            self.last[name] = pid
            self.counts[name] = {str(pid): 1} if pid is not None else {}

    def observe(self, coordinator: "Coordinator", name: str, pid: Any) -> None:
        if pid is not None:
            counts = self.counts.setdefault(name, {})
            counts[str(int(pid))] = counts.get(str(int(pid)), 0) + 1
        previous = self.last.get(name)
        if pid is None or previous is None or pid == previous:
            self.changes[name] = 0
        else:
            self.changes[name] = self.changes.get(name, 0) + 1
            coordinator.forget_client_state(name)
            if self.changes[name] == 1 and not self.simulation:
                coordinator.note_event(name, f"answered from a new process (pid {previous} -> {pid}): its device "
                                             "runtime restarted, or it runs a new ClientApp process per message; "
                                             "resending whole sequences", EventKind.RESTARTED)
            elif name not in self.ephemeral:
                self.ephemeral.add(name)
                if self.simulation:
                    log(WARNING, "node %s answers from several simulation actors: sending whole sequences from now "
                        "on (each actor keeps its own draft copy); give the ClientApp all CPUs (client_resources "
                        "num_cpus) for one warm actor", name)
                else:
                    log(WARNING, "node %s answers from a new process every message (Flower's stock ClientApp "
                        "path): sending whole sequences and reloading its draft each round; start its SuperNode "
                        "with --isolation process and `specfed-flwr device-runtime` next to it "
                        "(docs/DEPLOYMENT.md)", name)
        self.last[name] = pid if pid is not None else previous

    def forget_ephemeral(self, coordinator: "Coordinator") -> None:
        for name in self.ephemeral:
            coordinator.forget_client_state(name)  # it keeps nothing between messages


def note_state_lost(coordinator: "Coordinator", name: str, round_: int) -> None:
    """The device answered without the state the delta builds on (another process): no drafts this
    round, not a fault; whole sequences next round."""
    coordinator.forget_client_state(name)
    stats = coordinator.client_stats[name]
    stats.resyncs += 1
    stats.resync_rounds.append(round_)
    log(INFO, "node %s lost its draft state (another process?): resending whole sequences", name)
