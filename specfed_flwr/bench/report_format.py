"""Formatting shared by the report's sections: numbers, TV values, markdown tables, verdicts, and
the one per-round quantity several sections quote (a client's drafting time in a round)."""

from __future__ import annotations

from typing import Any

import numpy as np


def fmt(x: Any, spec: str = ".3f", none: str = "–") -> str:
    if x is None:
        return none
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if not np.isfinite(x):
            return none
        return format(float(x), spec)
    return str(x)


def fmt_tv(x: Any) -> str:
    """TV values: below 1e-4 is float error of an exact law (p itself sums to 1 only to ~1e-6)."""
    if x is None:
        return "–"
    return f"{x:.1e} (= 0)" if x < 1e-4 else f"{x:.4f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def status(met: Any) -> str:
    return "**met**" if met is True else ("**missed**" if met is False else "not measured")


def client_draft_s(r: dict[str, Any]) -> float:
    """Client drafting per round as it adds to the round: the sum over clients that draft one after the
    other (in-process, one Ray actor), the max when each has its own process."""
    parallel = r.get("engine") == "flower-deployment" or (
        r.get("engine") == "flower-simulation" and (r.get("flower_actors") or 0) >= (r.get("clients") or 0))
    return (r.get("draft_max_s_per_round") if parallel else r.get("draft_s_per_round")) or 0.0


def median(rows: list[dict[str, Any]], key: str) -> Any:
    import statistics

    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None
