"""Theory module: speedup model, Lambert-W optimal gamma, bias bounds, adaptive controller."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from specfed_flwr.wire import bytes_per_position
from specfed_flwr.theory import (
    AdaptiveController,
    ControllerConfig,
    LinkProfile,
    acceptance_rate,
    alpha_from_counts,
    best_integer_gamma,
    expected_tokens_per_step,
    one_step_output_law,
    optimal_gamma,
    round_time,
    speedup,
    tv_bias_bound,
    tv_distance,
)

ALPHAS = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
A_VALUES = [0.01, 0.05, 0.2]
B_VALUES = [0.2, 1.0, 3.0]


def _oracle_gamma(alpha: float, a: float, b: float) -> float:
    """Brute force: dense grid argmax of the speedup, then bounded local refinement."""
    grid = np.linspace(0.0, 400.0, 400_001)  # step 1e-3
    s = speedup(alpha, grid, a, b)
    i = int(np.argmax(s))
    lo, hi = grid[max(i - 2, 0)], grid[min(i + 2, grid.size - 1)]
    if i == 0 and s[0] >= s[1]:
        return 0.0
    res = minimize_scalar(lambda g: -float(speedup(alpha, g, a, b)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-10})
    return float(res.x)


# ---------------------------------------------------------------------------------------------
# formulas
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,a,b", list(itertools.product(ALPHAS, A_VALUES, B_VALUES)))
def test_optimal_gamma_matches_brute_force(alpha, a, b):
    g = optimal_gamma(alpha, a, b)
    oracle = _oracle_gamma(alpha, a, b)
    assert g >= 0.0
    # the maximum is flat, so compare both the location and the value
    assert abs(g - oracle) < 1e-3 or (g == 0.0 and oracle < 1e-3)
    assert speedup(alpha, g, a, b) >= speedup(alpha, oracle, a, b) - 1e-12


@pytest.mark.parametrize("alpha,a,b", list(itertools.product(ALPHAS, A_VALUES, B_VALUES)))
def test_best_integer_gamma_is_integer_argmax(alpha, a, b):
    g = best_integer_gamma(alpha, a, b)
    ints = np.arange(0, 500)
    assert g == int(ints[np.argmax(speedup(alpha, ints, a, b))])
    capped = best_integer_gamma(alpha, a, b, gamma_max=3)
    assert capped == int(ints[:4][np.argmax(speedup(alpha, ints[:4], a, b))])


def test_worked_example():
    assert optimal_gamma(0.8, 0.05, 1.0) == pytest.approx(7.8567, abs=1e-3)
    assert best_integer_gamma(0.8, 0.05, 1.0) == 8
    assert speedup(0.8, 8, 0.05, 1.0) == pytest.approx(3.092, abs=1e-3)
    assert expected_tokens_per_step(0.8, 8) == pytest.approx((1 - 0.8**9) / 0.2)
    assert round_time(8, 0.05, 1.0) == pytest.approx(1.4)


def test_stationarity_condition_holds():
    # d/dgamma speedup = 0  <=>  alpha^(gamma+1) * (beta*(gamma + b/a) + 1) = 1
    for alpha, a, b in [(0.8, 0.05, 1.0), (0.6, 0.01, 0.2), (0.95, 0.2, 3.0)]:
        g = optimal_gamma(alpha, a, b)
        beta = -math.log(alpha)
        assert alpha ** (g + 1) * (beta * (g + b / a) + 1) == pytest.approx(1.0, abs=1e-10)


def test_expected_tokens_limits_and_vectorisation():
    assert expected_tokens_per_step(1.0, 5) == pytest.approx(6.0)
    assert expected_tokens_per_step(1.0 - 1e-13, 5) == pytest.approx(6.0, rel=1e-9)
    assert expected_tokens_per_step(1.0 - 1e-7, 5) == pytest.approx(6.0, rel=1e-5)
    assert expected_tokens_per_step(0.0, 5) == pytest.approx(1.0)
    assert expected_tokens_per_step(0.5, 0) == pytest.approx(1.0)
    out = expected_tokens_per_step(np.array([0.0, 0.5, 1.0]), np.array([[1], [3]]))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out, [[1.0, 1.5, 2.0], [1.0, 1.875, 4.0]])
    # continuity at alpha -> 1
    xs = 1.0 - np.logspace(-3, -14, 30)
    vals = expected_tokens_per_step(xs, 10)
    assert np.all(np.diff(vals) >= -1e-9) and vals[-1] == pytest.approx(11.0)
    with pytest.raises(ValueError):
        expected_tokens_per_step(0.5, -1)


def test_speedup_alpha_one_and_zero():
    assert speedup(1.0, 4, 0.1, 1.0) == pytest.approx(5 / 1.4)
    assert speedup(0.0, 4, 0.1, 1.0) == pytest.approx(1 / 1.4)
    assert speedup(0.7, 0, 0.1, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        speedup(0.5, 3, 0.1, 0.0)


def test_optimal_gamma_edges():
    assert optimal_gamma(0.0, 0.05, 1.0) == 0.0
    assert optimal_gamma(-0.3, 0.05, 1.0) == 0.0
    assert optimal_gamma(1.0, 0.05, 1.0) == math.inf
    assert optimal_gamma(1.0, 2.0, 1.0) == 0.0  # b < a: drafting never pays
    assert optimal_gamma(0.9, 2.0, 1.0) == 0.0
    assert optimal_gamma(0.9, 1.0, 1.0) == 0.0  # b == a
    assert optimal_gamma(0.05, 0.5, 1.0) == 0.0  # gamma* < 0 -> 0
    with pytest.raises(ValueError, match="a \\(per-token cost\\)"):
        optimal_gamma(0.8, 0.0, 1.0)
    with pytest.raises(ValueError, match="a \\(per-token cost\\)"):
        optimal_gamma(0.8, -1.0, 1.0)
    with pytest.raises(ValueError, match="b \\(round cost\\)"):
        optimal_gamma(0.8, 0.05, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        optimal_gamma(float("nan"), 0.05, 1.0)
    assert best_integer_gamma(1.0, 0.05, 1.0, gamma_max=12) == 12
    with pytest.raises(ValueError, match="gamma_max"):
        best_integer_gamma(1.0, 0.05, 1.0)
    assert best_integer_gamma(0.05, 0.5, 1.0) == 0
    assert best_integer_gamma(0.05, 0.5, 1.0, gamma_min=1) == 1


def test_optimal_gamma_numerically_hard_regions():
    # near the Lambert-W branch point (alpha -> 1 or b/a -> 1) and where exp underflows
    for alpha, a, b in [(0.999999, 0.05, 1.0), (0.8, 0.999999, 1.0), (0.5, 1e-5, 100.0)]:
        g = optimal_gamma(alpha, a, b)
        assert math.isfinite(g) and g >= 0.0
        beta = -math.log(alpha)
        if g > 0:
            # stationarity in log form: (g+1)*ln(alpha) + ln(beta*(g + b/a) + 1) = 0
            assert (g + 1) * math.log(alpha) + math.log(beta * (g + b / a) + 1) == pytest.approx(0.0, abs=1e-8)
    # monotone in alpha and in b
    gs = [optimal_gamma(al, 0.05, 1.0) for al in np.linspace(0.3, 0.99, 50)]
    assert np.all(np.diff(gs) >= 0)
    gb = [optimal_gamma(0.8, 0.05, b) for b in np.linspace(0.06, 5.0, 50)]
    assert np.all(np.diff(gb) >= 0)


# ---------------------------------------------------------------------------------------------
# distributions and bias bounds
# ---------------------------------------------------------------------------------------------

def _random_dist(rng, n, v, conc=0.3):
    return rng.dirichlet(np.full(v, conc), size=n)


def test_acceptance_rate_is_one_minus_tv():
    rng = np.random.default_rng(0)
    p, q = _random_dist(rng, 50, 20), _random_dist(rng, 50, 20)
    np.testing.assert_allclose(acceptance_rate(p, q), 1.0 - tv_distance(p, q), atol=1e-12)
    assert acceptance_rate([0.5, 0.5], [0.5, 0.5]) == pytest.approx(1.0)
    assert isinstance(acceptance_rate([0.5, 0.5], [1.0, 0.0]), float)
    with pytest.raises(ValueError):
        acceptance_rate(np.ones(3) / 3, np.ones(4) / 4)


def _top_k(q, k):
    idx = np.argsort(-q, axis=-1)[:, :k]
    kept = np.take_along_axis(q, idx, axis=-1)
    return idx, kept


def _reconstruct(q, k, rule):
    n, v = q.shape
    idx, kept = _top_k(q, k)
    s = kept.sum(axis=-1, keepdims=True)
    out = np.zeros_like(q)
    if rule == "exact":
        np.put_along_axis(out, idx, kept / s, axis=-1)
    elif rule == "uniform":
        out[:] = (1.0 - s) / (v - k)
        np.put_along_axis(out, idx, kept, axis=-1)
    elif rule == "temperature":
        # q_hat_i = p_1 * (p_i / p_1) ** (1/tau) on kept tokens, tau >= 1 s.t. they sum to 1
        for r in range(n):
            p = kept[r]
            if k == 1 or p[0] * k < 1.0:
                row = np.full(v, (1.0 - s[r, 0]) / (v - k))
                row[idx[r]] = p
            else:
                f = lambda lt: (p[0] * (p / p[0]) ** math.exp(-lt)).sum() - 1.0  # noqa: E731
                lo, hi = 0.0, 30.0
                for _ in range(200):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
                row = np.zeros(v)
                vals = p[0] * (p / p[0]) ** math.exp(-lo)
                row[idx[r]] = vals / vals.sum()
            out[r] = row
    return out, s[:, 0]


@pytest.mark.parametrize("rule", ["exact", "uniform", "temperature"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_tv_bias_bound_holds_for_reconstruction_rules(rule, k):
    rng = np.random.default_rng(k)
    p = _random_dist(rng, 200, 16)
    q = _random_dist(rng, 200, 16)
    q_hat, s = _reconstruct(q, k, rule)
    np.testing.assert_allclose(q_hat.sum(axis=-1), 1.0, atol=1e-9)
    bound = tv_bias_bound(s)
    tv = tv_distance(q, q_hat)
    assert np.all(tv <= bound + 1e-9)
    # acceptance-rate bias and output-law bias are bounded by the same quantity
    assert np.all(np.abs(acceptance_rate(p, q) - acceptance_rate(p, q_hat)) <= bound + 1e-9)
    law = one_step_output_law(p, q, q_hat)
    np.testing.assert_allclose(law.sum(axis=-1), 1.0, atol=1e-9)
    assert np.all(tv_distance(law, p) <= tv + 1e-9)


def test_one_step_output_law_is_lossless_when_draft_equals_test():
    rng = np.random.default_rng(1)
    p, q = _random_dist(rng, 30, 12), _random_dist(rng, 30, 12)
    np.testing.assert_allclose(one_step_output_law(p, q, q), p, atol=1e-12)


def test_tv_bias_bound_values():
    assert tv_bias_bound(0.9) == pytest.approx(0.1)
    np.testing.assert_allclose(tv_bias_bound(np.array([1.0, 1.0002, 0.3, -0.1])), [0.0, 0.0, 0.7, 1.0])


def test_alpha_from_counts_and_bytes():
    assert alpha_from_counts(3, 4) == 0.75
    with pytest.raises(ValueError):
        alpha_from_counts(5, 4)
    with pytest.raises(ValueError):
        alpha_from_counts(0, 0)
    assert bytes_per_position(8, 49152) == 32
    assert bytes_per_position(8, 128256) == 48
    assert bytes_per_position(8, 65536) == 32  # ids 0..65535 still fit uint16 (the old theory copy said 48)


def test_alpha_mle_from_simulated_rounds():
    rng = np.random.default_rng(3)
    alpha, gamma = 0.7, 5
    acc = att = 0
    for _ in range(20000):
        n = 0
        while n < gamma and rng.random() < alpha:
            n += 1
        acc += n
        att += n + 1 if n < gamma else gamma
    assert alpha_from_counts(acc, att) == pytest.approx(alpha, abs=0.01)


# ---------------------------------------------------------------------------------------------
# adaptive controller
# ---------------------------------------------------------------------------------------------

def _controller(uplink_bps=10e6, rtt=0.02, **cfg):
    return AdaptiveController(ControllerConfig(**cfg), LinkProfile(uplink_bps=uplink_bps, rtt_s=rtt))


def _feed(c, rounds=10, alpha=0.8, b=0.3, draft=0.005, kept=None, sequences=8):
    g, k = c.gamma, c.k
    for _ in range(rounds):
        s = kept(k) if kept else None
        g, k = c.update(alpha=alpha, round_cost=b, draft_time_per_token=draft, kept_mass=s, k=k,
                        gamma=g, sequences=sequences)
    return g, k


def _kept_model(k):
    return 1.0 - 0.4 / math.sqrt(k)


def test_controller_priors_before_measurement():
    c = _controller()
    assert c.gamma == 4 and c.k == 8
    assert c.alpha == 0.8
    assert c.round_cost == pytest.approx(0.1 + 0.02)
    g, k = c.decide()
    assert 1 <= g <= 16 and k in (1, 2, 4, 8, 16, 32, 64)
    d = c.last_decision
    assert d is not None and d.gamma == g and d.k == k and d.throughput > 0


def test_controller_low_bandwidth_picks_smaller_k_than_high_bandwidth():
    low = _controller(uplink_bps=20e3)
    high = _controller(uplink_bps=1e9)
    _, k_low = _feed(low, kept=_kept_model)
    _, k_high = _feed(high, kept=_kept_model)
    assert k_low < k_high
    # monotone over a sweep of bandwidths
    ks = []
    for bw in [5e3, 5e4, 5e5, 5e6, 5e7, 5e8]:
        ks.append(_feed(_controller(uplink_bps=bw), kept=_kept_model)[1])
    assert ks == sorted(ks) and ks[0] < ks[-1]


def test_controller_larger_round_cost_gives_longer_gamma():
    gammas = []
    for b in [0.02, 0.1, 0.5, 2.0]:
        gammas.append(_feed(_controller(gamma_max=64), b=b, kept=_kept_model)[0])
    assert gammas == sorted(gammas) and gammas[0] < gammas[-1]


def test_controller_gamma_within_bounds_and_matches_best_integer_gamma():
    c = _controller(gamma_min=2, gamma_max=6, k_candidates=(8,), k_init=8)
    g, k = _feed(c, alpha=0.95, b=5.0)
    assert k == 8 and g == 6
    c = _controller(gamma_min=2, gamma_max=6, k_candidates=(8,), k_init=8)
    g, _ = _feed(c, alpha=0.05, b=0.01)
    assert g == 2
    # unclamped: exactly best_integer_gamma of the EMA alpha with the measured a, b
    c = _controller(gamma_min=0, gamma_max=1000, k_candidates=(8,), k_init=8)
    g, _ = _feed(c, alpha=0.8, b=0.3)
    a = c.per_token_cost(8)
    assert g == best_integer_gamma(c.alpha, a, c.round_cost)


def test_controller_ema_and_kept_mass_estimates():
    c = _controller(ema=0.5)
    c.observe(alpha=0.6, round_cost=1.0, kept_mass=0.8, k=8)
    assert c.alpha == pytest.approx(0.6)  # first measurement replaces the prior
    c.observe(alpha=0.8, round_cost=3.0, kept_mass=0.9, k=8)
    assert c.alpha == pytest.approx(0.7)
    assert c.round_cost == pytest.approx(2.0)
    assert c.kept_mass(8) == pytest.approx(0.85)
    # unseen K: monotone envelope around the measured one
    assert c.kept_mass(4) <= c.kept_mass(8) <= c.kept_mass(16)
    assert c.modelled_alpha(8) == pytest.approx(0.7)
    assert c.modelled_alpha(4) <= c.modelled_alpha(8) <= c.modelled_alpha(16) <= c.config.alpha_cap


def test_controller_k_limited_by_k_max_and_vocab():
    c = _controller(uplink_bps=1e10, k_max=4)
    assert _feed(c, kept=_kept_model)[1] <= 4
    c = _controller(uplink_bps=1e10, vocab_size=10, k_init=8)
    assert _feed(c, kept=_kept_model)[1] <= 10


def test_controller_round_wall_time_subtracts_draft_part():
    c = _controller(k_candidates=(8,), k_init=8)
    c.observe(draft_time_per_token=0.01, sequences=1)
    a = c.per_token_cost(8)
    c.observe(round_wall_time=1.0 + 4 * a, gamma=4, k=8)
    assert c.round_cost == pytest.approx(1.0)


def test_controller_config_validation():
    with pytest.raises(ValueError, match="gamma_init"):
        ControllerConfig(gamma_init=20, gamma_max=16)
    with pytest.raises(ValueError, match="ema"):
        ControllerConfig(ema=0.0)
    with pytest.raises(ValueError, match="uplink_bps"):
        LinkProfile(uplink_bps=0)
    c = _controller()
    with pytest.raises(ValueError, match="round_cost"):
        c.observe(round_cost=-1.0)
