"""Server round logic (``Coordinator``) and the in-process engine that drives it without Flower.

One round for every active sequence:
  plan_round      -> a ``DraftRequest`` per client (accepted delta, gamma, K)
  (transport: direct call, Flower simulation or deployment engine)
  complete_round  -> validate replies, gather drafts (q_hat per client and position in sparse
                     closed form: K ids + K values + one fill, never a vocabulary axis per
                     client), select the draft path from the bias-aware weighted drafts, score
                     it (ONE target forward for all sequences), verify, observe agreement
                     (weights), commit, and build the round's report.

A sequence nobody drafted still advances by one target token per round, so the server
finishes its sequences even when every client is gone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .aggregation import (BiasAwareWeights, DraftPath, WeightingConfig, path_agreement, prefix_match,
                          select_draft_path)
from .client_core import DraftClient
from .config import SpecFedConfig
from .protocol import DraftRequest, RoundPlan
from .roster import NodeRoster
from .reconstruction import reconstruct_sparse
from .sparse import SparseQ, zeros as sparse_zeros
from .target import TargetVerifier
from .theory import AdaptiveController, ControllerConfig, LinkProfile
from .sampling import SamplingSettings, path_seen, penalize, warped_probs
from .verification import VerificationResult, verify_greedy, verify_sampling
from .wire import (MAX_COUNT, DraftReply, WireFormatError, check_budget, distribution_bytes, full_distribution_bytes,
                   payload_bytes)

log = logging.getLogger("specfed_flwr")


@dataclass
class SequenceResult:
    index: int
    seq_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    rounds: int
    drafted: int  # draft path positions verified
    accepted: int  # of those, accepted
    alpha: float | None  # mean sum_x min(p, q_bar) over this sequence's verified positions
    owner: str | None = None
    prompt: str | None = None
    text: str | None = None

    @property
    def tau(self) -> float:
        """Mean tokens emitted per round (accepted drafts + correction/bonus)."""
        return len(self.token_ids) / self.rounds if self.rounds else 0.0

    def as_record(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "prompt": self.prompt,
            "text": self.text,
            "prompt_ids": self.prompt_ids,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "owner": self.owner,
            "metrics": {
                "rounds": self.rounds,
                "drafted": self.drafted,
                "accepted": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
                "alpha": self.alpha,
                "tau": self.tau,
            },
        }


@dataclass
class _Sequence:
    seq_id: int
    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    owner: str | None
    prompt: str | None
    cohort: int = 0  # the cohort whose rounds this sequence goes through (see pipeline.py)
    generated: list[int] = field(default_factory=list)
    client_known: dict[str, int] = field(default_factory=dict)  # committed length each client holds
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    alpha_sum: float = 0.0
    alpha_n: int = 0
    stop: tuple[str, ...] = ()  # stop strings of this sequence (run's ``stop`` or its prompt's own)
    sampling: SamplingSettings | None = None  # this prompt's own temperature / top-p (None: the run's)

    @property
    def committed(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.generated)


@dataclass
class RoundReport:
    round: int
    active_sequences: int
    clients_asked: int
    clients_replied: int
    drafted: int
    accepted: int
    emitted: int
    alpha: float | None
    verify_seconds: float
    server_seconds: float
    uplink_bytes: int
    downlink_bytes: int
    finished: list[SequenceResult]
    faults: dict[str, str]
    weights: dict[str, float]
    exchange_seconds: float | None = None  # wall time of the round's message exchange, when known
    cohort: int | None = None  # the cohort this round verified (None: every active sequence)
    pipeline_depth: int = 1  # cohorts in flight when it was verified

    def line(self) -> str:
        alpha = f"{self.alpha:.3f}" if self.alpha is not None else "  -  "
        faults = f" faults={','.join(self.faults)}" if self.faults else ""
        return (
            f"round {self.round}: {self.active_sequences} active, {self.clients_replied}/{self.clients_asked} clients, "
            f"accepted {self.accepted}/{self.drafted}, +{self.emitted} tokens, alpha {alpha}, "
            f"verify {self.verify_seconds * 1000:.0f} ms, up {self.uplink_bytes} B"
            + (f", exchange {self.exchange_seconds * 1000:.0f} ms" if self.exchange_seconds is not None else "")
            + faults
        )


@dataclass
class GenerationResult:
    """What a run produced, whatever the engine: the finished sequences (by prompt index), the
    summary (``Coordinator.summary``) and every round's report."""

    sequences: list[SequenceResult]
    summary: dict[str, Any]
    rounds: list[RoundReport]

    @property
    def metrics(self) -> dict[str, Any]:
        """The summary, under the name the in-process engine has always used."""
        return self.summary

    @property
    def token_ids(self) -> list[list[int]]:
        return [s.token_ids for s in self.sequences]

    @property
    def texts(self) -> list[str | None]:
        return [s.text for s in self.sequences]


@dataclass
class RoundDrafts:
    """One round's valid drafts as tensors (rows = active sequences, columns = replying clients)."""

    clients: list[str]
    tokens: torch.Tensor  # [B, C, G] long: drafted tokens (0 beyond lengths)
    lengths: torch.Tensor  # [B, C] long: drafted positions (0 = no draft)
    q: SparseQ  # batch [B, C, G], M = max K: reconstructed q_hat, all-zero where nothing was drafted
    kept_mass: dict[str, np.ndarray]  # client -> [N] kept mass S of each position it drafted
    weights: torch.Tensor  # [C] float32: bias-aware weights this round (before observing it)


