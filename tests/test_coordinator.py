"""The Coordinator driven directly: plan_round -> hand-built replies -> complete_round.

No proposer model and no transport: each test decides what every client drafts, builds the
reply with ``wire.make_reply`` and checks the tokens the server committed against the target's
greedy continuation computed independently here (a plain full forward per token, no KV cache,
no ``TargetVerifier``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specfed_flwr.config import SpecFedConfig
from specfed_flwr.coordinator import Coordinator
from specfed_flwr.faults import Fault, FaultKind
from specfed_flwr.specs import tiny_llama
from specfed_flwr.target import TargetVerifier
from specfed_flwr.wire import make_reply, payload_bytes

VOCAB = 64
PROMPTS = ([5, 9, 3], [17, 2, 40, 41, 8])


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0, vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2)


@torch.inference_mode()
def greedy(model, prefix: list[int], n: int) -> list[int]:
    """The target's own greedy continuation: argmax of a full forward over the whole prefix."""
    out = list(prefix)
    for _ in range(n):
        out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(prefix):]


class FakeClient:
    """Keeps the committed sequences from the requests' deltas; replies with given drafts."""

    def __init__(self, k: int = 4, confidence: float = 0.6):
        self.k, self.confidence = k, confidence
        self.seqs: dict[int, list[int]] = {}

    def sync(self, request) -> None:
        for i, seq_id in enumerate(request.seq_ids.tolist()):
            start = int(request.starts[i])
            self.seqs[seq_id] = self.seqs.get(seq_id, [])[:start] + request.delta(i).tolist()

    def reply(self, request, drafts: dict[int, list[int]]):
        """``drafts``: sequence id -> drafted tokens (missing = nothing drafted)."""
        self.sync(request)
        seq_ids = request.seq_ids.tolist()
        lengths = [len(drafts.get(s, [])) for s in seq_ids]
        g = max(lengths + [1])
        ids = np.zeros((len(seq_ids), g, self.k), dtype=np.int64)
        probs = np.zeros((len(seq_ids), g, self.k), dtype=np.float32)
        for row, s in enumerate(seq_ids):
            for j, tok in enumerate(drafts.get(s, [])):
                others = [t for t in range(VOCAB) if t != tok][: self.k - 1]
                ids[row, j] = [tok] + others
                probs[row, j] = [self.confidence] + [(0.95 - self.confidence) / max(self.k - 1, 1)] * (self.k - 1)
        return make_reply(seq_ids, lengths, ids, probs, VOCAB)


def _coordinator(model, prompts=PROMPTS, **overrides) -> tuple[Coordinator, list[int]]:
    # fixed gamma and K (not the adaptive default): the fake clients answer with their own K
    cfg = dict(top_k=4, draft_length=4, max_k=8, max_gamma=8, max_new_tokens=12, max_active_sequences=4,
               temperature=0.0, reconstruction="uniform", adaptive=False)
    cfg.update(overrides)
    coordinator = Coordinator(TargetVerifier(model), SpecFedConfig(**cfg), eos_token_ids=[])
    return coordinator, [coordinator.submit(p) for p in prompts]


def _generated(coordinator: Coordinator, seq_id: int, prompt: list[int]) -> list[int]:
    done = [r for r in coordinator.finished if r.seq_id == seq_id]
    if done:
        return done[0].token_ids
    return coordinator.target.tokens(seq_id)[len(prompt):]


def test_perfect_draft_is_accepted_whole_with_the_bonus_token(model):
    coordinator, (a, b) = _coordinator(model)
    client = FakeClient()
    requests = coordinator.plan_round(["c"])
    assert requests["c"].gammas.tolist() == [4, 4]
    drafts = {a: greedy(model, PROMPTS[0], 4), b: greedy(model, PROMPTS[1], 4)}
    report = coordinator.complete_round({"c": client.reply(requests["c"], drafts)})
    assert (report.drafted, report.accepted, report.emitted) == (8, 8, 10)
    for seq_id, prompt in zip((a, b), PROMPTS):
        got = _generated(coordinator, seq_id, list(prompt))
        assert got == greedy(model, list(prompt), 5)
        # the 5th token is the bonus: the target's argmax after the whole accepted draft
        assert got[4] == greedy(model, list(prompt) + drafts[seq_id], 1)[0]
    assert report.alpha is not None and 0.0 <= report.alpha <= 1.0


