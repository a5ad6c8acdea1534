"""Standby messages (``strategies/standby.py``): which draft requests get one, how long the device
holds it, and that their replies never reach the rounds. The deployment tests run them for real
(``test_deployment.py``: the persistent runtime reports itself, the server queues standbys)."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from specfed_flwr.protocol import DraftRequest, RoundPlan
from specfed_flwr.records import STANDBY_MESSAGE
from specfed_flwr.strategies.standby import (
    INITIAL_HOLD_S,
    MAX_HOLD_S,
    MIN_HOLD_S,
    TRANSIT_MARGIN_S,
    StandbyPlanner,
)
from specfed_flwr.strategies.strategy_utils import GridTransport


# ---- the planner -------------------------------------------------------------------------------


def test_first_request_gets_the_initial_hold_and_only_standby_nodes_get_one() -> None:
    planner = StandbyPlanner({"1"})
    assert planner.plan(["1", "2"], now=0.0) == {"1": INITIAL_HOLD_S}
    assert planner.sent == 1


def test_no_standby_while_another_request_of_the_node_is_open() -> None:
    """A request already queued keeps the SuperNode awake: a standby between them would only delay it."""
    planner = StandbyPlanner({"1"})
    assert planner.plan(["1"], now=0.0) == {"1": INITIAL_HOLD_S}
    assert planner.plan(["1"], now=0.1) == {}  # pipelined: the first is still out
    planner.delivered("1", now=1.0)
    assert planner.plan(["1"], now=1.2) == {}  # the second is still out
    planner.delivered("1", now=2.0)
    planner.delivered("1", now=2.1)  # all three answered: nothing of the node is queued any more
    assert "1" in planner.plan(["1"], now=2.3)


def test_hold_is_the_median_turnaround_plus_margin_clamped() -> None:
    planner = StandbyPlanner({"1"})
    t = 0.0
    for turnaround in (0.3, 0.5, 0.4):
        planner.plan(["1"], now=t)
        planner.delivered("1", now=t + 1.0)
        t += 1.0 + turnaround
    holds = planner.plan(["1"], now=t)
    # turnarounds recorded at each push after a reply: 0.3, 0.5, 0.4 -> median 0.4
    assert holds["1"] == pytest.approx(0.4 + TRANSIT_MARGIN_S)
    slow = StandbyPlanner({"1"})
    slow.plan(["1"], now=0.0)
    slow.delivered("1", now=1.0)
    assert slow.plan(["1"], now=30.0) == {}  # a hold as long as the 3 s sleep gains nothing: no standby
    at_cap = StandbyPlanner({"1"})
    at_cap.plan(["1"], now=0.0)
    at_cap.delivered("1", now=1.0)
    assert at_cap.plan(["1"], now=1.0 + MAX_HOLD_S - TRANSIT_MARGIN_S)["1"] == pytest.approx(MAX_HOLD_S)
    fast = StandbyPlanner({"1"})
    fast.plan(["1"], now=0.0)
    fast.delivered("1", now=1.0)
    assert fast.plan(["1"], now=1.0)["1"] == max(MIN_HOLD_S, TRANSIT_MARGIN_S)


def test_sleeps_the_devices_report_are_counted() -> None:
    """A device reports, with a draft reply that followed a standby, the gap from its standby answer
    to the request: the SuperNode's reply check when the request was queued, its 3 s sleep when not."""
    planner = StandbyPlanner({"1"})
    planner.plan(["1"], now=0.0)
    planner.delivered("1", now=1.0)  # no standby before this request: nothing to judge
    planner.plan(["1"], now=1.5)
    planner.delivered("1", now=3.0, standby_gap=0.4)
    planner.plan(["1"], now=3.5)
    planner.delivered("1", now=8.0, standby_gap=3.3)
    assert planner.slept == 1 and planner.stats()["slept"] == 1


def test_a_request_closed_unanswered_reopens_the_node() -> None:
    planner = StandbyPlanner({"1"})
    planner.plan(["1"], now=0.0)
    planner.closed(["1"])  # its round was decoded without a reply (deadline)
    assert "1" in planner.plan(["1"], now=5.0)


# ---- the transport -----------------------------------------------------------------------------


class EchoGrid:
    """Stores messages like a SuperLink (ids assigned on push) and answers each at once."""

    def __init__(self):
        self.pushed: list[Message] = []
        self.inbox: list[Message] = []
        self.pull_calls: list[list[str]] = []

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            self.pushed.append(m)
            self.inbox.append(Message(RecordDict({"echo": ConfigRecord({"ok": 1})}), reply_to=m))
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        self.pull_calls.append(list(message_ids))
        out = [m for m in self.inbox if m.metadata.reply_to_message_id in wanted]
        self.inbox = [m for m in self.inbox if m.metadata.reply_to_message_id not in wanted]
        return out


