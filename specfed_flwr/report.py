"""Human-readable summary table of a run."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def summary_table(summary: dict[str, Any]) -> str:
    rows = [
        ("sequences", _fmt(summary.get("sequences"))),
        ("tokens generated", _fmt(summary.get("tokens"))),
        ("tokens/s", _fmt(summary.get("tokens_per_s"), ".2f")),
        ("alpha (sum min(p, q_bar))", _fmt(summary.get("alpha"))),
        ("acceptance rate", _fmt(summary.get("acceptance_rate"))),
        ("tau (tokens per sequence-round)", _fmt(summary.get("tau"), ".2f")),
        ("uplink bytes / token", _fmt(summary.get("uplink_bytes_per_token"), ".1f")),
        ("uplink bytes / draft position (all-in)", _fmt(summary.get("uplink_bytes_per_position"), ".1f")),
        ("distribution bytes / draft position", _fmt(summary.get("topk_bytes_per_position"), ".1f")),
        ("compression vs full fp32 dist.", _fmt(summary.get("compression_vs_fp32"), ".0f") + "x"),
        ("rounds", _fmt(summary.get("rounds"))),
        ("seconds / round", _fmt(summary.get("seconds_per_round"), ".3f")),
        ("verify seconds (target)", _fmt(summary.get("verify_seconds"), ".2f")),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["SpecFed summary", "-" * (width + 16)]
    lines += [f"{name:<{width}}  {value:>12}" for name, value in rows]
    clients = summary.get("clients") or {}
    if clients:
        lines.append("-" * (width + 16))
        loads = summary.get("draft_loads") or {}
        lines.append("per client: replied/asked  positions  uplink B  faults  draft loads  resyncs after round 1")
        for name, stats in clients.items():
            faults = stats.get("faults") or []
            late_resyncs = sum(1 for r in stats.get("resync_rounds") or [] if r > 1)
            lines.append(
                f"  {name}: {stats['rounds_replied']}/{stats['rounds_asked']}  {stats['positions']}  "
                f"{stats['uplink_bytes']}  {len(faults)}  {_fmt(loads.get(name))}  {late_resyncs}"
                + (f" (first fault: {faults[0]})" if faults else "")
            )
    settings = summary.get("settings") or {}
    if settings:
        lines.append("gamma and K asked per client (median over rounds, range; chosen per round when adaptive):")
        for name, st in settings.items():
            lines.append(f"  {name}: gamma {_fmt(st['gamma_median'], 'g')} ({st['gamma_min']}-{st['gamma_max']}), "
                         f"K {_fmt(st['k_median'], 'g')}")
    excluded = summary.get("excluded") or {}
    for name, reason in excluded.items():
        lines.append(f"  {name}: refused at handshake: {reason}")
    faults = summary.get("faults") or {}
    if faults:
        lines.append("faults per client (kind x count):")
        for name, kinds in faults.items():
            lines.append(f"  {name}: " + ", ".join(f"{k} x{n}" for k, n in kinds.items()))
    hit = {k: v for k, v in (summary.get("limits") or {}).items() if v.get("hits")}
    if hit:
        lines.append("limits hit:")
        for name, info in hit.items():
            lines.append(f"  {name.replace('_', '-')}={info['value']}: {info['hits']} ({info['meaning']})")
    refused = summary.get("refused_prompts") or {}
    for index, reason in refused.items():
        lines.append(f"  prompt {index} refused: {reason}")
    return "\n".join(lines)
