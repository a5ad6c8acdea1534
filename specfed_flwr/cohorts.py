"""Cohorts: the active sequences split into groups that go through their rounds independently
(``pipeline.py`` keeps several in flight), and admission of waiting sequences into them.

``Cohorts`` is a part of ``Coordinator`` (a mixin over its sequences, plans and config).
"""

from __future__ import annotations

from typing import Iterable


class Cohorts:
    """Depth, admission and rebalancing of ``Coordinator``'s cohorts."""

    def set_depth(self, depth: int) -> None:
        """How many cohorts new sequences are spread over (1 = strict rounds)."""
        self.depth = max(1, int(depth))

    def collapsed_clients(self) -> set[str]:
        """Clients whose bias-aware weight collapsed (asked on probe rounds only)."""
        return set(self._collapsed)

    def _cohort_sizes(self) -> dict[int, int]:
        sizes = {c: 0 for c in range(self.depth)}
        for seq in self._active.values():
            sizes[seq.cohort] = sizes.get(seq.cohort, 0) + 1
        return sizes

    def cohorts_ready(self, busy: Iterable[int] = ()) -> list[int]:
        """Cohorts that can be planned now: not in flight (``busy``) and with work (active
        sequences, or room for waiting ones). A cohort past the depth (the depth went down)
        hands its sequences to a lower cohort once it is not in flight."""
        busy = set(busy)
        in_flight = {s for plan in self._plans.values() for s in plan.seq_ids}
        for seq in self._active.values():
            if seq.cohort >= self.depth and seq.cohort not in busy and seq.seq_id not in in_flight:
                seq.cohort %= self.depth
        self._rebalance(busy, in_flight)
        sizes = self._cohort_sizes()
        room = bool(self._waiting) and len(self._active) < self.config.max_active_sequences
        share = self._share()
        return [c for c in range(self.depth) if c not in busy
                and (sizes.get(c, 0) or (room and (share is None or sizes.get(c, 0) < share)))]

    def _rebalance(self, busy: set[int], in_flight: set[int]) -> None:
        """After the depth went up, idle cohorts above their share hand sequences to idle cohorts
        below it (sequences in flight stay where they are), so that the new cohorts get work."""
        if self.depth <= 1 or len(self._active) < 2:
            return
        share = -(-len(self._active) // self.depth)
        sizes = self._cohort_sizes()
        takers = [c for c in range(self.depth) if c not in busy and sizes.get(c, 0) < share]
        if not takers:
            return
        for seq in list(self._active.values()):
            if not takers:
                break
            c = seq.cohort
            if c in busy or seq.seq_id in in_flight or sizes.get(c, 0) <= share:
                continue
            taker = takers[0]
            sizes[c] -= 1
            sizes[taker] = sizes.get(taker, 0) + 1
            seq.cohort = taker
            if sizes[taker] >= share:
                takers.pop(0)

    def _share(self) -> int | None:
        """How many sequences one cohort takes at most when admitting (cohorts stay about equal)."""
        if self.depth <= 1:
            return None
        return -(-min(self.config.max_active_sequences, len(self._active) + len(self._waiting)) // self.depth)

    def _admit(self, cohort: int | None = None) -> None:
        """Start waiting sequences (up to ``max_active_sequences``). With cohorts, the one being
        planned takes them up to its share, so that cohorts stay about equal."""
        share = self._share() if cohort is not None else None
        while self._waiting and len(self._active) < self.config.max_active_sequences:
            if share is not None and self._cohort_sizes().get(cohort, 0) >= share:
                break
            seq = self._waiting.pop(0)
            seq.cohort = 0 if cohort is None else cohort
            self.target.start(seq.seq_id, seq.prompt_ids)
            self._active[seq.seq_id] = seq
        if self._waiting and len(self._active) >= self.config.max_active_sequences:
            self.hit_limit("max_active_sequences", f"{len(self._waiting)} sequence(s) wait for a free slot")
