"""The ``specfed-flwr theory`` command, in-process and as the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specfed_flwr.cli import main

EXAMPLE = ["theory", "--alpha", "0.8", "--per-token-cost", "0.05", "--round-cost", "1"]
KEYS = {"alpha", "per_token_cost", "round_cost", "gamma_opt", "gamma_best_int", "speedup",
        "speedup_at_gamma_opt", "expected_tokens_per_step"}


def _check_example(out: dict) -> None:
    assert KEYS <= set(out)
    assert out["alpha"] == 0.8 and out["per_token_cost"] == 0.05 and out["round_cost"] == 1.0
    assert out["gamma_opt"] == pytest.approx(7.8567, abs=1e-3)
    assert out["gamma_best_int"] == 8
    assert out["speedup"] == pytest.approx(3.092, abs=1e-3)
    assert out["speedup_at_gamma_opt"] >= out["speedup"]
    assert out["expected_tokens_per_step"] == pytest.approx((1 - 0.8**9) / 0.2)


def test_theory_in_process(capsys):
    assert main(EXAMPLE) == 0
    _check_example(json.loads(capsys.readouterr().out))


def test_theory_gamma_max(capsys):
    assert main(EXAMPLE + ["--gamma-max", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gamma_best_int"] == 4
    assert out["gamma_opt"] == pytest.approx(7.8567, abs=1e-3)
    assert out["speedup"] == pytest.approx(2.8013, abs=1e-3)


@pytest.mark.parametrize("argv,flag", [
    (["theory", "--alpha", "1.5", "--per-token-cost", "0.05", "--round-cost", "1"], "--alpha"),
    (["theory", "--alpha", "0", "--per-token-cost", "0.05", "--round-cost", "1"], "--alpha"),
    (["theory", "--alpha", "1", "--per-token-cost", "0.05", "--round-cost", "1"], "--alpha"),
    (["theory", "--alpha", "nan", "--per-token-cost", "0.05", "--round-cost", "1"], "--alpha"),
    (["theory", "--alpha", "0.8", "--per-token-cost", "0", "--round-cost", "1"], "--per-token-cost"),
    (["theory", "--alpha", "0.8", "--per-token-cost", "-0.1", "--round-cost", "1"], "--per-token-cost"),
    (["theory", "--alpha", "0.8", "--per-token-cost", "0.05", "--round-cost", "-1"], "--round-cost"),
    (["theory", "--alpha", "0.8", "--per-token-cost", "0.05", "--round-cost", "abc"], "--round-cost"),
    (["theory", "--alpha", "0.8", "--per-token-cost", "0.05", "--round-cost", "1", "--gamma-max", "0"],
     "--gamma-max"),
    (["theory", "--alpha", "0.8", "--per-token-cost", "0.05"], "--round-cost"),
])
def test_theory_bad_values(capsys, argv, flag):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert flag in captured.err


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2
    assert "theory" in capsys.readouterr().err


def _console_script() -> str:
    exe = Path(sys.executable).with_name("specfed-flwr")
    if exe.exists():
        return str(exe)
    found = shutil.which("specfed-flwr")
    if found is None:
        pytest.skip("specfed-flwr console script is not installed (pip install -e .)")
    return found


def test_installed_console_script():
    env = dict(os.environ)
    proc = subprocess.run([_console_script(), *EXAMPLE], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    _check_example(json.loads(proc.stdout))


def test_installed_console_script_bad_value():
    proc = subprocess.run([_console_script(), "theory", "--alpha", "2", "--per-token-cost", "0.05",
                           "--round-cost", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--alpha" in proc.stderr
    assert proc.stdout == ""


def test_theory_does_not_import_heavy_modules():
    code = ("import sys; from specfed_flwr.cli import main; "
            "main(['theory','--alpha','0.8','--per-token-cost','0.05','--round-cost','1']); "
            "heavy = [m for m in ('torch', 'flwr', 'transformers') if m in sys.modules]; "
            "sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
