"""The Flower app on Flower's DEPLOYMENT engine: a real SuperLink, real SuperNodes (``--isolation
process``), one ``specfed-flwr device-runtime`` per SuperNode, all on 127.0.0.1, driven by ``flwr run``.

* greedy output == the target's own ``generate`` == the simulation engine's output, with the
  draft loaded once per device and every message of the run (handshake included) answered by
  the same ClientApp process per node: the device runtime's pid;
* killing a device runtime or a SuperNode mid-run: the run finishes with the other device, the
  fault is in the summary, nothing already generated is lost; a restarted device runtime rejoins
  (it gets the probe and later messages and answers them from its new process); with no device
  left the server finishes by target-only decoding;
* every process the stack started is gone afterwards, also when the test fails.

Plus (no Flower processes): the measured round time feeds the adaptive controller.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from specfed_flwr.launch import FlowerStack, flwr_run, pid_alive, start_deployment_stack
from specfed_flwr.serve import summary_path_for
from specfed_flwr.specs import load_target_spec

APP_DIR = Path(__file__).resolve().parents[1]
VOCAB = 1024
RUN_TIMEOUT = 240.0
#: runs with a killed process: every round that still asks the dead node waits out its 15 s
#: deadline, and on a loaded 2-core machine the survivor has been seen missing deadlines too (a full
#: suite run took 242.6 s and finished correctly; not diagnosed, see the closing note)
FAULT_RUN_TIMEOUT = 480.0


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _oracle(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    target = load_target_spec("tiny:0", "cpu").model
    outs = []
    for p in prompts:
        x = torch.tensor([p])
        outs.append(target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist())
    return outs


def _run_config(tmp_path: Path, prompts: list[list[int]], **overrides) -> dict:
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    cfg = {
        "target": "tiny:0", "draft": "tiny:0", "draft-quantization": "none", "device": "cpu",
        "chat-template": False, "prompts": str(prompt_file), "results": str(tmp_path / "results.jsonl"),
        "resume": False, "max-new-tokens": 10, "max-active-sequences": 8, "draft-length": 4,
        "round-timeout": 30.0, "min-nodes": 2, "node-wait-timeout": 60.0, "handshake-timeout": 120.0,
    }
    cfg.update(overrides)
    return cfg


def _records(cfg: dict) -> list[dict]:
    path = Path(cfg["results"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _summary(cfg: dict) -> dict:
    return json.loads(summary_path_for(cfg["results"]).read_text())


def _start(tmp_path: Path, n: int = 2, runtime: str = "persistent") -> FlowerStack:
    return start_deployment_stack(n, log_dir=tmp_path / "logs", runtime=runtime)


def _assert_nothing_left(stack: FlowerStack, pids: set[int]) -> None:
    stack.stop()
    alive = sorted(p for p in pids | stack.seen_pids if pid_alive(p))
    assert not alive, f"processes of the stack still alive after stop(): {alive}"


def _run_log(stack: FlowerStack) -> str:
    return stack.last_run.log_path.read_text()[-4000:] if stack.last_run else "<no run>"


def _simulation_output(tmp_path: Path, prompts: list[list[int]], cfg: dict) -> list[list[int]]:
    """The same app and config on Flower's simulation engine (in-process ``run_simulation``)."""
    from flwr.simulation import run_simulation

    from specfed_flwr.client_app import app as client_app
    from specfed_flwr.serve import make_server_app

    sim_cfg = dict(cfg, results=str(tmp_path / "sim-results.jsonl"))
    sim_cfg.pop("prompts")
    captured = {}
    server_app = make_server_app(sim_cfg, prompts=prompts, on_result=lambda r: captured.update(r=r))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    assert "r" in captured, "the simulation ServerApp did not finish"
    return captured["r"].token_ids


