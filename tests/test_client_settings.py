"""``ClientSettings``: fixed vs adaptive (gamma, K) per client, and which rounds' times feed the
controller (a prefill round's only until a decoding round is measured)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from specfed_flwr.client_settings import ClientSettings
from specfed_flwr.config import SpecFedConfig
from specfed_flwr.wire import make_reply

V = 64


def _reply(gamma: int = 4):
    ids = np.tile(np.arange(4), (1, gamma, 1))  # [1, gamma, 4]
    probs = np.full((1, gamma, 4), 0.2, dtype=np.float32)
    return make_reply([1], [gamma], ids, probs, V)


def _request(start: int):
    return SimpleNamespace(starts=np.array([start]))


def test_fixed_settings_follow_the_run_and_the_node() -> None:
    s = ClientSettings(SpecFedConfig(adaptive=False, draft_length=3, top_k=6, max_k=8), V)
    assert s.fixed() == (3, 6) and s.for_client("a") == (3, 6)
    s.set_fixed("a", 5, 12)
    assert s.for_client("a") == (5, 8)  # K capped by max-k
    assert s.for_client("b") == (3, 6)


def test_prefill_timing_is_provisional_and_the_first_decoding_round_replaces_it() -> None:
    s = ClientSettings(SpecFedConfig(adaptive=True, draft_length=4, top_k=4, max_k=8), V)
    c = s.controller("a")
    # a prefill round (start 0): 2.0 s of drafting over 4 positions -> provisional 0.5 s per position
    s.observe("a", _request(0), _reply(), draft_seconds=2.0, wall_seconds=3.0, agreement=0.8)
    assert c.draft_time_per_token == pytest.approx(0.5) and c.round_cost == pytest.approx(1.0)
    # the first decoding round replaces it (not an EMA blend with the prefill round)
    s.observe("a", _request(5), _reply(), draft_seconds=0.4, wall_seconds=0.6, agreement=0.8)
    assert c.draft_time_per_token == pytest.approx(0.1) and c.round_cost == pytest.approx(0.2)
    # later prefill rounds give no timing; decoding rounds blend in
    s.observe("a", _request(0), _reply(), draft_seconds=4.0, wall_seconds=5.0, agreement=0.8)
    assert c.draft_time_per_token == pytest.approx(0.1) and c.round_cost == pytest.approx(0.2)
    s.observe("a", _request(9), _reply(), draft_seconds=0.8, wall_seconds=1.0, agreement=0.8)
    ema = c.config.ema
    assert c.draft_time_per_token == pytest.approx((1 - ema) * 0.1 + ema * 0.2)


def test_a_prefill_round_reported_by_the_device_costs_only_its_draft_steps() -> None:
    """The device says which forwards fed its prompts: a 4-position reply whose first forward
    prefilled (2.0 s of 2.3 s) drafted its other 3 positions in 0.3 s, so a step costs 0.1 s, not
    the 0.575 s of the whole time over 4 positions (which sends the next rounds to gamma 1)."""
    cfg = SpecFedConfig(adaptive=True, draft_length=4, top_k=4, max_k=8, max_gamma=16)
    told, untold = ClientSettings(cfg, V), ClientSettings(cfg, V)
    prefill = {"compute_seconds": 2.3, "forward_steps": 4, "prefill_seconds": 2.0, "prefill_forwards": 1}
    told.observe("a", _request(0), _reply(), draft_seconds=2.3, wall_seconds=2.5, agreement=0.9, device=prefill)
    untold.observe("a", _request(0), _reply(), draft_seconds=2.3, wall_seconds=2.5, agreement=0.9,
                   device={"compute_seconds": 2.3, "forward_steps": 4})
    assert told.controller("a").draft_time_per_token == pytest.approx(0.1)
    assert untold.controller("a").draft_time_per_token == pytest.approx(2.3 / 4)
    assert told.for_client("a")[0] > untold.for_client("a")[0]
    # prompts prefilled in forwards of their own (length groups) leave all 4 positions as steps
    grouped = ClientSettings(cfg, V)
    grouped.observe("a", _request(0), _reply(), draft_seconds=2.4, wall_seconds=2.5, agreement=0.9,
                    device={"compute_seconds": 2.4, "forward_steps": 6, "prefill_seconds": 2.0, "prefill_forwards": 2})
    assert grouped.controller("a").draft_time_per_token == pytest.approx(0.1)


def test_adaptive_gamma_stays_within_the_caps() -> None:
    s = ClientSettings(SpecFedConfig(adaptive=True, draft_length=4, top_k=4, max_k=8, max_gamma=6), V)
    for _ in range(5):  # cheap drafts, costly rounds, every draft agreed: as long as allowed
        s.observe("a", _request(3), _reply(), draft_seconds=0.004, wall_seconds=1.0, agreement=1.0)
    gamma, k = s.for_client("a")
    assert gamma == 6 and 1 <= k <= 4


def _device(compute: float, steps: int) -> dict:
    return {"compute_seconds": compute, "forward_steps": steps}


def test_a_device_that_drafts_ahead_is_modelled_by_its_real_step_cost() -> None:
    """A reply that was drafted ahead took ~no time at request time. Read the strict way, that says
    drafts are free and gamma runs to max-gamma; with the device's compute per step (ahead work
    included) and the server's time as b, the controller picks the gamma of the drafting-ahead
    round model instead."""
    from specfed_flwr.ahead_cost import best_gamma_drafting_ahead

    cfg = SpecFedConfig(adaptive=True, draft_length=4, top_k=4, max_k=8, max_gamma=16)
    ahead, blind = ClientSettings(cfg, V), ClientSettings(cfg, V)
    for _ in range(8):
        # the drafts were there: 1 ms to serve them, 0.25 s of drafting ahead over 5 forwards
        ahead.observe("a", _request(9), _reply(), draft_seconds=0.001, wall_seconds=0.004, agreement=0.97,
                      server_seconds=0.1, device=_device(0.251, 5))
        blind.observe("a", _request(9), _reply(), draft_seconds=0.001, wall_seconds=0.004, agreement=0.97,
                      server_seconds=0.1)
    c = ahead.controller("a")
    assert c.config.drafts_ahead and not blind.controller("a").config.drafts_ahead
    assert c.draft_time_per_token == pytest.approx(0.251 / 5)
    assert c.round_cost == pytest.approx(0.1 + 0.003)
    gamma, _ = ahead.for_client("a")
    assert gamma == best_gamma_drafting_ahead(c.modelled_alpha(c.k), c.per_token_cost(c.k), c.round_cost,
                                              gamma_max=16)
    assert 1 <= gamma <= 4
    assert blind.for_client("a")[0] == 16  # "free" drafts


def test_a_batch_drafts_in_gamma_steps_not_rows_times_gamma() -> None:
    """Strict rounds: 8 rows x 4 positions drafted in 0.4 s are 4 batched steps of 0.1 s."""
    s = ClientSettings(SpecFedConfig(adaptive=True, draft_length=4, top_k=4, max_k=8), V)
    ids = np.tile(np.arange(4), (8, 4, 1))  # [8, 4, 4]
    reply = make_reply(list(range(8)), [4] * 8, ids, np.full((8, 4, 4), 0.2, dtype=np.float32), V)
    s.observe("a", SimpleNamespace(starts=np.full(8, 5)), reply, draft_seconds=0.4, wall_seconds=0.6, agreement=0.8)
    assert s.controller("a").draft_time_per_token == pytest.approx(0.1)
