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
from specfed_flwr.engine import Coordinator
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
    cfg = SpecFedConfig(top_k=8, draft_length=4, max_k=16, max_gamma=8, max_new_tokens=6, max_reply_bytes=4096,
                        max_active_sequences=4)
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
    assert "node 1" in faults["1"] and "probs" in faults["1"]
    assert "no reply" in faults["2"]
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
    assert "not asked for" in report.faults["1"]


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