@pytest.mark.parametrize("wrong_at", [0, 1, 3])
def test_mismatch_keeps_the_prefix_and_emits_the_target_correction(model, wrong_at):
    coordinator, (a, b) = _coordinator(model)
    client = FakeClient()
    requests = coordinator.plan_round(["c"])
    draft = greedy(model, PROMPTS[0], 4)
    draft[wrong_at] = (draft[wrong_at] + 1) % VOCAB
    report = coordinator.complete_round({"c": client.reply(requests["c"], {a: draft})})
    assert report.accepted == wrong_at and report.drafted == 4
    assert _generated(coordinator, a, PROMPTS[0]) == greedy(model, PROMPTS[0], wrong_at + 1)
    assert _generated(coordinator, b, PROMPTS[1]) == greedy(model, PROMPTS[1], 1)  # nothing drafted for b


def test_empty_draft_and_silent_client_still_advance_one_target_token(model):
    coordinator, (a, b) = _coordinator(model)
    client = FakeClient()
    requests = coordinator.plan_round(["c", "silent"])
    report = coordinator.complete_round({"c": client.reply(requests["c"], {})})
    assert (report.drafted, report.accepted, report.emitted) == (0, 0, 2)
    assert report.faults == {"silent": Fault(FaultKind.DEADLINE, "no reply")}
    assert (report.clients_asked, report.clients_replied) == (2, 1)
    assert report.alpha is None
    for seq_id, prompt in zip((a, b), PROMPTS):
        assert _generated(coordinator, seq_id, prompt) == greedy(model, prompt, 1)
    # nobody at all
    coordinator.plan_round([])
    report = coordinator.complete_round({})
    assert (report.clients_asked, report.emitted) == (0, 2)
    for seq_id, prompt in zip((a, b), PROMPTS):
        assert _generated(coordinator, seq_id, prompt) == greedy(model, prompt, 2)


def test_garbage_and_malformed_clients_never_change_the_output(model):
    coordinator, (a, b) = _coordinator(model, max_new_tokens=10)
    good, bad, liar = FakeClient(confidence=0.5), FakeClient(confidence=0.9), FakeClient()
    rng = np.random.default_rng(0)
    rounds = 0
    while coordinator.has_work:
        rounds += 1
        requests = coordinator.plan_round(["good", "bad", "liar"])
        replies = {}
        if "good" in requests:
            good.sync(requests["good"])
            drafts = {s: greedy(model, good.seqs[s], int(g)) for s, g in
                      zip(requests["good"].seq_ids.tolist(), requests["good"].gammas.tolist())}
            replies["good"] = good.reply(requests["good"], drafts)
        if "bad" in requests:
            drafts = {s: rng.integers(0, VOCAB, int(g)).tolist() for s, g in
                      zip(requests["bad"].seq_ids.tolist(), requests["bad"].gammas.tolist())}
            replies["bad"] = bad.reply(requests["bad"], drafts)
        if "liar" in requests:  # claims a sequence it was not asked for
            fake = make_reply([999], [1], [[[1, 2, 3, 4]]], [[[0.5, 0.1, 0.1, 0.1]]], VOCAB)
            replies["liar"] = fake
        report = coordinator.complete_round(replies)
        if "liar" in requests:
            assert "not asked for" in report.faults["liar"].reason
            assert report.faults["liar"].kind is FaultKind.PROTOCOL
        assert rounds < 20
    for seq_id, prompt in zip((a, b), PROMPTS):
        assert _generated(coordinator, seq_id, prompt) == greedy(model, prompt, 10)
    w = coordinator.weights
    assert w.raw_weight("good") > w.raw_weight("bad")
    assert coordinator.summary(1.0)["acceptance_rate"] > 0.5  # the good drafts were used


