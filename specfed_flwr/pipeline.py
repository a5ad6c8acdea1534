"""Cohorts in flight: the decoding loop every engine shares.

In strict rounds the target idles while devices draft and messages travel, and devices idle
while the target verifies. Here the active sequences are split into up to ``depth`` cohorts that
go through their rounds independently: while one cohort's requests travel and its devices draft,
the target verifies another, and a cohort's next request is pushed as soon as its verification
ends. Depth 1 is the strict loop. Exactness does not depend on the depth: each round verifies
its own cohort's sequences with the target, exactly as a strict round would.

``run_rounds`` is the loop, in numbered steps:

1. **push**: every cohort that is not in flight and has work gets its next round planned
   (``Coordinator.plan_cohort``; its node roster decides which devices are asked), and pushed;
2. **pull**: replies that arrived for any round in flight are collected (non-blocking);
3. **verify**: the oldest round, once its replies are all in or its deadline passed, is decoded
   and handed to ``Coordinator.complete_round`` (which also tells the roster who answered). Then
   the loop goes back to 1, so that this cohort's next request leaves before anything else. A
   round whose sequences all finished meanwhile (step 5 decoded them to the end) is closed at
   once (``Coordinator.abandon_round``; the transport's ``discard`` drops its late replies), so
   the cohorts behind it do not wait for drafts nobody can use;
4. **depth**: with ``pipeline-depth=auto`` and devices drafting ahead (``draft-ahead``, the
   default), ONE cohort: the devices already draft the next round while the target verifies this
   one, and a second cohort would halve their batches (a draft step at batch 8 costs nearly what
   one at 16 does) and interrupt every guess they draft ahead (measured on this repository's
   benchmark machine, depth 1 against 2: 0.90 vs 0.82x target-only at concurrency 4 with split
   CPUs, 0.88 vs 0.80x at 16, 0.70 vs 0.58x in-process at 4 and 0.50 vs 0.40x on the Flower
   simulation with ``make run``'s settings). A further cohort only once the transport's own
   latency outlasts a whole cycle: ``1 + floor(latency / (verify + draft))``. Without drafting
   ahead two cohorts (one verifying while the other drafts), exactly two while the devices are
   saturated (their requests queue: the median wait a device reports between its reply and the
   next request is under a quarter of a verify), since more cohorts would only split their
   batches; otherwise two plus enough to cover the latency: ``2 + ceil(latency / (verify + draft))``.
   latency = exchange time minus the devices' drafting time (the least of the last rounds: queueing
   behind another cohort is not latency more cohorts could hide), cycle = verify + draft (their
   median), at most ``AUTO_MAX_DEPTH``. More cohorts than that only shrink every verify batch: the devices draft
   the cohorts one after the other, so they cannot go faster than their own compute;
5. **idle**: when nothing is ready to verify, the target prefills the prompts of sequences that
   joined (``Coordinator.prefill_pending``, one chunk at a time), so a new sequence's first verify
   does not run its whole prompt on the round's critical path; with nothing to prefill, it decodes
   the sequences whose drafts are late one target-only step (``Coordinator.step_in_flight``,
   ``target-steps-while-waiting``; late = the devices are prefilling them, or the round is past
   twice the recent median exchange: ``stalled_sequences``; their round later drops the positions decoded
   meanwhile and keeps only drafts that start with those tokens), so the target does not wait for
   prefilling, slow or lost devices; only then wait until something arrives (at most one poll
   interval).

A ``Transport`` moves requests and replies: Flower's grid (``strategies.specfed``) or threads
in this process (``inprocess``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from .protocol import RoundPlan

if TYPE_CHECKING:
    from .coordinator import Coordinator
    from .round_report import RoundReport

AUTO_START_DEPTH = 2
AUTO_MAX_DEPTH = 4
AUTO_WINDOW = 6  # rounds whose exchange/verify times the auto depth looks at
#: a device whose median wait for its next request is below this fraction of a verify counts as
#: saturated (``DepthController.devices_saturated``): a deeper pipeline cannot keep it busier
SATURATED_IDLE_FRACTION = 0.25


@dataclass
class InFlight:
    """One pushed round: its plan, when it left, and the raw replies that came back so far."""

    plan: RoundPlan
    pushed_at: float
    deadline: float
    expected: set[str]  # devices whose replies the round waits for
    raw: dict[str, Any] = field(default_factory=dict)  # device -> transport's raw reply
    arrivals: dict[str, float] = field(default_factory=dict)  # device -> perf_counter() when it arrived
    handles: dict[str, Any] = field(default_factory=dict)  # transport's own bookkeeping (message ids, futures)
    prefilling: set[int] = field(init=False)  # sequences the devices get whole this round (``RoundPlan.prefilling``)

    def __post_init__(self) -> None:
        self.prefilling = self.plan.prefilling()

    def complete(self, now: float) -> bool:
        return self.expected <= set(self.raw) or now >= self.deadline

    @property
    def exchange_seconds(self) -> float:
        """Push to the last reply (or to now, if some never came)."""
        last = max(self.arrivals.values(), default=None)
        return (last if last is not None else time.perf_counter()) - self.pushed_at


class Transport(Protocol):
    poll_interval: float

    def push(self, plan: RoundPlan, timeout: float) -> InFlight:
        """Send ``plan.requests``; never blocks on devices."""

    def pull(self, flights: list[InFlight]) -> None:
        """Move the replies that arrived into ``flight.raw`` / ``flight.arrivals``; never blocks."""

    def decode(self, flight: InFlight) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, str]]:
        """(valid replies, metrics, faults) of a finished round; a bad reply is a fault, never an exception."""

    def wait(self, seconds: float) -> None:
        """Block until a reply may have arrived, at most ``seconds``."""

    # optional: ``discard(flight)``, a round that will never be decoded (``Coordinator.abandon_round``)


class DepthController:
    """``pipeline-depth``: fixed, or ``auto`` (see module docstring, step 4)."""

    def __init__(self, fixed: int | None, *, drafts_ahead: bool = False):
        self.fixed = fixed
        self.drafts_ahead = bool(drafts_ahead)
        self.depth = fixed if fixed is not None else (1 if self.drafts_ahead else AUTO_START_DEPTH)
        self._exchange: list[float] = []
        self._verify: list[float] = []
        self._idle: list[float] = []

    def observe(self, exchange_seconds: float, verify_seconds: float, draft_seconds: float = 0.0,
                device_idle_seconds: float | None = None) -> int:
        """One verified round: its exchange time, the server's time on it, the devices' drafting
        time and (when the devices report it) how long the busiest device had waited for it."""
        if self.fixed is not None:
            return self.depth
        self._exchange = (self._exchange + [max(0.0, exchange_seconds - draft_seconds)])[-AUTO_WINDOW:]
        self._verify = (self._verify + [verify_seconds + draft_seconds])[-AUTO_WINDOW:]
        if device_idle_seconds is not None:
            self._idle = (self._idle + [device_idle_seconds])[-AUTO_WINDOW:]
        if len(self._exchange) >= 3 and self.drafts_ahead:
            # the devices draft during the verify: only a transport slower than a whole cycle
            # leaves them (and the target) waiting long enough for another cohort to pay
            latency = min(self._exchange)
            cycle = max(statistics.median(self._verify), 1e-3)
            self.depth = max(1, min(AUTO_MAX_DEPTH, 1 + math.floor(latency / cycle + 1e-9)))
        elif len(self._exchange) >= 3:
            if self.devices_saturated(verify_seconds):
                # requests queue at the devices: they are the bottleneck, and more cohorts would
                # only split their batches (a draft step at batch 16 costs far less than 4 at 4)
                self.depth = AUTO_START_DEPTH
                return self.depth
            # the least latency seen: a round that queued behind another cohort at the device
            # looks slower, but more cohorts would only make it queue longer
            latency = min(self._exchange)
            cycle = max(statistics.median(self._verify), 1e-3)
            self.depth = max(AUTO_START_DEPTH, min(AUTO_MAX_DEPTH, AUTO_START_DEPTH + math.ceil(latency / cycle - 1e-9)))
        return self.depth

    def devices_saturated(self, verify_seconds: float) -> bool:
        """Whether the devices' recent requests found them without a gap worth filling: their
        median wait for a request is under a quarter of a verify (``SATURATED_IDLE_FRACTION``)."""
        if len(self._idle) < 3:
            return False
        return statistics.median(self._idle) < SATURATED_IDLE_FRACTION * max(statistics.median(self._verify), 1e-3)


def steps_while_waiting(config: Any, transport: Any) -> bool:
    """``target-steps-while-waiting``: on, off, or auto = on unless the transport says its devices
    share the server's CPUs (``shares_server_cpus``: worker threads, the simulation engine), where
    a target step would only take compute from the drafting it waits for."""
    mode = getattr(config, "target_steps_while_waiting", "off")
    if mode == "auto":
        return not bool(getattr(transport, "shares_server_cpus", False))
    return mode == "on"


#: a round whose exchange has taken this many times the recent median is stalled (a device is
#: prefilling, slow or gone): the target decodes its sequences meanwhile (``stalled_sequences``)
STALL_FACTOR = 2.0


def stalled_sequences(flights: dict[int, InFlight], recent_exchanges: list[float]) -> list[int]:
    """Sequences whose drafts are out and late: sequences the devices are prefilling (they got
    them whole this round: that takes as long as the prompt, nobody knows how long), and those of a
    round whose exchange has taken ``STALL_FACTOR`` x the median of the recent steady rounds
    (rounds without prefill; none yet: not late).

    Why only those: in a steady state a target step while drafts are out replaces a token the
    drafts would have brought at no cost (a round then yields about m + alpha^m * tau(gamma - m)
    tokens instead of tau(gamma), no more) and lengthens the device's next delta, so it only pays
    where the drafts are late: then the target decodes on, as target-only would, and the late
    drafts are used where they still fit (``RoundSteps._skip_decoded``)."""
    now = time.perf_counter()
    limit = STALL_FACTOR * statistics.median(recent_exchanges) if recent_exchanges else math.inf
    out: list[int] = []
    for f in flights.values():
        if f.complete(now):
            continue
        if now - f.pushed_at > limit:
            out.extend(f.plan.seq_ids)
        else:
            out.extend(sorted(f.prefilling))
    return out


def run_rounds(
    coordinator: "Coordinator",
    transport: Transport,
    clients: Sequence[str],
    *,
    depth: int | None,
    round_timeout: float,
    max_rounds: int,
    after_round: "Callable[[RoundReport, InFlight, dict[str, dict[str, Any]]], None] | None" = None,
    before_plan: Callable[[], None] | None = None,
) -> DepthController:
    """Decode until every sequence is finished (or ``max_rounds`` rounds were planned).

    ``clients``: the devices that may be asked (the coordinator's roster picks from them each
    round); ``before_plan``: called before each round is planned (e.g. to drop the state of
    devices known to keep none)."""
    control = DepthController(depth, drafts_ahead=bool(getattr(coordinator.config, "draft_ahead", False)))
    coordinator.set_depth(control.depth)
    step_while_waiting = steps_while_waiting(coordinator.config, transport)
    exchanges: list[float] = []  # the last completed rounds' exchange times (``stalled_sequences``)
    flights: dict[int, InFlight] = {}  # round -> in flight
    while coordinator.has_work or flights:
        # 1. push every idle cohort
        busy = {f.plan.cohort for f in flights.values()}
        while coordinator.round < max_rounds:
            ready = coordinator.cohorts_ready(busy)  # again after each plan: planning admits sequences
            if not ready:
                break
            if before_plan is not None:
                before_plan()
            plan = coordinator.plan_cohort(list(clients), ready[0])
            busy.add(plan.cohort)
            flights[plan.round] = transport.push(plan, round_timeout)
        if not flights:
            break  # max_rounds reached
        # 2. pull what arrived
        transport.pull(list(flights.values()))
        # 3. verify the oldest round once it is complete (rounds are verified in the order they
        # were pushed, so that with a fixed depth the server's random draws, and so a sampled
        # output, do not depend on which device happened to answer first)
        oldest = min(flights)
        if coordinator.is_dead(flights[oldest].plan):
            # its sequences all finished meanwhile: waiting would only hold up the later cohorts
            flight = flights.pop(oldest)
            discard = getattr(transport, "discard", None)
            if discard is not None:
                discard(flight)
            report = coordinator.abandon_round(flight.plan)
            if after_round is not None:
                after_round(report, flight, {})
            continue
        if not flights[oldest].complete(time.perf_counter()):
            # 5. nothing to verify yet: prefill new sequences' prompts on the target, else decode
            # the sequences whose drafts are out one target step, else wait
            if not coordinator.prefill_pending() and not (
                    step_while_waiting and coordinator.step_in_flight(stalled_sequences(flights, exchanges))):
                transport.wait(transport.poll_interval)
            continue
        flight = flights.pop(oldest)
        replies, metrics, faults = transport.decode(flight)
        exchange = flight.exchange_seconds
        if not flight.prefilling:  # the stall rule compares with steady rounds only
            exchanges = (exchanges + [exchange])[-AUTO_WINDOW:]
        report = coordinator.complete_round(replies, client_metrics=metrics, faults=faults,
                                            round_seconds=exchange, plan=flight.plan)
        # 4. depth
        drafting = max((float(m.get("draft_seconds", 0.0)) for m in metrics.values()), default=0.0)
        idles = [float(m["idle_seconds"]) for m in metrics.values() if "idle_seconds" in m]
        # the busiest device (least idle) decides whether devices are the bottleneck
        coordinator.set_depth(control.observe(exchange, report.server_seconds, drafting, min(idles) if idles else None))
        if after_round is not None:
            after_round(report, flight, metrics)
    return control


__all__ = ["InFlight", "Transport", "DepthController", "run_rounds", "AUTO_MAX_DEPTH"]