def _plan(round_: int, nodes: list[str]) -> RoundPlan:
    req = DraftRequest(seq_ids=np.array([0], dtype=np.int64), starts=np.array([0], dtype=np.int64),
                       delta_offsets=np.array([0, 1], dtype=np.int64), delta_tokens=np.array([5], dtype=np.int32),
                       gammas=np.array([2], dtype=np.int32))
    return RoundPlan(round=round_, cohort=None, seq_ids=[0], requests={n: req for n in nodes}, committed={0: 1})


def _configure(plan: RoundPlan) -> dict[str, Message]:
    return {n: Message(RecordDict({"q": ConfigRecord({"round": plan.round})}), dst_node_id=int(n),
                       message_type="query.draft", group_id=str(plan.round)) for n in plan.requests}


def test_transport_queues_a_standby_behind_the_request_and_drops_its_reply(flower_task_identity) -> None:
    grid = EchoGrid()
    planner = StandbyPlanner({"1"})
    transport = GridTransport(grid, _configure, lambda requests, raw: raw, 0.01, standby=planner, standby_ttl=9.0)
    flight = transport.push(_plan(1, ["1", "2"]), timeout=5.0)
    types = [(m.metadata.message_type, int(m.metadata.dst_node_id)) for m in grid.pushed]
    # the node's request first, its standby right behind it; node 2 (stock path) gets none
    assert types == [("query.draft", 1), ("query.draft", 2), (STANDBY_MESSAGE, 1)]
    standby = grid.pushed[-1]
    assert standby.content.config_records["standby"]["hold_s"] == INITIAL_HOLD_S
    assert standby.metadata.ttl == 9.0
    transport.pull([flight])
    assert set(flight.raw) == {"1", "2"}  # the draft replies, and nothing else
    assert all(m.metadata.message_type != STANDBY_MESSAGE for m in flight.raw.values())
    assert grid.inbox == []  # the standby's reply was pulled (and dropped), not left in the SuperLink
    transport.decode(flight)
    grid.pull_calls.clear()
    transport.pull([])  # nothing pending: no pull at all
    assert grid.pull_calls == []


def test_transport_hands_the_reported_standby_gap_to_the_planner(flower_task_identity) -> None:
    from flwr.app import MetricRecord

    class GapGrid(EchoGrid):
        def push_messages(self, messages):
            ids = super().push_messages(messages)
            for i, m in enumerate(self.inbox):
                if m.metadata.message_type == "query.draft":
                    self.inbox[i] = Message(RecordDict({"metrics": MetricRecord({"standby_gap_s": 3.2})}),
                                            reply_to=self.pushed[i])
            return ids

    grid = GapGrid()
    planner = StandbyPlanner({"1"})
    transport = GridTransport(grid, _configure, lambda requests, raw: raw, 0.01, standby=planner)
    flight = transport.push(_plan(1, ["1"]), timeout=5.0)
    transport.pull([flight])
    assert set(flight.raw) == {"1"} and planner.slept == 1


def test_transport_without_a_planner_sends_no_standby(flower_task_identity) -> None:
    grid = EchoGrid()
    transport = GridTransport(grid, _configure, lambda requests, raw: raw, 0.01)
    transport.push(_plan(1, ["1"]), timeout=5.0)
    assert [m.metadata.message_type for m in grid.pushed] == ["query.draft"]


# ---- the device's handler ----------------------------------------------------------------------


@pytest.mark.parametrize("asked,held", [(0.05, 0.05), (-3.0, 0.0), (float("nan"), 0.0)])
def test_client_holds_the_standby_then_answers_it(flower_task_identity, asked, held) -> None:
    from specfed_flwr import client_app

    message = Message(RecordDict({"standby": ConfigRecord({"hold_s": asked})}), dst_node_id=1,
                      message_type=STANDBY_MESSAGE, group_id="1")
    message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    started = time.perf_counter()
    reply = client_app.standby(message, context=None)
    elapsed = time.perf_counter() - started
    assert reply.content.config_records["standby"]["held_s"] == held
    assert held <= elapsed < held + 0.5


def test_client_measures_the_gap_from_its_standby_answer(flower_task_identity, monkeypatch) -> None:
    """The handler notes when it answered a node's standby; the node's next draft request reports
    the time since (``standby_gap_s``)."""
    from types import SimpleNamespace

    from specfed_flwr import client_app

    monkeypatch.setattr(client_app, "_standby_answered", {})
    message = Message(RecordDict({"standby": ConfigRecord({"hold_s": 0.0})}), dst_node_id=1,
                      message_type=STANDBY_MESSAGE, group_id="1")
    message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    client_app.standby(message, context=SimpleNamespace(node_id=1))
    (key, answered), = client_app._standby_answered.items()
    assert key == (int(message.metadata.run_id), 1) and answered <= time.monotonic()


