"""The bench's adaptive-vs-fixed job (``bench.jobs_adaptive``): which gammas it reruns, in what
order, and how it judges the uplink issue's two bars, on hand-made records with known answers."""

from __future__ import annotations

import pytest

from specfed_flwr.bench.jobs_adaptive import ADAPTIVE, candidate_gammas, judge, rotated
from specfed_flwr.summary import median_gamma_asked


def _rows(tps_by_gamma: dict[int, float]) -> list[dict]:
    return [{"gamma": g, "tokens_per_s": t} for g, t in tps_by_gamma.items()]


def _rec(label, rep: int, tps: float, chosen: float | None = None) -> dict:
    return {"label": str(label), "rep": rep, "tokens_per_s": tps, "gamma_chosen_median": chosen}


def test_candidates_are_the_sweep_peak_and_its_measured_neighbours() -> None:
    assert candidate_gammas(_rows({1: 5.8, 2: 5.5, 3: 5.7, 4: 5.3})) == [1, 2]
    assert candidate_gammas(_rows({1: 3.0, 2: 4.0, 4: 5.0, 5: 4.9, 8: 2.0})) == [4, 5]  # 3 was not measured
    assert candidate_gammas(_rows({2: 1.0, 3: 2.0, 4: 1.5}), neighbours=2) == [2, 3, 4]


def test_candidates_of_an_empty_or_unmeasured_sweep() -> None:
    assert candidate_gammas([]) == []
    assert candidate_gammas([{"gamma": 2, "tokens_per_s": None}]) == []


def test_rotation_puts_every_label_first_once() -> None:
    labels = [ADAPTIVE, 1, 2]
    firsts = [rotated(labels, rep)[0] for rep in range(3)]
    assert firsts == [ADAPTIVE, 1, 2]
    assert all(sorted(map(str, rotated(labels, r))) == sorted(map(str, labels)) for r in range(5))
    assert rotated([], 3) == []


def test_median_gamma_asked_is_the_median_over_clients() -> None:
    settings = {"a": {"gamma_median": 1}, "b": {"gamma_median": 3}, "c": {"gamma_median": 2}}
    assert median_gamma_asked(settings) == 2.0
    assert median_gamma_asked(None) is None and median_gamma_asked({}) is None


def test_adaptive_matching_the_best_fixed_gamma_is_met() -> None:
    recs = [_rec(ADAPTIVE, 0, 6.8, 1), _rec(1, 0, 6.4), _rec(2, 0, 6.1),
            _rec(ADAPTIVE, 1, 6.9, 1), _rec(1, 1, 7.0), _rec(2, 1, 5.9),
            _rec(ADAPTIVE, 2, 6.6, 1), _rec(1, 2, 6.6), _rec(2, 2, 6.0)]
    out = judge(recs, {"gamma_star_compute": 1.61})
    assert out["best_fixed_gamma"] == 1
    assert out["best_fixed_tokens_per_s"] == pytest.approx(6.6)
    # per repetition: 6.8/6.4, 6.9/7.0, 6.6/6.6 -> median 1.0
    assert out["adaptive_ratio_vs_best_fixed"] == pytest.approx(1.0)
    assert out["ratio_met"] is True
    assert out["gamma_star_diff"] == pytest.approx(0.61) and out["gamma_star_met"] is True
    assert out["adaptive_gamma_chosen_median"] == 1


def test_slow_adaptive_and_far_gamma_star_are_missed() -> None:
    recs = [_rec(ADAPTIVE, 0, 4.0, 9), _rec(3, 0, 5.0), _rec(4, 0, 5.5),
            _rec(ADAPTIVE, 1, 4.2, 9), _rec(3, 1, 5.1), _rec(4, 1, 5.4)]
    out = judge(recs, {"gamma_star_compute": None, "gamma_star_link": 6.2})
    assert out["best_fixed_gamma"] == 4
    assert out["adaptive_ratio_vs_best_fixed"] == pytest.approx((4.0 / 5.5 + 4.2 / 5.4) / 2)
    assert out["ratio_met"] is False
    assert out["gamma_star_basis"] == "at the link profile"
    assert out["gamma_star_diff"] == pytest.approx(2.2) and out["gamma_star_met"] is False


def test_judge_without_an_adaptive_run_says_so() -> None:
    out = judge([_rec(2, 0, 5.0)], None)
    assert "skipped" in out and "gamma_star" not in out
