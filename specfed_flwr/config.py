"""Typed run configuration: OmegaConf YAML defaults in ``conf/`` merged with Flower run-config.

Flower run-config keys are kebab-case (``top-k``); the dataclass fields are snake_case
(``top_k``). Both spellings are accepted. Unknown keys and bad values are refused with a
one-line message naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A configuration key has a value the run cannot use."""


_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("collaborative", "per-device"),
    "reconstruction": ("uniform", "temperature", "exact"),
    "draft_sampling": ("sparse", "full"),
    "draft_selection": ("auto", "consensus", "pick", "vote"),
    "draft_quantization": ("int4", "int8", "none"),
    "target_dtype": ("float32", "bfloat16", "float16"),
    "uplink_encoding": ("auto", "fixed-k", "budgeted", "budgeted-compact"),
}


#: the most cohorts a run keeps in flight (``pipeline-depth``)
MAX_PIPELINE_DEPTH = 8


@dataclass
class SpecFedConfig:
    # models
    target: str = "default"
    draft: str = "default"
    draft_quantization: str = "int4"
    device: str = "auto"
    target_dtype: str = "float32"
    target_device_map: str = ""  # passed to from_pretrained (e.g. "auto"); "" = the whole target on ``device``
    # protocol
    mode: str = "collaborative"
    top_k: int = 8
    draft_length: int = 4
    adaptive: bool = False
    reconstruction: str = "exact"
    draft_sampling: str = "sparse"
    draft_selection: str = "auto"
    draft_ahead: bool = True
    pipeline_depth: str = "auto"
    # how a reply travels (wire.py): auto = budgeted-compact with 1 slot per position in greedy runs,
    # fixed-k in sampling runs without a budget, budgeted-compact with one
    uplink_encoding: str = "auto"
    uplink_budget: float = 0.0  # bytes per drafted position on average, all-in; 0 = off (top-k slots each)
    temperature: float = 0.0
    # the target's sampler (exact mode keeps its law: the server warps the target's logits the same way)
    top_p: float = 1.0
    top_k_sampling: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: str = ""  # a stop string, or a JSON list of them ('["\\n\\n", "END"]'); "" = none
    seed: int = 0
    # workload
    max_new_tokens: int = 48
    max_active_sequences: int = 16
    prompts: str = "default"
    chat_template: bool = True
    results: str = "results/specfed_results.jsonl"
    resume: bool = True
    # limits and faults
    max_k: int = 64
    max_gamma: int = 16
    max_reply_bytes: int = 8_000_000
    max_prompt_tokens: int = 4096
    round_timeout: float = 60.0
    handshake_timeout: float = 600.0
    min_nodes: int = 1
    node_wait_timeout: float = 120.0
    max_missed_rounds: int = 3
    rejoin_after_rounds: int = 5
    max_rounds: int = 100_000
    # bias-aware weights
    weight_ema: float = 0.3
    weight_sharpness: float = 2.0
    weight_drop_below: float = 0.05
    # default link profile of a device (node_config may override per device)
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0
    rtt_ms: float = 20.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def selection_scheme(self) -> str:
        """Resolve ``draft_selection = auto`` to the exact scheme that fits the other settings."""
        if self.greedy:
            return "vote"
        if self.draft_selection != "auto":
            return self.draft_selection
        if self.draft_sampling == "full":
            return "pick"  # paper-faithful: the client's own token against q_hat
        return "pick" if self.reconstruction == "exact" else "consensus"

    def stop_strings(self) -> list[str]:
        """``stop`` as a list: "" -> none, a JSON list of strings, else the one string."""
        return parse_stop(self.stop, "stop")

    def encoding(self) -> str:
        """``uplink-encoding`` resolved: ``auto`` -> budgeted-compact in greedy runs (the drafted
        token and its probability are all greedy verification and the weights use) and in sampling
        runs with an ``uplink-budget``; fixed-k otherwise (sampling without a budget, as before)."""
        if self.uplink_encoding != "auto":
            return self.uplink_encoding
        return "budgeted-compact" if self.greedy or self.uplink_budget > 0 else "fixed-k"

    def depth(self) -> int | None:
        """``pipeline-depth`` as a number, or None for ``auto``."""
        return None if self.pipeline_depth == "auto" else int(self.pipeline_depth)

    def exact(self) -> bool:
        """Whether the configured scheme provably keeps the target's distribution."""
        scheme = self.selection_scheme()
        if scheme in ("vote", "consensus"):
            return True
        return self.draft_sampling == "sparse" and self.reconstruction == "exact"

    def validate(self) -> "SpecFedConfig":
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"config key '{_kebab(name)}': {value!r} is not one of {', '.join(choices)}")
        _positive_int(self, "top_k")
        _positive_int(self, "max_new_tokens")
        _positive_int(self, "max_active_sequences")
        _positive_int(self, "max_k")
        _positive_int(self, "max_gamma")
        _positive_int(self, "max_reply_bytes")
        _positive_int(self, "max_prompt_tokens")
        _positive_int(self, "max_missed_rounds")
        _positive_int(self, "max_rounds")
        _positive_int(self, "min_nodes")
        if self.draft_length < 0:
            raise ConfigError(f"config key 'draft-length': must be >= 0, got {self.draft_length}")
        if self.draft_length > self.max_gamma:
            raise ConfigError(f"config key 'draft-length': {self.draft_length} exceeds max-gamma {self.max_gamma}")
        if self.top_k > self.max_k:
            raise ConfigError(f"config key 'top-k': {self.top_k} exceeds max-k {self.max_k}")
        if self.temperature < 0:
            raise ConfigError(f"config key 'temperature': must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"config key 'top-p': must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k_sampling < 0:
            raise ConfigError(f"config key 'top-k-sampling': must be >= 0 (0 = off), got {self.top_k_sampling}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"config key 'min-p': must be in [0, 1) (0 = off), got {self.min_p}")
        self.stop_strings()
        if not self.repetition_penalty > 0:
            raise ConfigError(f"config key 'repetition-penalty': must be > 0 (1 = off), got {self.repetition_penalty}")
        if not 0 < self.weight_ema <= 1:
            raise ConfigError(f"config key 'weight-ema': must be in (0, 1], got {self.weight_ema}")
        if self.weight_sharpness <= 0:
            raise ConfigError(f"config key 'weight-sharpness': must be > 0, got {self.weight_sharpness}")
        for name in ("round_timeout", "handshake_timeout", "node_wait_timeout", "uplink_mbps", "downlink_mbps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config key '{_kebab(name)}': must be > 0, got {getattr(self, name)}")
        if self.pipeline_depth != "auto":
            try:
                depth = int(self.pipeline_depth)
            except ValueError:
                depth = 0
            if not 1 <= depth <= MAX_PIPELINE_DEPTH or str(depth) != str(self.pipeline_depth).strip():
                raise ConfigError(f"config key 'pipeline-depth': 'auto' or an integer in 1..{MAX_PIPELINE_DEPTH}, "
                                  f"got {self.pipeline_depth!r}")
        if self.target_device_map and self.target_device_map not in ("auto", "balanced", "balanced_low_0",
                                                                      "sequential", "cpu") \
                and not self.target_device_map.startswith("cuda"):
            raise ConfigError(f"config key 'target-device-map': {self.target_device_map!r} is not '' (none), auto, "
                              "balanced, balanced_low_0, sequential, cpu or cuda[:N]")
        if not self.uplink_budget >= 0:
            raise ConfigError(f"config key 'uplink-budget': must be >= 0 (0 = off), got {self.uplink_budget}")
        if self.uplink_budget > 0 and self.uplink_encoding == "fixed-k":
            raise ConfigError("config key 'uplink-budget': a budget needs a variable-K uplink-encoding "
                              "(budgeted, budgeted-compact or auto), not fixed-k")
        if self.encoding() == "budgeted-compact" and self.max_gamma > 255:
            raise ConfigError(f"config key 'max-gamma': {self.max_gamma} exceeds 255, the most positions a "
                              "budgeted-compact reply carries per sequence (uint8 lengths)")
        if self.rtt_ms < 0:
            raise ConfigError(f"config key 'rtt-ms': must be >= 0, got {self.rtt_ms}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_stop(value: Any, key: str) -> list[str]:
    """Stop strings from a config value or a prompt record: "" / None -> [], a string, a JSON list
    string, or a list of non-empty strings. Raises ConfigError naming ``key``."""
    import json

    if value is None or value == "":
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"config key '{key}': not a JSON list of strings: {value!r}") from None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(f"config key '{key}': expected a non-empty string or a list of them, got {value!r}")
    return list(items)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _positive_int(cfg: SpecFedConfig, name: str) -> None:
    if getattr(cfg, name) < 1:
        raise ConfigError(f"config key '{_kebab(name)}': must be a positive integer, got {getattr(cfg, name)}")


_FIELDS = {f.name: f for f in dataclasses.fields(SpecFedConfig)}


def _coerce(name: str, value: Any) -> Any:
    f = _FIELDS[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    key = _kebab(name)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': expected {kind}, got {value!r}") from None
    return value


def default_yaml_path() -> Path:
    """conf/specfed.yaml of a source checkout, else the copy shipped inside the package."""
    repo_conf = Path(__file__).resolve().parent.parent / "conf" / "specfed.yaml"
    if repo_conf.exists():
        return repo_conf
    return Path(str(importlib.resources.files("specfed_flwr") / "conf" / "specfed.yaml"))


def load_config(
    overrides: Mapping[str, Any] | None = None, yaml_path: str | Path | None = None, *, ignore: tuple[str, ...] = ()
) -> SpecFedConfig:
    """Defaults <- YAML file <- overrides (Flower run-config or CLI). Raises ConfigError."""
    merged: dict[str, Any] = {}
    path = Path(yaml_path) if yaml_path is not None else default_yaml_path()
    if path.exists():
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        merged.update(loaded)
    elif yaml_path is not None:
        raise ConfigError(f"config file {path} does not exist")
    merged.update(dict(overrides or {}))
    values: dict[str, Any] = {}
    for raw_key, value in merged.items():
        if raw_key in ignore:
            continue
        name = str(raw_key).replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"unknown config key '{raw_key}' (see docs/CONFIG.md for the keys)")
        values[name] = _coerce(name, value)
    return SpecFedConfig(**values).validate()
