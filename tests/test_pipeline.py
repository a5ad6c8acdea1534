"""Pipelined rounds (cohorts in flight) in the in-process engine.

Oracles nobody here wrote: transformers' own greedy ``generate`` of the target, and, for
sampling, the target's own next-token and next-two-token law at a fixed prefix (chi-square).
Both with drafting ahead on, devices on worker threads and in a separate process.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specfed_flwr.adversarial import RandomDraftProposer
from specfed_flwr.client_core import DraftClient
from specfed_flwr.config import SpecFedConfig
from specfed_flwr.inprocess import InProcessEngine, ProcessTransport
from specfed_flwr.models import tiny_llama
from specfed_flwr.pipeline import DepthController
from specfed_flwr.proposer import HFDraftProposer

VOCAB = 1024
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def models():
    return tiny_llama(seed=0, vocab_size=VOCAB), tiny_llama(seed=1, vocab_size=VOCAB), tiny_llama(seed=2, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, VOCAB, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
            for _ in range(9)]


@pytest.fixture(scope="module")
def oracle(models, prompts):
    target = models[0]
    out = []
    for p in prompts:
        x = torch.tensor([p])
        gen = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        out.append(gen[0, len(p):].tolist())
    return out


def _config(depth: str, **extra) -> SpecFedConfig:
    base = dict(top_k=8, draft_length=4, max_new_tokens=NEW_TOKENS, max_active_sequences=6, max_k=VOCAB,
                pipeline_depth=depth, draft_ahead=True, adaptive=False)
    base.update(extra)
    return SpecFedConfig(**base)


@pytest.mark.parametrize("depth,drafters", list(itertools.product(["1", "2", "3", "auto"], [1, 3])))
def test_greedy_output_equals_target_generate_with_cohorts_in_flight(models, prompts, oracle, depth, drafters):
    target, draft_a, draft_b = models
    cfg = _config(depth)
    extra = {"garbage": DraftClient(RandomDraftProposer(VOCAB, seed=3))} if drafters == 3 else None
    drafts = [draft_a, draft_b] if drafters == 3 else [draft_a]
    engine = InProcessEngine(target, drafts, cfg, eos_token_ids=[], clients=extra)
    result = engine.generate(prompts)
    assert result.token_ids == oracle
    if depth in ("2", "3"):
        # rounds of several cohorts, each verifying only its own sequences
        cohorts = {r.cohort for r in result.rounds}
        assert len(cohorts) == int(depth)
        assert max(r.active_sequences for r in result.rounds) < cfg.max_active_sequences
    if drafters == 3:
        assert result.metrics["clients"]["garbage"]["rounds_replied"] > 0


class _SlowProposer(HFDraftProposer):
    """A draft that takes its time (a device slower than the target's verify), so that the server
    has sequences in flight and nothing to verify: it then decodes them itself."""

    delay = 0.05
    first_delay: float | None = None  # the first request's delay (a device prefilling), if different

    def propose(self, *args, **kwargs):
        first, self.first_delay = self.first_delay, None
        time.sleep(self.delay if first is None else first)
        return super().propose(*args, **kwargs)


def _slow_clients(drafts, garbage: bool) -> dict[str, DraftClient]:
    clients = {f"slow-{i}": DraftClient(_SlowProposer(d, vocab_size=VOCAB), draft_ahead=False) for i, d in enumerate(drafts)}
    if garbage:
        clients["garbage"] = DraftClient(RandomDraftProposer(VOCAB, seed=3))
    return clients


@pytest.mark.parametrize("depth,drafters", list(itertools.product(["1", "2"], [1, 3])))
def test_target_steps_while_waiting_keep_greedy_equal_to_generate(models, prompts, oracle, depth, drafters):
    """``target-steps-while-waiting=on``: the server decodes sequences whose drafts are out; the
    round that brings them keeps only drafts that start with those tokens. The output is still
    the target's own greedy generate, with slow honest drafters and a garbage one."""
    target, draft_a, draft_b = models
    cfg = _config(depth, target_steps_while_waiting="on")
    clients = _slow_clients([draft_a, draft_b] if drafters == 3 else [draft_a], garbage=drafters == 3)
    result = InProcessEngine(target, [], cfg, eos_token_ids=[], clients=clients).generate(prompts)
    assert result.token_ids == oracle
    steps = result.metrics["target_steps_while_waiting"]
    assert steps["steps"] > 0 and steps["tokens"] > 0
    off = InProcessEngine(target, [], _config(depth, target_steps_while_waiting="off"), eos_token_ids=[],
                          clients=_slow_clients([draft_a], garbage=False)).generate(prompts)
    assert off.token_ids == oracle and off.metrics["target_steps_while_waiting"]["steps"] == 0


def test_a_round_keeps_only_drafts_that_start_with_the_tokens_stepped_meanwhile(models, prompts, oracle):
    """Coordinator level, deterministic: plan a round, let the target step its sequences once
    while the drafts are out, then complete the round. The target drafting for itself starts
    with exactly the stepped token, so its drafts are shifted past it and accepted; a garbage
    client's drafts do not, so it drops out of those rows. Output: the target's generate."""
    from specfed_flwr.coordinator import Coordinator
    from specfed_flwr.target import TargetVerifier

    target = models[0]
    cfg = _config("1", target_steps_while_waiting="on")
    honest = DraftClient(HFDraftProposer(target, vocab_size=VOCAB))
    garbage = DraftClient(RandomDraftProposer(VOCAB, seed=5))
    coord = Coordinator(TargetVerifier(target, vocab_size=VOCAB), cfg, eos_token_ids=[])
    for p in prompts[:3]:
        coord.submit(p)
    plan = coord.plan_cohort(["honest", "garbage"], None)
    replies = {"honest": honest.handle(plan.requests["honest"])[0], "garbage": garbage.handle(plan.requests["garbage"])[0]}
    assert coord.prefill_pending() > 0
    assert coord.step_in_flight(plan.seq_ids) == 3  # one token each, while the drafts were "out"
    report = coord.complete_round(replies, plan=plan)
    # the honest drafts lost their first position (the stepped token) and the rest was accepted
    assert report.accepted == 3 * (cfg.draft_length - 1)
    assert report.emitted == 3 * cfg.draft_length
    for seq_id in plan.seq_ids:
        assert len(coord._active[seq_id].generated) == 1 + cfg.draft_length
    while coord.has_work:
        plan = coord.plan_cohort(["honest"], None)
        coord.complete_round({"honest": honest.handle(plan.requests["honest"])[0]}, plan=plan)
    assert [r.token_ids for r in sorted(coord.finished, key=lambda r: r.index)] == oracle[:3]


def test_drafting_ahead_is_used_and_counted(models, prompts, oracle):
    target = models[0]
    # the target as its own draft: every guess is right, so replies come from drafts made ahead
    engine = InProcessEngine(target, [target], _config("2"), eos_token_ids=[])
    result = engine.generate(prompts)
    assert result.token_ids == oracle
    assert result.metrics["proactive_hits"] > 0
    assert result.metrics["clients"]["drafter-0"]["proactive_hits"] == result.metrics["proactive_hits"]


def test_devices_in_their_own_process(models, prompts, oracle):
    target = models[0]
    cfg = _config("2", weight_drop_below=0.0)  # the random tiny:1 draft agrees little: keep asking it
    settings = {"draft": "tiny:1", "draft-quantization": "none", "draft-ahead": True}
    transport = ProcessTransport(["device-a"], settings, vocab_size=VOCAB, limits=cfg, threads=1)
    try:
        result = InProcessEngine(target, [], cfg, eos_token_ids=[], transport=transport).generate(prompts)
    finally:
        transport.close()
    assert result.token_ids == oracle
    stats = result.metrics["clients"]["device-a"]
    assert stats["rounds_replied"] == stats["rounds_asked"] == len(result.rounds)
    assert result.metrics["drafted_positions"] > 0


def test_auto_depth_covers_the_transport_latency_only():
    control = DepthController(None)
    assert control.depth == 2
    # the exchange is all drafting (in-process): two cohorts, one verifying while the other drafts
    for _ in range(3):
        control.observe(exchange_seconds=0.9, verify_seconds=0.3, draft_seconds=0.9)
    assert control.depth == 2
    # 0.6 s of transport latency beyond 0.3 s verify + 0.2 s drafting: 2 + ceil(1.2) = 4
    for _ in range(6):
        control.observe(exchange_seconds=0.8, verify_seconds=0.3, draft_seconds=0.2)
    assert control.depth == 4
    # 0.2 s latency per 0.5 s cycle: one more cohort
    for _ in range(6):
        control.observe(exchange_seconds=0.4, verify_seconds=0.3, draft_seconds=0.2)
    assert control.depth == 3
    fixed = DepthController(3)
    fixed.observe(10.0, 0.01)
    assert fixed.depth == 3


def test_auto_depth_stays_at_two_while_the_devices_are_saturated():
    """Requests that queue at the device (it reports ~no wait between its reply and the next
    request) mean the devices are the bottleneck: the same latency that would add cohorts does
    not, because more cohorts only split the devices' batches. A device that waits again lets
    the latency rule add them back."""
    control = DepthController(None)
    for _ in range(6):
        control.observe(exchange_seconds=0.8, verify_seconds=0.3, draft_seconds=0.2, device_idle_seconds=0.01)
    assert control.devices_saturated(0.3) and control.depth == 2
    for _ in range(6):
        control.observe(exchange_seconds=0.8, verify_seconds=0.3, draft_seconds=0.2, device_idle_seconds=0.4)
    assert not control.devices_saturated(0.3) and control.depth == 4
    # devices that do not report their wait: the latency rule alone, as before
    blind = DepthController(None)
    for _ in range(6):
        blind.observe(exchange_seconds=0.8, verify_seconds=0.3, draft_seconds=0.2)
    assert blind.depth == 4


def test_auto_depth_with_drafting_ahead_is_one_cohort_unless_the_transport_outlasts_a_cycle():
    """Devices that draft ahead already draft while the target verifies: one cohort, whatever
    the devices' load; a second only when the transport alone takes longer than a whole
    verify + draft cycle, and back to one when it speeds up."""
    control = DepthController(None, drafts_ahead=True)
    assert control.depth == 1
    for _ in range(6):  # in-process: the reply was drafted ahead, the exchange is ~nothing
        control.observe(exchange_seconds=0.01, verify_seconds=0.3, draft_seconds=0.0, device_idle_seconds=0.5)
    assert control.depth == 1
    for _ in range(6):  # 0.4 s of latency per 0.5 s cycle: still one
        control.observe(exchange_seconds=0.6, verify_seconds=0.3, draft_seconds=0.2)
    assert control.depth == 1
    for _ in range(6):  # 1.8 s of latency (a deployment round trip) per 0.5 s cycle: 1 + 3
        control.observe(exchange_seconds=2.0, verify_seconds=0.3, draft_seconds=0.2)
    assert control.depth == 4
    for _ in range(6):
        control.observe(exchange_seconds=0.01, verify_seconds=0.3, draft_seconds=0.0)
    assert control.depth == 1


def test_draft_client_reports_its_wait_between_requests():
    """``idle_seconds``: 0 for the first request, then the time since the previous reply."""
    import time as _time

    from specfed_flwr.client_core import DraftClient
    from specfed_flwr.protocol import DraftRequest
    from specfed_flwr.proposer import HFDraftProposer
    from specfed_flwr.specs import load_target_spec

    draft = load_target_spec("tiny:1", "cpu").model
    client = DraftClient(HFDraftProposer(draft, vocab_size=1024))
    settings = dict(k=2, temperature=0.0, sampling="sparse", seed=0)
    first = DraftRequest.build([(1, 0, [5, 6, 7], 2)], round=1, **settings)
    _, m1 = client.handle(first)
    assert m1.idle_seconds == 0.0
    _time.sleep(0.2)
    second = DraftRequest.build([(1, 3, [9], 2)], round=2, **settings)
    _, m2 = client.handle(second)
    assert 0.2 <= m2.idle_seconds < 5.0
    assert m2.as_dict()["idle_seconds"] == m2.idle_seconds


# ---- sampling: the target's own law at a fixed prefix -------------------------------------------

SMALL_V = 6
DRAWS = 12_000


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts[keep].sum()
    return float(chisquare(counts[keep], expected).pvalue)


def _two_token_law(target, prefix):
    with torch.inference_mode():
        p1 = torch.softmax(target(torch.tensor([prefix])).logits[0, -1].double(), -1)
        p2 = torch.stack([torch.softmax(target(torch.tensor([prefix + [x]])).logits[0, -1].double(), -1)
                          for x in range(SMALL_V)])
    return p1, (p1[:, None] * p2).flatten().numpy()  # [V], [V*V]


def _assert_two_token_law(pairs: np.ndarray, p1: torch.Tensor, joint: np.ndarray) -> None:
    assert pairs.shape == (DRAWS, 2)
    first = np.bincount(pairs[:, 0], minlength=SMALL_V)
    both = np.bincount(pairs[:, 0] * SMALL_V + pairs[:, 1], minlength=SMALL_V * SMALL_V)
    assert _chi2_pvalue(first, p1.numpy()) > 1e-3
    assert _chi2_pvalue(both, joint) > 1e-3


@pytest.mark.parametrize("drafters", [1, 3])
def test_sampling_keeps_the_target_law_with_cohorts_and_drafting_ahead(drafters):
    target = tiny_llama(seed=10, vocab_size=SMALL_V)
    drafts = [tiny_llama(seed=11 + i, vocab_size=SMALL_V) for i in range(drafters)]
    prefix = [1, 4, 2]
    p1, joint = _two_token_law(target, prefix)
    cfg = SpecFedConfig(top_k=3, draft_length=3, max_new_tokens=2, max_active_sequences=DRAWS, max_k=SMALL_V,
                        temperature=1.0, seed=1, pipeline_depth="2", draft_ahead=True, weight_drop_below=0.0,
                        max_prompt_tokens=16)
    result = InProcessEngine(target, drafts, cfg, eos_token_ids=[]).generate([prefix] * DRAWS)
    assert result.metrics["drafted_positions"] > DRAWS // 2  # drafts were really verified
    assert len({r.cohort for r in result.rounds}) == 2
    _assert_two_token_law(np.array([s.token_ids for s in result.sequences]), p1, joint)


@pytest.mark.parametrize("drafters", [1, 3])
def test_sampling_keeps_the_target_law_when_the_target_stepped_while_drafts_were_out(drafters):
    """Deterministic: every sequence's first token comes from a target step taken while its drafts
    were out (``step_in_flight``), its second from verifying the drafts shifted past that token
    (``_skip_decoded``: kept only where the drafted first token equals it). The two-token law is
    still the target's."""
    from specfed_flwr.coordinator import Coordinator
    from specfed_flwr.target import TargetVerifier

    target = tiny_llama(seed=10, vocab_size=SMALL_V)
    clients = {f"d{i}": DraftClient(HFDraftProposer(tiny_llama(seed=11 + i, vocab_size=SMALL_V), vocab_size=SMALL_V))
               for i in range(drafters)}
    prefix = [1, 4, 2]
    p1, joint = _two_token_law(target, prefix)
    # 3 new tokens: the plan asks for 2 drafts, one is left after the stepped token (the law of
    # the first two tokens is tested)
    cfg = SpecFedConfig(top_k=3, draft_length=3, max_new_tokens=3, max_active_sequences=DRAWS, max_k=SMALL_V,
                        temperature=1.0, seed=1, weight_drop_below=0.0, max_prompt_tokens=16)
    coord = Coordinator(TargetVerifier(target, vocab_size=SMALL_V), cfg, eos_token_ids=[])
    for _ in range(DRAWS):
        coord.submit(prefix)
    plan = coord.plan_cohort(list(clients), None)
    replies = {name: client.handle(plan.requests[name])[0] for name, client in clients.items()}
    while coord.prefill_pending(max_tokens=10**6):
        pass
    assert coord.step_in_flight(plan.seq_ids) == DRAWS
    report = coord.complete_round(replies, plan=plan)
    assert report.drafted > DRAWS // 10  # drafts that started with the stepped token were verified
    while coord.has_work:  # the third tokens (not tested)
        plan = coord.plan_cohort(list(clients), None)
        coord.complete_round({n: c.handle(plan.requests[n])[0] for n, c in clients.items()}, plan=plan)
    _assert_two_token_law(np.array([r.token_ids[:2] for r in sorted(coord.finished, key=lambda r: r.index)]), p1, joint)


class _HoldingTransport:
    """Answers every request at once (the draft client runs in ``push``), except the first
    request of round ``hold``: that reply never comes, as from a device that went quiet."""

    poll_interval = 0.01
    shares_server_cpus = False

    def __init__(self, clients: dict[str, DraftClient], hold: int):
        self.clients, self.hold = clients, hold
        self.discarded: list[int] = []
        self.held: list[int] = []

    def push(self, plan, timeout):
        from specfed_flwr.pipeline import InFlight

        now = time.perf_counter()
        flight = InFlight(plan, now, now + timeout, set(plan.requests))
        if plan.round == self.hold:
            self.held = list(plan.seq_ids)
        else:
            for name, request in plan.requests.items():
                flight.handles[name] = self.clients[name].handle(request)
        return flight

    def pull(self, flights):
        for flight in flights:
            for name, answer in flight.handles.items():
                flight.raw[name] = answer
                flight.arrivals[name] = time.perf_counter()

    def decode(self, flight):
        replies = {name: reply for name, (reply, _) in flight.raw.items()}
        metrics = {name: m.as_dict() for name, (_, m) in flight.raw.items()}
        return replies, metrics, {}

    def discard(self, flight):
        self.discarded.append(flight.plan.round)

    def wait(self, seconds):
        time.sleep(seconds)


def test_a_round_whose_sequences_finished_meanwhile_is_closed_without_waiting(models, prompts, oracle):
    """A cohort's reply never comes; the target decodes its sequences to the end meanwhile (they
    got whole prompts that round, so they count as late). The round is then closed at once: the
    run does not sit out the round deadline, nobody is faulted for the missing reply, and the
    output is still the target's greedy generate."""
    from specfed_flwr.coordinator import Coordinator
    from specfed_flwr.pipeline import run_rounds
    from specfed_flwr.target import TargetVerifier

    target, draft = models[0], models[1]
    cfg = _config("2", target_steps_while_waiting="on", max_active_sequences=4)
    clients = {"device": DraftClient(HFDraftProposer(draft, vocab_size=VOCAB))}
    transport = _HoldingTransport(clients, hold=2)  # round 2: the second cohort's first round
    coord = Coordinator(TargetVerifier(target, vocab_size=VOCAB), cfg, eos_token_ids=[])
    for p in prompts:
        coord.submit(p)
    reports = []
    started = time.perf_counter()
    run_rounds(coord, transport, ["device"], depth=2, round_timeout=60.0, max_rounds=1000,
               after_round=lambda report, flight, metrics: reports.append(report))
    assert time.perf_counter() - started < 30.0  # well inside the 60 s deadline it used to wait out
    assert transport.discarded == [2]
    closed = next(r for r in reports if r.round == 2)
    assert closed.active_sequences == 0 and closed.clients_asked == 0 and closed.finished
    reported = [s.seq_id for r in reports for s in r.finished]
    assert sorted(reported) == sorted(set(reported)) and set(transport.held) <= set(reported)
    stats = coord.client_stats["device"]
    assert stats.faults == [] and stats.resyncs == 0
    assert [r.token_ids for r in sorted(coord.finished, key=lambda r: r.index)] == oracle
