"""Plugging specfed-flwr into a Flower setup of one's own.

A ServerApp written here (not specfed-flwr's) builds ``SpecFedStrategy`` around its own
target and prompts; a ClientApp written here registers specfed-flwr's query handlers next to
a handler of its own. Both run on Flower's simulation engine and the greedy output equals the
target's own ``generate``.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from specfed_flwr import client_app as specfed_client
from specfed_flwr.config import SpecFedConfig
from specfed_flwr.specs import load_target_spec
from specfed_flwr.strategies import SpecFedStrategy
from specfed_flwr.target import TargetVerifier

pytestmark = pytest.mark.flower

MY_PROMPTS = [[11, 12, 13], [400, 401], [9, 8, 7, 6, 5], [1000]]
NEW_TOKENS = 8


def test_own_server_and_client_apps_use_specfed_pieces():
    # ---- the user's ClientApp: their own handler plus specfed-flwr's two ----
    my_client = ClientApp()

    @my_client.query("status")
    def status(message: Message, context: Context) -> Message:  # something the user already had
        return Message(RecordDict(), reply_to=message)

    my_client.query("handshake")(specfed_client.handshake)
    my_client.query("draft")(specfed_client.draft)

    # ---- the user's ServerApp: their target, their prompts, the strategy ----
    target = load_target_spec("tiny:0", "cpu").model
    outcome = {}
    my_server = ServerApp()

    @my_server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = SpecFedConfig(target="tiny:0", draft="tiny:1", draft_quantization="none", device="cpu",
                            chat_template=False, top_k=4, draft_length=3, max_new_tokens=NEW_TOKENS,
                            max_active_sequences=3, min_nodes=2).validate()
        strategy = SpecFedStrategy(TargetVerifier(target), cfg)
        outcome["result"] = strategy.generate(grid, MY_PROMPTS)

    run_simulation(server_app=my_server, client_app=my_client, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    assert "result" in outcome, "the user's ServerApp did not finish (see the log above)"
    result = outcome["result"]
    expected = []
    for p in MY_PROMPTS:
        x = torch.tensor([p])
        expected.append(target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                                        do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist())
    assert result.token_ids == expected
    assert len(result.nodes) == 2 and not result.excluded
    assert result.summary["drafted_positions"] > 0  # the drafts really went through the user's ClientApp
