"""The Flower app on Flower's simulation engine (in-process ``run_simulation``), tiny fp32 models.

Greedy output must equal the target's own ``generate(do_sample=False)`` in both modes with
1 and 3 clients, with several concurrent sequences that finish at different rounds.
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.simulation import run_simulation

from specfed_flwr.client_app import app as client_app
from specfed_flwr.serve import make_server_app
from specfed_flwr.specs import load_target_spec

pytestmark = pytest.mark.flower

VOCAB = 1024
BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2, "include_dashboard": False}}


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def _oracle(prompts, budgets, dtype: str = "float32"):
    target = load_target_spec("tiny:0", "cpu", dtype).model
    outs = []
    for p, n in zip(prompts, budgets):
        x = torch.tensor([p])
        outs.append(target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                    pad_token_id=0, eos_token_id=None)[0, len(p):].tolist())
    return outs


def run_app(tmp_path, num_supernodes: int, prompts, **overrides):
    results = tmp_path / "results.jsonl"
    captured = {}
    cfg = {"target": "tiny:0", "draft": "tiny:0", "draft-quantization": "none", "device": "cpu", "chat-template": False, "results": str(results),
           "max-new-tokens": 10, "max-active-sequences": 4, "round-timeout": 60.0, "min-nodes": num_supernodes}
    cfg.update(overrides)
    server_app = make_server_app(cfg, prompts=prompts, on_result=lambda r: captured.update(r=r))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_config=BACKEND)
    assert "r" in captured, "the ServerApp did not finish (see the log above)"
    return captured["r"], [json.loads(line) for line in results.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["collaborative", "per-device"])
@pytest.mark.parametrize("clients", [1, 3])
def test_simulation_greedy_equals_target_generate(tmp_path, mode, clients):
    prompts = _prompts(7, seed=clients)
    # two cohorts in flight (auto keeps one while the devices draft ahead): the pipelined loop on Flower
    result, records = run_app(tmp_path, clients, prompts, mode=mode, **{"pipeline-depth": "2"})
    expected = _oracle(prompts, [10] * len(prompts))
    assert result.token_ids == expected
    # the results file holds every prompt once, in the order they finished
    assert sorted(r["index"] for r in records) == list(range(len(prompts)))
    assert {r["index"]: r["token_ids"] for r in records} == dict(enumerate(expected))
    # concurrency: 4 active at most, split over the two cohorts in flight; sequences finished in
    # several different rounds, drafts were used
    finishing_rounds = {rep.round for rep in result.rounds if rep.finished}
    assert len(finishing_rounds) >= 2
    assert len({rep.cohort for rep in result.rounds}) >= 2
    assert all(rep.active_sequences > 0 for rep in result.rounds)  # no round for an empty cohort
    assert max(rep.active_sequences for rep in result.rounds) <= 4
    # the first two rounds are the two starting cohorts, 4 sequences between them
    assert [r.cohort for r in result.rounds[:2]] == [0, 1]
    assert sum(r.active_sequences for r in result.rounds[:2]) == 4
    assert result.summary["accepted"] > 0  # multi-token rounds crossed the transport
    assert len(result.nodes) == clients
    if mode == "per-device":
        owners = {s.owner for s in result.sequences}
        assert owners == set(result.nodes)


def test_simulation_bfloat16_target_greedy_equals_its_own_generate(tmp_path):
    """The ServerApp verifies a bf16 target with ``verify-numerics=auto`` (stepwise): its greedy
    output is the bf16 target's own ``generate``."""
    prompts = _prompts(5, seed=11)
    result, _ = run_app(tmp_path, 1, prompts, **{"target-dtype": "bfloat16"})
    assert result.token_ids == _oracle(prompts, [10] * len(prompts), "bfloat16")