def test_client_caps_a_huge_hold(flower_task_identity, monkeypatch) -> None:
    from specfed_flwr import client_app

    slept = []
    monkeypatch.setattr(client_app.time, "sleep", slept.append)
    message = Message(RecordDict({"standby": ConfigRecord({"hold_s": 1e9})}), dst_node_id=1,
                      message_type=STANDBY_MESSAGE, group_id="1")
    message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    reply = client_app.standby(message, context=None)
    assert slept == [client_app.STANDBY_HOLD_LIMIT_S]
    assert reply.content.config_records["standby"]["held_s"] == client_app.STANDBY_HOLD_LIMIT_S


# ---- pulling replies one call per node (``reply_puller.py``) -----------------------------------


class StuckGrid:
    """Node 2's replies never finish pulling (its objects never arrive); node 1's come at once."""

    def __init__(self):
        import threading

        self.release = threading.Event()
        self.calls: list[list[str]] = []

    def pull_messages(self, message_ids):
        self.calls.append(list(message_ids))
        if any(mid.startswith("n2") for mid in message_ids):
            self.release.wait(30)
            return []
        return [f"reply-{mid}" for mid in message_ids]


def test_a_blocked_pull_does_not_hold_up_other_nodes() -> None:
    from specfed_flwr.strategies.reply_puller import ReplyPuller

    grid = StuckGrid()
    puller = ReplyPuller(grid, settle_s=0.05)
    try:
        started = time.perf_counter()
        got = puller.pull({"1": ["n1-a"], "2": ["n2-a"]})
        assert got == ["reply-n1-a"]  # node 1's reply arrives though node 2's call hangs
        assert time.perf_counter() - started < 1.0
        got = puller.pull({"1": ["n1-b"], "2": ["n2-b"]})
        assert got == ["reply-n1-b"]
        # node 2's call is still running: no second call was started for it
        assert [c for c in grid.calls if c[0].startswith("n2")] == [["n2-a"]]
    finally:
        grid.release.set()
    deadline = time.perf_counter() + 5
    while "2" in puller.running and time.perf_counter() < deadline:
        puller.pull({})
        time.sleep(0.01)
    assert "2" not in puller.running  # collected once it returned; node 2 can be pulled again
    puller.pull({"2": ["n2-c"]})


def test_a_draft_reply_after_a_standby_carries_the_gap_the_server_reads(flower_task_identity, monkeypatch) -> None:
    """The whole device-side path: the standby handler notes its answer, the node's next draft
    request goes through the real draft handler (the drafting itself stubbed: it is not what is
    tested) and its reply carries ``standby_gap_s`` in the metrics record the server's transport
    reads (``_standby_gap``); a draft request with no standby before it carries none."""
    from types import SimpleNamespace

    from specfed_flwr import client_app
    from specfed_flwr.device import RUNTIME
    from specfed_flwr.records import request_content
    from specfed_flwr.strategies.strategy_utils import _standby_gap
    from specfed_flwr.wire import make_reply

    monkeypatch.setattr(client_app, "_standby_answered", {})
    monkeypatch.setattr(client_app, "_warned", True)
    stub_reply = make_reply([0], [1], [[[3, 4]]], [[[0.75, 0.25]]], 16)
    monkeypatch.setattr(RUNTIME, "draft", lambda key, settings, request: (stub_reply, {"draft_seconds": 0.01}))
    context = SimpleNamespace(node_id=7, node_config={})

    def send(message_type: str, content: RecordDict) -> Message:
        message = Message(content, dst_node_id=7, message_type=message_type, group_id="1")
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        handler = client_app.standby if message_type == STANDBY_MESSAGE else client_app.draft
        return handler(message, context)

    request = DraftRequest.build([(0, 0, [5, 6], 1)], k=2, temperature=0.0, sampling="sparse", seed=0, round=1)
    without = send("query.draft", request_content(request, {"draft": "tiny:0:16"}))
    assert _standby_gap(without) is None
    send(STANDBY_MESSAGE, RecordDict({"standby": ConfigRecord({"hold_s": 0.0})}))
    time.sleep(0.2)
    after = send("query.draft", request_content(request, {"draft": "tiny:0:16"}))
    gap = _standby_gap(after)
    assert gap is not None and 0.2 <= gap < 5.0
    assert after.content.metric_records["metrics"]["draft_seconds"] == pytest.approx(0.01)
    # the gap is reported once: the request after that had no standby in front of it
    assert _standby_gap(send("query.draft", request_content(request, {"draft": "tiny:0:16"}))) is None
