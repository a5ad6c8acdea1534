"""The app as users start it: ``flwr run`` against a SuperLink in simulation mode.

Run-config overrides given to ``flwr run`` reach the ServerApp and change what it does (the
summary file records the effective config, and the measured numbers follow it), and a bad
value ends the run with one line naming the key, before any model loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specfed_flwr.launch import flwr_run, pid_alive, start_simulation_stack
from specfed_flwr.serve import summary_path_for
from specfed_flwr.specs import load_target_spec

pytestmark = pytest.mark.flower

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 1024  # tiny:SEED models: ids fit in uint16
PROMPTS = [[5, 17, 300, 2], [999, 1, 64], [7, 7, 7, 7, 7, 12], [450, 3]]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("flwr-run-logs")
    stack = start_simulation_stack(1, log_dir=logs)
    pids = set()
    try:
        pids = set(stack.pids())
        yield stack
    finally:
        stack.stop()
        alive = [p for p in pids | stack.seen_pids if pid_alive(p)]
        assert not alive, f"processes left behind: {alive}"


def _oracle(new_tokens: int) -> list[list[int]]:
    target = load_target_spec("tiny:0", "cpu").model
    out = []
    for p in PROMPTS:
        x = torch.tensor([p])
        out.append(target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)[0, len(p):].tolist())
    return out


def _base_config(tmp_path: Path, new_tokens: int = NEW_TOKENS) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    return {
        "target": "tiny:0", "draft": "tiny:1", "draft-quantization": "none", "device": "cpu",
        "chat-template": False, "prompts": str(prompts), "results": str(tmp_path / "out.jsonl"),
        "max-new-tokens": new_tokens, "round-timeout": 60.0,
    }


def test_run_config_overrides_take_effect(stack, tmp_path):
    cfg = {**_base_config(tmp_path, 12), "draft": "tiny:0"}  # the target's twin: drafts are accepted
    overrides = {"top-k": 2, "draft-length": 3, "reconstruction": "uniform", "mode": "per-device",
                 "max-active-sequences": 2, "uplink-encoding": "fixed-k", "adaptive": False}
    rc = flwr_run(stack, ROOT, {**cfg, **overrides}, stream=False, timeout=300)
    assert rc == 0, stack.last_run.log_path.read_text()[-3000:]
    summary = json.loads(summary_path_for(cfg["results"]).read_text())
    effective = summary["config"]
    assert (effective["top_k"], effective["draft_length"], effective["reconstruction"], effective["mode"],
            effective["max_active_sequences"]) == (2, 3, "uniform", "per-device", 2)
    assert effective["uplink_encoding"] == "fixed-k"  # greedy runs default to one compact slot
    assert effective["adaptive"] is False  # fixed gamma and K, as asked
    # the numbers follow the overrides: K=2 -> 2 uint16 ids + 2 float16 probabilities per position
    assert summary["topk_bytes_per_position"] == 2 * (2 + 2)
    records = [json.loads(line) for line in Path(cfg["results"]).read_text().splitlines()]
    # gamma=3 (default 4): never more than 3 drafted positions per sequence per round
    assert all(r["metrics"]["drafted"] <= 3 * r["metrics"]["rounds"] for r in records)
    assert any(r["metrics"]["drafted"] > 2 * r["metrics"]["rounds"] for r in records)
    # per-device mode: every sequence has an owning device
    assert all(r["owner"] for r in records)
    assert {r["index"]: r["token_ids"] for r in records} == dict(enumerate(_oracle(12)))


@pytest.mark.parametrize(
    "key,value,expected",
    [("reconstruction", "median", "'reconstruction'"), ("top-k", 0, "'top-k'"), ("top-k", "eight", "'top-k'")],
)
def test_bad_run_config_value_is_one_line_naming_the_key(stack, tmp_path, key, value, expected):
    cfg = {**_base_config(tmp_path), key: value}
    rc = flwr_run(stack, ROOT, cfg, stream=False, timeout=120, validate_run_config=False)
    assert rc != 0
    details = stack.last_run.details or ""
    assert expected in details and "\n" not in details.strip(), details
    assert not Path(cfg["results"]).exists()  # refused before anything ran


def test_cli_refuses_bad_value_before_starting_flower(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "specfed_flwr.cli", "simulate", "--set", "draft-length=-2"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'draft-length'" in lines[0], proc.stderr
    assert "SuperLink" not in proc.stdout
