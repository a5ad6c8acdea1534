"""The node roster: deselection after missed rounds, probes with doubling backoff, the
collapsed-weight probe, and rejoining."""

from __future__ import annotations

from specfed_flwr.faults import EventKind
from specfed_flwr.roster import NodeRoster


def test_a_node_is_benched_after_missed_rounds_and_rejoins_when_its_probe_answers():
    roster = NodeRoster(max_missed_rounds=2, rejoin_after_rounds=5)
    roster.add(["a", "b"])
    assert roster.observe("a", 1, ok=False) is None
    kind, text = roster.observe("a", 2, ok=False)
    assert kind is EventKind.DESELECTED and "probing again at round 7" in text
    assert roster.selectable(3) == ["b"] and roster.selectable(6) == ["b"]
    assert roster.selectable(7) == ["a", "b"]  # the probe
    kind, _ = roster.observe("a", 7, ok=True)
    assert kind is EventKind.REJOINED and not roster.is_benched("a")
    assert roster.selectable(8) == ["a", "b"]


def test_each_failed_probe_doubles_the_wait_up_to_64x():
    roster = NodeRoster(max_missed_rounds=1, rejoin_after_rounds=2)
    roster.add(["a"])
    waits = []  # rounds from each deselection to its probe
    for strike in range(9):
        roster.observe("a", 100 * strike, ok=False)
        until = roster._nodes["a"].benched_until
        waits.append(until - 100 * strike)
    assert waits == [2, 4, 8, 16, 32, 64, 128, 128, 128]


def test_a_good_reply_resets_the_backoff():
    roster = NodeRoster(max_missed_rounds=1, rejoin_after_rounds=3)
    roster.observe("a", 1, ok=False)
    roster.observe("a", 4, ok=False)  # failed probe: 6 rounds
    assert roster._nodes["a"].benched_until == 10
    roster.observe("a", 10, ok=True)
    roster.observe("a", 11, ok=False)
    assert roster._nodes["a"].benched_until == 14  # back to 3


def test_a_collapsed_node_is_asked_on_probe_rounds_only():
    roster = NodeRoster(max_missed_rounds=3, rejoin_after_rounds=4)
    roster.add(["a", "b"])
    asked = [r for r in range(1, 13) if "b" in roster.selectable(r, collapsed={"b"})]
    assert asked == [4, 8, 12]
    assert all("a" in roster.selectable(r, collapsed={"b"}) for r in range(1, 13))
