"""The fixed-prefix jobs of a run (paired, no sampling noise): alpha and kept mass per K and rule,
the exact one-step output law of every scheme (TV to the target), and the Monte Carlo check of
that law with the engine's own functions (the maths: ``law``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .law import Prefixes, collect_prefixes, fixed_prefix_alpha, monte_carlo_first_token, noise_floor, output_law, topk_reply, tv
from .presets import BASE, k_value

if TYPE_CHECKING:
    from .suite import Bench

LawKey = tuple[int, int, str, str]  # (prefix, K, rule, draft sampling)


def fixed_prefixes(bench: "Bench") -> None:
    """``bench.fixed`` (alpha per K), ``bench.tv_table`` (law per scheme), ``bench.mc`` (its check)."""
    bench.step("fixed prefixes: alpha per K and rule")
    pre = collect_prefixes(bench.pair, bench.work.prompts, bench.references)
    bench.fixed = {"per_k": alpha_per_k(pre, bench.preset.ks, bench.preset.reconstructions, bench.pair.vocab_size),
                   "prefixes": pre.p.shape[0]}
    bench.fixed["uplink_curve"] = uplink_records(bench, pre)
    bench.advance()

    bench.step("fixed prefixes: output law / TV")
    m = pre.p.shape[0]
    idx = sorted(set(np.linspace(0, m - 1, num=min(bench.preset.tv_prefixes, m)).round().astype(int).tolist()))
    bench.tv_table, laws = law_table(bench, pre, idx)
    bench.advance()

    bench.step("Monte Carlo check at one prefix")
    bench.mc = monte_carlo_check(bench, pre, idx, laws)
    bench.advance()


def uplink_records(bench: "Bench", pre: Prefixes) -> list[dict[str, Any]]:
    """The bytes-vs-alpha curve of the uplink encodings at these prefixes (``uplinkcurve``: fixed
    K vs a byte budget per position, float16 vs compact probabilities), one record each."""
    from ..uplinkcurve import uplink_curve

    out = []
    for rec in uplink_curve(pre.p, pre.q, gamma=BASE["gamma"]):
        out.append(bench.record("uplink_curve", "fixed-prefix", rec))
    return out


def alpha_per_k(pre: Prefixes, ks, rules, vocab: int) -> dict[str, dict[str, Any]]:
    """Per K label: alpha per rule, kept mass, TV(q, q_hat) and the payload of that K."""
    from ..wire import bytes_per_position, compression_ratio

    per_k = {}
    for k in ks:
        kv = k_value(k, vocab)
        per_k[str(k)] = fixed_prefix_alpha(pre, kv, rules, chunk=16 if kv > 4096 else 64)
        per_k[str(k)].update({"k": kv, "bytes_per_position": bytes_per_position(kv, vocab),
                              "compression_vs_fp32": compression_ratio(kv, vocab, "float32"),
                              "compression_vs_fp16": compression_ratio(kv, vocab, "float16")})
    return per_k


def _schemes(bench: "Bench") -> list[tuple[int, str, str]]:
    """(K, rule, draft sampling) whose law is computed: every rule at the base K, every K with the
    base rule, and (``bias_vs_k``) the paper-faithful uniform rule at every K."""
    pr, v = bench.preset, bench.pair.vocab_size
    schemes = [(BASE["k"], rule, mode) for mode in pr.recon_sampling_modes for rule in pr.reconstructions]
    schemes += [(k_value(k, v), BASE["reconstruction"], "sparse") for k in pr.ks if k_value(k, v) != BASE["k"]]
    if pr.bias_vs_k:
        schemes += [(k_value(k, v), "uniform", "full") for k in pr.ks if k_value(k, v) not in (BASE["k"], v)]
    return schemes


def law_table(bench: "Bench", pre: Prefixes, idx: list[int]) -> tuple[dict[str, dict[str, Any]], dict[LawKey, torch.Tensor]]:
    """Exact one-step output law -> TV to the target, at the prefixes ``idx``; the laws themselves."""
    pr = bench.preset
    table: dict[str, dict[str, Any]] = {}
    laws: dict[LawKey, torch.Tensor] = {}
    for k, rule, mode in _schemes(bench):
        tvs, lefts, bounds = [], [], []
        for i in idx:
            law, left = output_law(pre.p[i], pre.q[i], k, rule, mode, cover=pr.law_cover,
                                   max_candidates=pr.law_max_candidates)
            laws[(i, k, rule, mode)] = law
            tvs.append(tv(law, pre.p[i]))
            lefts.append(left)
            ids, _ = topk_reply(pre.q[i][None], k)
            bounds.append(max(0.0, 1.0 - float(pre.q[i][ids[0]].sum())))
        table[f"{k}/{rule}/{mode}"] = {"k": k, "reconstruction": rule, "draft_sampling": mode,
                                       "tv_to_target": float(np.mean(tvs)), "tv_max": float(np.max(tvs)),
                                       "tv_enumeration_error": float(np.max(lefts)),
                                       "tv_bound_1_minus_S": float(np.mean(bounds)), "prefixes": len(idx)}
    return table, laws


def monte_carlo_check(bench: "Bench", pre: Prefixes, idx: list[int], laws: dict[LawKey, torch.Tensor]) -> list[dict]:
    """The law checked with the engine's own functions, at the prefix with the largest 1 - S at K=8
    among the TV prefixes (where the paper-faithful bias is largest)."""
    pr = bench.preset
    bounds = []
    for i in idx:
        ids, _ = topk_reply(pre.q[i][None], BASE["k"])
        bounds.append(1.0 - float(pre.q[i][ids[0]].sum()))
    j = idx[int(np.argmax(bounds))]
    p, q = pre.p[j], pre.q[j]
    floor = noise_floor(p, pr.mc_samples)
    mc = []
    # the default exact scheme and every paper-faithful one (the other sparse schemes are exact
    # by the same argument; the law table covers them)
    mc_schemes = [(BASE["reconstruction"], "sparse")] + [(r, "full") for r in pr.reconstructions
                                                         if "full" in pr.recon_sampling_modes]
    for rule, mode in mc_schemes:
        hist = monte_carlo_first_token(p, q, BASE["k"], rule, mode, pr.mc_samples)
        law = laws[(j, BASE["k"], rule, mode)]
        rec = {"k": BASE["k"], "reconstruction": rule, "draft_sampling": mode, "samples": pr.mc_samples,
               "prefix": {"prompt": pre.where[j][0], "position": pre.where[j][1]},
               "tv_mc_to_target": tv(hist, p), "tv_mc_to_exact_law": tv(hist, law),
               "tv_exact_law_to_target": tv(law, p), "tv_noise_floor": floor,
               "kept_mass": 1.0 - bounds[idx.index(j)]}
        mc.append(rec)
        bench.record("tv", "monte-carlo (engine functions)", {
            "k": BASE["k"], "reconstruction": rule, "gamma": 1, "clients": 1, "concurrency": 1,
            "tv_to_target": rec["tv_mc_to_target"], "draft_sampling": mode, "temperature": 1.0}, **rec)
    return mc
