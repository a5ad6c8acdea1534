"""Runners of the Flower engines: the simulation (``run_simulation`` in this process) and the
deployment engine (a real SuperLink and SuperNodes, ``flwr run``), each returning one record."""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .presets import BASE, DRAFT_QUANTIZATION, FLOWER_BACKEND
from .rounds import RoundLog
from .run_local import exact_match, make_config, run_metrics

if TYPE_CHECKING:
    from ..specs import ModelPair


def _run_config(pair: "ModelPair", *, clients: int, concurrency: int, max_new_tokens: int, device: str,
                pipelined: bool, **extra: Any) -> dict[str, Any]:
    """The run config both Flower engines get: the bench's base configuration, greedy."""
    cfg = {
        "target": pair.target_spec, "draft": pair.draft_spec, "draft-quantization": DRAFT_QUANTIZATION,
        "device": "cpu" if pair.target_spec.startswith("tiny") else device,
        "chat-template": False, "resume": False,
        "max-new-tokens": max_new_tokens, "max-active-sequences": concurrency, "top-k": BASE["k"],
        "draft-length": BASE["gamma"], "reconstruction": BASE["reconstruction"], "temperature": 0.0,
        "min-nodes": clients, "adaptive": False, **extra,
    }
    if not pipelined:
        cfg.update({"pipeline-depth": "1", "draft-ahead": False})
    return cfg


