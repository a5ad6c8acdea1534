"""``specfed-flwr bench`` in miniature: tiny random models (tiny:0 target, tiny:1 draft, V=1024).

Checks the outputs' shape and sanity, not speed: results.json records carry the required keys,
byte accounting and compression are exact, the markdown has the targets section and the plots
exist. The Flower simulation part has its own test (marked ``flower``: Ray startup alone takes
tens of seconds on a 2-core machine).
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from specfed_flwr.bench.cli import main as bench_main
from specfed_flwr.bench.jobs_engines import deployment_comparison
from specfed_flwr.bench.presets import REQUIRED_KEYS, TINY_QUICK
from specfed_flwr.bench.rounds import RoundLog
from specfed_flwr.bench.run_flower import reply_gaps, run_deployment, run_flower
from specfed_flwr.bench.run_local import hf_generate
from specfed_flwr.bench.workload import load_bench_pair, make_workload
from specfed_flwr.round_report import RoundReport

V = 1024


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    md = out / "B.md"
    rc = bench_main(["--tiny", "--quick", "--no-flower", "--no-progress", "--out-dir", str(out), "--markdown", str(md)])
    assert rc == 0
    return out, md


def test_results_records_have_required_keys(tiny_run):
    out, _ = tiny_run
    records = json.loads((out / "results.json").read_text())
    assert isinstance(records, list) and records
    for rec in records:
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        assert not missing, f"{rec.get('engine')}: missing {missing}"
        assert rec["machine"]["cores"] >= 1 and rec["machine"]["torch"]
    engines = {r["engine"] for r in records}
    assert {"target-only", "hf-assisted", "in-process", "flower-deployment"} <= engines
    assert any(r["engine"].startswith("modeled") for r in records)
    deployment = next(r for r in records if r["engine"] == "flower-deployment")
    assert deployment["status"] == "not measured" and deployment["tokens_per_s"] is None


def test_sweep_values_are_sane(tiny_run):
    out, _ = tiny_run
    records = json.loads((out / "results.json").read_text())
    sweeps = [r for r in records if r["kind"] == "sweep"]
    axes = {r["axis"] for r in sweeps}
    assert {"base", "k", "reconstruction", "gamma", "clients", "concurrency"} <= axes
    for r in sweeps:
        assert 0.0 <= r["alpha"] <= 1.0
        assert 1.0 <= r["tau"] <= r["gamma"] + 1
        assert r["tokens_per_s"] > 0
        assert r["exact_match"] is None  # sampling mode
        assert r["tv_to_target"] is None or 0.0 <= r["tv_to_target"] <= 1.0
        assert len(r["per_position_acceptance"]) == r["gamma"]
    base = next(r for r in sweeps if r["axis"] == "base")
    assert (base["k"], base["gamma"], base["reconstruction"], base["clients"], base["concurrency"]) == (8, 4, "exact", 2, 1)
    # K=8 at V=1024: 8 * (2 + 2) = 32 B of arrays per position, plus the reply header (seq id int64 +
    # length int32 = 12 B per sequence and round) amortised over the drafted positions
    assert 32 < base["uplink_bytes_per_position"] <= 32 + 12
    # compression is measured on the top-K arrays alone (the engine's definition); the all-in
    # ratio (headers included) is reported beside it
    assert base["topk_bytes_per_position"] == 32
    assert math.isclose(base["compression_vs_fp32"], 4 * V / 32)
    assert math.isclose(base["compression_vs_fp16"], 2 * V / 32)
    assert math.isclose(base["compression_vs_fp32_all_in"], 4 * V / base["uplink_bytes_per_position"])
    assert math.isclose(base["compression_vs_fp16_all_in"], 2 * V / base["uplink_bytes_per_position"])
    # exact schemes keep the target's law: the exact one-step law is p up to float error
    exact = [r for r in sweeps if r["draft_sampling"] == "sparse" and r["tv_to_target"] is not None]
    assert exact and all(r["tv_to_target"] < 1e-5 for r in exact)


def test_greedy_engines_match_target(tiny_run):
    # Checked that it can fail: with jobs_engines.engines recording none of its rows (its two
    # bench.record calls replaced by `pass`) the first assert fails; before, the loop asserted nothing
    # about rows that were not there (and nothing at all when no engine was measured).
    out, _ = tiny_run
    records = json.loads((out / "results.json").read_text())
    measured = [r for r in records if r["kind"] == "engine" and r.get("status") != "not measured"]
    labels = {r.get("label") or r["engine"] for r in measured}
    assert {"target-only", "hf-assisted", "in-process-1c", "in-process-2c"} <= labels, labels
    for r in measured:
        assert r["exact_match"] == 1.0, r.get("label") or r["engine"]


def test_analysis_markdown_and_plots(tiny_run):
    out, md = tiny_run
    analysis = json.loads((out / "analysis.json").read_text())
    fixed = analysis["fixed_prefixes"]["per_k"]
    assert fixed["8"]["bytes_per_position"] == 32
    assert math.isclose(fixed["8"]["compression_vs_fp32"], 128.0)
    assert math.isclose(fixed["V"]["compression_vs_fp32"], 1.0)
    assert fixed["V"]["kept_mass"] == pytest.approx(1.0, abs=1e-4)
    # with K = V every rule gives q_hat = q
    for rule in ("uniform", "temperature", "exact"):
        assert fixed["V"]["alpha"][rule] == pytest.approx(fixed["V"]["alpha_full_q"], abs=1e-4)
    th = analysis["theory"]
    assert th["gamma_star_link"] is not None and th["measured_best_gamma_link"] in th["fit"]["gamma"]
    assert len(analysis["targets"]) == 4
    text = md.read_text()
    assert "## Targets" in text and "## Machine" in text and "not measured" in text
    assert ("**met**" in text) or ("**missed**" in text)
    for name in ("payload_alpha_vs_k", "gamma", "latency_vs_bandwidth"):
        png = out / f"{name}.png"
        assert png.exists() and png.stat().st_size > 1000
        assert f"{name}.png" in text


def test_adaptive_job_records_and_section(tiny_run):
    """The adaptive controller runs beside the gamma sweep's best gammas, the same number of times
    each, and the report judges both bars of the uplink issue from those runs."""
    out, md = tiny_run
    records = [r for r in json.loads((out / "results.json").read_text()) if r["kind"] == "adaptive"]
    labels = {r["label"] for r in records}
    assert "adaptive" in labels and len(labels) >= 2
    counts = {label: sum(r["label"] == label for r in records) for label in labels}
    assert set(counts.values()) == {TINY_QUICK.adaptive_reps}
    for r in records:
        assert r["adaptive"] is (r["label"] == "adaptive")
        assert r["tokens_per_s"] > 0 and r["settings"]
        if r["label"] != "adaptive":  # fixed settings: every client asked for that gamma every round
            assert all(st["gamma_min"] == st["gamma_max"] for st in r["settings"].values())
    ad = json.loads((out / "analysis.json").read_text())["adaptive"]
    assert str(ad["best_fixed_gamma"]) in labels
    assert ad["ratio_met"] == (ad["adaptive_ratio_vs_best_fixed"] >= ad["ratio_bar"])
    assert "gamma_star" in ad
    text = md.read_text()
    assert "## Adaptive gamma and K vs the best fixed gamma" in text


@pytest.mark.flower
def test_flower_engine_record(tmp_path):
    pair = load_bench_pair(True)
    work = make_workload(pair, TINY_QUICK, True)
    refs = [hf_generate(pair, p, 6) for p in work.prompts]
    m = run_flower(pair, work.prompts, clients=2, concurrency=4, max_new_tokens=6, references=refs)
    assert m["exact_match"] == 1.0
    assert m["tokens"] == 6 * len(work.prompts)
    assert m["rounds"] >= 1 and m["tokens_per_s"] > 0
    assert m["engine_overhead_s_per_round"] >= 0 and 0 <= m["engine_overhead_share"] <= 1
    assert m["draft_max_s_per_round"] > 0
    assert not m["faults"]  # one Ray actor keeps both nodes' draft caches warm
    assert set(m["draft_loads"].values()) == {1}  # the draft is loaded once per process, not per round


def test_tiny_run_lists_both_deployment_runtimes(tiny_run):
    """--no-flower: one not-measured deployment record per ClientApp runtime, with the record fields."""
    out, md = tiny_run
    records = [r for r in json.loads((out / "results.json").read_text()) if r["engine"] == "flower-deployment"]
    assert sorted((r["runtime"], r["pipelined"], r["standby_messages"], r["depth"] or 0) for r in records) == [
        ("persistent", False, False, 0), ("persistent", False, True, 0), ("persistent", True, True, 0),
        ("persistent", True, True, 2), ("stock", False, True, 0)]
    for r in records:
        assert r["round_s_median"] is None and r["reply_gap_s_median"] is None
    assert "Deployment engine: persistent device runtime vs stock" in md.read_text()


def test_deployment_comparison_judges_the_persistent_round() -> None:
    stock = {"round_s_median": 7.0, "reply_gap_s_median": 7.1, "rounds": 5}
    fast = deployment_comparison({"persistent": {"round_s_median": 3.5, "reply_gap_s_median": 3.4},
                                  "stock": stock}, 4.0)
    assert fast["met"] is True and fast["round_speedup_vs_stock"] == pytest.approx(2.0)
    assert fast["persistent"]["round_s_median"] == 3.5 and "reply_gap_met" not in fast
    slow = deployment_comparison({"persistent": {"round_s_median": 4.5}, "stock": stock}, 4.0)
    assert slow["met"] is False
    assert "met" not in deployment_comparison({"stock": stock}, 4.0)  # nothing to judge without persistent
    assert reply_gaps({"a": [1.0, 4.0, 8.0], "b": [2.0, 5.5]}) == [3.0, 4.0, 3.5]
    piped = deployment_comparison({"persistent-pipelined": {"reply_gap_s_median": 0.7}}, 4.0)
    assert piped["reply_gap_met"] is True
    assert deployment_comparison({"persistent-pipelined": {"reply_gap_s_median": 0.9}}, 4.0)["reply_gap_met"] is False
    # with a two-cohort run beside the default one, the reply gap is judged on the two-cohort run
    both = deployment_comparison({"persistent-pipelined": {"reply_gap_s_median": 3.0},
                                  "persistent-pipelined-depth2": {"reply_gap_s_median": 0.7}}, 4.0)
    assert both["reply_gap_met"] is True and both["reply_gap_run"] == "persistent-pipelined-depth2"


@pytest.mark.flower
def test_deployment_engine_record(tmp_path):
    """The deployment runner on the persistent device runtime, tiny models: the record has the
    fields results.json promises, the output is the target's, every node answered from one process."""
    pair = load_bench_pair(True)
    work = make_workload(pair, TINY_QUICK, True)
    refs = [hf_generate(pair, p, 6) for p in work.prompts]
    m = run_deployment(pair, work.prompts, clients=2, concurrency=4, max_new_tokens=6, references=refs,
                             runtime="persistent")
    assert m["runtime"] == "persistent" and m["pipelined"] is False
    assert m["exact_match"] == 1.0 and m["tokens"] == 6 * len(work.prompts)
    assert m["rounds"] >= 2 and len(m["round_s_all"]) == m["rounds"]
    assert m["round_s_median"] == statistics.median(m["round_s_all"]) > 0
    # strict rounds: every round waits for both nodes, so a node replies once per round
    assert m["reply_gaps"] == 2 * (m["rounds"] - 1) and m["reply_gap_s_median"] > 0
    assert set(m["clientapp_processes_per_node"].values()) == {1}
    assert set(m["draft_loads"].values()) == {1}


