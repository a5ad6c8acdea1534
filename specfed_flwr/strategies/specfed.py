"""SpecFedStrategy: a Flower Strategy whose rounds are speculative decoding steps.

Flower's ``Strategy`` is built around train/evaluate rounds; this one is query driven and
adds its own loop, ``generate(grid, prompts)``, a short one over two hooks in the manner of
Flower's ``Strategy.start()`` and FedAvg:

1. handshake every node (draft loaded once per device, tokenizer fingerprint checked,
   node settings and per-device prompts collected); mismatching nodes are excluded;
2. ``pipeline.run_rounds`` keeps up to ``pipeline-depth`` cohorts of sequences in flight. For
   each round it calls ``configure_draft`` (the plan's ``DraftRequest`` per node -> one
   ``query.draft`` message each, ttl = the round deadline), pushes them at once and pulls
   replies without blocking; while they travel the target verifies another cohort;
3. ``aggregate_draft`` validates the replies of a round (error replies, missing records, the
   wire checks; an invalid one only costs that node the round) and
   ``Coordinator.complete_round`` verifies on the target and commits; finished sequences are
   handed to ``on_finished`` immediately (so nothing generated is lost).

The Coordinator's node roster deselects nodes that miss ``max_missed_rounds`` rounds in a row
and probes them again after ``rejoin_after_rounds`` rounds (doubling, up to 64x, each time a
probe fails again). With no node left the server keeps decoding target-only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Mapping, Sequence

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..config import SpecFedConfig
from ..faults import EventKind, Fault, FaultKind
from ..coordinator import Coordinator
from ..device import machine_id
from ..round_report import GenerationResult, RoundReport, SequenceResult
from ..pipeline import InFlight, run_rounds
from ..protocol import DraftRequest, RoundPlan
from ..tokens import decode_texts, encode_prompt
from ..records import DRAFT_MESSAGE, HANDSHAKE_MESSAGE, config_record, reply_arrays, request_content
from ..target import TargetVerifier
from ..wire import WireFormatError, decode_reply
from .reply_puller import ReplyPuller
from .standby import StandbyPlanner
from .strategy_utils import GridTransport, NodeProcesses, error_reply_fault, note_state_lost, short_reason


@dataclass
class SpecFedResult(GenerationResult):
    """A run through Flower: the engine's result plus what the handshake and the devices did."""

    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # handshake info of the nodes that took part
    excluded: dict[str, str] = field(default_factory=dict)  # node -> why it was refused
    faults: dict[str, list[str]] = field(default_factory=dict)  # node -> every dropped reply's reason


