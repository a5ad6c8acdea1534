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


def test_adaptive_gamma_stays_within_the_caps() -> None:
    s = ClientSettings(SpecFedConfig(adaptive=True, draft_length=4, top_k=4, max_k=8, max_gamma=6), V)
    for _ in range(5):  # cheap drafts, costly rounds, every draft agreed: as long as allowed
        s.observe("a", _request(3), _reply(), draft_seconds=0.004, wall_seconds=1.0, agreement=1.0)
    gamma, k = s.for_client("a")
    assert gamma == 6 and 1 <= k <= 4
