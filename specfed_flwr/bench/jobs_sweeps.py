"""The sweeps of a run: the in-process engine sampling at temperature 1, one axis at a time around
the base configuration (K, reconstruction rule for both draft-sampling modes, gamma, clients,
concurrency), each record beside the fixed-prefix alpha and law of its scheme."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .presets import BASE, Preset, k_value
from .run_local import make_config, run_inprocess
from .workload import cycled

if TYPE_CHECKING:
    from .suite import Bench


def sweep_configs(pr: Preset) -> list[tuple[str, dict[str, Any]]]:
    """One axis at a time around BASE; the base configuration runs once (axis 'base')."""
    out: list[tuple[str, dict[str, Any]]] = [("base", dict(BASE))]
    seen = {tuple(sorted(BASE.items()))}

    def add(axis: str, **change: Any) -> None:
        cfg = dict(BASE, **change)
        key = tuple(sorted(cfg.items()))
        if key not in seen:
            seen.add(key)
            out.append((axis, cfg))

    for k in pr.ks:
        add("k", k=k)
    for mode in pr.recon_sampling_modes:
        for rule in pr.reconstructions:
            add("reconstruction", reconstruction=rule, draft_sampling=mode)
    for g in pr.gammas:
        add("gamma", gamma=g)
    for c in pr.clients:
        add("clients", clients=c)
    for c in pr.concurrency:
        add("concurrency", concurrency=c)
    return out


def sweeps(bench: "Bench", configs: list[tuple[str, dict[str, Any]]]) -> None:
    pr, pair, v = bench.preset, bench.pair, bench.pair.vocab_size
    for axis, c in configs:
        kv = k_value(c["k"], v)
        bench.step(f"sweep {axis}: K={c['k']} g={c['gamma']} {c['reconstruction'][:4]}/{c['draft_sampling'][:2]} "
                   f"c{c['clients']} x{c['concurrency']}")
        cfg = make_config(v, k=kv, gamma=c["gamma"], reconstruction=c["reconstruction"],
                          draft_sampling=c["draft_sampling"], concurrency=c["concurrency"], temperature=1.0,
                          max_new_tokens=pr.max_new_tokens)
        prompts = cycled(bench.work.prompts, max(c["concurrency"], len(bench.work.prompts)))
        m = run_inprocess(pair, prompts, cfg, c["clients"])
        m.update(_fixed_prefix_numbers(bench, c, kv))
        m["exact"] = cfg.exact()
        bench.record("sweep", "in-process", m, axis=axis, k_label=str(c["k"]))
        bench.advance()


def _fixed_prefix_numbers(bench: "Bench", c: dict[str, Any], kv: int) -> dict[str, Any]:
    """The fixed-prefix alpha, kept mass and law (TV) of the sweep's scheme, where measured."""
    out: dict[str, Any] = {}
    fixed = bench.fixed["per_k"].get(str(c["k"]))
    if fixed is not None:
        out["alpha_fixed_prefixes"] = fixed["alpha"].get(c["reconstruction"])
        out["kept_mass"] = fixed["kept_mass"]
    law = bench.tv_table.get(f"{kv}/{c['reconstruction']}/{c['draft_sampling']}")
    if law is None and c["draft_sampling"] == "sparse" and c["k"] == BASE["k"]:
        law = bench.tv_table.get(f"{BASE['k']}/{c['reconstruction']}/sparse")
    if law is not None:
        out["tv_to_target"] = law["tv_to_target"]
        out["tv_bound_1_minus_S"] = law["tv_bound_1_minus_S"]
    return out