@dataclass
class ClientStats:
    rounds_asked: int = 0
    rounds_replied: int = 0
    positions: int = 0
    uplink_bytes: int = 0
    # the top-K part of the uplink (K ids + K probabilities per valid position), without the
    # per-sequence header and the padding of short rows: the per-position cost the wire format
    # promises and that compression is measured on
    topk_bytes: int = 0
    downlink_bytes: int = 0
    draft_seconds: float = 0.0
    faults: list[str] = field(default_factory=list)  # "round N: reason" of every dropped reply
    # what the server did about this client: deselected / rejoined / weight collapsed / restored
    events: list[str] = field(default_factory=list)
    fault_kinds: dict[str, int] = field(default_factory=dict)  # kind (see ``fault_kind``) -> count
    event_kinds: dict[str, int] = field(default_factory=dict)  # kind of ``events`` -> count
    resyncs: int = 0  # rounds the device answered without its draft state (whole sequences resent)
    resync_rounds: list[int] = field(default_factory=list)  # the rounds those were
    proactive_hits: int = 0  # rows the device had drafted ahead when the request came (guess confirmed)
    proactive_misses: int = 0  # rows whose drafts made ahead the device had to drop

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds_asked": self.rounds_asked,
            "rounds_replied": self.rounds_replied,
            "positions": self.positions,
            "uplink_bytes": self.uplink_bytes,
            # every uplink byte of this client (headers, counts, padding) over the positions it drafted
            "bytes_per_position_all_in": self.uplink_bytes / self.positions if self.positions else None,
            "topk_bytes": self.topk_bytes,
            "downlink_bytes": self.downlink_bytes,
            "draft_seconds": self.draft_seconds,
            "faults": list(self.faults),
            "events": list(self.events),
            "fault_kinds": dict(self.fault_kinds),
            "event_kinds": dict(self.event_kinds),
            "resyncs": self.resyncs,
            "resync_rounds": list(self.resync_rounds),
            "proactive_hits": self.proactive_hits,
            "proactive_misses": self.proactive_misses,
        }


#: the limits a run enforces (config key -> what hitting it means)
LIMITS = {
    "max_k": "replies refused for carrying more than max-k slots per position",
    "max_gamma": "replies refused for carrying more than max-gamma positions",
    "max_reply_bytes": "replies refused for being larger than max-reply-bytes",
    "max_active_sequences": "rounds in which sequences waited because max-active-sequences were active",
    "max_new_tokens": "sequences stopped at max-new-tokens",
    "max_prompt_tokens": "prompts refused for being longer than max-prompt-tokens",
}


def fault_kind(reason: str) -> str:
    """A short category for a dropped reply's reason (the summary counts faults per kind)."""
    text = str(reason)
    if "exceeds max_k" in text:
        return "limit:max-k"
    if "exceeds max_gamma" in text:
        return "limit:max-gamma"
    if "exceeds max_bytes" in text:
        return "limit:max-reply-bytes"
    if text.startswith("no reply"):
        return "deadline"
    if text.startswith("error reply"):
        return "error-reply"
    if text.startswith("reply from "):  # wire.WireFormatError
        return "wire-format"
    if "no 'draft' array record" in text:
        return "missing-record"
    if text.startswith(("reply claims", "reply is missing", "sequence ", "reply has K=")):
        return "protocol"
    return "invalid-reply"


def _limit_of_kind(kind: str) -> str | None:
    return {"limit:max-k": "max_k", "limit:max-gamma": "max_gamma", "limit:max-reply-bytes": "max_reply_bytes"}.get(kind)


