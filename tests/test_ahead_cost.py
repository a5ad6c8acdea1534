"""``ahead_cost``: the round cost of a device that drafts ahead, and its best draft length."""

from __future__ import annotations

import pytest

from specfed_flwr.ahead_cost import best_gamma_drafting_ahead, round_time_drafting_ahead, throughput_drafting_ahead
from specfed_flwr.theory import expected_tokens_per_step


def test_a_sure_guess_overlaps_drafting_with_the_verify_and_a_hopeless_one_does_not():
    # every guess holds: the longer of verify (b) and drafting gamma + 1 positions ahead
    assert round_time_drafting_ahead(1.0, 3, a=0.05, b=0.1) == pytest.approx(max(0.1, 0.2))
    assert round_time_drafting_ahead(1.0, 1, a=0.05, b=0.1) == pytest.approx(0.1)
    # no guess holds: the strict round, drafting after the verify
    assert round_time_drafting_ahead(0.0, 3, a=0.05, b=0.1) == pytest.approx(0.1 + 0.15)


def test_more_rows_make_a_whole_batch_hit_rarer():
    one = round_time_drafting_ahead(0.9, 2, a=0.05, b=0.2, rows=1)
    many = round_time_drafting_ahead(0.9, 2, a=0.05, b=0.2, rows=16)
    assert one < many < 0.2 + 0.05 * 2 + 1e-12


def test_throughput_is_expected_tokens_over_the_expected_round():
    t = round_time_drafting_ahead(0.8, 4, a=0.03, b=0.1, rows=2)
    assert throughput_drafting_ahead(0.8, 4, a=0.03, b=0.1, rows=2) == pytest.approx(
        float(expected_tokens_per_step(0.8, 4)) / t)


@pytest.mark.parametrize("alpha,a,b,rows", [(0.97, 0.05, 0.1, 1), (0.97, 0.05, 0.11, 4), (0.8, 0.01, 0.5, 1),
                                            (0.6, 0.2, 0.05, 1), (0.99, 0.001, 1.0, 1), (0.9, 0.13, 0.25, 16)])
def test_best_gamma_is_the_argmax_of_the_modelled_throughput(alpha, a, b, rows):
    g = best_gamma_drafting_ahead(alpha, a, b, rows, gamma_min=1, gamma_max=16)
    curve = {k: throughput_drafting_ahead(alpha, k, a, b, rows) for k in range(1, 17)}
    assert curve[g] == pytest.approx(max(curve.values()))
    assert g == min(k for k, v in curve.items() if v >= curve[g] * (1 - 1e-12))


def test_cheap_drafts_and_a_slow_verify_draft_long_and_the_reverse_short():
    assert best_gamma_drafting_ahead(0.95, a=0.001, b=1.0) >= 8
    assert best_gamma_drafting_ahead(0.95, a=0.5, b=0.01) == 1
    with pytest.raises(ValueError):
        best_gamma_drafting_ahead(0.9, 0.1, 0.1, gamma_min=5, gamma_max=4)
    with pytest.raises(ValueError):
        round_time_drafting_ahead(0.9, 1, a=-1.0, b=0.1)
