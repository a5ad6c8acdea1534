"""The embedded default pair (SmolLM2-135M fp32 target, int4 draft) through Flower's
simulation engine, 2 SuperNodes: greedy output equals the target's own ``generate``.

As in test_real_engine, a divergence is only accepted at a near-tie of the target's top two
logits (a multi-token verify forward and generate's one-token forward round differently).
"""

from __future__ import annotations

import json

import pytest
import torch
from flwr.simulation import run_simulation

from specfed_flwr.client_app import app as client_app
from specfed_flwr.tokens import default_eos_ids, encode_prompt
from specfed_flwr.prompts import load_prompts
from specfed_flwr.serve import make_server_app

pytestmark = [pytest.mark.real_model, pytest.mark.flower]

NEW_TOKENS = 16


def test_default_pair_through_flower_matches_target_greedy(tmp_path):
    from specfed_flwr.models import load_target

    prompts = load_prompts("default")[:3]
    results = tmp_path / "real.jsonl"
    captured = {}
    server_app = make_server_app(
        {"device": "cpu", "results": str(results), "max-new-tokens": NEW_TOKENS, "top-k": 8, "draft-length": 4,
         "min-nodes": 2, "round-timeout": 300.0},
        prompts=prompts, on_result=lambda r: captured.update(r=r),
    )
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    assert "r" in captured, "the ServerApp did not finish (see the log above)"
    result = captured["r"]
    assert len(result.nodes) == 2 and not result.excluded

    target, tok = load_target(device="cpu")
    eos = default_eos_ids(target, tok)
    matches = 0
    for seq in result.sequences:
        ids = torch.tensor([encode_prompt(tok, seq.prompt, True)])
        expected = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else 0,
                                   repetition_penalty=1.0, temperature=None, top_p=None, top_k=None)[0, ids.shape[1]:].tolist()
        if seq.token_ids == expected:
            matches += 1
            continue
        j = next(i for i, (a, b) in enumerate(zip(seq.token_ids + [-1], expected + [-2])) if a != b)
        with torch.no_grad():
            logits = target(torch.tensor([ids[0].tolist() + expected[:j]])).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        assert float(top2[0] - top2[1]) < 1e-3, f"prompt {seq.index} diverged at token {j}: not a near-tie"
    assert matches >= 2
    assert result.summary["acceptance_rate"] >= 0.8  # greedy: the drafts' quality (see test_real_engine)
    assert {json.loads(line)["index"] for line in results.read_text().splitlines()} == {0, 1, 2}
