"""Which devices the server asks each round: one policy for deselection, probing and backoff.

Two things can take a device out of the rounds:

* **missed rounds**: no usable reply ``max_missed_rounds`` rounds in a row (deadline, error
  reply, malformed reply). It is deselected and probed again after ``rejoin_after_rounds``
  rounds; each deselection in a row doubles the wait (at most 64x), so a device that never
  answers in time costs the others fewer and fewer deadlines. A probe that fails benches it
  again at once; one answered in time brings it back.
* **collapsed weight**: its drafts keep disagreeing with the target, so its bias-aware weight
  fell to zero (``aggregation.BiasAwareWeights``). It still answers, so it is not benched: it is
  only asked every ``rejoin_after_rounds`` rounds, to measure whether it recovered.

Both used to live in two places (the Strategy's backoff, the Coordinator's probe) and shared
``rejoin_after_rounds`` by accident; here they are one roster, used by every engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .faults import EventKind

MAX_BACKOFF_DOUBLINGS = 6  # the wait grows to at most 2**6 = 64 x rejoin_after_rounds


@dataclass
class _Node:
    missed: int = 0  # rounds in a row without a usable reply
    strikes: int = 0  # deselections in a row without a usable reply in between
    benched_until: int | None = None  # first round it may be asked again (a probe)


@dataclass
class NodeRoster:
    max_missed_rounds: int
    rejoin_after_rounds: int
    _nodes: dict[str, _Node] = field(default_factory=dict)

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            self._nodes.setdefault(str(name), _Node())

    @property
    def names(self) -> list[str]:
        return list(self._nodes)

    def is_benched(self, name: str) -> bool:
        return self._nodes[name].benched_until is not None

    def selectable(self, round_: int, collapsed: Iterable[str] = ()) -> list[str]:
        """The devices to ask in round ``round_``: not benched (or due for a probe), and, for a
        device whose weight collapsed, only on probe rounds."""
        collapsed = set(collapsed)
        probe_round = round_ % max(1, self.rejoin_after_rounds) == 0
        out = []
        for name, node in self._nodes.items():
            if node.benched_until is not None and node.benched_until > round_:
                continue
            if name in collapsed and not probe_round:
                continue
            out.append(name)
        return out

    def observe(self, name: str, round_: int, ok: bool) -> tuple[EventKind, str] | None:
        """A round asked ``name`` and got a usable reply (``ok``) or not; returns what changed."""
        node = self._nodes.setdefault(name, _Node())
        if ok:
            node.missed = 0
            node.strikes = 0
            if node.benched_until is not None:
                node.benched_until = None
                return EventKind.REJOINED, "rejoined: replied in time to the probe"
            return None
        node.missed += 1
        probing = node.benched_until is not None  # a benched device's probe: one miss benches it again
        if node.missed < self.max_missed_rounds and not probing:
            return None
        node.strikes += 1
        wait = self.rejoin_after_rounds * 2 ** min(node.strikes - 1, MAX_BACKOFF_DOUBLINGS)
        node.benched_until = round_ + wait
        what = "failed its probe" if probing and node.missed < self.max_missed_rounds else \
            f"{node.missed} missed rounds in a row"
        node.missed = 0
        return EventKind.DESELECTED, f"deselected after {what}; probing again at round {node.benched_until}"
