"""What Flower reads from files and flags: TOML values and ``'k=v ...'`` strings, the connection in
``$FLWR_HOME/config.toml``, ``flwr federation simulation-config`` flags from a backend config, and
a run config checked against the app's ``[tool.flwr.app.config]`` defaults."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    raise TypeError(f"unsupported config value {value!r} ({type(value).__name__})")


def format_config_args(config: Mapping[str, Any]) -> str:
    """Format ``{"k": v}`` as Flower's ``'k1=v1 k2="s"'`` string (``--node-config``).

    Flower splits on whitespace outside quotes; strings must not contain a double quote.
    """
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"invalid config key {key!r}")
        if isinstance(value, str) and '"' in value:
            raise ValueError(f"config string values may not contain '\"': {key}={value!r}")
        parts.append(f"{key}={toml_value(value)}")
    return " ".join(parts)


def write_flower_config(flwr_home: Path, name: str, address: str) -> Path:
    """Add connection ``name`` to ``$FLWR_HOME/config.toml`` (keeps other connections)."""
    import tomli  # flwr dependency
    import tomli_w  # flwr dependency

    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data: dict[str, Any] = {}
    if path.exists():
        data = tomli.loads(path.read_text())
    superlink = data.setdefault("superlink", {})
    superlink.setdefault("default", name)
    superlink[name] = {"address": address, "insecure": True}
    path.write_text(tomli_w.dumps(data))
    return path


def sim_config_flags(num_supernodes: int, backend: Mapping[str, Any] | None) -> list[str]:
    """Map a Flower ``backend_config`` dict to ``flwr federation simulation-config`` flags."""
    flags = ["--num-supernodes", str(int(num_supernodes))]
    backend = dict(backend or {})
    unknown = set(backend) - {"name", "client_resources", "init_args", "verbose"}
    if unknown:
        raise ValueError(f"unsupported simulation backend keys: {sorted(unknown)}")
    if "name" in backend:
        flags += ["--backend-name", str(backend["name"])]
    if backend.get("verbose"):
        flags.append("--verbose")
    cres = dict(backend.get("client_resources") or {})
    bad = set(cres) - {"num_cpus", "num_gpus"}
    if bad:
        raise ValueError(f"unsupported client_resources keys: {sorted(bad)}")
    if cres.get("num_cpus") is not None:
        flags += ["--client-resources-num-cpus", str(int(cres["num_cpus"]))]
    if cres.get("num_gpus") is not None:
        flags += ["--client-resources-num-gpus", str(float(cres["num_gpus"]))]
    init = dict(backend.get("init_args") or {})
    init.pop("include_dashboard", None)  # Flower's Ray backend already sets False
    init.pop("ignore_reinit_error", None)
    bad = set(init) - {"num_cpus", "num_gpus", "logging_level", "log_to_driver"}
    if bad:
        raise ValueError(f"unsupported init_args keys (not settable via the SuperLink): {sorted(bad)}")
    if init.get("num_cpus") is not None:
        flags += ["--init-args-num-cpus", str(int(init["num_cpus"]))]
    if init.get("num_gpus") is not None:
        flags += ["--init-args-num-gpus", str(int(init["num_gpus"]))]
    if init.get("logging_level") is not None:
        flags += ["--init-args-logging-level", str(init["logging_level"])]
    if init.get("log_to_driver") is not None:
        flags += ["--init-args-log-to-driver", "true" if init["log_to_driver"] else "false"]
    return flags


def app_config_defaults(app_dir: Path) -> dict[str, Any]:
    import tomli

    from flwr.common.config import flatten_dict

    data = tomli.loads((app_dir / "pyproject.toml").read_text())
    return flatten_dict(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def normalize_run_config(app_dir: Path, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten, type-check against the app's ``[tool.flwr.app.config]`` defaults."""
    from flwr.common.config import flatten_dict

    defaults = app_config_defaults(app_dir)
    flat = flatten_dict(dict(run_config))
    unknown = sorted(k for k in flat if k not in defaults)
    if unknown:
        raise KeyError(
            f"run_config keys not declared in {app_dir / 'pyproject.toml'} "
            f"[tool.flwr.app.config]: {unknown} (Flower would fail the run with "
            f"\"Key '...' is not present in the main dictionary\")"
        )
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, Path):
            value = str(value)
        elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # numpy scalar
        if not isinstance(value, (bool, int, float, str)):
            raise TypeError(f"run_config[{key!r}] must be bool/int/float/str, got {type(value).__name__}")
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # Flower does not coerce: keep the declared type
        elif type(value) is not type(default) and not (
            isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool)
            and not isinstance(default, bool)
        ):
            raise TypeError(
                f"run_config[{key!r}]={value!r} ({type(value).__name__}) does not match the type of "
                f"its default {default!r} ({type(default).__name__}); Flower passes it through as is"
            )
        out[key] = value
    return out
