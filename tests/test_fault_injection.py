"""Fault injection through Flower's simulation engine (issue 6, acceptance 1 and 2).

Four SuperNodes, each broken differently (``specfed_flwr.faultapp``): one crashes from round 3
on, one sends NaN probabilities / out-of-range token ids, one sends random drafts, one answers
after the round deadline. The run must finish with the target's own greedy output and a
summary that names each fault per client. A node whose draft has another vocabulary is
refused at the handshake and the others carry on.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.simulation import run_simulation

from specfed_flwr.faultapp import make_fault_client_app
from specfed_flwr.serve import make_server_app
from specfed_flwr.specs import load_target_spec

pytestmark = pytest.mark.flower

VOCAB = 1024
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "include_dashboard": False}}
ROUND_TIMEOUT = 1.0


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def _oracle(prompts, max_new_tokens):
    target = load_target_spec("tiny:0", "cpu").model
    outs = []
    for p in prompts:
        x = torch.tensor([p])
        outs.append(target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist())
    return outs


def _run(tmp_path, faults, prompts, num_supernodes=4, **overrides):
    results = tmp_path / "results.jsonl"
    captured = {}
    cfg = {"target": "tiny:0", "draft": "tiny:0", "draft-quantization": "none", "device": "cpu",
           "chat-template": False, "results": str(results), "max-new-tokens": 10, "max-active-sequences": 4,
           "round-timeout": ROUND_TIMEOUT, "handshake-timeout": 60.0, "min-nodes": num_supernodes,
           "max-missed-rounds": 2, "rejoin-after-rounds": 3, "weight-ema": 0.7,
           # two cohorts: enough rounds in 10 tokens for every fault to show (crash on the 3rd request,
           # deselection, probes); auto keeps one cohort while the devices draft ahead
           "pipeline-depth": "2"}
    cfg.update(overrides)
    server_app = make_server_app(cfg, prompts=prompts, on_result=lambda r: captured.update(r=r))
    client_app = make_fault_client_app(faults, crash_round=3, slow_seconds=ROUND_TIMEOUT + 0.4, vocab_size=VOCAB)
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_config=BACKEND)
    assert "r" in captured, "the ServerApp did not finish (see the log above)"
    return captured["r"], [json.loads(line) for line in results.read_text().splitlines()]


def test_four_faulty_clients_run_finishes_with_target_output(tmp_path):
    kinds = {0: "crash", 1: "nan", 2: "random", 3: "slow"}
    prompts = _prompts(3, seed=11)
    result, records = _run(tmp_path, kinds, prompts)

    assert result.token_ids == _oracle(prompts, 10)
    assert sorted(r["index"] for r in records) == list(range(len(prompts)))
    assert len(result.nodes) == 4 and not result.excluded

    partition = {name: int(info["partition-id"]) for name, info in result.nodes.items()}
    node = {p: name for name, p in partition.items()}
    summary_faults = result.summary["faults"]
    clients = result.summary["clients"]
    print(json.dumps(summary_faults, indent=1))

    # crash: error replies from round 3 on (never before), then deselected
    crash = clients[node[0]]
    assert summary_faults[node[0]].get("error-reply", 0) >= 1
    first_error = min(int(f.split(":")[0].split()[1]) for f in crash["faults"] if "error reply" in f)
    assert first_error >= 3
    assert "injected crash" in crash["faults"][0] or any("injected crash" in f for f in crash["faults"])
    assert crash["rounds_replied"] >= 1  # it drafted before it crashed
    # NaN / out-of-range ids: refused by the wire checks, with the reason
    nan = clients[node[1]]
    assert summary_faults[node[1]].get("wire-format", 0) >= 2
    # (greedy runs send budgeted-compact replies: there the broken probability is the refused code 0)
    assert any("not finite" in f or "is not a probability" in f for f in nan["faults"])
    assert any("outside 0..1023" in f for f in nan["faults"])
    assert nan["rounds_replied"] == 0
    # random drafts: valid replies, but the bias-aware weight collapses and it is deselected
    assert summary_faults[node[2]].get("weight-collapsed", 0) >= 1
    assert result.summary["weights"][node[2]]["weight"] == 0.0
    # slow: misses the deadline, deselected after max-missed-rounds, probed again
    assert summary_faults[node[3]].get("deadline", 0) >= 2
    assert summary_faults[node[3]].get("deselected", 0) >= 1
    assert any(f"{ROUND_TIMEOUT:g} s round deadline" in f for f in clients[node[3]]["faults"])
    # the slow node does not hold the others up for long: deselected, probed with a growing
    # interval, so most rounds end well before the deadline
    waited = [r for r in result.rounds if node[3] in r.faults]
    assert len(waited) <= max(3, len(result.rounds) // 2), [r.round for r in waited]
    assert clients[node[3]]["rounds_asked"] == len(waited)


def test_tokenizer_mismatch_is_refused_at_the_handshake(tmp_path):
    prompts = _prompts(3, seed=5)
    result, _ = _run(tmp_path, {1: "mismatch"}, prompts, num_supernodes=2)  # partition 0 honest
    assert result.token_ids == _oracle(prompts, 10)
    assert len(result.excluded) == 1
    (name, reason), = result.excluded.items()
    assert "tokenizer mismatch" in reason and "512" in reason and "1024" in reason
    assert name not in result.nodes and len(result.nodes) == 1
    assert result.summary["faults"][name] == {"handshake-refused": 1}
    assert result.summary["accepted"] > 0  # the honest node drafted
    # the refused node was never asked to draft
    assert name not in result.summary["clients"]