@pytest.mark.flower
def test_deployment_greedy_equals_target_and_simulation(tmp_path: Path) -> None:
    prompts = _prompts(6, seed=11)
    cfg = _run_config(tmp_path, prompts)
    stack = _start(tmp_path)
    pids: set[int] = set()
    try:
        assert stack.runtime == "persistent"
        runtime_pid = {str(n): stack.process(f"runtime-{i}").pid for i, n in enumerate(stack.node_ids)}
        pids = stack.pids()
        rc = flwr_run(stack, APP_DIR, cfg, stream=False, timeout=RUN_TIMEOUT)
        pids |= stack.pids()
        assert rc == 0, _run_log(stack)
        runtime_logs = [stack.log_path(f"runtime-{i}").read_text() for i in range(2)]
    finally:
        _assert_nothing_left(stack, pids)
    expected = _oracle(prompts, 10)
    records = _records(cfg)
    assert sorted(r["index"] for r in records) == list(range(len(prompts)))
    got = [r["token_ids"] for r in sorted(records, key=lambda r: r["index"])]
    assert got == expected
    summary = _summary(cfg)
    assert summary["rounds"] >= 2 and summary["accepted"] > 0  # multi-token rounds over the transport
    # acceptance 2: every message of the run (the handshake and each round's draft) was answered by
    # ONE process per node -- the device runtime started next to that node's SuperNode -- which
    # loaded the draft once
    for node, counts in summary["reply_pids"].items():
        assert counts == {str(runtime_pid[node]): summary["clients"][node]["rounds_replied"] + 1}, (node, counts)
    assert sorted(summary["draft_loads"].values()) == [1, 1], summary["draft_loads"]
    assert summary["ephemeral_nodes"] == []
    assert all(not s["faults"] and not s["resyncs"] for s in summary["clients"].values()), summary["clients"]
    # standby messages: the runtime reports itself, so the server queued them (strict rounds, depth
    # auto: at least the first request of each node had nothing queued behind it)
    standby = summary["standby"]
    assert standby["nodes"] == sorted(str(n) for n in stack.node_ids) and standby["sent"] >= 2, standby
    assert 0 <= standby["slept"] <= standby["sent"], standby  # devices report the gap after each standby
    for log, n in zip(runtime_logs, stack.node_ids):
        drafts = summary["clients"][str(n)]["rounds_replied"] + 1  # + the handshake
        tasks = log.count("): completed in")  # each message served once: drafts, then the standbys it got
        assert drafts <= tasks <= drafts + standby["sent_to"][str(n)], (n, tasks, drafts, standby)
    # ... and the simulation engine gives the same tokens
    assert _simulation_output(tmp_path, prompts, cfg) == expected


def _served(stack: FlowerStack, name: str) -> int:
    """Tasks a device runtime has finished so far (one log line each)."""
    try:
        return stack.log_path(name).read_text(errors="replace").count("): completed in")
    except OSError:
        return 0