def run_flower(pair: "ModelPair", prompts: list[list[int]], *, clients: int, concurrency: int, max_new_tokens: int,
               mode: str = "collaborative", references=None, device: str = "auto", pipelined: bool = True,
               adaptive: bool = False) -> dict[str, Any]:
    """The Flower simulation engine (``run_simulation``); ``pipelined``: the run config's defaults
    (cohorts in flight, drafting ahead), else strict rounds; ``adaptive``: gamma and K chosen per
    round (else the base configuration's, every round)."""
    from flwr.simulation import run_simulation

    from ..client_app import app as client_app
    from ..serve import make_server_app

    log = RoundLog()
    with tempfile.TemporaryDirectory(prefix="specfed-bench-") as tmp:
        overrides = _run_config(pair, clients=clients, concurrency=concurrency, max_new_tokens=max_new_tokens,
                                device=device, pipelined=pipelined, results=str(Path(tmp) / "results.jsonl"),
                                mode=mode, adaptive=adaptive, **{"round-timeout": 300.0})
        captured: dict[str, Any] = {}
        server_app = make_server_app(overrides, prompts=prompts, on_result=lambda r: captured.update(result=r),
                                     on_round=log)
        started = time.perf_counter()
        with quiet_flower():
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                           backend_config=FLOWER_BACKEND)
        total = time.perf_counter() - started
    if "result" not in captured:
        raise RuntimeError("the Flower ServerApp did not finish (see the log above)")
    result = captured["result"]
    cfg = make_config(pair.vocab_size, k=BASE["k"], gamma=BASE["gamma"], reconstruction=BASE["reconstruction"],
                      draft_sampling="sparse", concurrency=concurrency, temperature=0.0, max_new_tokens=max_new_tokens,
                      mode=mode, adaptive=adaptive)
    outputs = [s.token_ids for s in result.sequences]
    # clients draft in parallel only if the simulation has an actor for each of them
    actors = int(FLOWER_BACKEND["init_args"]["num_cpus"] // FLOWER_BACKEND["client_resources"]["num_cpus"])
    metrics = run_metrics(result.summary, log, cfg, clients, parallel=actors >= clients, outputs=outputs,
                          references=references, batched=True)
    metrics.update({
        "flower_actors": actors, "simulation_total_s": total,
        "faults": {c: len(f) for c, f in result.faults.items()},
        "draft_loads": result.summary.get("draft_loads"),
        "proactive_hits": result.summary.get("proactive_hits"),
        "proactive_misses": result.summary.get("proactive_misses"),
        "resyncs_after_round_1": sum(sum(1 for r in c.get("resync_rounds", []) if r > 1)
                                     for c in result.summary.get("clients", {}).values()),
        "pipelined": pipelined,
    })
    return metrics


def app_dir() -> Path | None:
    """The Flower app (this repository's pyproject.toml with [tool.flwr.app]), or None when the
    package runs from an installed wheel without the repository."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    with contextlib.suppress(OSError):
        if "[tool.flwr.app]" in pyproject.read_text():
            return root
    return None


def reply_gaps(reply_times: dict[str, list[float]]) -> list[float]:
    """Gaps between each node's consecutive draft replies (as the server pulled them), pooled."""
    gaps: list[float] = []
    for times in (reply_times or {}).values():
        gaps += [b - a for a, b in zip(times, times[1:])]
    return gaps


def run_deployment(pair: "ModelPair", prompts: list[list[int]], *, clients: int, concurrency: int, max_new_tokens: int,
                   references=None, device: str = "auto", timeout: float = 900.0,
                   runtime: str = "persistent", pipelined: bool = False, standby: bool = True,
                   depth: int | None = None) -> dict[str, Any]:
    """The same app on Flower's DEPLOYMENT engine: ``launch.start_deployment_stack`` (a real SuperLink,
    ``clients`` real SuperNodes) and ``flwr run``, with ``runtime="persistent"`` (one ``specfed-flwr
    device-runtime`` per SuperNode: one warm ClientApp process for all messages) or ``"stock"``
    (Flower's new ``flwr-clientapp`` process per message, SuperExec poll 0.1 s). ``pipelined`` False:
    strict rounds (``pipeline-depth=1``, no drafting ahead: the next round's messages go out after
    every reply of this one is in); True: the run config's defaults (cohorts in flight, drafting ahead).
    ``standby``: ``standby-messages`` auto (the default) or off. ``depth``: a fixed ``pipeline-depth``
    for a pipelined run (None: the default, auto).

    ``round_s_median``: median wall time of one round as the ServerApp measured it (push, wait for the
    replies, verify, commit); ``reply_gap_s_median``: median gap between a node's consecutive replies.
    The ServerApp runs in its own process, so the rest comes from the run summary's totals: round =
    decode wall / (rounds + 1) (the wall includes waiting for the nodes and the handshake, one more
    exchange), overhead = round - verify - the slowest client's draft time."""
    root = app_dir()
    if root is None:
        raise RuntimeError("the Flower app (repository pyproject.toml) was not found")
    with tempfile.TemporaryDirectory(prefix="specfed-bench-dep-") as tmp:
        tmp_p = Path(tmp)
        prompt_file = tmp_p / "prompts.jsonl"
        prompt_file.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
        results = tmp_p / "results.jsonl"
        run_cfg = _run_config(pair, clients=clients, concurrency=concurrency, max_new_tokens=max_new_tokens,
                              device=device, pipelined=pipelined, prompts=str(prompt_file), results=str(results),
                              **{"round-timeout": 120.0, "node-wait-timeout": 120.0,
                                 "standby-messages": "auto" if standby else "off",
                                 **({"pipeline-depth": str(depth)} if pipelined and depth else {})})
        summary, records, times = _run_on_stack(root, run_cfg, results, clients=clients, runtime=runtime,
                                                log_dir=tmp_p / "logs", timeout=timeout)
    outputs = [r["token_ids"] for r in sorted(records, key=lambda r: r["index"])]
    rec = _deployment_record(summary, clients=clients, concurrency=concurrency)
    rec.update({"runtime": runtime, "pipelined": pipelined, "standby_messages": standby, "depth": depth, **times,
                "exact_match": exact_match(outputs, references)})
    return rec


def _run_on_stack(root: Path, run_cfg: dict[str, Any], results: Path, *, clients: int, runtime: str, log_dir: Path,
                  timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """Start a deployment stack, ``flwr run`` the app on it, stop it: (summary, result records, times)."""
    from ..launch import flwr_run, start_deployment_stack
    from ..serve import summary_path_for

    started = time.perf_counter()
    stack = start_deployment_stack(clients, log_dir=log_dir, runtime=runtime)
    try:
        stack_s = time.perf_counter() - started
        rc = flwr_run(stack, root, run_cfg, stream=False, timeout=timeout)
        if rc != 0:
            tail = stack.last_run.log_path.read_text()[-2000:] if stack.last_run else ""
            raise RuntimeError(f"flwr run failed (rc={rc}): {tail}")
        run_s = stack.last_run.elapsed_s
    finally:
        stack.stop()
    summary = json.loads(summary_path_for(results).read_text())
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return summary, records, {"stack_start_s": stack_s, "flwr_run_s": run_s}


def _deployment_record(summary: dict[str, Any], *, clients: int, concurrency: int) -> dict[str, Any]:
    """A deployment run's record from its summary (see ``run_deployment``)."""
    rounds = int(summary.get("rounds") or 0)
    wall = float(summary["wall_seconds"])
    verify = float(summary.get("verify_seconds") or 0.0)
    drafts = [float(c.get("draft_seconds") or 0.0) for c in (summary.get("clients") or {}).values()]
    # the handshake is one more message exchange through the same engine: per exchange = wall / (rounds + 1)
    exchanges = rounds + 1
    round_s = wall / exchanges if rounds else None
    overhead = max(0.0, wall - verify - max(drafts, default=0.0)) / exchanges if rounds else None
    walls = [float(x) for x in summary.get("round_wall_seconds") or []]
    gaps = reply_gaps(summary.get("reply_times") or {})
    return {
        "proactive_hits": summary.get("proactive_hits"), "proactive_misses": summary.get("proactive_misses"),
        "round_s_median": statistics.median(walls) if walls else None,
        "round_s_all": walls,
        "reply_gap_s_median": statistics.median(gaps) if gaps else None,
        "reply_gaps": len(gaps),
        # distinct ClientApp processes that answered each node (handshake included): 1 = warm for the run
        "clientapp_processes_per_node": {n: len(c) for n, c in (summary.get("reply_pids") or {}).items()},
        "server_poll_s": summary.get("poll_interval"),
        "standby_sent": (summary.get("standby") or {}).get("sent", 0),
        # standbys after which the node's SuperNode slept anyway: the hold ended before the next request
        "standby_slept": (summary.get("standby") or {}).get("slept"),
        "pipeline_depth_max": summary.get("pipeline_depth_max"),
        "standby_median_hold_s": (summary.get("standby") or {}).get("median_hold_s"),
        "k": BASE["k"], "reconstruction": BASE["reconstruction"], "draft_sampling": "sparse", "gamma": BASE["gamma"],
        "clients": clients, "concurrency": concurrency, "mode": "collaborative", "temperature": 0.0,
        "sequences": summary.get("sequences"), "tokens": int(summary["tokens"]),
        "alpha": summary.get("alpha"), "tau": summary.get("tau"), "acceptance_rate": summary.get("acceptance_rate"),
        "uplink_bytes_per_position": summary.get("uplink_bytes_per_position"),
        "topk_bytes_per_position": summary.get("topk_bytes_per_position"),
        "compression_vs_fp32": summary.get("compression_vs_fp32"),
        "compression_vs_fp16": summary.get("compression_vs_fp16"),
        "compression_vs_fp32_all_in": summary.get("compression_vs_fp32_all_in"),
        "tokens_per_s": int(summary["tokens"]) / wall if wall else None,
        "wall_s": wall, "rounds": rounds, "round_s_mean": round_s,
        "verify_s_per_round": verify / exchanges if rounds else None,
        "draft_max_s_per_round": max(drafts, default=0.0) / exchanges if rounds else None,
        "draft_s_per_round": sum(drafts) / exchanges if rounds else None,
        "engine_overhead_s_per_round": overhead, "engine_overhead_s_per_round_mean": overhead,
        "engine_overhead_share": overhead / round_s if round_s else None,
        "draft_loads": summary.get("draft_loads"), "ephemeral_nodes": summary.get("ephemeral_nodes"),
        "faults": {c: len(v.get("faults") or []) for c, v in (summary.get("clients") or {}).items()},
        "batched_verify": True,
    }


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower logs every round at INFO; keep warnings only while a benchmark runs."""
    loggers = [logging.getLogger(n) for n in ("flwr", "specfed_flwr")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
