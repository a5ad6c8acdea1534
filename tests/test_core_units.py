"""Unit tests of the pure pieces: reconstruction, verification, aggregation, protocol, config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specfed_flwr.aggregation import BiasAwareWeights, WeightingConfig, prefix_match, select_draft_path
from specfed_flwr.config import ConfigError, SpecFedConfig, load_config
from specfed_flwr.protocol import DraftRequest, ProtocolError
from specfed_flwr.draft_payload import sparsify
from specfed_flwr.reconstruction import reconstruct, temperature_for_top1
from specfed_flwr.verification import verify_greedy, verify_sampling


def _topk(q: torch.Tensor, k: int):
    vals, ids = torch.topk(q, k, dim=1)
    return ids, vals.half().float()


@pytest.fixture
def q():
    g = torch.Generator().manual_seed(0)
    return torch.softmax(torch.randn(6, 50, generator=g) * 2, dim=1)


@pytest.mark.parametrize("rule", ["uniform", "temperature", "exact"])
def test_reconstruction_is_a_distribution_and_keeps_the_sent_tokens(q, rule):
    ids, probs = _topk(q, 5)
    q_hat = reconstruct(ids, probs, 50, rule)
    assert q_hat.shape == (6, 50)
    assert torch.allclose(q_hat.sum(1), torch.ones(6), atol=1e-5)
    assert (q_hat >= 0).all()
    assert (q_hat.gather(1, ids) > 0).all()


def test_uniform_diffusion_spreads_the_missing_mass_evenly(q):
    ids, probs = _topk(q, 5)
    q_hat = reconstruct(ids, probs, 50, "uniform")
    mask = torch.ones_like(q_hat, dtype=torch.bool).scatter(1, ids, False)
    expected_fill = (1 - probs.sum(1)) / 45
    assert torch.allclose(q_hat[mask].view(6, 45), expected_fill.unsqueeze(1).expand(6, 45), atol=1e-6)
    assert torch.allclose(q_hat.gather(1, ids), probs, atol=1e-6)
    # bias bound: TV(q, q_hat) <= 1 - S
    tv = 0.5 * (q - q_hat).abs().sum(1)
    assert (tv <= 1 - probs.sum(1) + 1e-3).all()


def test_exact_is_the_renormalised_top_k(q):
    ids, probs = _topk(q, 3)
    q_hat = reconstruct(ids, probs, 50, "exact")
    assert torch.allclose(q_hat.gather(1, ids), probs / probs.sum(1, keepdim=True), atol=1e-6)
    assert torch.allclose(q_hat.sum(1), torch.ones(6))


def test_temperature_rule_matches_the_true_top1_probability(q):
    ids, probs = _topk(q, 8)
    tau, solvable = temperature_for_top1(probs)
    q_hat = reconstruct(ids, probs, 50, "temperature")
    top = probs[:, 0]
    assert solvable.any()
    assert (tau[solvable] >= 1.0 - 1e-6).all()
    assert torch.allclose(q_hat.gather(1, ids[:, :1]).squeeze(1)[solvable], top[solvable], atol=1e-4)
    # flatter than plain renormalisation, never sharper
    renorm_top = top / probs.sum(1)
    assert (q_hat.max(1).values <= renorm_top + 1e-6).all()


def test_temperature_falls_back_to_uniform_when_unsolvable():
    ids = torch.tensor([[3]])
    probs = torch.tensor([[0.4]])
    assert torch.allclose(reconstruct(ids, probs, 10, "temperature"), reconstruct(ids, probs, 10, "uniform"))


def test_unknown_rule_is_refused(q):
    ids, probs = _topk(q, 2)
    with pytest.raises(ValueError, match="reconstruction rule"):
        reconstruct(ids, probs, 50, "magic")


def test_verify_greedy_accepts_the_matching_prefix_and_emits_the_target_choice():
    logits = torch.zeros(2, 4, 6)
    target_choice = torch.tensor([[1, 2, 3, 4], [5, 0, 1, 2]])
    logits.scatter_(2, target_choice.unsqueeze(-1), 5.0)
    drafts = torch.tensor([[1, 2, 0], [5, 0, 1]])
    lengths = torch.tensor([3, 2])
    res = verify_greedy(logits, drafts, lengths)
    assert res.num_accepted.tolist() == [2, 2]
    assert res.tokens_of(0) == [1, 2, 3]  # correction at the mismatch
    assert res.tokens_of(1) == [5, 0, 1]  # bonus after a fully accepted (shorter) draft


def test_verify_sampling_single_position_law():
    """Accept/residual/bonus at one position reproduces p exactly (analytic check, large n)."""
    n, v = 200_000, 4
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    g = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(q.expand(n, v), 1, replacement=True, generator=g)
    target = p.expand(n, 2, v).clone()
    res = verify_sampling(target, q.expand(n, 1, v).clone(), drafts, torch.ones(n, dtype=torch.long), g)
    first = res.tokens[:, 0]
    freq = torch.bincount(first, minlength=v).float() / n
    assert torch.allclose(freq, p, atol=0.005)
    # acceptance rate equals alpha = sum min(p, q)
    assert abs(res.num_accepted.float().mean().item() - torch.minimum(p, q).sum().item()) < 0.005


def test_verify_sampling_with_no_draft_is_plain_sampling():
    p = torch.tensor([[[0.0, 1.0, 0.0]]])
    res = verify_sampling(p, torch.zeros(1, 0, 3), torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert res.tokens_of(0) == [1]


def test_sparsify_modes_put_the_drafted_token_in_slot_0():
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(64, 30, generator=g), dim=1)
    for mode in ("greedy", "sparse", "full"):
        ids, probs, drafted = sparsify(q, 4, mode, g)
        assert (ids[:, 0] == drafted).all()
        assert (probs[:, 0] > 0).all()
        assert probs.dtype == torch.float16
        # ids in a row are distinct
        assert all(len(set(r)) == 4 for r in ids.tolist())
    ids, _, drafted = sparsify(q, 4, "greedy", g)
    assert (drafted == q.argmax(1)).all()


def test_sparsify_full_mode_sends_an_outside_token():
    q = torch.full((2000, 10), 0.1)
    g = torch.Generator().manual_seed(0)
    ids, probs, drafted = sparsify(q, 1, "full", g)
    assert len(set(drafted.tolist())) == 10  # drafts outside any top-1 happen and are sent


def test_select_path_drops_disagreeing_clients_and_votes():
    v = 8
    tokens = torch.tensor([[[1, 2, 3], [1, 4, 5], [6, 7, 7]]])  # B=1, C=3, G=3
    q = torch.full((1, 3, 3, v), 1.0 / v)
    lengths = torch.tensor([[3, 3, 3]])
    path = select_draft_path(tokens, q, lengths, torch.tensor([0.4, 0.35, 0.25]), "vote")
    # token 1 has weight 0.75 at position 0; then client 0 (0.4) outvotes client 1 (0.35)
    assert path.tokens[0, :3].tolist() == [1, 2, 3]
    assert int(path.lengths[0]) == 3
    m = prefix_match(tokens, lengths, path.tokens, path.lengths)
    assert m[0].tolist() == [[True, True, True], [True, True, False], [True, False, False]]


def test_select_path_stops_when_nobody_agrees():
    """Two clients that disagree with each other (tokens 1 vs 3, then 2 vs 4) and whose q_hat at
    position 0 both put all mass on token 5, which neither drafted: consensus draws 5 from q_bar,
    no client's own prefix matches the path any more, so both drop out and the path stops after
    that one position although both drafted two.

    Verified to fail: with the drop-out line of ``select_draft_path``
    (``active = active & (drafted_j == token.unsqueeze(1))``) removed, the path runs on to
    length 2."""
    v = 8
    tokens = torch.tensor([[[1, 2], [3, 4]]])  # B=1, C=2, G=2
    q = torch.zeros(1, 2, 2, v)
    q[0, :, 0, 5] = 1.0  # position 0: every q_hat on token 5
    q[0, 0, 1, 2] = 1.0
    q[0, 1, 1, 4] = 1.0
    lengths = torch.tensor([[2, 2]])
    path = select_draft_path(tokens, q, lengths, torch.tensor([0.5, 0.5]), "consensus", torch.Generator().manual_seed(0))
    assert int(path.lengths[0]) == 1 and int(path.tokens[0, 0]) == 5
    # both drafted position 0 from the path's prefix; neither drafted position 1 from it
    assert prefix_match(tokens, lengths, path.tokens, path.lengths)[0].tolist() == [[True, False], [True, False]]
    # vote always follows a drafted token: the heavier client wins and the path runs its whole draft
    path = select_draft_path(tokens, q, lengths, torch.tensor([0.6, 0.4]), "vote")
    assert path.tokens[0].tolist() == [1, 2] and int(path.lengths[0]) == 2
    # nobody drafted at all: an empty path
    path = select_draft_path(tokens, q, torch.tensor([[0, 0]]), torch.tensor([1.0, 1.0]), "pick")
    assert int(path.lengths[0]) == 0


def test_bias_aware_weights_collapse_for_a_disagreeing_client():
    w = BiasAwareWeights(WeightingConfig(ema=0.5, sharpness=2.0, drop_below=0.05))
    for _ in range(10):
        w.observe("good", [0.9, 0.95], [0.98, 0.97])
        w.observe("lossy", [0.9, 0.95], [0.6, 0.5])
        w.observe("bad", [0.0, 0.01], [0.99, 0.99])
    weights = w.weights(["good", "lossy", "bad"])
    assert weights[0] > weights[1] > 0
    assert weights[2] == 0.0
    assert abs(weights.sum() - 1) < 1e-9


def test_draft_request_roundtrip_and_validation():
    req = DraftRequest.build([(5, 0, [1, 2, 3], 4), (9, 7, [8], 2)], k=8, temperature=0.0, sampling="sparse", seed=1, round=3, release=[2])
    back = DraftRequest.from_parts(req.arrays(), req.config())
    assert back.delta(0).tolist() == [1, 2, 3] and back.delta(1).tolist() == [8]
    assert back.release.tolist() == [2]
    bad = req.arrays()
    bad["delta_offsets"] = np.array([0, 5, 4])
    with pytest.raises(ProtocolError, match="delta_offsets"):
        DraftRequest.from_parts(bad, req.config())
    with pytest.raises(ProtocolError, match="missing"):
        DraftRequest.from_parts({"seq_ids": req.seq_ids}, req.config())
    with pytest.raises(ProtocolError, match="vocabulary"):
        req.validate(vocab_size=4)


def test_config_merges_yaml_and_refuses_bad_keys(tmp_path):
    cfg = load_config({"top-k": 16, "draft-length": 6, "reconstruction": "uniform"})
    assert (cfg.top_k, cfg.draft_length, cfg.reconstruction) == (16, 6, "uniform")
    y = tmp_path / "c.yaml"
    y.write_text("top_k: 2\nmode: per-device\n")
    cfg = load_config({"mode": "collaborative"}, y)
    assert cfg.top_k == 2 and cfg.mode == "collaborative"
    with pytest.raises(ConfigError, match="'top-k'"):
        load_config({"top-k": "many"})
    with pytest.raises(ConfigError, match="'reconstruction'"):
        load_config({"reconstruction": "magic"})
    with pytest.raises(ConfigError, match="unknown config key 'topk'"):
        load_config({"topk": 3})
    with pytest.raises(ConfigError, match="'draft-length'"):
        load_config({"draft-length": 99})


def test_selection_scheme_resolution_and_exactness_flag():
    assert SpecFedConfig(temperature=0).selection_scheme() == "vote"
    assert SpecFedConfig(temperature=1, reconstruction="exact").selection_scheme() == "pick"
    assert SpecFedConfig(temperature=1, reconstruction="uniform").selection_scheme() == "consensus"
    assert SpecFedConfig(temperature=1, draft_sampling="full", reconstruction="uniform").exact() is False
    assert SpecFedConfig(temperature=1, reconstruction="temperature").exact() is True
