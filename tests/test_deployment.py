"""The Flower app on Flower's DEPLOYMENT engine: a real SuperLink, real SuperNodes, one
``specfed-flwr draft-worker`` per SuperNode, all on 127.0.0.1, driven by ``flwr run``.

* greedy output == the target's own ``generate`` == the simulation engine's output, with
  the draft loaded once per device (the worker's load count, in the run summary);
* killing a draft worker or a SuperNode mid-run: the run finishes with the other device,
  the fault is in the summary, nothing already generated is lost; with no device left the
  server finishes by target-only decoding;
* every process the stack started is gone afterwards, also when the test fails.

Plus (no Flower processes): the measured round time feeds the adaptive controller.
"""

from __future__ import annotations

import json
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


def _start(tmp_path: Path, n: int = 2) -> FlowerStack:
    return start_deployment_stack(n, log_dir=tmp_path / "logs", draft_workers=True,
                                  worker_draft="tiny:0", worker_quantization="none")


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
        assert len(stack.worker_addresses) == 2
        assert all(c["worker-address"] == a for c, a in zip(stack.node_configs, stack.worker_addresses))
        pids = stack.pids()
        rc = flwr_run(stack, APP_DIR, cfg, stream=False, timeout=RUN_TIMEOUT)
        pids |= stack.pids()
        assert rc == 0, _run_log(stack)
    finally:
        _assert_nothing_left(stack, pids)
    expected = _oracle(prompts, 10)
    records = _records(cfg)
    assert sorted(r["index"] for r in records) == list(range(len(prompts)))
    got = [r["token_ids"] for r in sorted(records, key=lambda r: r["index"])]
    assert got == expected
    summary = _summary(cfg)
    assert summary["rounds"] >= 2 and summary["accepted"] > 0  # multi-token rounds over the transport
    # acceptance 2: each device loaded its draft once (in its worker) for the whole run
    assert sorted(summary["draft_loads"].values()) == [1, 1], summary["draft_loads"]
    assert summary["ephemeral_nodes"] == []
    assert all(not s["faults"] for s in summary["clients"].values()), summary["clients"]
    # ... and the simulation engine gives the same tokens
    assert _simulation_output(tmp_path, prompts, cfg) == expected


def _kill_when(stack: FlowerStack, cfg: dict, names: list[str], lines: int, killed: list[int]) -> threading.Thread:
    """Kill ``names`` once the results file has ``lines`` lines (mid-run)."""

    def watch() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if len(_records(cfg)) >= lines:
                for name in names:
                    killed.append(stack.kill(name))
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _fault_run(tmp_path: Path, kill: list[str], **overrides) -> tuple[dict, dict, list[dict], str]:
    # 4 active at a time, 12 prompts: three waves; the kill lands after the first wave
    prompts = _prompts(12, seed=5)
    # a dead device is dropped after one missed round and not probed again in this short run
    cfg = _run_config(tmp_path, prompts, **{"max-active-sequences": 4, "round-timeout": 30.0,
                                            "max-missed-rounds": 1, "rejoin-after-rounds": 50, **overrides})
    stack = _start(tmp_path)
    pids: set[int] = set()
    killed: list[int] = []
    try:
        node_of = {f"worker-{i}": str(n) for i, n in enumerate(stack.node_ids)}
        node_of.update({f"supernode-{i}": str(n) for i, n in enumerate(stack.node_ids)})
        pids = stack.pids()
        watcher = _kill_when(stack, cfg, kill, 1, killed)
        rc = flwr_run(stack, APP_DIR, cfg, stream=False, timeout=RUN_TIMEOUT)
        watcher.join(timeout=5)
        pids |= stack.pids()
        assert killed, "the run ended before the kill"
        assert rc == 0, _run_log(stack)
        run_log = stack.last_run.log_path.read_text()
    finally:
        _assert_nothing_left(stack, pids)
    records = _records(cfg)
    # nothing lost, nothing twice, and still exactly the target's greedy output
    assert sorted(r["index"] for r in records) == list(range(len(prompts)))
    assert {r["index"]: r["token_ids"] for r in records} == dict(enumerate(_oracle(prompts, 10)))
    return _summary(cfg), node_of, records, run_log


@pytest.mark.flower
@pytest.mark.parametrize("victim", ["worker-0", "supernode-1"])
def test_deployment_survives_a_dead_device(tmp_path: Path, victim: str) -> None:
    summary, node_of, _, _ = _fault_run(tmp_path, [victim])
    dead, alive = node_of[victim], next(n for k, n in node_of.items() if n != node_of[victim])
    faults = summary["clients"][dead]["faults"]
    assert faults, summary["clients"]
    if victim.startswith("worker"):  # the ClientApp says why: its worker is gone
        assert any("no draft worker at" in f for f in faults), faults
    else:  # a dead SuperNode just stops answering
        assert any("deadline" in f for f in faults), faults
    # the survivor kept drafting after the kill
    assert summary["clients"][alive]["rounds_replied"] > summary["clients"][dead]["rounds_replied"]
    assert summary["accepted"] > 0


@pytest.mark.flower
def test_deployment_no_device_left_finishes_target_only(tmp_path: Path) -> None:
    summary, node_of, _, run_log = _fault_run(tmp_path, ["worker-0", "worker-1"])
    for name in ("worker-0", "worker-1"):
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
    from specfed_flwr.engine import Coordinator
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


def test_worker_keeps_one_draft_warm_and_refuses_strangers() -> None:
    """The draft worker in a thread: a port probe or a wrong authkey does not stop it, the
    model is loaded once across handshake + several rounds, and an absent worker is named."""
    import socket

    from specfed_flwr.device import DeviceRuntime
    from specfed_flwr.launch import free_port
    from specfed_flwr.protocol import DraftRequest
    from specfed_flwr.worker import WorkerUnavailable, call_worker, serve_worker

    address = f"127.0.0.1:{free_port()}"
    runtime, ready, stop = DeviceRuntime(), threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_worker, args=(address,), daemon=True,
                              kwargs={"key": b"k1", "runtime": runtime, "preload": ("tiny:0", "none"),
                                      "ready": ready, "stop": stop})
    thread.start()
    assert ready.wait(60)
    try:
        host, port = address.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # a readiness probe
        with pytest.raises(WorkerUnavailable, match="authkey"):
            call_worker(address, ("ping",), key=b"wrong")
        server_cfg = {"draft": "tiny:0", "draft-quantization": "none", "max-k": 64, "max-gamma": 16}
        info = call_worker(address, ("handshake", (1, 7), server_cfg, {}), key=b"k1")
        assert info["vocab_size"] == VOCAB and info["draft_loads"] == 1
        prompt = _prompts(1, seed=2)[0]
        known = []
        for rnd in range(1, 4):
            committed = prompt + [5] * (rnd - 1)
            req = DraftRequest.build([(1, len(known), committed[len(known):], 3)], k=4, temperature=0.0,
                                     sampling="sparse", seed=0, round=rnd, release=[])
            reply, metrics = call_worker(address, ("draft", (1, 7), server_cfg, {}, req.arrays(), req.config()),
                                         key=b"k1")
            known = committed
            assert metrics["draft_loads"] == 1
        assert call_worker(address, ("ping",), key=b"k1")["draft_loads"] == 1
    finally:
        stop.set()
        try:
            call_worker(address, ("ping",), key=b"k1", timeout=5)  # wake accept() so the loop sees stop
        except Exception:
            pass
        thread.join(timeout=10)
    with pytest.raises(WorkerUnavailable, match="no draft worker at"):
        call_worker(address, ("ping",), key=b"k1")
