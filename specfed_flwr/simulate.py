"""The README's main job: the Flower app on the simulation engine, offline.

``flwr-run`` (default): start our own SuperLink in simulation mode with runtime dependency
installation disabled (the managed ``local`` SuperLink would ``uv sync`` a fresh environment
and needs the network), run ``flwr run <app> <federation> --run-config ... --stream`` against
it, and stop everything we started. ``python``: Flower's in-process ``run_simulation``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping

from .config import SpecFedConfig


def _app_dir(app_dir: str | None) -> Path:
    if app_dir is not None:
        path = Path(app_dir).resolve()
    else:
        path = Path(__file__).resolve().parent.parent
    if not (path / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{path} has no pyproject.toml: pass --app-dir pointing at the specfed-flwr checkout")
    return path


def run_config_overrides(cfg: SpecFedConfig, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The user's overrides in kebab-case, with the results path made absolute (the
    ServerApp runs in another process and directory)."""
    out = {str(k).replace("_", "-"): v for k, v in overrides.items()}
    out["results"] = str(Path(cfg.results).resolve())
    prompts = out.get("prompts", cfg.prompts)
    if prompts != "default":
        out["prompts"] = str(Path(str(prompts)).expanduser().resolve())
    out.setdefault("min-nodes", 1)
    return out


def simulate(
    cfg: SpecFedConfig,
    overrides: Mapping[str, Any],
    *,
    num_supernodes: int = 2,
    engine: str = "flwr-run",
    app_dir: str | None = None,
    log_dir: str | None = None,
) -> int:
    run_config = run_config_overrides(cfg, overrides)
    run_config["min-nodes"] = num_supernodes
    if engine == "python":
        from flwr.simulation import run_simulation

        from .launch import single_actor_backend

        from .client_app import app as client_app
        from .serve import make_server_app

        run_simulation(
            server_app=make_server_app(run_config),
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_config=single_actor_backend(),
        )
        return 0
    from .launch import flwr_run, start_simulation_stack

    logs = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="specfed-flwr-"))
    print(f"starting a SuperLink (simulation, {num_supernodes} SuperNodes); logs in {logs}", flush=True)
    with start_simulation_stack(num_supernodes, log_dir=logs) as stack:
        code = flwr_run(stack, _app_dir(app_dir), run_config, stream=True)
        last = stack.last_run
    if code == 0:
        print(f"results: {run_config['results']}", flush=True)
    else:
        reason = last.details if last is not None and last.details not in (None, "", "N/A") else f"status {last.status if last else None}"
        print(f"specfed-flwr simulate: the run did not complete: {reason} (logs in {logs})", flush=True)
    return code