def test_federation_records_and_report(tiny_run):
    """The pipelined-engine comparison: same-concurrency target-only beside every engine, on shared
    and split CPUs, with server CPU per token; step costs against the raw forward."""
    out, md = tiny_run
    records = json.loads((out / "results.json").read_text())
    engines = [r for r in records if r["kind"] == "engine_comparison"]
    layouts = {(r["engine"], r["cpu_layout"], r["concurrency"]) for r in engines}
    for conc in (1, 4, 16):
        assert ("target-only", "shared", conc) in layouts and ("in-process", "shared", conc) in layouts
        assert ("emulated-federation", "split", conc) in layouts and ("target-only", "split", conc) in layouts
    assert ("hf-assisted", "shared", 1) in layouts
    for r in engines:
        assert r["tokens_per_s"] > 0 and r["target_only_tokens_per_s"] > 0
        assert math.isclose(r["ratio_vs_target_only"], r["tokens_per_s"] / r["target_only_tokens_per_s"])
        assert r["exact_match"] == 1.0  # greedy: every engine gives the target's own output
        if r["cpu_layout"] == "split":
            assert r["server_cpu_s_per_token"] > 0
        if r["engine"] in ("in-process", "emulated-federation"):
            assert r["proactive_hits"] is not None and r["proactive_misses"] is not None
    steps = [r for r in records if r["kind"] == "step_cost"]
    assert {(r["component"], r["batch"]) for r in steps} == {(c, b) for c in ("draft", "verify") for b in (1, 4, 16)}
    for r in steps:
        assert r["step_ms"] > 0 and r["raw_forward_ms"] > 0
        assert math.isclose(r["ratio"], r["step_ms"] / r["raw_forward_ms"])
    numerics = [r for r in records if r["kind"] == "numerics_cost"]
    assert sorted(r["batch"] for r in numerics) == [1, 4, 16]
    for r in numerics:
        assert r["dtype"] == "bfloat16" and r["batched_ms"] > 0 and r["stepwise_ms"] > 0
        assert math.isclose(r["ratio"], r["stepwise_ms"] / r["batched_ms"])
    text = md.read_text()
    assert "## Pipelined rounds and the emulated federation" in text
    assert "### Draft and verify step against the bare forward" in text
    assert "### Reduced-precision verification: `verify-numerics` batched vs stepwise" in text


