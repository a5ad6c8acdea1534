"""Typed faults: every fault path yields its ``FaultKind``, and no kind is read back out of text.

The grep-level check walks the package's syntax trees: a kind derived from a message would show
up as ``reason.startswith(...)`` or ``"exceeds max_k" in text``. ``test_the_checker_flags_the_old
_text_parser`` runs the checker on the parser this replaced, so the check itself can fail.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest

from specfed_flwr.faults import EventKind, Fault, FaultKind
from specfed_flwr.wire import WireFormatError, decode_reply, make_reply, reply_to_arrays

PACKAGE = Path(__file__).resolve().parent.parent / "specfed_flwr"

#: names that hold a fault's or an event's text wherever it travels
_TEXT_NAMES = {"reason", "text", "problem", "detail", "message", "msg", "error", "why", "exc"}


def _is_text(node: ast.AST) -> bool:
    """``reason`` / ``self.reason`` / ``str(exc)`` / ``fault.reason``: an expression holding message text."""
    if isinstance(node, ast.Name):
        return node.id in _TEXT_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in _TEXT_NAMES
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "str" and node.args:
        return _is_text(node.args[0])
    return False


#: (module, function) that look at text for another reason than a fault's or an event's kind
ALLOWED = {
    ("cli.py", "parse_override"): "splits the user's key=value override, not a message",
    ("spawn.py", "address_in_use"): "a child process's log is all there is to tell a port clash (no errno object)",
}


def _functions(tree: ast.AST):
    """(function name, node) for every node, named by its innermost enclosing function ("" at module level)."""
    def walk(node, name):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            yield inner, child
            yield from walk(child, inner)
    yield from walk(tree, "")


def text_derivations(source: str) -> list[tuple[int, str, str]]:
    """(line, function, snippet) of every place that classifies message text:
    ``<text>.startswith(...)`` / ``.endswith(...)``, or ``"literal" in <text>``."""
    found = []
    for function, node in _functions(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith") and _is_text(node.func.value)):
            found.append((node.lineno, function, ast.unparse(node)))
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)) and _is_text(right):
                    found.append((node.lineno, function, ast.unparse(node)))
    return found


def test_no_fault_or_event_kind_is_derived_from_message_text():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree_text = path.read_text()
        for line, function, snippet in text_derivations(tree_text):
            if (path.name, function) in ALLOWED:
                continue
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {snippet}")
        for node in ast.walk(ast.parse(tree_text)):
            if isinstance(node, ast.FunctionDef) and node.name in ("fault_kind", "event_kind"):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: def {node.name}")
    assert not offenders, "kinds must be typed where the fault is seen, not parsed from text:\n" + "\n".join(offenders)


def test_the_checker_flags_the_old_text_parser():
    old = '''
def fault_kind(reason):
    text = str(reason)
    if "exceeds max_k" in text:
        return "limit:max-k"
    if text.startswith("no reply"):
        return "deadline"
'''
    assert [(line, function) for line, function, _ in text_derivations(old)] == [(4, "fault_kind"), (6, "fault_kind")]


def test_kinds_are_the_summary_keys():
    assert FaultKind.LIMIT_MAX_K.value == "limit:max-k" and FaultKind.DEADLINE == "deadline"
    assert {k.limit for k in FaultKind} == {None, "max_k", "max_gamma", "max_reply_bytes"}
    assert EventKind.WEIGHT_COLLAPSED.value == "weight-collapsed"
    assert str(Fault(FaultKind.PROTOCOL, "reply is missing sequences [3]")) == "reply is missing sequences [3]"


# ---- the wire's faults ----------------------------------------------------------------------------

def _arrays(b=2, g=3, k=4, vocab=64):
    ids = np.tile(np.arange(k, dtype=np.int64), (b, g, 1))
    probs = np.full((b, g, k), 0.9 / k, dtype=np.float32)
    return reply_to_arrays(make_reply(list(range(1, b + 1)), [g] * b, ids, probs, vocab))


@pytest.mark.parametrize("limits, kind", [
    (dict(max_k=2), FaultKind.LIMIT_MAX_K),
    (dict(max_gamma=2), FaultKind.LIMIT_MAX_GAMMA),
    (dict(max_bytes=64), FaultKind.LIMIT_MAX_REPLY_BYTES),
])
def test_wire_limits_carry_their_limit_kind(limits, kind):
    kw = dict(vocab_size=64, max_k=8, max_gamma=8, client="node 1") | limits
    with pytest.raises(WireFormatError) as info:
        decode_reply(_arrays(), **kw)
    assert info.value.kind is kind
    assert Fault.from_exception(info.value) == Fault(kind, str(info.value))
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries with its kind
    assert again.kind is kind and str(again) == str(info.value)


def test_other_wire_refusals_are_wire_format():
    arrays = _arrays()
    arrays["probs"] = arrays["probs"].copy()
    arrays["probs"][0, 0, 0] = np.nan
    with pytest.raises(WireFormatError) as info:
        decode_reply(arrays, vocab_size=64, max_k=8, max_gamma=8, client="node 1")
    assert info.value.kind is FaultKind.WIRE_FORMAT
    arrays = _arrays(k=4)
    with pytest.raises(WireFormatError) as info:  # K above the vocabulary is a format error, not max-k
        decode_reply(arrays, vocab_size=3, max_k=8, max_gamma=8, client="node 1")
    assert info.value.kind is FaultKind.WIRE_FORMAT


# ---- the Flower side: records, error codes, the strategy's decode -------------------------------

class _Reply:
    def __init__(self, content=None, code=None, reason="boom"):
        from flwr.app import RecordDict

        self.content = content if content is not None else RecordDict()
        self._code, self._reason = code, reason

    def has_error(self):
        return self._code is not None

    @property
    def error(self):
        class _E:
            code, reason = self._code, self._reason

        return _E()


def test_missing_record_has_its_kind():
    from flwr.app import RecordDict

    from specfed_flwr.records import MissingRecordError, reply_arrays

    with pytest.raises(MissingRecordError) as info:
        reply_arrays(RecordDict())
    assert Fault.from_exception(info.value).kind is FaultKind.MISSING_RECORD
    assert Fault.from_exception(RuntimeError("whatever")).kind is FaultKind.INVALID_REPLY


def test_flower_error_codes_map_in_one_place():
    from flwr.common.constant import ErrorCode

    from specfed_flwr.strategies.strategy_utils import error_reply_fault

    expired = error_reply_fault(_Reply(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE), 2.0)
    assert expired.kind is FaultKind.DEADLINE and "2 s round deadline" in expired.reason
    assert error_reply_fault(_Reply(code=ErrorCode.MESSAGE_UNAVAILABLE), 2.0).kind is FaultKind.DEADLINE
    assert error_reply_fault(_Reply(code=ErrorCode.NODE_UNAVAILABLE), 2.0).kind is FaultKind.DEADLINE
    raised = error_reply_fault(_Reply(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ValueError: bad"), 2.0)
    assert raised.kind is FaultKind.ERROR_REPLY and raised.reason.endswith("ValueError: bad")


def test_strategy_decode_types_every_fault():
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from specfed_flwr.config import SpecFedConfig
    from specfed_flwr.coordinator import Coordinator
    from specfed_flwr.specs import tiny_llama
    from specfed_flwr.strategies import SpecFedStrategy
    from specfed_flwr.target import TargetVerifier

    target = TargetVerifier(tiny_llama(seed=0, vocab_size=64, hidden_size=32, num_layers=1, num_heads=2))
    cfg = SpecFedConfig(top_k=4, draft_length=3, max_k=8, max_gamma=8)
    coordinator = Coordinator(target, cfg)
    coordinator.submit([1, 2, 3])
    requests = coordinator.plan_round(["ok", "none", "norecord", "junk", "wide"])
    good = _arrays(b=1, g=3, k=4)
    wide = _arrays(b=1, g=3, k=16)
    draft = lambda arrays: RecordDict({"draft": ArrayRecord({n: Array(a) for n, a in arrays.items()})})  # noqa: E731
    junk = RecordDict({"draft": ArrayRecord({"seq_ids": Array(np.zeros(1, np.int64))}),
                       "metrics": ConfigRecord({"x": 1})})
    raw = {"ok": _Reply(draft(good)), "norecord": _Reply(RecordDict()), "junk": _Reply(junk),
           "wide": _Reply(draft(wide))}
    replies, _, faults = SpecFedStrategy(target, cfg).decode_replies(requests, raw)
    assert set(replies) == {"ok"}
    assert {n: f.kind for n, f in faults.items()} == {
        "none": FaultKind.DEADLINE, "norecord": FaultKind.MISSING_RECORD,
        "junk": FaultKind.WIRE_FORMAT, "wide": FaultKind.LIMIT_MAX_K}


# ---- the in-process transport ---------------------------------------------------------------------

def test_thread_transport_types_its_faults():
    from specfed_flwr.inprocess import ThreadTransport
    from specfed_flwr.protocol import DraftRequest, RoundPlan

    class Broken:
        def handle(self, request):
            raise RuntimeError("drafter exploded")

        def stop_ahead(self):
            pass

    transport = ThreadTransport({"broken": Broken(), "slow": Broken()})
    try:
        request = DraftRequest.build([(1, 0, [1, 2], 2)], k=2, temperature=0.0, sampling="sparse", seed=0, round=1)
        plan = RoundPlan(round=1, cohort=None, seq_ids=[1], requests={"broken": request}, committed={1: 2})
        flight = transport.push(plan, 5.0)
        flight.plan = RoundPlan(round=1, cohort=None, seq_ids=[1], requests={"broken": request, "slow": request},
                                committed={1: 2})
        for _ in range(200):
            transport.pull([flight])
            if "broken" in flight.raw:
                break
            transport.wait(0.05)
        _, _, faults = transport.decode(flight)
    finally:
        transport.close()
    assert faults["broken"].kind is FaultKind.ERROR_REPLY and "drafter exploded" in faults["broken"].reason
    assert faults["slow"].kind is FaultKind.DEADLINE
