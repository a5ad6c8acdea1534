"""Server round logic: ``Coordinator`` plans rounds and completes them, whatever the transport.

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
from dataclasses import replace
from typing import Any, Iterable, Sequence

import torch

from .aggregation import BiasAwareWeights, DraftPath, WeightingConfig
from .client_settings import ClientSettings
from .cohorts import Cohorts
from .config import SpecFedConfig
from .faults import EventKind, Fault, FaultKind
from .protocol import DraftRequest, RoundPlan
from .randomness import MAX_SEED, sequence_key
from .roster import NodeRoster
from .round_report import LIMITS, ClientStats, RoundReport, SequenceResult
from .round_steps import RoundSteps, _Sequence
from .sampling import SamplingSettings
from .sparse import zeros as sparse_zeros
from .summary import summarize, topk_bytes
from .target import TargetVerifier
from .theory import AdaptiveController
from .wire import MAX_COUNT, DraftReply, WireFormatError, check_budget, payload_bytes

log = logging.getLogger("specfed_flwr")


#: prompt tokens the target prefills per idle step of the pipeline (``Coordinator.prefill_pending``):
#: about half a second of the default target on one CPU core, the longest a ready verify may wait
PREFILL_CHUNK_TOKENS = 256


class Coordinator(Cohorts, RoundSteps):
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
        self.weights = BiasAwareWeights(WeightingConfig.from_config(config))
        self.settings = ClientSettings(config, self.vocab_size, client_settings)
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
        self.limit_hits: dict[str, int] = {name: 0 for name in LIMITS}
        self._collapsed: set[str] = set()
        # target-only steps while drafts are out (``step_in_flight``)
        self._finished_between: list[SequenceResult] = []  # finished by such a step, reported with the next round
        self.steps_in_flight = 0
        self.tokens_in_flight = 0
        self.step_seconds = 0.0

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

    def note_event(self, client: str, text: str, kind: EventKind) -> None:
        """Something the server did about a client, counted by ``kind`` in the summary."""
        kind = EventKind(kind)
        stats = self.client_stats.setdefault(client, ClientStats())
        round_ = self._completing or self.round
        stats.events.append(f"round {round_}: {text}")
        stats.event_kinds[kind.value] = stats.event_kinds.get(kind.value, 0) + 1
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
        seed: int | None = None,
    ) -> int:
        """Queue a prompt; ``max_new_tokens``, ``stop``, ``temperature`` and ``top_p`` override the
        run's for this sequence.

        A per-prompt temperature / top-p sets the law the server verifies this row against, and the
        devices draft the row from it too (``DraftRequest.temperatures`` / ``top_ps``). Temperature 0
        in a sampling run is greedy as a point mass on the argmax (top-k 1). A sampling prompt in a
        greedy run is refused: greedy runs draft and select greedily, which is not a sample of what
        is sent.

        ``seed`` (0..2**63-1): the sequence's own randomness key (``randomness.sequence_key``); its
        sampled output then depends only on (prompt, seed, run settings, models), not on the other
        prompts, their order, the cohorts or the pipeline depth. Without it the key comes from the
        run's seed and ``index``."""
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED):
            raise ValueError(f"seed must be an integer in 0..2**63-1, got {seed!r}")
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
        seq = self._waiting[-1]
        seq.key = sequence_key(seed, self.config.seed, seq.index)
        seq.seeded = seed is not None
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

    def step_in_flight(self, seq_ids: Iterable[int]) -> int:
        """One target-only decode step (one forward, batched) for ``seq_ids`` -- sequences whose
        drafts are out -- so the target does not sit idle while devices draft and messages travel;
        returns the tokens emitted.

        The token is what a round with an empty draft would emit: the target's argmax (greedy)
        or a sample from its warped law (sampling), so the output law is unchanged; the round that
        later brings these sequences' drafts drops the positions decoded meanwhile and keeps a
        client's drafts only where they start with exactly those tokens
        (``RoundSteps._skip_decoded``). Sequences finished here are reported with the next round.
        Only sequences whose prompt the target has cached are stepped (``prefill_pending`` first)."""
        seqs = [self._active[s] for s in seq_ids if s in self._active and self.target.pending_prefill(s) == 0]
        if not seqs:
            return 0
        started = time.perf_counter()
        b = len(seqs)
        empty = DraftPath(tokens=torch.zeros((b, 0), dtype=torch.long), lengths=torch.zeros(b, dtype=torch.long),
                          q_bar=sparse_zeros((b, 0), 1, self.vocab_size))  # [B, 0] path: nothing drafted
        logits, probs, _ = self._score(seqs, empty)  # [B, 1, V]
        result = self._verify(seqs, logits, probs, empty)
        rounds = [s.rounds for s in seqs]
        emitted, finished = self._commit(seqs, empty, result, torch.zeros((b, 0)))
        for seq, r in zip(seqs, rounds):
            seq.rounds = r  # not a speculative round of the sequence
        self._finished_between.extend(finished)
        self.steps_in_flight += 1
        self.tokens_in_flight += emitted
        self.step_seconds += time.perf_counter() - started
        return emitted

    def prefill_pending(self, max_tokens: int = PREFILL_CHUNK_TOKENS) -> int:
        """Prefill the target for active sequences whose prompt is not cached yet, oldest first,
        about ``max_tokens`` prompt tokens per call (at least one sequence); returns the tokens fed.

        The pipeline calls this when it would otherwise wait for replies (``pipeline.run_rounds``,
        step 5), so the target's prompt work overlaps the devices' prefill and drafting instead of
        adding to the first verify of every new sequence. Chunked so that a verify that becomes
        ready meanwhile waits for at most one chunk."""
        chosen, total = [], 0
        for seq_id in sorted(self._active):
            n = self.target.pending_prefill(seq_id)
            if n <= 0:
                continue
            if chosen and total + n > max_tokens:
                break
            chosen.append(seq_id)
            total += n
        return self.target.prefill(chosen) if chosen else 0

    # ---- (gamma, K) per client: ``client_settings.ClientSettings`` -----------------------------
    def settings_for(self, client: str) -> tuple[int, int]:
        """(gamma, K) for a client this round: fixed, or the adaptive controller's choice."""
        return self.settings.for_client(client)

    def set_client_link(self, client: str, uplink_mbps: float, rtt_ms: float) -> None:
        self.settings.set_link(client, uplink_mbps, rtt_ms)

    def set_client_settings(self, client: str, gamma: int, k: int) -> None:
        self.settings.set_fixed(client, gamma, k)

    def controller(self, client: str) -> AdaptiveController:
        return self.settings.controller(client)

    def _adapt(self, plan: RoundPlan, report: "RoundReport", replies: dict[str, DraftReply],
               metrics: dict[str, dict[str, Any]], agreements: dict[str, float], round_seconds: float | None) -> None:
        """Feed each replying client's controller this round's measurements."""
        for client, reply in replies.items():
            draft_seconds = float(metrics.get(client, {}).get("draft_seconds", 0.0))
            wall = round_seconds if round_seconds is not None else draft_seconds + report.server_seconds
            self.settings.observe(client, plan.requests.get(client), reply, draft_seconds=draft_seconds,
                                  wall_seconds=wall, agreement=agreements.get(client),
                                  server_seconds=report.server_seconds, device=metrics.get(client))

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
        settings: dict[str, tuple[int, int]] = {}
        run_sampler = SamplingSettings.from_config(self.config)
        for client in clients:
            if client not in allowed:
                continue
            mine = self._drafts_for(client, seqs)
            gamma, k = self.settings_for(client)
            pinned = self.settings.fixed() if self.config.adaptive else (gamma, k)
            if any(s.seeded for s in mine):
                k = pinned[1]  # K is per request: a seeded row's draws need the fixed K
            encoding, budget, k = self.uplink_for(k)
            entries, keys, rows = [], [], []
            for seq in mine:
                g = max(0, min(pinned[0] if seq.seeded else gamma, seq.remaining - 1))
                known = seq.client_known.get(client, 0)
                entries.append((seq.seq_id, known, seq.committed[known:], g))
                own = seq.sampling or run_sampler  # the row's sampler, so devices draft from its law
                keys.append(seq.key)
                rows.append((own.temperature, own.top_p, own.top_k))
            release = sorted(self._to_release.get(client, set()))
            if not entries and not release:
                continue
            settings[client] = (gamma, k)
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
                keys=keys,
                rows=rows,
            )
        plan = RoundPlan(round=self.round, cohort=cohort, seq_ids=[s.seq_id for s in seqs], requests=requests,
                         committed={s.seq_id: len(s.committed) for s in seqs}, settings=settings)
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
                    EventKind.WEIGHT_COLLAPSED)
            elif not collapsed and client in self._collapsed:
                self._collapsed.discard(client)
                self.note_event(client, f"weight restored (measured agreement {rec.agreement:.3f}): drafting again",
                                EventKind.WEIGHT_RESTORED)

    def forget_client_state(self, client: str) -> None:
        """The client lost its caches (restart): resend whole sequences next time."""
        for seq in self._active.values():
            seq.client_known.pop(client, None)
        self._to_release.pop(client, None)

    def _check_reply(self, client: str, reply: DraftReply) -> Fault | None:
        """A well-formed reply that does not answer what was asked: a ``PROTOCOL`` fault."""
        request = self._planned[client]
        problem = self._reply_mismatch(request, reply)
        if problem is not None:
            return Fault(FaultKind.PROTOCOL, problem)
        try:  # a variable-K reply over the byte budget it was asked to keep
            check_budget(reply, request.budget, int(request.gammas.max(initial=1)), self.vocab_size, client)
        except WireFormatError as exc:
            return Fault.from_exception(exc)
        return None

    @staticmethod
    def _reply_mismatch(request: DraftRequest, reply: DraftReply) -> str | None:
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
        return None

    def is_dead(self, plan: RoundPlan) -> bool:
        """Whether every sequence ``plan`` drafts for has finished since it was pushed (target steps
        while waiting decoded them to the end): its replies could only be dropped."""
        return not any(s in self._active for s in plan.seq_ids)

    def abandon_round(self, plan: RoundPlan) -> RoundReport:
        """Close a dead round (``is_dead``) without waiting for its replies.

        Waiting would stall every later cohort behind it (rounds are verified in push order) for
        drafts of finished sequences. Nobody is faulted for the missing replies, and the releases
        the request carried stay pending until a reply confirms them (a device that frees a
        sequence twice ignores the second). The report carries the sequences finished meanwhile."""
        del self._plans[plan.round]
        finished, self._finished_between = self._finished_between, []
        report = RoundReport(round=plan.round, active_sequences=0, clients_asked=0, clients_replied=0, drafted=0,
                             accepted=0, emitted=0, alpha=None, verify_seconds=0.0, server_seconds=0.0,
                             uplink_bytes=0, downlink_bytes=0, finished=finished, faults={}, weights={},
                             cohort=plan.cohort, pipeline_depth=self.depth, settings=dict(plan.settings))
        self.rounds.append(report)
        return report

    def complete_round(
        self,
        replies: dict[str, DraftReply],
        *,
        client_metrics: dict[str, dict[str, Any]] | None = None,
        faults: dict[str, Fault] | None = None,
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
        drafts = self._skip_decoded(seqs, self._gather_drafts(seqs, valid))
        path = self._select_path(seqs, drafts)
        logits, probs, verify_seconds = self._score(seqs, path)
        result = self._verify(seqs, logits, probs, path)
        alpha_bar, agreements = self._observe_agreement(drafts, path, logits, probs)
        emitted, finished = self._commit(seqs, path, result, alpha_bar)
        finished = self._finished_between + finished  # sequences a step while waiting finished, too
        self._finished_between = []

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
            settings=dict(plan.settings),
        )
        if self.config.adaptive:
            self._adapt(plan, report, valid, client_metrics, agreements, round_seconds)
        self._check_weights(valid)
        self._planned = {}
        self._completing = 0
        self.rounds.append(report)
        return report

    def _observe_roster(self, plan: RoundPlan, faults: dict[str, Fault]) -> None:
        """Tell the roster which asked clients answered; a client that did not may have lost or
        skipped state, so it gets whole sequences next time."""
        for client in plan.requests:
            ok = client not in faults
            event = self.roster.observe(client, plan.round, ok)
            if event is not None:
                kind, text = event
                self.note_event(client, text, kind)
            if not ok:
                self.forget_client_state(client)

    # ---- the steps of one round -------------------------------------------------------------
    def _validate_replies(
        self, replies: dict[str, DraftReply], faults: dict[str, Fault], client_metrics: dict[str, dict[str, Any]]
    ) -> tuple[dict[str, DraftReply], dict[str, Fault]]:
        """Keep the replies that answer what was asked; every other planned client gets a fault.

        Updates the per-client stats (asked, replied, bytes, positions, draft time, faults) and
        what each client now holds of every sequence (it applied the round's deltas)."""
        valid: dict[str, DraftReply] = {}
        for client, request in self._planned.items():
            stats = self.client_stats.setdefault(client, ClientStats())
            stats.rounds_asked += 1
            stats.downlink_bytes += request.nbytes()
            if client not in replies:
                faults.setdefault(client, Fault(FaultKind.DEADLINE, "no reply"))
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
            stats.topk_bytes += topk_bytes(replies[client])
            metrics = client_metrics.get(client, {})
            stats.draft_seconds += float(metrics.get("draft_seconds", 0.0))
            stats.proactive_hits += int(metrics.get("proactive_hits", 0) or 0)
            stats.proactive_misses += int(metrics.get("proactive_misses", 0) or 0)
        for client, fault in faults.items():
            if not isinstance(fault, Fault):  # its kind is decided where it was seen, never from its text
                raise TypeError(f"the fault of {client} is a {type(fault).__name__}, not a faults.Fault")
            stats = self.client_stats.setdefault(client, ClientStats())
            stats.faults.append(f"round {self._completing}: {fault.reason}")
            stats.fault_kinds[fault.kind.value] = stats.fault_kinds.get(fault.kind.value, 0) + 1
            if fault.kind.limit is not None:
                self.hit_limit(fault.kind.limit, f"{client}: {fault.reason}")
            if client in self._planned and client not in valid:
                log.warning("round %d: %s dropped: %s", self._completing, client, fault.reason)
        return valid, faults

    # ---- summary ---------------------------------------------------------------------------
    def summary(self, wall_seconds: float) -> dict[str, Any]:
        out = summarize(self.finished, self.rounds, self.client_stats, self.vocab_size, wall_seconds, self.weights.snapshot())
        out["limits"] = self.limits()
        out["target_steps_while_waiting"] = {"steps": self.steps_in_flight, "tokens": self.tokens_in_flight,
                                             "seconds": self.step_seconds}
        return out
