"""The adaptive-settings job of a run: the Lambert-W controller (``adaptive``, the default) beside
the fixed gammas where the gamma sweep peaked, in interleaved repetitions, and the uplink issue's
two bars judged on them.

Why repetitions: near its maximum the tokens/s-vs-gamma curve is flat, so the sweep's single run
per gamma cannot name the best gamma on a noisy machine. The job reruns the sweep's best gamma and
its neighbours, with the adaptive run in the same repetition (order rotated per repetition, so slow
drift of the machine is spread over every label), and judges on medians:

* adaptive tokens/s >= ``ADAPTIVE_RATIO_BAR`` x the best fixed gamma's: the median over repetitions
  of (adaptive / that gamma) within each repetition;
* theory's gamma* (``bench.theory``: Lambert W on the gamma sweep's alpha and round-cost fit) within
  ``GAMMA_STAR_TOLERANCE`` of the best gamma by median tokens/s.

Every run has the sweep's settings (in-process, strict rounds, temperature 1, the base K, reconstruction
and clients, one sequence), so the controller's choices are the only difference.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from ..summary import median_gamma_asked
from .presets import BASE
from .run_local import make_config, run_inprocess
from .workload import cycled

if TYPE_CHECKING:
    from .suite import Bench

ADAPTIVE_RATIO_BAR = 0.95
GAMMA_STAR_TOLERANCE = 1.0
ADAPTIVE = "adaptive"


def candidate_gammas(sweep_rows: list[dict[str, Any]], neighbours: int = 1) -> list[int]:
    """The gamma sweep's best gamma (max tokens/s) and its ``neighbours`` on each side that the
    sweep measured."""
    rows = [r for r in sweep_rows if r.get("tokens_per_s") is not None]
    if not rows:
        return []
    best = max(rows, key=lambda r: r["tokens_per_s"])["gamma"]
    measured = sorted({int(r["gamma"]) for r in rows})
    return [g for g in measured if abs(g - best) <= neighbours]


def rotated(labels: list[Any], rep: int) -> list[Any]:
    """``labels`` starting at position ``rep`` (mod len): each label runs first once in a while."""
    if not labels:
        return []
    i = rep % len(labels)
    return labels[i:] + labels[:i]


def adaptive_vs_fixed(bench: "Bench") -> None:
    """``adaptive`` records (one per label and repetition) and ``bench.analysis["adaptive"]``."""
    bench.step("adaptive vs fixed gamma")
    gammas = candidate_gammas(bench.sweep_rows("gamma"))
    if not gammas:
        bench.analysis["adaptive"] = {"skipped": "no gamma sweep to compare with"}
        bench.advance()
        return
    pr, pair = bench.preset, bench.pair
    prompts = cycled(bench.work.prompts, max(BASE["concurrency"], len(bench.work.prompts)))
    labels: list[Any] = [ADAPTIVE] + gammas
    records: list[dict[str, Any]] = []
    for rep in range(pr.adaptive_reps):
        for label in rotated(labels, rep):
            cfg = make_config(pair.vocab_size, k=BASE["k"], gamma=BASE["gamma"] if label == ADAPTIVE else label,
                              reconstruction=BASE["reconstruction"], draft_sampling=BASE["draft_sampling"],
                              concurrency=BASE["concurrency"], temperature=1.0, max_new_tokens=pr.max_new_tokens,
                              adaptive=label == ADAPTIVE)
            m = run_inprocess(pair, prompts, cfg, BASE["clients"])
            chosen = median_gamma_asked(m.get("settings"))
            if label == ADAPTIVE:  # gamma-indexed numbers of a run whose gamma changed mean nothing
                m.update(gamma=chosen, per_position_acceptance=None, per_position_reach=None, tau_full_rounds=None)
            records.append(bench.record("adaptive", "in-process", m, label=str(label), rep=rep,
                                        gamma_chosen_median=chosen))
    bench.analysis["adaptive"] = judge(records, bench.theory)
    bench.advance()


def judge(records: list[dict[str, Any]], theory: dict[str, Any] | None) -> dict[str, Any]:
    """Medians per label, the best fixed gamma, and the two bars (see the module docstring)."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    medians = {label: statistics.median(r["tokens_per_s"] for r in rs) for label, rs in by_label.items()}
    fixed = {int(label): tps for label, tps in medians.items() if label != ADAPTIVE}
    if ADAPTIVE not in medians or not fixed:
        return {"medians": medians, "skipped": "no adaptive or fixed run"}
    best = max(fixed, key=lambda g: fixed[g])
    best_by_rep = {r["rep"]: r["tokens_per_s"] for r in by_label[str(best)]}
    ratios = [r["tokens_per_s"] / best_by_rep[r["rep"]] for r in by_label[ADAPTIVE] if best_by_rep.get(r["rep"])]
    ratio = statistics.median(ratios) if ratios else None
    chosen = [r["gamma_chosen_median"] for r in by_label[ADAPTIVE] if r.get("gamma_chosen_median") is not None]
    out: dict[str, Any] = {
        "reps": max(len(rs) for rs in by_label.values()),
        "tokens_per_s_median": medians,
        "best_fixed_gamma": best,
        "best_fixed_tokens_per_s": fixed[best],
        "adaptive_tokens_per_s": medians[ADAPTIVE],
        "adaptive_ratio_per_rep": ratios,
        "adaptive_ratio_vs_best_fixed": ratio,
        "adaptive_gamma_chosen_median": statistics.median(chosen) if chosen else None,
        "ratio_bar": ADAPTIVE_RATIO_BAR,
        "ratio_met": None if ratio is None else ratio >= ADAPTIVE_RATIO_BAR,
    }
    star = _gamma_star(theory)
    if star is not None:
        out.update(gamma_star=star[0], gamma_star_basis=star[1], gamma_star_diff=abs(star[0] - best),
                   gamma_star_met=abs(star[0] - best) <= GAMMA_STAR_TOLERANCE)
    return out


def _gamma_star(theory: dict[str, Any] | None) -> tuple[float, str] | None:
    """Theory's gamma* for the in-process runs (compute only), else at the link profile."""
    if not theory:
        return None
    if theory.get("gamma_star_compute") is not None:
        return float(theory["gamma_star_compute"]), "compute only (fit of the gamma sweep's round times)"
    if theory.get("gamma_star_link") is not None:
        return float(theory["gamma_star_link"]), "at the link profile"
    return None
