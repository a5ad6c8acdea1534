"""pyproject's run config, the YAML defaults and the config dataclass describe the same keys.

Flower only accepts ``--run-config`` overrides for keys listed in ``[tool.flwr.app.config]``,
and those values reach the ServerApp on top of the YAML; a key missing there cannot be
overridden, a value differing from the YAML silently changes the default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from omegaconf import OmegaConf

from specfed_flwr.config import SpecFedConfig, default_yaml_path, load_config

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_every_config_field_is_a_run_config_key_with_the_yaml_default():
    run_config = _pyproject_config()
    yaml = OmegaConf.to_container(OmegaConf.load(default_yaml_path()))
    fields = {f.name for f in dataclasses.fields(SpecFedConfig)}
    assert {k.replace("-", "_") for k in run_config} == fields
    assert set(yaml) == fields
    for key, value in run_config.items():
        assert yaml[key.replace("-", "_")] == value, f"pyproject {key}={value!r} but YAML has {yaml[key.replace('-', '_')]!r}"


def test_run_config_loads_to_the_dataclass_defaults():
    assert load_config(_pyproject_config()) == SpecFedConfig().validate()
