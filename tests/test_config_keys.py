"""The five homes of the configuration agree with the ``SpecFedConfig`` dataclass, key by key.

The dataclass is the source (type, default, docstring per field); ``conf/specfed.yaml``, the
package's copy of it, ``[tool.flwr.app.config]`` in pyproject.toml and CONFIG.md's key table are
generated from it (``python -m specfed_flwr.config_homes --write``). Flower only accepts
``--run-config`` overrides for keys listed in the pyproject table, and those values reach the
ServerApp on top of the YAML: a key missing there cannot be overridden, a value differing from the
YAML silently changes the default. Each check names the key that disagrees.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from specfed_flwr import config_homes
from specfed_flwr.config import ConfigError, SpecFedConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {f.name: f.default for f in dataclasses.fields(SpecFedConfig)}


def disagreements(home: dict, *, docs: dict[str, str] | None = None) -> list[str]:
    """What a home (snake_case key -> default, or -> (default, meaning) with ``docs``) gets wrong,
    one line per key."""
    out = [f"key '{k}' is missing" for k in DEFAULTS if k not in home]
    out += [f"key '{k}' is not a SpecFedConfig field" for k in home if k not in DEFAULTS]
    for key in DEFAULTS.keys() & home.keys():
        value = home[key]
        if docs is not None:
            value, meaning = value
            if meaning != docs[key]:
                out.append(f"key '{key}': documented as {meaning!r}, the field's docstring says {docs[key]!r}")
        if value != DEFAULTS[key] or type(value) is not type(DEFAULTS[key]):
            out.append(f"key '{key}': default {value!r}, the dataclass has {DEFAULTS[key]!r}")
    return out


def _yaml(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def _pyproject() -> dict:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {k.replace("-", "_"): v for k, v in table.items()}


def _config_md() -> dict:
    """key -> (default as shown, meaning) from CONFIG.md's key table."""
    rows = {}
    for line in (ROOT / "docs" / "CONFIG.md").read_text().splitlines():
        m = re.fullmatch(r"\| `([a-z0-9-]+)` \| (`[^|]*`) \| (.*) \|", line)
        if m:
            rows[m.group(1).replace("-", "_")] = (m.group(2), m.group(3))
    return rows


@pytest.mark.parametrize("path", ["conf/specfed.yaml", "specfed_flwr/conf/specfed.yaml"])
def test_yaml_defaults_match_the_dataclass(path):
    assert not disagreements(_yaml(ROOT / path)), disagreements(_yaml(ROOT / path))


def test_pyproject_run_config_matches_the_dataclass():
    assert not disagreements(_pyproject()), disagreements(_pyproject())


def test_config_md_documents_every_key_with_its_default_and_docstring():
    docs = config_homes.field_docs()
    shown = {k: v for k, v in _config_md().items()}
    # compare the shown default through the same rendering the generator uses
    as_values = {k: (DEFAULTS[k] if config_homes.md_default(DEFAULTS.get(k)) == d else d, m) for k, (d, m) in shown.items()}
    problems = disagreements(as_values, docs=docs)
    assert not problems, problems


def test_every_field_has_a_docstring():
    docs = config_homes.field_docs()
    assert [k for k in DEFAULTS if not docs.get(k)] == []


def test_every_home_is_exactly_what_the_dataclass_generates():
    stale = [str(p.relative_to(ROOT)) for p in config_homes.stale()]
    assert not stale, f"{stale} differ from SpecFedConfig: run `python -m specfed_flwr.config_homes --write`"


def test_the_check_names_the_key_that_drifts():
    """The checks can fail: a home with one default changed, one key missing and one unknown."""
    home = dict(DEFAULTS, top_k=16, extra=1)
    del home["seed"]
    problems = disagreements(home)
    assert problems == ["key 'seed' is missing", "key 'extra' is not a SpecFedConfig field",
                        "key 'top_k': default 16, the dataclass has 8"]
    docs = {k: "meaning" for k in DEFAULTS}
    documented = {k: (v, "meaning") for k, v in DEFAULTS.items()} | {"mode": ("collaborative", "other")}
    assert disagreements(documented, docs=docs) == [
        "key 'mode': documented as 'other', the field's docstring says 'meaning'"]


def test_run_config_loads_to_the_dataclass_defaults():
    assert load_config({k.replace("_", "-"): v for k, v in _pyproject().items()}) == SpecFedConfig().validate()


@pytest.mark.parametrize("override, message", [
    ({"mode": "solo"}, "config key 'mode': 'solo' is not one of collaborative, per-device"),
    ({"draft-selection": "greedy"}, "config key 'draft-selection': 'greedy' is not one of auto, consensus, pick, vote"),
    ({"max-k": 0}, "config key 'max-k': must be a positive integer, got 0"),
    ({"draft-length": -1}, "config key 'draft-length': must be >= 0, got -1"),
    ({"top-p": 1.5}, "config key 'top-p': must be in (0, 1] (1 = off), got 1.5"),
    ({"round-timeout": 0}, "config key 'round-timeout': must be > 0, got 0.0"),
    ({"rtt-ms": -1}, "config key 'rtt-ms': must be >= 0, got -1.0"),
    ({"top-k": "many"}, "config key 'top-k': expected int, got 'many'"),
    ({"top-k": 99}, "config key 'top-k': 99 exceeds max-k 64"),
])
def test_a_bad_value_stops_with_one_line_naming_the_key(override, message):
    """Choices come from the ``Literal`` types and bounds from the ``Annotated`` ones."""
    with pytest.raises(ConfigError) as info:
        load_config(override)
    assert str(info.value) == message
