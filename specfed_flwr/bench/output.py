"""The files of a run: results.json (the records), analysis.json, a saved state, the plots and
the markdown report; ``--render-from STATE`` rebuilds the plots and the report from a saved state
(no measuring), e.g. after a change to the report's text."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import pickle
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .presets import BASE, Preset

if TYPE_CHECKING:
    from .suite import Bench

log = logging.getLogger("specfed_flwr.bench")

#: everything the plots and the markdown read
STATE = ("records", "analysis", "machine", "fixed", "tv_table", "mc", "latency", "theory", "targets",
         "engine_ratios", "target_only_tps")


def write(bench: "Bench") -> None:
    """results.json, analysis.json, the saved state, then the plots and the report."""
    bench.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for rec in bench.records:
        rec["machine"] = {k: bench.machine.get(k) for k in ("cpu", "cores", "device", "torch", "transformers", "flwr")}
        rec["timestamp"] = stamp
    bench.analysis.update({
        "preset": bench.preset.name, "timestamp": stamp, "machine": bench.machine,
        "models": {"target": bench.pair.target_identity, "draft": bench.pair.draft_identity,
                   "vocab_size": bench.pair.vocab_size, "load_seconds": bench.pair.load_seconds},
        "workload": {"prompts": len(bench.work.prompts), "categories": sorted(set(bench.work.categories)),
                     "max_new_tokens": bench.preset.max_new_tokens},
        "base": BASE, "target_only_tokens_per_s": bench.target_only_tps, "engine_ratios": bench.engine_ratios,
        "fixed_prefixes": bench.fixed, "tv": bench.tv_table, "monte_carlo": bench.mc,
        "latency": bench.latency, "theory": jsonable(bench.theory), "targets": bench.targets,
    })
    (bench.out_dir / "results.json").write_text(json.dumps(jsonable(bench.records), indent=1) + "\n")
    (bench.out_dir / "analysis.json").write_text(json.dumps(jsonable(bench.analysis), indent=1) + "\n")
    state = {k: getattr(bench, k) for k in STATE}
    state.update(preset=asdict(bench.preset), tiny=bench.tiny)  # plain data: loads whatever module ran it
    with contextlib.suppress(OSError):
        state_path(bench.preset.name).write_bytes(pickle.dumps(state))
    render(bench)


def state_path(preset: str) -> Path:
    return Path(tempfile.gettempdir()) / f"specfed-bench-state-{preset}.pkl"


def load_state(path: str) -> dict[str, Any]:
    """A saved run's state (``write``): the ``STATE`` attributes, ``preset`` and ``tiny``."""
    state = pickle.loads(Path(path).read_bytes())
    preset = state["preset"]
    state["preset"] = Preset(**preset) if isinstance(preset, dict) else preset
    return state


def render(bench: "Bench") -> None:
    """The plots and the markdown report (``--markdown``) from the bench's state."""
    from .plots import make_plots
    from .report import markdown

    plots = make_plots(bench)
    md = Path(bench.args.markdown)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown(bench, plots, md))
    log.info("wrote %s, %s and %d plots in %.0f s", bench.out_dir / "results.json", md, len(plots),
             time.perf_counter() - bench.started)


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if math.isfinite(f) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x
