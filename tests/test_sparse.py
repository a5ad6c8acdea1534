"""The sparse form of draft distributions (``sparse.py``) against dense references.

Every closed form the server uses -- reconstruction, mixing into q_bar, sampling from it, q at
a token, the residual row, sum_x min(p, q) -- is checked against the same quantity computed on
dense ``[..., V]`` tensors written out independently here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specfed_flwr.aggregation import path_agreement, select_draft_path
from specfed_flwr.reconstruction import reconstruct, reconstruct_sparse, temperature_for_top1
from specfed_flwr.sparse import SparseQ, agreement, densify, from_dense, mix, q_at, sample, sum_min, zeros
from specfed_flwr.verification import verify_sampling

V = 40


def _client_q(n: int, k: int, seed: int, rule: str = "uniform") -> tuple[SparseQ, torch.Tensor, torch.Tensor]:
    """n reconstructed q_hat rows from the top-K of random distributions: (sparse, ids, probs)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(n, V, generator=g) * 2, dim=1)
    vals, ids = torch.topk(q, k, dim=1)
    probs = vals.half().float()
    return reconstruct_sparse(ids, probs, V, rule), ids, probs


def _dense_reference(ids: torch.Tensor, probs: torch.Tensor, rule: str) -> torch.Tensor:
    """The rules written out on dense tensors (reconstruction.py's docstring)."""
    n, k = ids.shape
    kept = probs.sum(1, keepdim=True)
    if rule == "exact":
        return torch.zeros(n, V).scatter(1, ids, probs / kept)
    if rule == "uniform":
        q = torch.full((n, V), 1.0).mul((1 - kept).clamp_min(0) / (V - k)).scatter(1, ids, probs)
        return q / q.sum(1, keepdim=True)
    tau, solvable = temperature_for_top1(probs)
    flat = torch.zeros(n, V).scatter(1, ids, torch.softmax(probs.log() / tau.unsqueeze(1), dim=1))
    return torch.where(solvable.unsqueeze(1), flat, _dense_reference(ids, probs, "uniform"))


@pytest.mark.parametrize("rule", ["uniform", "temperature", "exact"])
@pytest.mark.parametrize("k", [1, 3, V])
def test_closed_form_equals_the_dense_rule(rule, k):
    sq, ids, probs = _client_q(16, k, seed=1, rule=rule)
    assert sq.ids.shape == (16, k) and sq.fill.shape == (16,)
    want = _dense_reference(ids, probs, rule)
    assert torch.allclose(densify(sq), want, atol=1e-6)
    assert torch.allclose(reconstruct(ids, probs, V, rule), want, atol=1e-6)
    # q at a token: listed and unlisted ones
    tokens = torch.arange(16) % V
    assert torch.allclose(q_at(sq, tokens), want[torch.arange(16), tokens], atol=1e-6)


def test_empty_slots_do_not_touch_token_zero():
    q = SparseQ(ids=torch.tensor([[3, -1, -1]]), values=torch.tensor([[0.5, 0.0, 0.0]]), fill=torch.tensor([0.5 / (V - 1)]),
                vocab_size=V)
    dense = densify(q)
    assert dense[0, 0] == pytest.approx(0.5 / (V - 1)) and dense[0, 3] == pytest.approx(0.5)
    assert q_at(q, torch.tensor([0]))[0] == pytest.approx(0.5 / (V - 1))
    z = zeros((2, 3), 4, V)
    assert densify(z).abs().sum() == 0 and z.shape == (2, 3)


@pytest.mark.parametrize("clients", [1, 2, 5])
def test_mix_is_the_weighted_sum_of_the_clients(clients):
    b, k = 6, 4
    sq, _, _ = _client_q(b * clients, k, seed=clients)
    q = SparseQ(sq.ids.view(b, clients, k), sq.values.view(b, clients, k), sq.fill.view(b, clients), V)
    # overlapping ids between clients (same top tokens), a dropped client, an empty slot
    if clients > 1:
        q.ids[:, 1] = q.ids[:, 0].roll(1, dims=1)
        q.ids[0, 1, 0], q.values[0, 1, 0] = -1, 0.0
    w = torch.rand(b, clients, generator=torch.Generator().manual_seed(0))
    w[1, 0] = 0.0  # with one client: a dead row (all weights 0), which mixes to all-zero
    w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    want = torch.einsum("bc,bcv->bv", w, densify(q))
    got = mix(q, w)
    assert torch.allclose(densify(got), want, atol=1e-6)
    listed = got.ids[got.ids >= 0]
    assert got.ids.shape[-1] == clients * k and len(listed) > 0
    for row in got.ids:  # each token listed once
        r = row[row >= 0].tolist()
        assert len(r) == len(set(r))


def test_sample_draws_from_q_including_unlisted_tokens():
    n = 200_000
    sq, _, _ = _client_q(1, 3, seed=4)
    q = SparseQ(sq.ids.expand(n, 3), sq.values.expand(n, 3), sq.fill.expand(n), V)
    law = densify(sq)[0].double().numpy()
    assert law[np.setdiff1d(np.arange(V), sq.ids[0].numpy())].sum() > 0.05  # the unlisted part matters
    x = sample(q, torch.Generator().manual_seed(2)).numpy()
    counts = np.bincount(x, minlength=V)
    assert chisquare(counts, law * n / law.sum()).pvalue > 1e-3
    # fill 0: never an unlisted token
    exact, _, _ = _client_q(1000, 3, seed=5, rule="exact")
    drawn = sample(exact, torch.Generator().manual_seed(0))
    assert (exact.ids == drawn.unsqueeze(1)).any(dim=1).all()