def _kill_when(stack: FlowerStack, cfg: dict, names: list[str], lines: int, killed: list[int]) -> threading.Thread:
    """Kill ``names`` once the results file has ``lines`` lines (mid-run). A device runtime is
    killed right after it finished a task: it then waits for the node's next message (the SuperNode
    sleeps 3 s after its reply), so the kill finds it between tasks, not holding a task's token."""

    def watch() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if len(_records(cfg)) >= lines:
                for name in names:
                    if name.startswith("runtime-"):
                        done = _served(stack, name)
                        while _served(stack, name) == done and time.monotonic() < deadline:
                            time.sleep(0.02)
                    killed.append(stack.kill(name))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _fault_run(tmp_path: Path, kill: list[str], restart: bool = False, **overrides) -> tuple[dict, dict, str, list[int]]:
    """12 prompts, 4 active at a time (three waves); ``kill`` lands after the first results line.
    ``restart``: start the killed device runtime again once the server has logged its missed round.
    Returns the summary, process name -> node id, the run log and the killed/restarted pids."""
    prompts = _prompts(12, seed=5)
    # by default a dead device is dropped after one missed round and not probed again in this short run
    # two cohorts in flight: rounds come often enough for a restarted runtime to meet a probe before
    # the run ends (auto keeps one cohort while devices draft ahead: fewer, longer rounds)
    cfg = _run_config(tmp_path, prompts, **{"max-active-sequences": 4, "round-timeout": 15.0,
                                            "max-missed-rounds": 1, "rejoin-after-rounds": 50,
                                            "pipeline-depth": "2", **overrides})
    stack = _start(tmp_path)
    pids: set[int] = set()
    killed: list[int] = []
    restarted: list[int] = []
    try:
        node_of = {f"runtime-{i}": str(n) for i, n in enumerate(stack.node_ids)}
        node_of.update({f"supernode-{i}": str(n) for i, n in enumerate(stack.node_ids)})
        pids = stack.pids()
        watcher = _kill_when(stack, cfg, kill, 1, killed)
        restarter = None
        if restart:
            def restart_after_fault() -> None:
                watcher.join(RUN_TIMEOUT)
                run_log = stack.log_dir / f"run-{stack._run_counter}.log"
                deadline = time.monotonic() + RUN_TIMEOUT
                # the server's round line names the nodes that missed it: "... faults=<id>[,<id>]"
                pattern = re.compile(r"faults=[\d,]*\b" + node_of[kill[0]] + r"\b")
                while time.monotonic() < deadline:
                    if run_log.exists() and pattern.search(run_log.read_text(errors="replace")):
                        restarted.append(stack.restart(kill[0]))
                        return
                    time.sleep(0.1)

            restarter = threading.Thread(target=restart_after_fault, daemon=True)
            restarter.start()
        rc = flwr_run(stack, APP_DIR, cfg, stream=False, timeout=FAULT_RUN_TIMEOUT)
        watcher.join(timeout=5)
        if restarter is not None:
            restarter.join(timeout=5)
        pids |= stack.pids()
        assert killed, "the run ended before the kill"
        assert not restart or restarted, "the run ended before the killed runtime could be restarted"
        assert rc == 0, _run_log(stack)
        run_log = stack.last_run.log_path.read_text()
    finally:
        _assert_nothing_left(stack, pids)
    records = _records(cfg)
    # nothing lost, nothing twice, and still exactly the target's greedy output
    assert sorted(r["index"] for r in records) == list(range(len(prompts)))
    assert {r["index"]: r["token_ids"] for r in records} == dict(enumerate(_oracle(prompts, 10)))
    return _summary(cfg), node_of, run_log, killed + restarted


@pytest.mark.flower
def test_deployment_three_nodes_one_random_greedy_equals_target(tmp_path: Path) -> None:
    """Pipelined rounds with drafting ahead on the deployment engine, 3 SuperNodes of which one
    sends well-formed garbage (confident random drafts): the output is still the target's own
    greedy ``generate``, and the garbage node's weight falls below the honest ones'."""
    prompts = _prompts(6, seed=23)
    cfg = _run_config(tmp_path, prompts, **{"min-nodes": 3, "pipeline-depth": "2", "draft-ahead": True})
    node_configs = [{"partition-id": i, "num-partitions": 3} for i in range(3)]
    node_configs[2]["fault"] = "random"
    stack = start_deployment_stack(3, log_dir=tmp_path / "logs", node_configs=node_configs,
                                   app="specfed_flwr.faultapp:app")
    pids: set[int] = set()
    try:
        pids = stack.pids()
        garbage = str(stack.node_ids[2])
        rc = flwr_run(stack, APP_DIR, cfg, stream=False, timeout=RUN_TIMEOUT)
        pids |= stack.pids()
        assert rc == 0, _run_log(stack)
    finally:
        _assert_nothing_left(stack, pids)
    records = _records(cfg)
    got = [r["token_ids"] for r in sorted(records, key=lambda r: r["index"])]
    assert got == _oracle(prompts, 10)
    summary = _summary(cfg)
    assert set(summary["clients"]) == {str(n) for n in stack.node_ids}
    assert summary["accepted"] > 0  # the honest nodes' drafts were accepted
    weights = {n: w["weight"] for n, w in summary["weights"].items()}
    assert weights[garbage] < min(w for n, w in weights.items() if n != garbage), weights


@pytest.mark.flower
def test_deployment_survives_a_dead_supernode(tmp_path: Path) -> None:
    summary, node_of, _, _ = _fault_run(tmp_path, ["supernode-1"])
    dead, alive = node_of["supernode-1"], node_of["supernode-0"]
    faults = summary["clients"][dead]["faults"]
    assert any("deadline" in f for f in faults), faults  # a dead SuperNode just stops answering
    # the survivor kept drafting after the kill
    assert summary["clients"][alive]["rounds_replied"] > summary["clients"][dead]["rounds_replied"]
    assert summary["accepted"] > 0