class Coordinator:
    """Everything the server does per round, independent of the transport."""

    def __init__(
        self,
        target: TargetVerifier,
        config: SpecFedConfig,
        *,
        eos_token_ids: Iterable[int] = (),
        client_settings: dict[str, tuple[int, int]] | None = None,
        tokenizer: Any = None,
    ):
        """``tokenizer`` decodes the output for stop strings (``stop``); without one, a run or
        prompt with stop strings is refused at submit."""
        self.target = target
        self.tokenizer = tokenizer
        self.config = config
        self.vocab_size = target.vocab_size
        self.eos_token_ids = {int(t) for t in eos_token_ids}
        self.weights = BiasAwareWeights(
            WeightingConfig(
                ema=config.weight_ema, sharpness=config.weight_sharpness, drop_below=config.weight_drop_below
            )
        )
        self.client_settings = dict(client_settings or {})
        self.client_links: dict[str, LinkProfile] = {}
        self.controllers: dict[str, AdaptiveController] = {}
        self.client_stats: dict[str, ClientStats] = {}
        self.round = 0
        self._next_seq_id = 1
        self._waiting: list[_Sequence] = []
        self._active: dict[int, _Sequence] = {}
        self._to_release: dict[str, set[int]] = {}
        self._plans: dict[int, RoundPlan] = {}  # planned rounds not completed yet (several with cohorts)
        self._planned: dict[str, DraftRequest] = {}  # the requests of the round being completed
        self._planned_committed: dict[int, int] = {}
        self.depth = 1  # cohorts (see pipeline.py)
        self._completing = 0  # the round complete_round is working on (0: none)
        self.roster = NodeRoster(config.max_missed_rounds, config.rejoin_after_rounds)
        self.finished: list[SequenceResult] = []
        self.rounds: list[RoundReport] = []
        self._generator = torch.Generator().manual_seed(int(config.seed))
        self.limit_hits: dict[str, int] = {name: 0 for name in LIMITS}
        self._collapsed: set[str] = set()

    # ---- limits and events -------------------------------------------------------------------
    def hit_limit(self, name: str, detail: str = "", count: int = 1) -> None:
        """Count a limit being hit; the first hit of each limit is logged."""
        first = self.limit_hits.get(name, 0) == 0
        self.limit_hits[name] = self.limit_hits.get(name, 0) + count
        if first:
            value = getattr(self.config, name, None)
            # a full batch and sequences stopping at their budget are normal operation
            level = logging.INFO if name in ("max_active_sequences", "max_new_tokens") else logging.WARNING
            log.log(level, "limit %s=%s hit%s (counted in the summary's 'limits')",
                    name.replace("_", "-"), value, f": {detail}" if detail else "")

    def note_event(self, client: str, text: str, kind: str = "event") -> None:
        """Something the server did about a client (``kind``: deselected, rejoined,
        weight-collapsed, weight-restored, restarted, ...), counted by kind in the summary."""
        stats = self.client_stats.setdefault(client, ClientStats())
        round_ = self._completing or self.round
        stats.events.append(f"round {round_}: {text}")
        stats.event_kinds[kind] = stats.event_kinds.get(kind, 0) + 1
        log.warning("round %d: %s %s", round_, client, text)

    def limits(self) -> dict[str, dict[str, Any]]:
        return {
            name: {"value": getattr(self.config, name), "hits": int(self.limit_hits.get(name, 0)), "meaning": meaning}
            for name, meaning in LIMITS.items()
        }

    # ---- sequences -----------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        *,
        index: int | None = None,
        max_new_tokens: int | None = None,
        owner: str | None = None,
        prompt: str | None = None,
        stop: Sequence[str] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> int:
        """Queue a prompt; ``max_new_tokens``, ``stop``, ``temperature`` and ``top_p`` override the
        run's for this sequence.

        A per-prompt temperature / top-p changes only the law the server verifies this row against
        (exact whatever the devices drafted from). Temperature 0 in a sampling run is greedy as a
        point mass on the argmax (top-k 1). A sampling prompt in a greedy run is refused: greedy
        runs draft and select greedily, which is not a sample of what is sent."""
        sampling = None
        if temperature is not None or top_p is not None:
            if self.config.greedy and temperature is not None and float(temperature) > 0:
                raise ValueError("a per-prompt temperature > 0 needs a sampling run (run-config temperature > 0)")
            base = SamplingSettings.from_config(self.config)
            t = base.temperature if temperature is None else float(temperature)
            p = base.top_p if top_p is None else float(top_p)
            if not (t >= 0 and 0 < p <= 1):
                raise ValueError(f"per-prompt temperature must be >= 0 and top_p in (0, 1], got {t}, {p}")
            sampling = replace(base, temperature=t if t > 0 else 1.0, top_p=p, top_k=1 if t == 0 else base.top_k)
        prompt_ids = [int(t) for t in prompt_ids]
        stops = tuple(self.config.stop_strings() if stop is None else [str(s) for s in stop])
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need the target's tokenizer to decode the output (this target has none)")
        if not prompt_ids:
            raise ValueError("a prompt must have at least one token")
        if len(prompt_ids) > self.config.max_prompt_tokens:
            self.hit_limit("max_prompt_tokens", f"a prompt of {len(prompt_ids)} tokens was refused")
            raise ValueError(f"prompt has {len(prompt_ids)} tokens, above max-prompt-tokens {self.config.max_prompt_tokens}")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}")
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        budget = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= budget <= self.config.max_new_tokens:
            raise ValueError(f"max_new_tokens must be in 1..{self.config.max_new_tokens} (max-new-tokens), got {budget}")
        self._waiting.append(
            _Sequence(
                seq_id=seq_id,
                index=len(self.finished) + len(self._active) + len(self._waiting) if index is None else index,
                prompt_ids=prompt_ids,
                max_new_tokens=budget,
                owner=owner,
                prompt=prompt,
                stop=stops,
                sampling=sampling,
            )
        )
        return seq_id

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def active_sequences(self) -> list[int]:
        return list(self._active)

    @property
    def rounds_completed(self) -> int:
        return len(self.rounds)

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

    def settings_for(self, client: str) -> tuple[int, int]:
        """(gamma, K) for a client this round: fixed, or the adaptive controller's choice."""
        gamma, k = self.client_settings.get(client, (self.config.draft_length, self.config.top_k))
        if self.config.adaptive:
            controller = self.controller(client)
            gamma, k = controller.gamma, min(k, controller.k)
        return min(gamma, self.config.max_gamma), min(k, self.config.max_k, self.vocab_size)

    def set_client_link(self, client: str, uplink_mbps: float, rtt_ms: float) -> None:
        self.client_links[client] = LinkProfile(uplink_bps=float(uplink_mbps) * 1e6, rtt_s=float(rtt_ms) / 1000.0)

    def controller(self, client: str) -> AdaptiveController:
        if client not in self.controllers:
            cfg = self.config
            self.controllers[client] = AdaptiveController(
                ControllerConfig(
                    gamma_init=min(max(cfg.draft_length, 1), cfg.max_gamma),
                    gamma_max=cfg.max_gamma,
                    k_init=cfg.top_k,
                    k_max=min(cfg.max_k, self.vocab_size),
                    vocab_size=self.vocab_size,
                    # greedy acceptance does not depend on K: only its bytes count
                    alpha_k_sensitivity=0.0 if cfg.greedy else 0.5,
                ),
                self.client_links.get(client, LinkProfile(cfg.uplink_mbps * 1e6, cfg.rtt_ms / 1000.0)),
            )
        return self.controllers[client]

    def _adapt(self, report: "RoundReport", replies: dict[str, DraftReply], metrics: dict[str, dict[str, Any]],
               agreements: dict[str, float], round_seconds: float | None) -> None:
        """Feed each client's controller this round's measurements (SPEC theory: T = a*gamma + b)."""
        for client, reply in replies.items():
            positions = int(reply.lengths.sum())
            draft_seconds = float(metrics.get(client, {}).get("draft_seconds", 0.0))
            wall = round_seconds if round_seconds is not None else draft_seconds + report.server_seconds
            kept = reply.kept_mass()[reply.valid_mask()]
            self.controller(client).update(
                alpha=agreements.get(client),
                round_cost=max(wall - draft_seconds, 1e-4),
                draft_time_per_token=draft_seconds / positions if positions else None,
                kept_mass=float(kept.mean()) if kept.size else None,
                k=reply.k,
                gamma=int(reply.gamma),
                sequences=max(1, int(reply.batch_size)),
            )

    def uplink_for(self, k: int) -> tuple[str, float, int]:
        """(encoding, budget, slots cap per position) of a request whose K is ``k``: fixed-k sends k
        slots; a budget lets a sampling position use up to min(max-k, 255) slots within it; else k
        (at most 255). In greedy runs a variable-K device sends 1 slot whatever the cap (see
        ``proposer.py``): the drafted token and its probability, all greedy verification and the
        weights use."""
        cfg = self.config
        encoding = cfg.encoding()
        if encoding == "fixed-k":
            return encoding, 0.0, k
        if cfg.uplink_budget > 0 and not cfg.greedy:
            return encoding, float(cfg.uplink_budget), min(cfg.max_k, MAX_COUNT, self.vocab_size)
        return encoding, 0.0, min(k, MAX_COUNT)

    def set_client_settings(self, client: str, gamma: int, k: int) -> None:
        self.client_settings[client] = (int(gamma), int(k))

    def _drafts_for(self, client: str, seqs: list[_Sequence]) -> list[_Sequence]:
        if self.config.mode == "per-device":
            return [s for s in seqs if s.owner == client]
        return seqs

    # ---- one round -------------------------------------------------------------------------
    def plan_round(self, clients: Sequence[str]) -> dict[str, DraftRequest]:
        """Strict rounds: plan one round over every active sequence; ``complete_round`` then
        completes it without naming it."""
        return dict(self.plan_cohort(clients, None).requests)

    def plan_cohort(self, clients: Sequence[str], cohort: int | None) -> RoundPlan:
        """Admit waiting sequences and build each client's request for one round of ``cohort``
        (None: every active sequence). Clients the roster benched, or whose weight collapsed,
        are only asked when their probe is due."""
        self._admit(cohort)
        self.round += 1
        self.roster.add(clients)
        allowed = set(self.roster.selectable(self.round, self._collapsed))
        seqs = [s for s in self._active.values() if cohort is None or s.cohort == cohort]
        requests: dict[str, DraftRequest] = {}
        for client in clients:
            if client not in allowed:
                continue
            gamma, k = self.settings_for(client)
            encoding, budget, k = self.uplink_for(k)
            entries = []
            for seq in self._drafts_for(client, seqs):
                g = max(0, min(gamma, seq.remaining - 1))
                known = seq.client_known.get(client, 0)
                entries.append((seq.seq_id, known, seq.committed[known:], g))
            release = sorted(self._to_release.get(client, set()))
            if not entries and not release:
                continue
            requests[client] = DraftRequest.build(
                entries,
                k=k,
                temperature=self.config.temperature,
                sampling=self.config.draft_sampling,
                seed=self.config.seed,
                round=self.round,
                release=release,
                top_k_sampling=self.config.top_k_sampling,
                top_p=self.config.top_p,
                min_p=self.config.min_p,
                repetition_penalty=self.config.repetition_penalty,
                encoding=encoding,
                budget=budget,
            )
        plan = RoundPlan(round=self.round, cohort=cohort, seq_ids=[s.seq_id for s in seqs], requests=requests,
                         committed={s.seq_id: len(s.committed) for s in seqs})
        self._plans[plan.round] = plan
        return plan

    def _check_weights(self, clients: Iterable[str]) -> None:
        """Report a client whose bias-aware weight collapsed (it stops drafting, is probed
        every ``rejoin_after_rounds`` rounds) or came back."""
        for client in clients:
            rec = self.weights.records.get(client)
            if rec is None:
                continue
            collapsed = self.weights.raw_weight(client) == 0.0
            if collapsed and client not in self._collapsed:
                self._collapsed.add(client)
                self.note_event(client, (
                    f"weight collapsed (measured agreement {rec.agreement:.3f} < weight-drop-below "
                    f"{self.config.weight_drop_below:g}): deselected, probed every {self.config.rejoin_after_rounds} rounds"),
                    "weight-collapsed")
            elif not collapsed and client in self._collapsed:
                self._collapsed.discard(client)
                self.note_event(client, f"weight restored (measured agreement {rec.agreement:.3f}): drafting again",
                                "weight-restored")

    def forget_client_state(self, client: str) -> None:
        """The client lost its caches (restart): resend whole sequences next time."""
        for seq in self._active.values():
            seq.client_known.pop(client, None)
        self._to_release.pop(client, None)

    def _check_reply(self, client: str, reply: DraftReply) -> str | None:
        request = self._planned[client]
        asked = dict(zip(request.seq_ids.tolist(), request.gammas.tolist()))
        got = reply.seq_ids.tolist()
        if sorted(got) != sorted(asked):
            extra = sorted(set(got) - set(asked))
            if extra:
                return f"reply claims sequences it was not asked for: {extra[:5]}"
            return f"reply is missing sequences {sorted(set(asked) - set(got))[:5]}"
        for seq_id, length in zip(got, reply.lengths.tolist()):
            if length > asked[seq_id]:
                return f"sequence {seq_id}: drafted {length} positions, asked for {asked[seq_id]}"
        if reply.k > request.k:
            return f"reply has K={reply.k} slots, asked for {request.k}"
        try:
            check_budget(reply, request.budget, int(request.gammas.max(initial=1)), self.vocab_size, client)
        except WireFormatError as exc:
            return str(exc)
        return None

    def complete_round(
        self,
        replies: dict[str, DraftReply],
        *,
        client_metrics: dict[str, dict[str, Any]] | None = None,
        faults: dict[str, str] | None = None,
        round_seconds: float | None = None,
        plan: RoundPlan | None = None,
    ) -> RoundReport:
        """Verify this round's drafts and commit the accepted tokens.

        ``plan``: the round to complete (``plan_cohort``); without it, the one open round.

        The round runs as named steps, each a small pure-ish function of the previous one's
        output: validate replies -> gather drafts (sparse q_hat per client) -> select the draft
        path -> score it on the target (one forward) -> verify (accept test) -> observe
        agreement (client weights) -> commit. Nothing in it builds a tensor with both a client
        and a vocabulary axis: per-client state is K ids + K values + one fill per position
        (``sparse.py``); the only vocabulary-sized tensors are the target's [B, G+1, V]
        logits and probabilities.

        ``round_seconds``: wall time of the round's message exchange, when the transport knows
        it (feeds the adaptive controller's per-round cost)."""
        started = time.perf_counter()
        if plan is None:
            if len(self._plans) != 1:
                raise RuntimeError(f"complete_round without a plan needs exactly one open round, not {len(self._plans)}")
            plan = next(iter(self._plans.values()))
        del self._plans[plan.round]
        self._planned, self._planned_committed = plan.requests, plan.committed
        self._completing = plan.round
        client_metrics = client_metrics or {}
        valid, faults = self._validate_replies(replies, dict(faults or {}), client_metrics)
        self._observe_roster(plan, faults)
        seqs = [self._active[s] for s in plan.seq_ids if s in self._active]
        drafts = self._gather_drafts(seqs, valid)
        path = self._select_path(drafts)
        logits, probs, verify_seconds = self._score(seqs, path)
        result = self._verify(logits, probs, path)
        alpha_bar, agreements = self._observe_agreement(drafts, path, logits, probs)
        emitted, finished = self._commit(seqs, path, result, alpha_bar)

        drafted = int(path.lengths.sum())
        valid_pos = torch.arange(path.tokens.shape[1]).unsqueeze(0) < path.lengths.unsqueeze(1)  # [B, G]
        report = RoundReport(
            round=plan.round,
            active_sequences=len(seqs),
            clients_asked=len(self._planned),
            clients_replied=len(valid),
            drafted=drafted,
            accepted=int(result.num_accepted.sum()),
            emitted=emitted,
            alpha=float(alpha_bar[valid_pos].mean()) if drafted else None,
            verify_seconds=verify_seconds,
            server_seconds=time.perf_counter() - started,
            uplink_bytes=sum(payload_bytes(r) for r in valid.values()),
            downlink_bytes=sum(r.nbytes() for r in self._planned.values()),
            finished=finished,
            faults=faults,
            weights={cl: float(w) for cl, w in zip(drafts.clients, drafts.weights.tolist())},
            exchange_seconds=round_seconds,
            cohort=plan.cohort,
            pipeline_depth=self.depth,
        )
        if self.config.adaptive:
            self._adapt(report, valid, client_metrics, agreements, round_seconds)
        self._check_weights(valid)
        self._planned = {}
        self._completing = 0
        self.rounds.append(report)
        return report

    def _observe_roster(self, plan: RoundPlan, faults: dict[str, str]) -> None:
        """Tell the roster which asked clients answered; a client that did not may have lost or
        skipped state, so it gets whole sequences next time."""
        for client in plan.requests:
            ok = client not in faults
            event = self.roster.observe(client, plan.round, ok)
            if event is not None:
                kind, text = event
                self.note_event(client, text, kind.value)
            if not ok:
                self.forget_client_state(client)

    # ---- the steps of one round -------------------------------------------------------------
    def _validate_replies(
        self, replies: dict[str, DraftReply], faults: dict[str, str], client_metrics: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, DraftReply], dict[str, str]]:
        """Keep the replies that answer what was asked; every other planned client gets a fault.

        Updates the per-client stats (asked, replied, bytes, positions, draft time, faults) and
        what each client now holds of every sequence (it applied the round's deltas)."""
        valid: dict[str, DraftReply] = {}
        for client, request in self._planned.items():
            stats = self.client_stats.setdefault(client, ClientStats())
            stats.rounds_asked += 1
            stats.downlink_bytes += request.nbytes()
            if client not in replies:
                faults.setdefault(client, "no reply")
                continue
            problem = self._check_reply(client, replies[client])
            if problem:
                faults[client] = problem
                continue
            valid[client] = replies[client]
            stats.rounds_replied += 1
            # the client applied this round's deltas and releases
            for seq_id in request.seq_ids.tolist():
                if seq_id in self._active:
                    self._active[seq_id].client_known[client] = self._planned_committed[seq_id]
            sent = set(request.release.tolist())
            left = self._to_release.get(client, set()) - sent
            if left:
                self._to_release[client] = left
            else:
                self._to_release.pop(client, None)
            stats.positions += int(replies[client].lengths.sum())
            stats.uplink_bytes += payload_bytes(replies[client])
            stats.topk_bytes += _topk_bytes(replies[client])
            metrics = client_metrics.get(client, {})
            stats.draft_seconds += float(metrics.get("draft_seconds", 0.0))
            stats.proactive_hits += int(metrics.get("proactive_hits", 0) or 0)
            stats.proactive_misses += int(metrics.get("proactive_misses", 0) or 0)
        for client, reason in faults.items():
            stats = self.client_stats.setdefault(client, ClientStats())
            stats.faults.append(f"round {self._completing}: {reason}")
            kind = fault_kind(reason)
            stats.fault_kinds[kind] = stats.fault_kinds.get(kind, 0) + 1
            limit = _limit_of_kind(kind)
            if limit is not None:
                self.hit_limit(limit, f"{client}: {reason}")
            if client in self._planned and client not in valid:
                log.warning("round %d: %s dropped: %s", self._completing, client, reason)
        return valid, faults

    def _gather_drafts(self, seqs: list[_Sequence], replies: dict[str, DraftReply]) -> RoundDrafts:
        """The valid replies as tensors: rows = active sequences, columns = replying clients.

        Each client's K ids + probabilities are reconstructed in closed form
        (``reconstruct_sparse``), one call per client over all its drafted positions; nothing
        here has a vocabulary axis."""
        clients = list(replies)
        b, c, v = len(seqs), len(clients), self.vocab_size
        g = max([int(r.lengths.max()) if r.lengths.size else 0 for r in replies.values()], default=0)
        slots = max([r.k for r in replies.values()], default=1)
        tokens = torch.zeros((b, c, g), dtype=torch.long)  # [B, C, G] drafted tokens
        lengths = torch.zeros((b, c), dtype=torch.long)  # [B, C] drafted positions
        q = sparse_zeros((b, c, g), slots, v)  # batch [B, C, G], M = max K: q_hat (all-zero where not drafted)
        kept: dict[str, np.ndarray] = {}
        row_of = {s.seq_id: i for i, s in enumerate(seqs)}
        for ci, client in enumerate(clients):
            reply = replies[client]
            rows = np.array([row_of.get(int(s), -1) for s in reply.seq_ids], dtype=np.int64)  # [B_r]
            drafted = reply.valid_mask() & (rows >= 0)[:, None]  # [B_r, G_r]
            r_idx, j_idx = np.nonzero(drafted)  # [N] each: the drafted (row, position) pairs
            kept[client] = np.zeros(0, dtype=np.float32)
            if not r_idx.size:
                continue
            ids = torch.from_numpy(reply.token_ids[r_idx, j_idx].astype(np.int64))  # [N, K_r]
            probs = torch.from_numpy(reply.probs[r_idx, j_idx].astype(np.float32))  # [N, K_r]
            counts = None if reply.counts is None else torch.from_numpy(reply.counts[r_idx, j_idx].astype(np.int64))  # [N]
            q_hat = reconstruct_sparse(ids, probs, v, self.config.reconstruction, counts)  # batch [N], M = K_r
            at_b, at_j = torch.from_numpy(rows[r_idx]), torch.from_numpy(j_idx)  # [N], [N]
            tokens[at_b, ci, at_j] = ids[:, 0]
            q.ids[at_b, ci, at_j, : ids.shape[1]] = q_hat.ids
            q.values[at_b, ci, at_j, : ids.shape[1]] = q_hat.values
            q.fill[at_b, ci, at_j] = q_hat.fill
            answered = rows >= 0
            lengths[torch.from_numpy(rows[answered]), ci] = torch.from_numpy(reply.lengths[answered].astype(np.int64))
            kept[client] = probs.sum(dim=1).numpy()
        weights = torch.from_numpy(self.weights.weights(clients)).float() if c else torch.zeros(0)  # [C]
        return RoundDrafts(clients=clients, tokens=tokens, lengths=lengths, q=q, kept_mass=kept, weights=weights)

    def _select_path(self, drafts: RoundDrafts) -> DraftPath:
        """The draft path each sequence verifies (scheme: ``config.selection_scheme()``), cut to
        its longest row so the target scores no position that nobody reached."""
        path = select_draft_path(drafts.tokens, drafts.q, drafts.lengths, drafts.weights,
                                 self.config.selection_scheme(), self._generator)
        return path.trimmed()

    def _score(self, seqs: list[_Sequence], path: DraftPath) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """ONE target forward over every sequence's path: the logits [B, G+1, V], in sampling
        mode also the target's sampling law [B, G+1, V] (None in greedy mode, which needs only
        the argmax), and the seconds the forward took.

        The law is the target's own sampler under the run's settings (``sampling.warp``:
        repetition penalty per position from the row's committed tokens + path prefix, then
        temperature, top-k-sampling, top-p, min-p), so the accept test keeps exactly that law.
        Greedy applies only the repetition penalty, like ``generate(do_sample=False)``."""
        g = path.tokens.shape[1]
        paths = [path.tokens[i, : int(path.lengths[i])].tolist() for i in range(len(seqs))]
        verify_started = time.perf_counter()
        logits = self.target.score_batch([s.seq_id for s in seqs], paths)  # [B, G'+1, V], G' = longest path
        verify_seconds = time.perf_counter() - verify_started
        logits = logits[:, : g + 1]  # [B, G+1, V] (a wrapped scorer may pad wider)
        settings = SamplingSettings.from_config(self.config)
        seen = None
        if settings.penalizes:
            seen = path_seen([s.committed for s in seqs], path.tokens, path.lengths, logits.shape[-1])  # [B, G+1, V]
        if self.config.greedy:
            return (penalize(logits, seen, settings.repetition_penalty) if seen is not None else logits), None, verify_seconds
        if any(s.sampling is not None for s in seqs):  # some rows have their own temperature / top-p
            probs = torch.stack([warped_probs(logits[i], s.sampling or settings, None if seen is None else seen[i])
                                 for i, s in enumerate(seqs)])  # [B, G+1, V]
        elif not settings.truncates and seen is None:
            temperature = settings.temperature
            probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # [B, G+1, V]
        else:
            probs = warped_probs(logits, settings, seen)  # [B, G+1, V]
        return logits, probs, verify_seconds

    def _verify(self, logits: torch.Tensor, probs: torch.Tensor | None, path: DraftPath) -> VerificationResult:
        """The accept test: greedy (target argmax) or speculative sampling against q_bar."""
        if probs is None:
            return verify_greedy(logits, path.tokens, path.lengths)
        return verify_sampling(probs, path.q_bar, path.tokens, path.lengths, self._generator)

    def _observe_agreement(
        self, drafts: RoundDrafts, path: DraftPath, logits: torch.Tensor, probs: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Measure alpha of q_bar per path position ([B, G]) and fold each client's agreement,
        at the path positions it drafted from the path's own prefix, into its bias-aware weight.

        Greedy: a drafted token is accepted iff it is the target's argmax, so that indicator is
        the client's acceptance rate (sum min(p, q_hat) would judge a correct but flat draft as
        bad and a confident wrong one as fair); alpha of q_bar is still measured, against
        softmax(logits). Sampling: sum_x min(p(x), q_hat(x)), from the sparse form. Returns
        (alpha_bar [B, G], mean agreement per client this round)."""
        g = path.tokens.shape[1]
        tokens = drafts.tokens[:, :, :g]  # [B, C, G]
        greedy = probs is None
        if greedy:
            alpha_bar, client_alpha = path_agreement(logits, path.q_bar, logits=True)
        else:
            alpha_bar, client_alpha = path_agreement(probs, path.q_bar, drafts.q[:, :, :g])
        matched = prefix_match(tokens, drafts.lengths, path.tokens, path.lengths)  # [B, C, G]
        target_top = logits[:, :g].argmax(dim=-1) if greedy else None  # [B, G]
        agreements: dict[str, float] = {}
        for ci, client in enumerate(drafts.clients):
            mask = matched[:, ci, :]  # [B, G]
            if target_top is not None:
                values = (tokens[:, ci] == target_top).float()[mask]
            else:
                values = client_alpha[:, ci][mask]
            self.weights.observe(client, values.numpy(), drafts.kept_mass.get(client, np.zeros(0)))
            if values.numel():
                agreements[client] = float(values.mean())
        return alpha_bar, agreements

    def _commit(
        self, seqs: list[_Sequence], path: DraftPath, result: VerificationResult, alpha_bar: torch.Tensor
    ) -> tuple[int, list[SequenceResult]]:
        """Append each sequence's accepted drafts and correction/bonus token (up to its budget,
        stopping at EOS), crop the target's cache, and finish sequences. Returns (tokens
        emitted, sequences finished this round)."""
        valid_pos = torch.arange(path.tokens.shape[1]).unsqueeze(0) < path.lengths.unsqueeze(1)  # [B, G]
        emitted = 0
        finished: list[SequenceResult] = []
        for i, seq in enumerate(seqs):
            new_tokens = result.tokens_of(i)
            n_acc = int(result.num_accepted[i])
            self.target.commit(seq.seq_id, n_acc, new_tokens[-1])
            seq.rounds += 1
            seq.drafted += int(path.lengths[i])
            seq.accepted += n_acc
            row_alpha = alpha_bar[i][valid_pos[i]]
            seq.alpha_sum += float(row_alpha.sum())
            seq.alpha_n += int(row_alpha.numel())
            reason = None
            for tok in new_tokens:
                if seq.remaining <= 0:
                    break
                seq.generated.append(tok)
                emitted += 1
                if tok in self.eos_token_ids:
                    reason = "eos"
                    break
                if seq.stop and self._stopped(seq):
                    reason = "stop"
                    break
            if reason is None and seq.remaining <= 0:
                reason = "length"
                self.hit_limit("max_new_tokens", f"sequence {seq.index} stopped at {seq.max_new_tokens} new tokens")
            if reason is not None:
                finished.append(self._finish(seq, reason))
        return emitted, finished

    def _stopped(self, seq: _Sequence) -> bool:
        """Whether the output now contains one of the sequence's stop strings (checked after every
        token, so the output ends with the token that completes it, as generate's ``stop_strings``).
        Only the tail that can hold a new match is decoded."""
        longest = max(len(s) for s in seq.stop)
        tail = seq.generated[-(longest + 8):]  # a token decodes to >= 1 character (+ slack for merges)
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        return any(s in text for s in seq.stop)

    def _finish(self, seq: _Sequence, reason: str) -> SequenceResult:
        del self._active[seq.seq_id]
        self.target.release(seq.seq_id)
        for client in seq.client_known:
            self._to_release.setdefault(client, set()).add(seq.seq_id)
        result = SequenceResult(
            index=seq.index,
            seq_id=seq.seq_id,
            prompt_ids=seq.prompt_ids,
            token_ids=list(seq.generated),
            finish_reason=reason,
            rounds=seq.rounds,
            drafted=seq.drafted,
            accepted=seq.accepted,
            alpha=seq.alpha_sum / seq.alpha_n if seq.alpha_n else None,
            owner=seq.owner,
            prompt=seq.prompt,
        )
        self.finished.append(result)
        return result

    # ---- summary ---------------------------------------------------------------------------
    def summary(self, wall_seconds: float) -> dict[str, Any]:
        out = summarize(self.finished, self.rounds, self.client_stats, self.vocab_size, wall_seconds, self.weights.snapshot())
        out["limits"] = self.limits()
        return out


def _topk_bytes(reply: DraftReply) -> int:
    return distribution_bytes(reply)


def summarize(
    finished: list[SequenceResult],
    rounds: list[RoundReport],
    client_stats: dict[str, ClientStats],
    vocab_size: int,
    wall_seconds: float,
    weights: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregate metrics of a run (the summary table's numbers)."""
    tokens = sum(len(r.token_ids) for r in finished)
    drafted = sum(r.drafted for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    seq_steps = sum(r.active_sequences for r in rounds)
    alphas = [(r.alpha, r.drafted) for r in rounds if r.alpha is not None and r.drafted]
    uplink = sum(r.uplink_bytes for r in rounds)
    downlink = sum(r.downlink_bytes for r in rounds)
    positions = sum(s.positions for s in client_stats.values())
    uplink_payload = sum(s.uplink_bytes for s in client_stats.values())
    per_position = uplink_payload / positions if positions else None
    topk = sum(s.topk_bytes for s in client_stats.values())
    topk_per_position = topk / positions if positions and topk else None
    return {
        "sequences": len(finished),
        "tokens": tokens,
        "rounds": len(rounds),
        "wall_seconds": wall_seconds,
        "tokens_per_s": tokens / wall_seconds if wall_seconds > 0 else None,
        "seconds_per_round": wall_seconds / len(rounds) if rounds else None,
        "alpha": sum(a * n for a, n in alphas) / sum(n for _, n in alphas) if alphas else None,
        "acceptance_rate": accepted / drafted if drafted else None,
        "tau": (accepted + seq_steps) / seq_steps if seq_steps else None,
        "drafted_positions": drafted,
        "accepted": accepted,
        "uplink_bytes": uplink,
        "downlink_bytes": downlink,
        "uplink_bytes_per_token": uplink / tokens if tokens else None,
        # all-in: every uplink byte (headers and padding included) over the positions drafted
        "uplink_bytes_per_position": per_position,
        "bytes_per_position_all_in": per_position,
        # the top-K distribution alone, what replaces one dense distribution per position
        "topk_bytes_per_position": topk_per_position,
        "compression_vs_fp32": full_distribution_bytes(vocab_size, "float32") / topk_per_position if topk_per_position else None,
        "compression_vs_fp16": full_distribution_bytes(vocab_size, "float16") / topk_per_position if topk_per_position else None,
        "compression_vs_fp32_all_in": full_distribution_bytes(vocab_size, "float32") / per_position if per_position else None,
        "verify_seconds": sum(r.verify_seconds for r in rounds),
        "clients": {c: s.as_dict() for c, s in client_stats.items()},
        "proactive_hits": sum(s.proactive_hits for s in client_stats.values()),
        "proactive_misses": sum(s.proactive_misses for s in client_stats.values()),
        # per client: fault kind -> count, plus what the server did about it (events)
        "faults": {
            c: {**s.fault_kinds, **s.event_kinds}
            for c, s in client_stats.items() if s.fault_kinds or s.event_kinds
        },
        "weights": weights or {},
    }