def test_mixed_lengths_and_k_across_sequences_and_clients(model):
    coordinator, (a, b) = _coordinator(model)
    coordinator.set_client_settings("short", 4, 2)
    coordinator.set_client_settings("wide", 4, 6)
    short, wide = FakeClient(k=2), FakeClient(k=6)
    requests = coordinator.plan_round(["short", "wide"])
    assert (requests["short"].k, requests["wide"].k) == (2, 6)
    ga, gb = greedy(model, PROMPTS[0], 4), greedy(model, PROMPTS[1], 4)
    replies = {
        "short": short.reply(requests["short"], {a: ga[:3], b: gb[:1]}),  # a: 3 positions, b: 1
        "wide": wide.reply(requests["wide"], {b: gb}),  # b: all 4, a: nothing
    }
    report = coordinator.complete_round(replies)
    # a: 3 accepted + bonus; b: "wide" carries the path past where "short" stopped: 4 + bonus
    assert report.accepted == 7 and report.drafted == 7 and report.emitted == 9
    assert _generated(coordinator, a, PROMPTS[0]) == greedy(model, PROMPTS[0], 4)
    assert _generated(coordinator, b, PROMPTS[1]) == greedy(model, PROMPTS[1], 5)
    # next round: deltas carry exactly the committed tokens, so the clients' copies match
    requests = coordinator.plan_round(["short", "wide"])
    short.sync(requests["short"])
    assert short.seqs[a] == PROMPTS[0] + greedy(model, PROMPTS[0], 4)
    assert short.seqs[b] == PROMPTS[1] + greedy(model, PROMPTS[1], 5)


def test_report_is_complete_when_returned(model):
    coordinator, (a, b) = _coordinator(model)
    client = FakeClient()
    requests = coordinator.plan_round(["c"])
    reply = client.reply(requests["c"], {a: greedy(model, PROMPTS[0], 2)})
    report = coordinator.complete_round({"c": reply}, round_seconds=0.25)
    assert report.round == 1 and report.active_sequences == 2
    assert report.uplink_bytes == payload_bytes(reply) and report.downlink_bytes == requests["c"].nbytes()
    assert report.exchange_seconds == 0.25 and report.server_seconds >= report.verify_seconds > 0
    assert set(report.weights) == {"c"} and report.faults == {}
    assert coordinator.rounds[-1] is report
    assert "round 1:" in report.line()


@pytest.mark.parametrize("rule", ["uniform", "temperature", "exact"])
def test_sampling_round_is_consistent(model, rule):
    """Sampling mode (not an exactness check, see test_sampling_exactness.py): two clients, one
    drafting the target's greedy tokens, every sequence advances by accepted + 1."""
    coordinator, (a, b) = _coordinator(model, temperature=1.0, reconstruction=rule, seed=1)
    one, two = FakeClient(), FakeClient(k=3)
    requests = coordinator.plan_round(["one", "two"])
    replies = {
        "one": one.reply(requests["one"], {a: greedy(model, PROMPTS[0], 4), b: greedy(model, PROMPTS[1], 2)}),
        "two": two.reply(requests["two"], {a: [1, 2, 3], b: [4]}),
    }
    report = coordinator.complete_round(replies)
    assert 0 <= report.accepted <= report.drafted <= 8
    assert report.emitted == report.accepted + 2
    assert report.alpha is not None and 0.0 <= report.alpha <= 1.0 + 1e-6
    assert sum(len(_generated(coordinator, s, p)) for s, p in zip((a, b), PROMPTS)) == report.emitted


# ---- faults and limits: each path yields its typed kind ------------------------------------------

