"""The bytes-vs-alpha curve of the uplink encodings (``uplinkcurve.py``): record format, its
numbers against direct computations, budgeted K beating fixed K at equal bytes where positions
differ in how peaked they are, and the greedy bytes; on tiny models and synthetic tables."""

from __future__ import annotations

import math

import pytest
import torch

from specfed_flwr.specs import tiny_llama
from specfed_flwr.uplinkcurve import greedy_bytes_per_position, uplink_curve, uplink_curve_for_pair

KEYS = {"encoding", "temperature", "bytes_per_position_all_in", "alpha_fixed_prefixes", "alpha_full_fixed_prefixes"}


def _mixed_tables(m=48, v=512, seed=0):
    """Half the prefixes nearly one-hot, half flat-ish: a fixed K spends the same bytes on both."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.where(torch.arange(m) % 2 == 0, torch.tensor(12.0), torch.tensor(1.5)).unsqueeze(1)  # [M, 1]
    logits = torch.randn(m, v, generator=g) * scale  # [M, V]
    q = torch.softmax(logits, dim=1)
    p = torch.softmax(logits + 0.3 * torch.randn(m, v, generator=g), dim=1)
    return p, q


def test_records_and_their_numbers():
    p, q = _mixed_tables()
    records = uplink_curve(p, q, ks=(1, 8), budgets=(16, 32), gamma=4)
    assert [r["encoding"] for r in records] == ["fixed-k"] * 2 + ["budgeted"] * 2 + ["budgeted-compact"] * 2
    full = float(torch.minimum(p, q).sum(dim=1).mean())
    for r in records:
        assert KEYS <= set(r) and r["temperature"] == 1.0
        assert r["alpha_full_fixed_prefixes"] == pytest.approx(full, abs=1e-5)
        assert 0 < r["alpha_fixed_prefixes"] <= r["alpha_full_fixed_prefixes"] + 1e-6
    fixed8 = records[1]
    assert fixed8["k"] == 8 and fixed8["bytes_per_position_all_in"] == 8 * (2 + 2) + 12 / 4
    for r in records[2:]:
        # one sequence drafting gamma positions per reply spends the budget (header and counts included)
        assert r["bytes_per_position_all_in"] <= r["budget"] + 1e-9
        assert r["bytes_per_position_all_in"] > 0.5 * r["budget"]


def test_budgeted_k_dominates_fixed_k_at_equal_bytes():
    p, q = _mixed_tables()
    records = uplink_curve(p, q, ks=(2, 4, 8), budgets=range(8, 50, 2), gamma=4)
    compact = [r for r in records if r["encoding"] == "budgeted-compact"]
    for fixed in (r for r in records if r["encoding"] == "fixed-k"):
        affordable = [r for r in compact if r["bytes_per_position_all_in"] <= fixed["bytes_per_position_all_in"]]
        best = max(r["alpha_fixed_prefixes"] for r in affordable)
        assert best > fixed["alpha_fixed_prefixes"], (fixed, best)
    # more bytes never buy less alpha by more than the quantisation noise
    alphas = [r["alpha_fixed_prefixes"] for r in compact]
    assert all(b >= a - 5e-3 for a, b in zip(alphas, alphas[1:]))


class _Pair:
    def __init__(self, target, draft, vocab_size):
        self.target, self.draft, self.vocab_size = target, draft, vocab_size


def test_curve_on_tiny_models():
    v = 1024
    pair = _Pair(tiny_llama(seed=0, vocab_size=v), tiny_llama(seed=1, vocab_size=v), v)
    prompts = [[1, 2, 3, 4], [9, 8, 7]]
    continuations = [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    records = uplink_curve_for_pair(pair, prompts, continuations, ks=(1, 8), budgets=(8, 32))
    assert len(records) == 6 and all(KEYS <= set(r) for r in records)
    assert all(r["prefixes"] == 9 for r in records)
    assert all(math.isfinite(r["alpha_fixed_prefixes"]) for r in records)
    by = {(r["encoding"], r["k"] or r["budget"]): r for r in records}
    assert by[("budgeted-compact", 32.0)]["alpha_fixed_prefixes"] >= by[("budgeted-compact", 8.0)]["alpha_fixed_prefixes"]


def test_greedy_bytes_per_position():
    # make run (greedy): 12 sequences x 4 positions, V = 49152: 4 B per position + (8 + 3 * 12) / 48 B of header
    assert greedy_bytes_per_position(49152, sequences=12, gamma=4) == pytest.approx(4 + 44 / 48)
    assert greedy_bytes_per_position(49152, sequences=1, gamma=4) == pytest.approx(4 + 11 / 4)
    assert greedy_bytes_per_position(49152, sequences=1, gamma=4) <= 8
    assert greedy_bytes_per_position(49152, sequences=12, gamma=4, encoding="fixed-k") == 32 + 12 / 4


def test_support_bound_extrapolates_the_gap_and_counts_id_bits():
    """The report's 'why missed': a gap that falls exactly 2 points per doubling of slots from 8
    points at 4 slots reaches 2 points at 32 slots; 32 ids of a 1024-token vocabulary need
    log2 C(1024, 32) bits. A curve that does not fall gives no bound."""
    from specfed_flwr.bench.report_measurements import support_bound

    curve = [{"encoding": "budgeted-compact", "mean_slots": n, "alpha_full_fixed_prefixes": 0.99,
              "alpha_fixed_prefixes": 0.99 - (0.08 - 0.02 * math.log2(n / 4))} for n in (4, 8, 16)]
    bound = support_bound(curve, 1024, gap_points=2.0)
    assert bound["points_per_doubling"] == pytest.approx(2.0)
    assert bound["slots"] == pytest.approx(32.0)
    expected_bits = math.log2(math.comb(1024, 32))
    assert bound["id_bytes"] == pytest.approx(expected_bits / 8)
    assert bound["bits_per_id"] == pytest.approx(expected_bits / 32)
    flat = [dict(r, alpha_fixed_prefixes=0.9) for r in curve]
    assert support_bound(flat, 1024, gap_points=2.0) is None
