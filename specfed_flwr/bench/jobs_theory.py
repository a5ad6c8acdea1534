"""The modeled-latency and theory job of a run: the latency model per link profile (one
``modeled`` record per scheme and profile) and the gamma* fit (maths: ``latency``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .latency import HEADER_BYTES, gamma_theory, latency_model, schemes
from .presets import BASE

if TYPE_CHECKING:
    from .suite import Bench

SCHEME_NAMES = ("top-K (K=8)", "full fp32", "full fp16", "target-only")


def model_and_theory(bench: "Bench") -> None:
    bench.step("modeled latency and theory")
    v = bench.pair.vocab_size
    base = bench.sweep_rows("base")[0]
    full = {r["k_label"]: r for r in bench.sweep_rows("k")}.get("V")
    bench.latency = latency_model(base, full, v, bench.target_only_tps, bench.preset.max_new_tokens)
    for row in bench.latency["rows"]:
        _modeled_records(bench, row, base, full)
    g_rows = sorted(bench.sweep_rows("gamma"), key=lambda r: r["gamma"])
    g_rows = list({r["gamma"]: r for r in g_rows}.values())
    bench.theory = gamma_theory(g_rows, base, v)
    bench.advance()


def _modeled_records(bench: "Bench", row: dict[str, Any], base: dict[str, Any], full: dict[str, Any] | None) -> None:
    """One ``modeled`` record per scheme at one link profile."""
    from ..wire import full_distribution_bytes

    v, gamma = bench.pair.vocab_size, BASE["gamma"]
    by_scheme = schemes(base, full, v)
    for name in SCHEME_NAMES:
        tps = 1.0 / row[name]["s_per_token"]
        own = name in by_scheme
        bench.record("modeled", f"modeled: {name}", {
            "k": BASE["k"] if name.startswith("top") else (v if name.startswith("full") else None),
            "gamma": gamma if name != "target-only" else None, "clients": 1, "concurrency": 1,
            "reconstruction": BASE["reconstruction"] if name != "target-only" else None,
            "alpha": (base if name.startswith("top") else (full or base))["alpha"] if name != "target-only" else None,
            "tau": by_scheme[name][1] if own else None,
            "uplink_bytes_per_position": (by_scheme[name][0] - HEADER_BYTES) / gamma if own else None,
            "compression_vs_fp32": (full_distribution_bytes(v, "float32") * gamma / (by_scheme[name][0] - HEADER_BYTES)
                                    if own else None),
            "tokens_per_s": tps}, uplink_mbps=row["uplink_mbps"], rtt_ms=row["rtt_ms"],
            ms_per_token=1000 * row[name]["s_per_token"])