def test_sum_min_and_agreement_match_brute_force():
    g = torch.Generator().manual_seed(7)
    p = torch.softmax(torch.randn(5, V, generator=g) * 3, dim=1)
    t = torch.rand(5, 4, generator=g) * 0.1
    t[0, 1] = t[0, 2]  # tied thresholds
    t[1] = 0.0
    brute = torch.minimum(p.unsqueeze(2), t.unsqueeze(1)).sum(1)
    assert torch.allclose(sum_min(p, t), brute, atol=1e-6)
    assert (sum_min(p, torch.zeros(5, 3)) == 0).all()
    for rule in ("uniform", "temperature", "exact"):
        sq, _, _ = _client_q(15, 4, seed=8, rule=rule)
        q = SparseQ(sq.ids.view(5, 3, 4), sq.values.view(5, 3, 4), sq.fill.view(5, 3), V)
        want = torch.minimum(p.unsqueeze(1), densify(q)).sum(-1)
        assert torch.allclose(agreement(p, q), want, atol=1e-6)


def _paths_setup(b=5, c=3, g=3, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sq, _, _ = _client_q(b * c * g, k, seed=seed)
    q = SparseQ(sq.ids.view(b, c, g, k), sq.values.view(b, c, g, k), sq.fill.view(b, c, g), V)
    # drafted token: the client's top token, so clients partly agree
    tokens = q.ids[..., 0].clone()
    tokens[:, 1, 1:] = tokens[:, 0, 1:]
    lengths = torch.randint(0, g + 1, (b, c), generator=gen)
    lengths[0] = g
    return tokens, q, lengths


@pytest.mark.parametrize("scheme", ["pick", "vote", "consensus"])
def test_sparse_and_dense_inputs_give_the_same_path(scheme):
    tokens, q, lengths = _paths_setup()
    w = torch.tensor([0.5, 0.3, 0.2])
    sparse = select_draft_path(tokens, q, lengths, w, scheme, torch.Generator().manual_seed(3))
    dense = select_draft_path(tokens, densify(q), lengths, w, scheme, torch.Generator().manual_seed(3))
    if scheme != "consensus":  # consensus draws from M + 1 categories, a different stream per form
        assert torch.equal(sparse.tokens, dense.tokens) and torch.equal(sparse.lengths, dense.lengths)
        assert torch.allclose(densify(sparse.q_bar), densify(dense.q_bar), atol=1e-6)
    # q_bar at each path position is the weighted mix of the clients still on the path
    dq = densify(q)
    for i in range(tokens.shape[0]):
        active = (lengths[i] > 0) & (w > 0)
        for j in range(int(sparse.lengths[i])):
            active = active & (lengths[i] > j)
            wn = w * active / (w * active).sum()
            assert torch.allclose(densify(sparse.q_bar)[i, j], (wn.unsqueeze(1) * dq[i, :, j]).sum(0), atol=1e-6)
            active = active & (tokens[i, :, j] == sparse.tokens[i, j])
        assert densify(sparse.q_bar)[i, int(sparse.lengths[i]):].abs().sum() == 0


def test_verify_sampling_sparse_equals_dense():
    tokens, q, lengths = _paths_setup(seed=1)
    path = select_draft_path(tokens, q, lengths, torch.tensor([0.4, 0.4, 0.2]), "pick", torch.Generator().manual_seed(0))
    p = torch.softmax(torch.randn(5, 4, V, generator=torch.Generator().manual_seed(9)), dim=-1)
    a = verify_sampling(p, path.q_bar, path.tokens, path.lengths, torch.Generator().manual_seed(4))
    b = verify_sampling(p, densify(path.q_bar), path.tokens, path.lengths, torch.Generator().manual_seed(4))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.num_accepted, b.num_accepted)


def test_path_agreement_matches_dense_agreement():
    tokens, q, lengths = _paths_setup(seed=2)
    path = select_draft_path(tokens, q, lengths, torch.tensor([0.4, 0.4, 0.2]), "vote")
    logits = torch.randn(5, 4, V, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(logits, dim=-1)
    alpha_bar, alpha_c = path_agreement(p, path.q_bar, q)
    assert torch.allclose(alpha_bar, torch.minimum(p[:, :3], densify(path.q_bar)).sum(-1), atol=1e-5)
    assert torch.allclose(alpha_c, torch.minimum(p[:, None, :3], densify(q)).sum(-1), atol=1e-5)
    from_logits, none = path_agreement(logits, path.q_bar, logits=True)
    assert none is None and torch.allclose(from_logits, alpha_bar, atol=1e-5)


def test_from_dense_round_trip():
    q = torch.softmax(torch.randn(2, 3, V), dim=-1)
    assert torch.allclose(densify(from_dense(q)), q)
