"""Malformed replies thrown at the server side never raise out of the strategy.

Property-based: hypothesis builds replies with wrong shapes, dtypes, values, sizes, missing
records and error replies; ``SpecFedStrategy.decode_replies`` + ``Coordinator.complete_round``
must turn every one into a per-node fault, and the greedy output must stay the target's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from transformers import LlamaConfig, LlamaForCausalLM

from specfed_flwr.config import SpecFedConfig
from specfed_flwr.coordinator import Coordinator
from specfed_flwr.faults import EventKind, FaultKind
from specfed_flwr.records import record_arrays
from specfed_flwr.strategies import SpecFedStrategy
from specfed_flwr.target import TargetVerifier

VOCAB = 64


@pytest.fixture(scope="module")
def target_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


class FakeReply:
    """Duck-types a Flower reply Message (real ones need a running Flower context)."""

    def __init__(self, content: RecordDict | None = None, error: str | None = None):
        self.content = content if content is not None else RecordDict()
        self._error = error

    def has_error(self) -> bool:
        return self._error is not None

    @property
    def error(self):
        class _E:
            reason = self._error

        return _E()


def _valid_arrays(seq_ids, gamma, k):
    b = len(seq_ids)
    ids = np.zeros((b, gamma, k), dtype=np.uint16)
    probs = np.zeros((b, gamma, k), dtype=np.float16)
    for i in range(b):
        for j in range(gamma):
            ids[i, j] = np.arange(k) + 1
            probs[i, j] = 0.9 / k
    return {"seq_ids": np.array(seq_ids, dtype=np.int64), "lengths": np.full(b, gamma, dtype=np.int32),
            "token_ids": ids, "probs": probs}


dtypes = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.float16, np.float32, np.float64, np.bool_])
wild_arrays = hnp.arrays(dtype=dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))


@st.composite
def malformed_content(draw):
    kind = draw(st.sampled_from(["random_fields", "mutate_valid", "no_draft_record", "error", "huge"]))
    if kind == "error":
        return FakeReply(error=draw(st.text(max_size=20)))
    if kind == "no_draft_record":
        return FakeReply(RecordDict({"metrics": MetricRecord({"x": 1.0})}))
    if kind == "random_fields":
        names = draw(st.lists(st.sampled_from(["seq_ids", "lengths", "token_ids", "probs", "extra"]), max_size=5, unique=True))
        arrays = {n: draw(wild_arrays) for n in names}
    elif kind == "huge":
        arrays = _valid_arrays([1, 2], 4, 8)
        arrays["token_ids"] = np.zeros((2, 4, 4096), dtype=np.uint16)
        arrays["probs"] = np.zeros((2, 4, 4096), dtype=np.float16)
    else:
        arrays = _valid_arrays([1, 2], 4, 8)
        field = draw(st.sampled_from(list(arrays)))
        arrays[field] = draw(wild_arrays)
    record = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()})
    return FakeReply(RecordDict({"draft": record}))


def _strategy_and_coordinator(model):
    # a node is never benched here (max-missed-rounds): these tests send it bad replies on purpose,
    # round after round, and look at how each one is refused (tests/test_roster.py covers benching)
    cfg = SpecFedConfig(top_k=8, draft_length=4, max_k=16, max_gamma=8, max_new_tokens=6, max_reply_bytes=4096,
                        max_active_sequences=4, max_missed_rounds=1000)
    verifier = TargetVerifier(model)
    strategy = SpecFedStrategy(verifier, cfg)
    coordinator = Coordinator(verifier, cfg, eos_token_ids=[])
    coordinator.submit([1, 2, 3])
    coordinator.submit([4, 5])
    return strategy, coordinator


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=malformed_content())
def test_malformed_replies_never_raise_out_of_the_strategy(target_model, bad):
    strategy, coordinator = _strategy_and_coordinator(target_model)
    requests = coordinator.plan_round(["1", "2"])
    good = FakeReply(RecordDict({"draft": ArrayRecord({n: Array(a) for n, a in _valid_arrays([1, 2], 4, 8).items()})}))
    replies, metrics, faults = strategy.decode_replies(requests, {"1": bad, "2": good})
    report = coordinator.complete_round(replies, client_metrics=metrics, faults=faults)
    assert "2" not in report.faults
    if "1" not in replies:
        assert "1" in report.faults and report.faults["1"]
    assert report.emitted >= 2  # both sequences advanced


def test_faulty_node_is_named_with_the_reason(target_model):
    strategy, coordinator = _strategy_and_coordinator(target_model)
    requests = coordinator.plan_round(["1", "2"])
    arrays = _valid_arrays([1, 2], 4, 8)
    arrays["probs"][0, 0, 0] = np.nan
    bad = FakeReply(RecordDict({"draft": ArrayRecord({n: Array(a) for n, a in arrays.items()})}))
    replies, metrics, faults = strategy.decode_replies(requests, {"1": bad})
    assert "node 1" in faults["1"].reason and "probs" in faults["1"].reason
    assert faults["1"].kind is FaultKind.WIRE_FORMAT
    assert "no reply" in faults["2"].reason and faults["2"].kind is FaultKind.DEADLINE
    report = coordinator.complete_round(replies, client_metrics=metrics, faults=faults)
    assert set(report.faults) == {"1", "2"}
    assert coordinator.client_stats["1"].faults and coordinator.client_stats["2"].faults


def test_claiming_other_sequences_is_refused(target_model):
    strategy, coordinator = _strategy_and_coordinator(target_model)
    requests = coordinator.plan_round(["1"])
    arrays = _valid_arrays([1, 99], 4, 8)  # sequence 99 was never asked for
    bad = FakeReply(RecordDict({"draft": ArrayRecord({n: Array(a) for n, a in arrays.items()})}))
    replies, metrics, faults = strategy.decode_replies(requests, {"1": bad})
    report = coordinator.complete_round(replies, client_metrics=metrics, faults=faults)
    assert "not asked for" in report.faults["1"].reason and report.faults["1"].kind is FaultKind.PROTOCOL


def test_greedy_output_unchanged_by_garbage(target_model):
    """Adversarial drafts every round: the output is still the target's greedy continuation."""
    strategy, coordinator = _strategy_and_coordinator(target_model)
    rng = np.random.default_rng(0)
    while coordinator.has_work:
        requests = coordinator.plan_round(["1"])
        if "1" not in requests:
            coordinator.complete_round({})
            continue
        req = requests["1"]
        arrays = _valid_arrays(req.seq_ids.tolist(), 4, 8)
        arrays["lengths"] = req.gammas.astype(np.int32)
        for i in range(len(req.seq_ids)):
            for j in range(4):
                arrays["token_ids"][i, j] = rng.choice(VOCAB, 8, replace=False)
        msg = FakeReply(RecordDict({"draft": ArrayRecord({n: Array(a) for n, a in arrays.items()})}))
        replies, metrics, faults = strategy.decode_replies(requests, {"1": msg})
        coordinator.complete_round(replies, client_metrics=metrics, faults=faults)
    for seq in coordinator.finished:
        x = torch.tensor([seq.prompt_ids])
        expected = target_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                         pad_token_id=0, eos_token_id=None)[0, x.shape[1]:].tolist()
        assert seq.token_ids == expected
    # the garbage client's weight collapsed
    assert coordinator.weights.raw_weight("1") < coordinator.weights.raw_weight("never-seen")