@pytest.mark.flower
def test_deployment_killed_device_runtime_faults_then_rejoins(tmp_path: Path) -> None:
    """Acceptance 3: SIGKILL a persistent device runtime between two of its tasks. Its node misses
    the next round (the fault is listed), the run goes on with the other node and still gives the
    target's output; the runtime is started again, the server's probe two rounds later reaches it
    and the node drafts again -- answered from the new process, with whole sequences (its caches
    died with the old one), and not mistaken for a node that starts a process per message."""
    summary, node_of, run_log, (old_pid, new_pid) = _fault_run(
        tmp_path, ["runtime-0"], restart=True, **{"rejoin-after-rounds": 2})
    node, other = node_of["runtime-0"], node_of["runtime-1"]
    stats = summary["clients"][node]
    assert any("deadline" in f for f in stats["faults"]), stats["faults"]
    assert any("deselected" in e for e in stats["events"]), stats["events"]
    assert any("rejoined" in e for e in stats["events"]), stats["events"]  # it replied to the probe in time
    # it replied from both processes: the old one before the kill, the restarted one after it
    counts = summary["reply_pids"][node]
    assert set(counts) == {str(old_pid), str(new_pid)} and counts[str(new_pid)] >= 1, (counts, old_pid, new_pid)
    assert summary["draft_loads"][node] == 1  # the new process loaded the draft once, too
    assert summary["ephemeral_nodes"] == []
    assert set(summary["reply_pids"][other]) == {next(iter(summary["reply_pids"][other]))}  # untouched node: one pid
    assert summary["accepted"] > 0


@pytest.mark.flower
def test_deployment_no_device_left_finishes_target_only(tmp_path: Path) -> None:
    summary, node_of, run_log, _ = _fault_run(tmp_path, ["runtime-0", "runtime-1"])
    for name in ("runtime-0", "runtime-1"):
        assert summary["clients"][node_of[name]]["faults"], summary["clients"]
    assert "0/0 clients" in run_log  # rounds with nobody asked: the target decodes alone


# ---- no Flower processes ----------------------------------------------------------------


def test_measured_round_cost_lengthens_adaptive_drafts() -> None:
    """Coordinator.complete_round(round_seconds=...) feeds the controller's per-round cost b:
    the same drafts over a slow transport (deployment: seconds per round) make longer drafts
    pay. Vocabulary 16 and K=16 so that q_hat == q and alpha ~ 1 (random tiny models are
    near-uniform: with a big vocabulary their alpha is ~K/V whatever the draft). The client's
    draft time is pinned at 40 ms a round: a tiny model drafts in well under a millisecond on an
    idle machine, which makes even a 50 ms round cost hundreds of draft tokens and pushes both
    runs to max-gamma (the verdict would then depend on how loaded the machine is)."""
    from specfed_flwr.client_core import DraftClient
    from specfed_flwr.config import SpecFedConfig
    from specfed_flwr.coordinator import Coordinator
    from specfed_flwr.proposer import HFDraftProposer
    from specfed_flwr.target import TargetVerifier

    def run(round_seconds: float) -> tuple[int, float]:
        cfg = SpecFedConfig(target="tiny:0:16", draft="tiny:0:16", adaptive=True, draft_length=2, max_gamma=16,
                            top_k=16, max_k=16, temperature=1.0, max_new_tokens=40, chat_template=False).validate()
        coordinator = Coordinator(TargetVerifier(load_target_spec("tiny:0:16", "cpu").model), cfg)
        client = DraftClient(HFDraftProposer(load_target_spec("tiny:0:16", "cpu").model, vocab_size=16))
        for p in ([1, 2, 3], [4, 5]):
            coordinator.submit(p)
        for _ in range(3):
            requests = coordinator.plan_round(["c"])
            reply, metrics = client.handle(requests["c"])
            measured = dict(metrics.as_dict(), draft_seconds=0.04)
            coordinator.complete_round({"c": reply}, client_metrics={"c": measured}, round_seconds=round_seconds)
        return coordinator.settings_for("c")[0], coordinator.controller("c").round_cost

    (fast, b_fast), (slow, b_slow) = run(0.05), run(5.0)
    assert b_slow > 1.0 > b_fast  # the measured exchange time minus draft compute
    assert slow > fast, (fast, slow)