class SpecFedStrategy(Strategy):
    def __init__(
        self,
        target: TargetVerifier,
        config: SpecFedConfig,
        *,
        tokenizer: Any = None,
        eos_token_ids: Iterable[int] = (),
        tokenizer_fingerprint: dict[str, Any] | None = None,
        on_finished: Callable[[SequenceResult], None] | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        poll_interval: float | None = None,
    ):
        self.target = target
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.fingerprint = tokenizer_fingerprint or {"vocab_size": target.vocab_size, "vocab_sha256": ""}
        self.on_finished = on_finished
        self.on_round = on_round
        #: seconds between reply pulls; None = by engine (:meth:`poll_for`)
        self.poll_interval = poll_interval
        self._poll = 0.005

    # Flower's train/evaluate hooks: this strategy has no training rounds.
    def configure_train(self, server_round, arrays, config, grid):  # noqa: D102
        return []

    def aggregate_train(self, server_round, replies):  # noqa: D102
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: D102
        return []

    def aggregate_evaluate(self, server_round, replies):  # noqa: D102
        return None

    def summary(self) -> None:
        cfg = self.config
        log(INFO, "SpecFedStrategy: mode=%s K=%d gamma=%d reconstruction=%s selection=%s temperature=%s exact=%s",
            cfg.mode, cfg.top_k, cfg.draft_length, cfg.reconstruction, cfg.selection_scheme(), cfg.temperature, cfg.exact())

    # ---- transport ---------------------------------------------------------------------------
    #: reply poll on Flower's deployment engine: every pull is an HTTP call to the SuperLink, and a
    #: reply is listed before its objects are stored, so a 5 ms poll often hits Flower's 1 s initial
    #: object-pull backoff (SPEC: 50 ms measured better); in-memory grids (simulation) poll 5 ms
    DEPLOYMENT_POLL_S = 0.05
    SIMULATION_POLL_S = 0.005

    def poll_for(self, grid: Grid) -> float:
        """The reply poll for this grid: the explicit ``poll_interval``, else by engine."""
        if self.poll_interval is not None:
            return float(self.poll_interval)
        return self.SIMULATION_POLL_S if type(grid).__name__ == "InMemoryGrid" else self.DEPLOYMENT_POLL_S

    def _exchange(self, grid: Grid, messages: dict[str, Message], timeout: float,
                  arrivals: dict[str, float] | None = None) -> tuple[dict[str, Message], float]:
        """Push all, pull with a short poll until every reply is in or the deadline passes.
        ``arrivals``: filled with node -> ``time.perf_counter()`` when its reply was pulled."""
        started = time.perf_counter()
        if not messages:
            return {}, 0.0
        try:
            ids = [str(i) for i in grid.push_messages(list(messages.values())) if i]
        except Exception as exc:  # a transport hiccup costs this round's drafts, not the run
            log(WARNING, "pushing %d message(s) failed (%s: %s); this round goes without them",
                len(messages), type(exc).__name__, exc)
            return {}, time.perf_counter() - started
        # map replies to nodes by the id each pushed message got (a grid returns only the ids it
        # stored, so the position in the returned list is not enough)
        node_of = {m.metadata.message_id: name for name, m in messages.items() if m.metadata.message_id in set(ids)}
        if not node_of and len(ids) == len(messages):
            node_of = dict(zip(ids, messages))
        pending = set(node_of)
        replies: dict[str, Message] = {}
        deadline = started + timeout
        while pending:
            for reply in grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[node_of[mid]] = reply
                    if arrivals is not None:
                        arrivals[node_of[mid]] = time.perf_counter()
            if not pending or time.perf_counter() >= deadline:
                break
            time.sleep(self._poll)
        return replies, time.perf_counter() - started

    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        deadline = time.perf_counter() + self.config.node_wait_timeout
        while True:
            nodes = sorted(int(n) for n in grid.get_node_ids())
            if len(nodes) >= self.config.min_nodes or time.perf_counter() >= deadline:
                return nodes
            time.sleep(0.5)

    # ---- handshake ---------------------------------------------------------------------------
    def _server_settings(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "draft": cfg.draft,
            "draft-quantization": cfg.draft_quantization,
            "draft-ahead": cfg.draft_ahead,
            "max-k": cfg.max_k,
            "max-gamma": cfg.max_gamma,
            "vocab_size": self.target.vocab_size,
        }

    def handshake(self, grid: Grid, nodes: Sequence[int]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        content = {n: RecordDict({"config": config_record(self._server_settings())}) for n in nodes}
        messages = {
            str(n): Message(content[n], dst_node_id=n, message_type=HANDSHAKE_MESSAGE, group_id="handshake",
                            ttl=float(self.config.handshake_timeout))
            for n in nodes
        }
        replies, _ = self._exchange(grid, messages, self.config.handshake_timeout)
        accepted: dict[str, dict[str, Any]] = {}
        excluded: dict[str, str] = {}
        for name in messages:
            reply = replies.get(name)
            if reply is None:
                excluded[name] = "no handshake reply before the deadline"
            elif reply.has_error():
                if error_reply_fault(reply, self.config.handshake_timeout).kind is FaultKind.DEADLINE:
                    excluded[name] = f"no handshake reply before the deadline ({short_reason(reply.error.reason, 80)})"
                else:
                    excluded[name] = f"handshake failed on the device: {short_reason(reply.error.reason)}"
            else:
                try:
                    if "info" not in reply.content.config_records:
                        problem, info = "handshake reply has no 'info' record", {}
                    else:
                        info = dict(reply.content.config_records["info"])
                        problem = self._check_identity(info)
                except Exception as exc:  # whatever a device sends must not end the run
                    problem, info = short_reason(f"handshake reply could not be read ({type(exc).__name__}: {exc})"), {}
                if problem:
                    excluded[name] = problem
                else:
                    accepted[name] = info
        for name, reason in excluded.items():
            log(WARNING, "node %s refused: %s", name, reason)
        return accepted, excluded

    def _check_identity(self, info: dict[str, Any]) -> str | None:
        problem = self._check_settings(info)
        if problem:
            return problem
        vocab = info.get("vocab_size")
        if vocab != self.target.vocab_size:
            return (
                f"tokenizer mismatch: the device's draft has vocabulary size {vocab}, "
                f"the target has {self.target.vocab_size}"
            )
        theirs, ours = str(info.get("vocab_sha256", "")), str(self.fingerprint.get("vocab_sha256", ""))
        if theirs and ours and theirs != ours:
            return f"tokenizer mismatch: vocabulary hash {theirs[:12]}... differs from the target's {ours[:12]}..."
        return None

    @staticmethod
    def _check_settings(info: dict[str, Any]) -> str | None:
        """The node's own settings in its handshake must be usable (a bad one refuses the node)."""
        def number(key: str, minimum: float, integer: bool) -> str | None:
            if key not in info:
                return None
            value = info[key]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            ok = ok and value >= minimum and value != float("inf") and (not integer or float(value).is_integer())
            if not ok:
                kind = "an integer" if integer else "a number"
                return f"handshake setting '{key}' must be {kind} >= {minimum:g}, got {value!r}"
            return None

        for key, minimum, integer in (("max-k", 1, True), ("uplink-mbps", 1e-9, False), ("rtt-ms", 0, False)):
            problem = number(key, minimum, integer)
            if problem:
                return problem
        prompts = info.get("prompts")
        if prompts is not None and not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
            return "handshake setting 'prompts' must be a list of strings"
        return None

    # ---- the decoding loop ---------------------------------------------------------------------
    def generate(
        self,
        grid: Grid,
        prompts: Sequence[str | Sequence[int]],
        *,
        indices: Sequence[int] | None = None,
        options: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> SpecFedResult:
        """``options[index]``: that prompt's overrides (``max_new_tokens``, ``stop``)."""
        cfg = self.config
        self.summary()
        self._poll = self.poll_for(grid)
        started = time.perf_counter()
        nodes = self._wait_for_nodes(grid)
        log(INFO, "%d node(s) connected; handshaking", len(nodes))
        infos, excluded = self.handshake(grid, nodes) if nodes else ({}, {})
        coordinator = self._coordinator_for(infos)
        items = self._prompt_items(prompts, indices, infos)
        refused = self._submit(coordinator, items, options or {})
        log(INFO, "%d sequence(s) queued, %d active at most; %d node(s) drafting", len(items), cfg.max_active_sequences, len(infos))

        processes = NodeProcesses(simulation=type(grid).__name__ == "InMemoryGrid")
        processes.start(infos)
        reply_times: dict[str, list[float]] = {n: [] for n in infos}  # s since start, draft replies
        round_walls: list[float] = []  # each round: push to verified (exchange + verify + bookkeeping)
        last_metrics: dict[str, dict[str, Any]] = {}  # newest metrics of each node

        def after_round(report: RoundReport, flight: InFlight, metrics: dict[str, dict[str, Any]]) -> None:
            for name, m in metrics.items():
                last_metrics[name] = m
                if name in flight.arrivals:
                    reply_times.setdefault(name, []).append(flight.arrivals[name] - started)
                processes.observe(coordinator, name, m.get("pid"))
                if m.get("state_lost"):
                    note_state_lost(coordinator, name, report.round)
            log(INFO, "%s", report.line())
            decode_texts(self.tokenizer, report.finished)
            for seq in report.finished:
                if self.on_finished is not None:
                    self.on_finished(seq)
            if self.on_round is not None:
                self.on_round(report)
            round_walls.append(time.perf_counter() - flight.pushed_at)

        standby = None
        if cfg.standby_messages == "auto" and not processes.simulation:
            standby = StandbyPlanner({n for n, info in infos.items() if info.get("runtime") == "persistent"})
        transport = GridTransport(grid, self.configure_draft, self.aggregate_draft, self._poll,
                                  standby=standby, standby_ttl=float(cfg.round_timeout),
                                  puller=None if processes.simulation else ReplyPuller(grid))
        # devices on this machine (the simulation engine, a loopback deployment) share its CPUs
        transport.shares_server_cpus = any(str(info.get("host", "")) == machine_id() for info in infos.values())
        run_rounds(coordinator, transport, list(infos), depth=cfg.depth(), round_timeout=cfg.round_timeout,
                   max_rounds=cfg.max_rounds, after_round=after_round,
                   before_plan=lambda: processes.forget_ephemeral(coordinator))
        wall = time.perf_counter() - started
        results = sorted(coordinator.finished, key=lambda r: r.index)
        summary = coordinator.summary(wall)
        summary["excluded"] = excluded
        for name, reason in excluded.items():
            summary["faults"].setdefault(name, {})[EventKind.HANDSHAKE_REFUSED.value] = 1
        summary["refused_prompts"] = refused
        summary["draft_loads"] = {
            n: max(int(info.get("draft_loads") or 0), int(last_metrics.get(n, {}).get("draft_loads", 0)))
            for n, info in infos.items()
        }
        summary["ephemeral_nodes"] = sorted(processes.ephemeral)
        summary["reply_pids"] = processes.counts
        summary["reply_times"] = reply_times
        summary["round_wall_seconds"] = round_walls
        summary["poll_interval"] = self._poll
        summary["standby"] = dict(standby.stats(), nodes=sorted(standby.nodes)) if standby is not None else None
        return SpecFedResult(
            sequences=results,
            summary=summary,
            rounds=coordinator.rounds,
            nodes=infos,
            excluded=excluded,
            faults={c: s.faults for c, s in coordinator.client_stats.items() if s.faults},
        )

    def _coordinator_for(self, infos: dict[str, dict[str, Any]]) -> Coordinator:
        """A Coordinator that knows each accepted node's own max-k and link (from its handshake)."""
        cfg = self.config
        coordinator = Coordinator(self.target, cfg, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer)
        for name, info in infos.items():
            gamma, k = coordinator.settings_for(name)
            if "max-k" in info:
                k = min(k, int(info["max-k"]))
            coordinator.set_client_settings(name, gamma, k)
            coordinator.set_client_link(name, float(info.get("uplink-mbps", cfg.uplink_mbps)),
                                        float(info.get("rtt-ms", cfg.rtt_ms)))
        return coordinator

    def _submit(self, coordinator: Coordinator, items: list[tuple[int, Any, str | None]],
                options: Mapping[int, Mapping[str, Any]]) -> dict[int, str]:
        """Queue every prompt; returns the refused ones (index -> why): one bad prompt must not end the run."""
        refused: dict[int, str] = {}
        for index, prompt, owner in items:
            try:
                ids = encode_prompt(self.tokenizer, prompt, self.config.chat_template)
                own = dict(options.get(index, {}))
                coordinator.submit(ids, index=index, owner=owner, prompt=prompt if isinstance(prompt, str) else None,
                                   max_new_tokens=own.get("max_new_tokens"), stop=own.get("stop"),
                                   temperature=own.get("temperature"), top_p=own.get("top_p"), seed=own.get("seed"))
            except (ValueError, TypeError) as exc:
                refused[index] = str(exc)
                log(WARNING, "prompt %d refused: %s", index, exc)
        return refused

    # ---- the hooks of one round --------------------------------------------------------------
    def configure_draft(self, plan: RoundPlan) -> dict[str, Message]:
        """One ``query.draft`` message per node of the plan. ttl = the round deadline: a device that
        is late does not work through stale rounds (the SuperLink drops the expired request and
        any late reply)."""
        cfg = self.config
        extra = {"draft": cfg.draft, "draft-quantization": cfg.draft_quantization, "draft-ahead": cfg.draft_ahead}
        return {
            name: Message(request_content(req, extra), dst_node_id=int(name), message_type=DRAFT_MESSAGE,
                          group_id=str(plan.round), ttl=float(cfg.round_timeout))
            for name, req in plan.requests.items()
        }

    def aggregate_draft(
        self, requests: dict[str, DraftRequest], raw: dict[str, Message]
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Fault]]:
        """Validate every reply of a round: (valid replies, metrics, faults). An invalid reply
        becomes a fault of that node, never an exception."""
        cfg = self.config
        replies, metrics, faults = {}, {}, {}
        for name in requests:
            message = raw.get(name)
            if message is None:
                faults[name] = Fault(FaultKind.DEADLINE, f"no reply within the {cfg.round_timeout:g} s round deadline")
                continue
            try:
                if message.has_error():
                    faults[name] = error_reply_fault(message, cfg.round_timeout)
                    continue
                arrays, m = reply_arrays(message.content, f"node {name}")
                replies[name] = decode_reply(
                    arrays, vocab_size=self.target.vocab_size, max_k=cfg.max_k, max_gamma=cfg.max_gamma,
                    client=f"node {name}", max_bytes=cfg.max_reply_bytes,
                )
                metrics[name] = m
            except WireFormatError as exc:
                faults[name] = Fault.from_exception(exc)
            except Exception as exc:  # anything a device sends must not end the run
                faults[name] = Fault.from_exception(exc, short_reason(f"{type(exc).__name__}: {exc}"))
        return replies, metrics, faults

    decode_replies = aggregate_draft  # the name tests and older callers use

    def _prompt_items(self, prompts, indices, infos) -> list[tuple[int, Any, str | None]]:
        indices = list(indices) if indices is not None else list(range(len(prompts)))
        if self.config.mode != "per-device":
            return [(i, p, None) for i, p in zip(indices, prompts)]
        # per-device (TK-SLT): each device owns the prompts it brought; the server's own prompts
        # are spread over the devices round-robin
        items: list[tuple[int, Any, str | None]] = []
        next_index = max(indices, default=-1) + 1
        for name, info in infos.items():
            for p in info.get("prompts") or []:
                items.append((next_index, p, name))
                next_index += 1
        names = list(infos)
        for j, (i, p) in enumerate(zip(indices, prompts)):
            items.append((i, p, names[j % len(names)] if names else None))
        return items
