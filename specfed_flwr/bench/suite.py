"""One ``specfed-flwr bench`` run: the state every job adds to, and the order the jobs run in.

``Bench`` holds the run's records (results.json), its analysis (analysis.json) and the derived
tables the report reads; the jobs are functions of it in their own modules (``jobs_*``), the
verdicts in ``verdicts``, the files in ``output``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from . import jobs_adaptive, jobs_engines, jobs_federation, jobs_prefixes, jobs_sweeps, jobs_theory, output, verdicts
from .machine import loadavg, machine_info
from .presets import REQUIRED_KEYS, preset_for
from .workload import load_bench_pair, make_workload

log = logging.getLogger("specfed_flwr.bench")


class PairInfo:
    """What the report needs of the pair when it is rebuilt from a saved state (no models loaded)."""

    def __init__(self, models: dict[str, Any]):
        self.vocab_size = int(models["vocab_size"])
        self.target_identity, self.draft_identity = models["target"], models["draft"]


class Bench:
    """The state of one run (see the module docstring)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tiny = bool(args.tiny)
        self.preset = preset_for(self.tiny, bool(args.quick))
        self.out_dir = Path(args.out_dir)
        self.records: list[dict[str, Any]] = []
        self.analysis: dict[str, Any] = {}
        self.started = time.perf_counter()
        self.bar = None
        self.load_samples: list[float] = []

    # ---- records and progress ------------------------------------------------------------------
    def record(self, kind: str, engine: str, values: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """A results.json record: every required key (None when not measured), then the values."""
        rec: dict[str, Any] = {key: None for key in REQUIRED_KEYS}
        rec.update({"kind": kind, "engine": engine, "preset": self.preset.name})
        rec.update(values)
        rec.update(extra)
        rec.setdefault("tv_to_target", None)
        rec.setdefault("exact_match", None)
        self.records.append(rec)
        return rec

    def step(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc[:48])

    def advance(self) -> None:
        """One job done; samples the 1-minute load average (the machine may be shared: the report says so)."""
        load = loadavg()
        if load:
            self.load_samples.append(load[0])
        if self.bar is not None:
            self.bar.update(1)

    def sweep_rows(self, axis: str) -> list[dict[str, Any]]:
        """The sweep records of ``axis``, the base run first (it belongs to every axis)."""
        base = [r for r in self.records if r["kind"] == "sweep" and r["axis"] == "base"]
        rows = [r for r in self.records if r["kind"] == "sweep" and r["axis"] == axis]
        return base + rows

    # ---- the run -------------------------------------------------------------------------------
    @classmethod
    def from_state(cls, args: argparse.Namespace, path: str) -> "Bench":
        """A ``Bench`` with a saved run's state and no models (``--render-from``); its verdicts are
        judged again (their wording may have changed since the run; the numbers have not)."""
        state = output.load_state(path)
        bench = cls(args)
        for k in output.STATE:
            setattr(bench, k, state[k])
        bench.preset, bench.tiny = state["preset"], state["tiny"]
        bench.pair = PairInfo(bench.analysis["models"])
        bench.targets = verdicts.targets(bench)
        return bench

    def _n_jobs(self, sweeps: int) -> int:
        pr, args = self.preset, self.args
        flower = 0 if args.no_flower else (len(pr.flower_concurrency) + int(pr.flower_per_device)
                                           + len(jobs_engines.DEPLOYMENT_RUNS) * int(not args.no_deployment))
        return 2 + pr.engine_reps * 4 + 3 + sweeps + 3 + 1 + 1 + flower

    def run(self) -> int:
        from tqdm.auto import tqdm

        self.machine = machine_info("cpu" if self.tiny else self.args.device)
        log.info("loading the model pair (%s)", "tiny:0 / tiny:1" if self.tiny else "embedded default")
        self.pair = load_bench_pair(self.tiny, self.args.device)
        self.work = make_workload(self.pair, self.preset, self.tiny)
        sweeps = jobs_sweeps.sweep_configs(self.preset)
        self.bar = tqdm(total=self._n_jobs(len(sweeps)), desc="bench", unit="job", file=sys.stderr, mininterval=0.5,
                        disable=self.args.no_progress)
        try:
            jobs_engines.warmup(self)
            jobs_engines.engines(self)
            jobs_prefixes.fixed_prefixes(self)
            jobs_sweeps.sweeps(self, sweeps)
            jobs_engines.concurrency_engines(self)
            if not self.args.no_flower:
                jobs_engines.flower_simulation(self)
            else:
                self.analysis["flower"] = "skipped (--no-flower)"
            jobs_engines.deployment(self)
            jobs_theory.model_and_theory(self)
            jobs_adaptive.adaptive_vs_fixed(self)
            if not self.args.no_federation:
                jobs_federation.federation(self)
        finally:
            self.bar.close()
        self._close_machine()
        self.targets = verdicts.targets(self)
        output.write(self)
        return 0

    def _close_machine(self) -> None:
        self.machine["loadavg_end"] = loadavg()
        if self.load_samples:
            self.machine["load_1min_during_run"] = {
                "samples": len(self.load_samples), "mean": round(statistics.mean(self.load_samples), 2),
                "min": round(min(self.load_samples), 2), "max": round(max(self.load_samples), 2)}
        self.analysis["bench_seconds"] = time.perf_counter() - self.started