# ---- the whole server loop: SpecFedStrategy.generate over a scripted grid ---------------------

@st.composite
def bad_values(draw):
    """Right dtypes and shapes, wrong values: lengths, ids, probabilities, sequence ids."""
    b, g, k = 2, draw(st.integers(0, 9)), draw(st.integers(1, 20))
    arrays = {
        "seq_ids": draw(hnp.arrays(np.int64, (b,), elements=st.sampled_from([1, 2, 3, 0, -1, 99, 2**62]))),
        "lengths": draw(hnp.arrays(np.int32, (b,), elements=st.integers(-3, 12))),
        "token_ids": draw(hnp.arrays(np.uint16, (b, g, k))),
        "probs": draw(hnp.arrays(np.float16, (b, g, k), elements=st.floats(width=16, allow_nan=True, allow_infinity=True))),
    }
    return FakeReply(RecordDict({"draft": ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()})}))


wild_metrics = st.dictionaries(
    st.sampled_from(["draft_seconds", "pid", "state_lost", "draft_loads", "positions", "junk"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**62), 2**62)),
    max_size=4,
)

bad_handshake = st.one_of(
    st.just(None),  # no reply
    st.just("error"),
    st.just({}),  # no info record
    st.fixed_dictionaries({}, optional={
        "vocab_size": st.one_of(st.integers(-5, 70), st.text(max_size=3), st.floats(allow_nan=True)),
        "vocab_sha256": st.text(max_size=5),
        "max-k": st.one_of(st.integers(-3, 100), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)),
        "uplink-mbps": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 5), st.text(max_size=3)),
        "rtt-ms": st.one_of(st.floats(allow_nan=True), st.integers(-10, 10)),
        "prompts": st.one_of(st.lists(st.text(max_size=4), max_size=2), st.lists(st.integers(), max_size=2)),
        "pid": st.integers(0, 10),
    }),
)


