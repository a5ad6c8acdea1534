"""Kill the server mid-run, resume from its results file (issue 6, acceptance 4).

The server (``serve()``, in its own process, see ``tests/resume_server.py``) is SIGKILLed once
at least one sequence is in the results file. A second run with the same file regenerates
only what is missing: the finished lines stay byte for byte, and the final file holds every
prompt exactly once with the target's greedy output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from specfed_flwr.specs import load_target_spec

HERE = Path(__file__).resolve().parent
PROMPTS = [[(7 * i + j) % 1024 for j in range(2 + i % 4)] for i in range(10)]


def _server(results: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(HERE / "resume_server.py"), str(results), json.dumps(PROMPTS), "--round-delay", str(delay)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_killed_server_resumes_without_regenerating(tmp_path):
    results = tmp_path / "results.jsonl"
    first = _server(results, delay=0.4)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if len([ln for ln in _lines(results) if ln.endswith("}")]) >= 1:
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be killed:\n" + first.stdout.read()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    before = results.read_bytes()
    done_before = {json.loads(ln)["index"]: ln for ln in before.decode().splitlines() if ln.strip().endswith("}")}
    assert 1 <= len(done_before) < len(PROMPTS)

    second = _server(results, delay=0.0)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    generated = json.loads(out.strip().splitlines()[-1])["generated"]
    # nothing finished before the kill was generated again
    assert set(generated).isdisjoint(done_before), (generated, sorted(done_before))
    assert sorted(generated) == sorted(set(range(len(PROMPTS))) - set(done_before))
    assert f"resuming: {len(done_before)} of {len(PROMPTS)} prompts already in" in out

    lines = _lines(results)
    records = [json.loads(ln) for ln in lines]
    # the first run's complete lines are untouched, every prompt is there exactly once
    for index, line in done_before.items():
        assert line in lines
    assert sorted(r["index"] for r in records) == list(range(len(PROMPTS)))
    target = load_target_spec("tiny:0", "cpu").model
    for r in records:
        x = torch.tensor([PROMPTS[r["index"]]])
        expected = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)[0, x.shape[1]:].tolist()
        assert r["prompt_ids"] == PROMPTS[r["index"]] and r["token_ids"] == expected
