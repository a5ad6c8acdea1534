"""``specfed-flwr device-runtime`` (specfed_flwr/persistent_runtime.py) against the installed Flower.

The runtime speaks Flower's Runtime API through Flower-INTERNAL modules, which any Flower release
may change. This file is the guard (marked ``flower``, so CI runs it with the other Flower tests):

* the installed Flower is in the tested range, and that range is the one pyproject.toml pins;
* every internal symbol, keyword and wire field the runtime uses is there (and the check itself
  notices a missing one);
* one real deployment: a SuperLink, two SuperNodes with ``--isolation process``, one device runtime
  each, the echo app for four rounds -- every reply of a node comes from its runtime's one process
  (module imported once), and a ClientApp exception becomes an error reply after which the same
  process answers the next round.

Bad options fail with exit code 2 and a message naming the option, before anything connects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from specfed_flwr import cli, persistent_runtime as pr
from specfed_flwr.launch import flwr_run, pid_alive, start_deployment_stack

pytestmark = pytest.mark.flower

ROOT = Path(__file__).resolve().parents[1]
ECHO_APP = Path(__file__).parent / "fixtures" / "echo_app"


def test_installed_flower_is_the_tested_and_pinned_range() -> None:
    import flwr

    assert pr.check_flower_version() == flwr.__version__  # raises UnsupportedFlowerVersion, naming the range
    pin = re.search(r'"flwr\[simulation\]([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) == pr.TESTED_FLWR_RANGE, "pyproject.toml's Flower pin and TESTED_FLWR disagree"


def test_version_gate_refuses_untested_releases(monkeypatch) -> None:
    monkeypatch.delenv(pr.ALLOW_UNTESTED_ENV, raising=False)
    for ok in ("1.41.0", "1.42.0", "1.42.3rc1"):
        assert pr.check_flower_version(ok) == ok
    for bad in ("1.40.2", "1.43.0", "1.43.0.dev20261026", "2.0.0", "nightly"):
        with pytest.raises(pr.UnsupportedFlowerVersion, match=r"tested with flwr>=1\.41,<1\.43.*--runtime stock"):
            pr.check_flower_version(bad)
    monkeypatch.setenv(pr.ALLOW_UNTESTED_ENV, "1")  # the explicit way to try a new Flower
    assert pr.check_flower_version("1.43.0") == "1.43.0"


def test_flower_internals_the_runtime_uses_are_there() -> None:
    assert pr.internal_api_problems() == []


def test_internals_check_names_what_moved(monkeypatch) -> None:
    """The check above must be able to fail: remove one method and one keyword it relies on."""
    monkeypatch.delattr(pr.RuntimeHttpClient, "PushTaskOutput")

    def push_message(client, msg, context):  # a renamed parameter
        raise AssertionError("not called")

    monkeypatch.setattr(pr, "push_message", push_message)
    problems = pr.internal_api_problems()
    assert any("RuntimeHttpClient.PushTaskOutput is missing" in p for p in problems), problems
    assert any("push_message" in p and "'message'" in p for p in problems), problems


@pytest.mark.parametrize("argv, needle", [
    (["--runtime-api-address", "no-port"], "--runtime-api-address must be HOST:PORT"),
    (["--runtime-api-address", "127.0.0.1:70000"], "--runtime-api-address must be HOST:PORT"),
    (["--runtime-api-address", "127.0.0.1:9094", "--app", "no_such_module_xyz:app"], "cannot import 'no_such_module_xyz'"),
    (["--runtime-api-address", "127.0.0.1:9094", "--app", "specfed_flwr.cli"], "--app must be MODULE:ATTRIBUTE"),
    (["--runtime-api-address", "127.0.0.1:9094", "--app", "specfed_flwr.cli:main"], "not a flwr.clientapp.ClientApp"),
    (["--runtime-api-address", "127.0.0.1:9094", "--app", "specfed_flwr.client_app:nope"], "has no attribute 'nope'"),
    (["--runtime-api-address", "127.0.0.1:9094", "--root-certificates", "/no/such.pem"], "--root-certificates"),
    (["--runtime-api-address", "127.0.0.1:9094", "--superexec-auth-secret-file", "/no/such"], "--superexec-auth-secret-file"),
    (["--runtime-api-address", "127.0.0.1:9094", "--poll-interval", "-1"], "--poll-interval"),
])
def test_bad_options_fail_cleanly(argv, needle, capsys) -> None:
    assert cli.main(["device-runtime", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "Traceback" not in err


def test_insecure_with_certificates_is_refused(capsys, tmp_path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("not a certificate")
    assert cli.main(["device-runtime", "--runtime-api-address", "127.0.0.1:9094", "--insecure",
                     "--root-certificates", str(pem)]) == 2
    assert "--insecure disables TLS" in capsys.readouterr().err


def test_echo_round_trips_stay_in_one_process(tmp_path: Path) -> None:
    out = tmp_path / "echo.json"
    pids: set[int] = set()
    with start_deployment_stack(2, log_dir=tmp_path / "logs") as stack:
        assert stack.runtime == "persistent"
        assert {"runtime-0", "runtime-1"} <= set(stack.process_names)
        runtime_pid = {n: stack.process(f"runtime-{i}").pid for i, n in enumerate(stack.node_ids)}
        # round 0 = warm-up, rounds 1..3 timed; the ClientApp raises in round 2
        rc = flwr_run(stack, ECHO_APP, {"out": str(out), "rounds": 3, "mode": "push-pull", "fail-round": 2},
                      stream=False, timeout=240.0)
        assert rc == 0, stack.last_run.log_path.read_text()[-3000:]
        logs = [stack.log_path(f"runtime-{i}").read_text() for i in range(2)]
        pids = stack.pids()
    data = json.loads(out.read_text())
    rounds = data["all-rounds"]
    assert len(rounds) == 4 and all(len(r) == 2 for r in rounds), rounds
    assert all("echo asked to fail in round 2" in r["error"] for r in rounds[2]), rounds[2]
    good = [r for i, rnd in enumerate(rounds) if i != 2 for r in rnd]
    assert all(r["ping"] == f"hello-{r['round']}-{r['node-id']}" for r in good)
    # every reply of a node came from its device runtime's one process, which imported the app once
    for node, pid in runtime_pid.items():
        mine = [r for r in good if r["node-id"] == node]
        assert len(mine) == 3 and {r["pid"] for r in mine} == {pid}, (node, pid, mine)
        assert len({r["module-loaded-at"] for r in mine}) == 1
    for log in logs:
        assert log.count("query.echo): completed in") == 3, log[-2000:]
        assert log.count("query.echo): failed in") == 1  # the raising round: an error reply, not a dead runtime
        assert log.count("ClientApp of specfed/specfed-echo-app==0.1.0") == 1  # loaded from the FAB once
        assert "[echo-client]" in log  # the ClientApp's own output goes to the runtime's log
    alive = sorted(p for p in pids | stack.seen_pids if pid_alive(p))
    assert not alive, f"processes still alive after stop(): {alive}"