class ScriptedGrid:
    """A Grid that answers synchronously: node 1 honestly shaped random drafts, node 2 what the test says."""

    def __init__(self, handshake_of_2, replies_of_2, rng):
        self.handshake_of_2 = handshake_of_2
        self.replies_of_2 = list(replies_of_2)
        self.rng = rng
        self.inbox: list = []

    def get_node_ids(self):
        return [1, 2]

    def _answer(self, node, message):
        from flwr.app import ConfigRecord, Error, Message

        if message.metadata.message_type == "query.handshake":
            if node == 1:
                return Message(RecordDict({"info": ConfigRecord({"vocab_size": VOCAB, "pid": 1})}), reply_to=message)
            info = self.handshake_of_2
            if info is None:
                return None
            if info == "error":
                return Message(Error(code=0, reason="handshake exploded"), reply_to=message)
            if not info:
                return Message(RecordDict({}), reply_to=message)
            clean = {k: v for k, v in info.items() if not (isinstance(v, list) and not v)}
            return Message(RecordDict({"info": ConfigRecord(clean)}), reply_to=message)
        if node == 2:
            if not self.replies_of_2:
                return None
            bad, metrics = self.replies_of_2.pop(0)
            if bad.has_error():
                return Message(Error(code=1, reason=bad.error.reason), reply_to=message)
            content = bad.content
            if metrics:
                content["metrics"] = MetricRecord(metrics)
            return Message(content, reply_to=message)
        req = record_arrays(message.content.array_records["request"])
        k = int(message.content.config_records["config"]["k"])
        arrays = _valid_arrays(req["seq_ids"].tolist(), max(1, int(req["gammas"].max(initial=0))), k)
        arrays["lengths"] = req["gammas"].astype(np.int32)
        for i in range(arrays["token_ids"].shape[0]):
            for j in range(arrays["token_ids"].shape[1]):
                arrays["token_ids"][i, j] = self.rng.choice(VOCAB, k, replace=False)
        return Message(RecordDict({"draft": ArrayRecord({n: Array(a) for n, a in arrays.items()})}), reply_to=message)

    def push_messages(self, messages):
        import uuid

        ids = []
        for m in messages:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            out = self._answer(int(m.metadata.dst_node_id), m)
            if out is not None:
                self.inbox.append(out)
        return ids

    def pull_messages(self, message_ids):
        wanted = set(message_ids)
        out = [m for m in self.inbox if m.metadata.reply_to_message_id in wanted]
        self.inbox = [m for m in self.inbox if m.metadata.reply_to_message_id not in wanted]
        return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    # node 2 passes the handshake often enough for its junk draft replies to be exercised
    handshake=st.one_of(st.just({"vocab_size": VOCAB, "pid": 2}), bad_handshake),
    replies=st.lists(st.tuples(st.one_of(malformed_content(), bad_values()), wild_metrics), min_size=1, max_size=8),
    adaptive=st.booleans(),
)
def test_generate_survives_any_reply(target_model, flower_task_identity, handshake, replies, adaptive):
    """The whole server loop (handshake, rounds, validation, verification) with node 2 sending
    junk: it never raises, the output is the target's greedy continuation, and node 2 is either
    refused at the handshake or has its bad replies counted as faults."""
    cfg = SpecFedConfig(top_k=8, draft_length=4, max_k=16, max_gamma=8, max_new_tokens=6, max_reply_bytes=4096,
                        max_active_sequences=4, round_timeout=0.02, handshake_timeout=0.02, node_wait_timeout=0.02,
                        adaptive=adaptive, max_missed_rounds=2, rejoin_after_rounds=2)
    strategy = SpecFedStrategy(TargetVerifier(target_model), cfg)
    grid = ScriptedGrid(handshake, replies, np.random.default_rng(0))
    prompts = [[1, 2, 3], [4, 5], [6]]
    result = strategy.generate(grid, prompts)
    for seq, prompt in zip(result.sequences, prompts):
        x = torch.tensor([prompt])
        expected = target_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                         pad_token_id=0, eos_token_id=None)[0, x.shape[1]:].tolist()
        assert seq.token_ids == expected
    assert [s.index for s in result.sequences] == [0, 1, 2]
    assert "1" in result.nodes
    if "2" in result.excluded:
        assert result.summary["faults"]["2"] == {"handshake-refused": 1}
    else:
        # every round that asked node 2 either used its reply or counted one typed fault for it.
        # Verified to fail: with the fault bookkeeping in Coordinator._validate_replies
        # (``stats.faults.append``) commented out, this fails on the first junk reply.
        stats = result.summary["clients"]["2"]
        assert stats["rounds_asked"] >= 1
        assert stats["rounds_asked"] == stats["rounds_replied"] + len(stats["faults"])
        kinds = stats["fault_kinds"]
        assert sum(kinds.values()) == len(stats["faults"])
        assert set(kinds) <= {k.value for k in FaultKind}
        assert set(stats["event_kinds"]) <= {k.value for k in EventKind}