def test_faults_are_counted_by_their_typed_kind_and_limits_by_key(model):
    """A transport's typed fault, a reply answering another question (protocol) and a missing
    reply (deadline) each land in the summary under their own kind; a limit kind also counts the
    limit. A plain-string fault is refused: its kind must be decided where it was seen."""
    coordinator, (a, b) = _coordinator(model)
    client = FakeClient()
    requests = coordinator.plan_round(["ok", "late", "over", "liar"])
    liar = make_reply([999], [1], [[[1, 2, 3, 4]]], [[[0.5, 0.1, 0.1, 0.1]]], VOCAB)
    over = Fault(FaultKind.LIMIT_MAX_K, "reply from over: field 'token_ids': K=99 slots exceeds max_k=8")
    report = coordinator.complete_round({"ok": client.reply(requests["ok"], {}), "liar": liar},
                                        faults={"over": over})
    assert {c: f.kind for c, f in report.faults.items()} == {
        "late": FaultKind.DEADLINE, "over": FaultKind.LIMIT_MAX_K, "liar": FaultKind.PROTOCOL}
    summary = coordinator.summary(1.0)
    assert summary["faults"] == {"late": {"deadline": 1}, "over": {"limit:max-k": 1}, "liar": {"protocol": 1}}
    assert summary["limits"]["max_k"]["hits"] == 1 and summary["limits"]["max_gamma"]["hits"] == 0
    coordinator.plan_round(["ok"])
    with pytest.raises(TypeError, match="not a faults.Fault"):
        coordinator.complete_round({}, faults={"ok": "no reply"})


@pytest.mark.parametrize("kind, limit", [(FaultKind.LIMIT_MAX_K, "max_k"), (FaultKind.LIMIT_MAX_GAMMA, "max_gamma"),
                                         (FaultKind.LIMIT_MAX_REPLY_BYTES, "max_reply_bytes")])
def test_each_limit_kind_counts_its_own_limit(model, kind, limit):
    assert kind.limit == limit
    coordinator, _ = _coordinator(model)
    coordinator.plan_round(["c"])
    coordinator.complete_round({}, faults={"c": Fault(kind, "refused")})
    hits = {name: entry["hits"] for name, entry in coordinator.limits().items()}
    assert hits[limit] == 1 and sum(hits[k] for k in ("max_k", "max_gamma", "max_reply_bytes")) == 1


def test_missed_rounds_deselect_then_the_probe_rejoins_as_typed_events(model):
    """max-missed-rounds in a row bench a client (event ``deselected``); its probe after
    rejoin-after-rounds that answers brings it back (``rejoined``)."""
    coordinator, _ = _coordinator(model, max_new_tokens=12, max_missed_rounds=2, rejoin_after_rounds=2)
    client = FakeClient()
    asked = []
    for _ in range(6):
        requests = coordinator.plan_round(["flaky"])
        asked.append("flaky" in requests)
        replies = {"flaky": client.reply(requests["flaky"], {})} if "flaky" in requests and len(asked) > 2 else {}
        coordinator.complete_round(replies)
    # rounds 1-2 missed -> benched at round 2 until round 4; round 4 probe answers
    assert asked[:4] == [True, True, False, True]
    kinds = coordinator.summary(1.0)["faults"]["flaky"]
    assert kinds == {"deadline": 2, "deselected": 1, "rejoined": 1}


@pytest.mark.parametrize("adaptive", [False, True])
def test_settings_asked_are_reported_per_round_and_summarised(model, adaptive):
    """Every report names the (gamma, K) each client was asked for; fixed settings stay at draft-length
    and top-k, while the adaptive controller lengthens the drafts of a client whose drafts are all
    accepted. The output is the target's greedy continuation either way."""
    coordinator, seq_ids = _coordinator(model, adaptive=adaptive, max_new_tokens=24)
    client = FakeClient(confidence=0.9)
    asked = []
    while coordinator.has_work:
        request = coordinator.plan_round(["c"])["c"]
        client.sync(request)
        client.k = int(request.k)  # answer with the K asked for
        drafts = {s: greedy(model, client.seqs[s], int(g)) for s, g in
                  zip(request.seq_ids.tolist(), request.gammas.tolist())}
        report = coordinator.complete_round({"c": client.reply(request, drafts)})
        gamma, k = report.settings["c"]
        assert k == int(request.k) and gamma >= max(request.gammas.tolist())
        asked.append(gamma)
    if adaptive:
        assert max(asked) > 4  # started at draft-length 4; every draft accepted -> longer drafts
    else:
        assert set(asked) == {4}
    summary = coordinator.summary(1.0)["settings"]["c"]
    assert (summary["gamma_min"], summary["gamma_max"], summary["rounds"]) == (min(asked), max(asked), len(asked))
    for seq_id, prompt in zip(seq_ids, PROMPTS):
        assert _generated(coordinator, seq_id, prompt) == greedy(model, prompt, 24)