def _report(rnd: int, active: int, drafted: int, accepted: int, *, exchange: float = 0.010, server: float = 0.004,
            verify: float = 0.003, depth: int = 1) -> RoundReport:
    return RoundReport(round=rnd, active_sequences=active, clients_asked=2, clients_replied=2, drafted=drafted,
                       accepted=accepted, emitted=accepted + active, alpha=None, verify_seconds=verify,
                       server_seconds=server, uplink_bytes=200, downlink_bytes=100, finished=[], faults={}, weights={},
                       exchange_seconds=exchange, pipeline_depth=depth)


def test_round_log_reads_acceptance_and_times_from_reports() -> None:
    """The per-round numbers come from the RoundReports alone (no patched Coordinator)."""
    log = RoundLog()
    log.started, log.arrived = 10.0, [10.1, 10.3, 10.4, 10.5]
    # one sequence, gamma 4: accepted 4 (all), 1 (rejected at position 2), 0 (rejected at 1); then a
    # 2-sequence round whose per-row split the counts cannot give
    log.reports = [_report(1, 1, 4, 4), _report(2, 1, 4, 1), _report(3, 1, 2, 0), _report(4, 2, 8, 3, depth=2)]
    cond, reach = log.per_position(4)
    assert cond == [2 / 3, 1 / 2, 1.0, 1.0]  # position 1: tested 3x, accepted 2x; position 2: tested 2x, once
    assert reach == [2 / 3, 1 / 3, 1 / 2, 1 / 2]  # position 3: drafted twice, accepted once
    # full-gamma rounds: 1, 2 and the 2-sequence round 4: (4+1 + 1+1 + 3+2) / (1 + 1 + 2)
    assert log.steady_tau(4) == pytest.approx(12 / 4)
    walls = log.walls()  # strict rounds: time since the previous report; pipelined: exchange + server
    assert walls.tolist() == pytest.approx([0.1, 0.2, 0.1, 0.014])
    assert log.decode_wall() == pytest.approx(0.5)
    clients = {"a": {"draft_seconds": 0.08, "positions": 10}, "b": {"draft_seconds": 0.04, "positions": 10}}
    t = log.timing(clients, parallel_clients=False, gamma=4)
    assert t["rounds"] == 4 and t["draft_s_per_round"] == pytest.approx(0.03)  # (0.08 + 0.04) / 4 rounds
    assert t["draft_max_s_per_round"] == pytest.approx(0.02)
    assert t["draft_s_per_position"] == pytest.approx(0.12 / 20)
    assert t["verify_s_per_round"] == pytest.approx(0.003)
    assert t["full_rounds"] == 3 and t["round_s_full_mean"] == pytest.approx((0.1 + 0.2 + 0.014) / 3)
    assert t["uplink_bytes_per_round_per_client"] == pytest.approx(100.0)