# ---- limits: enforced, counted in the summary, logged once ------------------------------------

def _reply(arrays):
    return FakeReply(RecordDict({"draft": ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()})}))


def test_reply_limits_are_enforced_and_reported(target_model, caplog):
    strategy, coordinator = _strategy_and_coordinator(target_model)  # max_k 16, max_gamma 8, 4096 bytes
    cases = {
        "max_k": _valid_arrays([1, 2], 4, 32),
        "max_gamma": _valid_arrays([1, 2], 12, 8),
        "max_reply_bytes": _valid_arrays([1, 2], 8, 16) | {"token_ids": np.zeros((2, 8, 16), np.uint16),
                                                           "probs": np.zeros((2, 8, 16), np.float16)},
    }
    cases["max_reply_bytes"]["seq_ids"] = np.arange(1, 3, dtype=np.int64)
    big = {n: np.concatenate([a] * 40) if a.ndim else a for n, a in cases["max_reply_bytes"].items()}
    big["seq_ids"] = np.arange(1, 81, dtype=np.int64)
    cases["max_reply_bytes"] = big
    with caplog.at_level("INFO", logger="specfed_flwr"):
        for _ in range(2):  # twice: counted twice, logged once
            for limit, arrays in cases.items():
                requests = coordinator.plan_round(["1"])
                replies, metrics, faults = strategy.decode_replies(requests, {"1": _reply(arrays)})
                report = coordinator.complete_round(replies, client_metrics=metrics, faults=faults)
                assert "1" in report.faults, limit
    limits = coordinator.summary(1.0)["limits"]
    for limit in cases:
        assert limits[limit]["hits"] == 2, (limit, limits[limit])
        assert limits[limit]["value"] == getattr(coordinator.config, limit)
        logged = [r for r in caplog.records if f"limit {limit.replace('_', '-')}=" in r.getMessage()]
        assert len(logged) == 1, (limit, [r.getMessage() for r in logged])
    kinds = coordinator.summary(1.0)["faults"]["1"]
    assert kinds["limit:max-k"] == kinds["limit:max-gamma"] == kinds["limit:max-reply-bytes"] == 2


def test_workload_limits_are_enforced_and_reported(target_model, flower_task_identity, caplog):
    """max-active-sequences caps the batch, max-new-tokens the output, max-prompt-tokens refuses
    a prompt (reported, the run goes on); a node asking for K above max-k gets max-k."""
    # strict rounds (pipeline-depth 1), so that one round's batch is every active sequence
    cfg = SpecFedConfig(top_k=8, draft_length=4, max_k=8, max_gamma=8, max_new_tokens=5, max_active_sequences=2,
                        max_prompt_tokens=6, round_timeout=0.5, handshake_timeout=0.5, node_wait_timeout=0.02,
                        pipeline_depth="1")
    strategy = SpecFedStrategy(TargetVerifier(target_model), cfg)
    grid = ScriptedGrid({"vocab_size": VOCAB, "max-k": 64}, [], np.random.default_rng(1))
    grid.replies_of_2 = None  # node 2 answers like node 1
    answer = grid._answer
    grid._answer = lambda node, m: answer(1 if m.metadata.message_type == "query.draft" else node, m)
    prompts = [[1, 2], [3, 4, 5], list(range(1, 10)), [6], [7, 8]]  # prompt 2 is too long
    with caplog.at_level("INFO", logger="specfed_flwr"):
        result = strategy.generate(grid, prompts)
    assert [s.index for s in result.sequences] == [0, 1, 3, 4]
    assert all(len(s.token_ids) == 5 and s.finish_reason == "length" for s in result.sequences)
    assert max(r.active_sequences for r in result.rounds) == 2
    limits = result.summary["limits"]
    assert limits["max_active_sequences"]["hits"] >= 1
    assert limits["max_new_tokens"]["hits"] == 4
    assert limits["max_prompt_tokens"]["hits"] == 1
    assert "above max-prompt-tokens 6" in result.summary["refused_prompts"][2]
    assert any("limit max-prompt-tokens=6 hit" in r.getMessage() for r in caplog.records)
    # K asked of node 2 stayed within max-k although it offered 64
    assert all(r.clients_asked <= 2 for r in result.rounds)
    assert result.summary["topk_bytes_per_position"] <= 8 * (2 + 2)
