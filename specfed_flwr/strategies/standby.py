"""Standby messages: keep a deployment SuperNode from falling into Flower's 3 s idle sleep.

Why: a SuperNode (flwr 1.42, ``supernode/start_client_internal.py``) pulls a message, waits for
the ClientApp's reply, pushes it and pulls again at once. In a strict round the server has not
verified that reply yet, so the pull finds nothing and the SuperNode sleeps a hard-coded 3 s
before it looks again: the next request waits in the SuperLink for most of that time. Flower
offers no way to shorten the sleep short of patching it.

What: when the server pushes a node's draft request and nothing else is queued for that node,
it queues one small ``query.standby`` message right behind it. The SuperNode pulls the standby
right after pushing its draft reply (so it does not sleep), and the device holds it for
``hold_s`` -- about as long as the server takes to turn a reply into the node's next request --
before answering it. By the time the SuperNode pulls again, the next request is queued.

The cost: one tiny message per node and round through the SuperLink, and a held standby that
delays a request queued behind it by at most the hold. Standbys go only to nodes whose handshake
reports the persistent device runtime (``specfed-flwr device-runtime``): on Flower's stock path
every message starts a new ClientApp process (~3 s), which is what the standby is meant to beat.

The hold is learned: the server measures, per node, the time from a reply's arrival to the
push of that node's next request (its turnaround), and sends the median of the recent ones plus
a margin for the reply's own trip through the SuperLink (``TRANSIT_MARGIN_S``). Too short a hold
costs the 3 s sleep; too long a hold costs only the excess, so the margin errs long.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

#: hold before the server has measured a turnaround (s)
INITIAL_HOLD_S = 1.0
#: the reply's trip from the SuperNode to the server: a SuperLink store, the server's poll and, at
#: times, Flower's 1 s first-object pull back-off (s)
TRANSIT_MARGIN_S = 0.5
#: holds are at least MIN_HOLD_S; a node whose hold would exceed MAX_HOLD_S gets no standby: with
#: the SuperNode's 0.5 s reply checks on top, such a hold lasts as long as the 3 s sleep it replaces
#: (seen in strict rounds where the other node replies much later: the turnaround includes that wait)
MIN_HOLD_S = 0.2
MAX_HOLD_S = 2.0
#: turnarounds the median looks at, per node
WINDOW = 8
#: a device reports, with each draft reply that followed a standby, the gap from its standby answer
#: to that request (``standby_gap_s``): about the SuperNode's 0.5 s reply check when the request was
#: already queued; a longer gap means the SuperNode found nothing and slept (counted as ``slept``).
#: Lengthening a node's holds after such sleeps was tried and measured no better (2-node strict runs
#: of 11 rounds, median round 3.96-4.14 s against 4.12 s): in strict rounds a node's turnaround
#: includes waiting for the slowest node, which node that is changes every round (one node's sleep
#: makes it the late one of the next round), and a hold long enough for the early node's wait
#: delays the late node's request by as much as it saves
SLEPT_GAP_S = 1.5


@dataclass
class StandbyPlanner:
    """Decides which draft requests get a standby behind them, and for how long it is held.

    ``nodes``: the node names that take standbys (their handshake reported the persistent device
    runtime). Driven by the transport: ``plan`` when it pushes, ``delivered`` when a draft reply
    arrives, ``closed`` when a round is decoded (its unanswered requests are gone).
    """

    nodes: set[str]
    turnarounds: dict[str, deque] = field(default_factory=dict)  # node -> recent turnarounds (s)
    last_reply: dict[str, float] = field(default_factory=dict)  # node -> arrival time of its newest reply
    open_requests: dict[str, int] = field(default_factory=dict)  # node -> draft requests pushed, not answered
    sent: int = 0  # standbys pushed this run
    sent_to: dict[str, int] = field(default_factory=dict)  # node -> standbys pushed to it
    holds: list[float] = field(default_factory=list)  # the hold of each standby pushed
    slept: int = 0  # standbys after which the node's SuperNode slept anyway (its device's ``standby_gap_s``)

    def hold_for(self, node: str) -> float | None:
        """Seconds the device should hold a standby of ``node`` before answering it; None when that
        would exceed ``MAX_HOLD_S`` (no standby then)."""
        recent = self.turnarounds.get(node)
        if not recent:
            return INITIAL_HOLD_S
        hold = max(MIN_HOLD_S, statistics.median(recent) + TRANSIT_MARGIN_S)
        return hold if hold <= MAX_HOLD_S else None

    def plan(self, nodes: list[str], now: float) -> dict[str, float]:
        """The draft requests about to be pushed to ``nodes`` at ``now``: records each node's
        turnaround (since its last reply) and returns {node: hold} for those that get a standby
        behind the request -- the standby nodes with no other request still open (a request
        already queued keeps the SuperNode awake by itself)."""
        holds = {}
        for node in nodes:
            replied = self.last_reply.pop(node, None)
            if replied is not None:
                self.turnarounds.setdefault(node, deque(maxlen=WINDOW)).append(max(0.0, now - replied))
            if node in self.nodes and self.open_requests.get(node, 0) == 0:
                hold = self.hold_for(node)
                if hold is not None:
                    holds[node] = hold
            self.open_requests[node] = self.open_requests.get(node, 0) + 1
        self.sent += len(holds)
        for node in holds:
            self.sent_to[node] = self.sent_to.get(node, 0) + 1
        self.holds.extend(holds.values())
        return holds

    def delivered(self, node: str, now: float, standby_gap: float | None = None) -> None:
        """A draft reply of ``node`` arrived at ``now``; ``standby_gap``: what its device reported
        (the request followed a standby; see ``SLEPT_GAP_S``)."""
        if standby_gap is not None and standby_gap > SLEPT_GAP_S:
            self.slept += 1
        self.last_reply[node] = now
        self.open_requests[node] = max(0, self.open_requests.get(node, 0) - 1)

    def closed(self, unanswered: list[str]) -> None:
        """A round was decoded with no reply from ``unanswered``: their requests are no longer open."""
        for node in unanswered:
            self.open_requests[node] = max(0, self.open_requests.get(node, 0) - 1)

    def stats(self) -> dict[str, object]:
        """What the summary reports: standbys sent (in all, per node), those after which the node
        slept anyway (as its device reported), and their median hold."""
        return {"sent": self.sent, "sent_to": dict(self.sent_to), "slept": self.slept,
                "median_hold_s": statistics.median(self.holds) if self.holds else 0.0}
