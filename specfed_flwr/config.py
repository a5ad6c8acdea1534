"""Typed run configuration: OmegaConf YAML defaults in ``conf/`` merged with Flower run-config.

Flower run-config keys are kebab-case (``top-k``); the dataclass fields are snake_case
(``top_k``). Both spellings are accepted. Unknown keys and bad values are refused with a
one-line message naming the key, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A configuration key has a value the run cannot use."""


@dataclass(frozen=True)
class Check:
    """A bound on a config field's value, carried in its type (``Annotated[int, Check(...)]``):
    ``validate`` refuses a value for which ``ok`` is false with "config key 'KEY': TEXT, got VALUE"."""

    ok: Callable[[Any], bool]
    text: str


PositiveInt = Annotated[int, Check(lambda v: v >= 1, "must be a positive integer")]
NonNegativeInt = Annotated[int, Check(lambda v: v >= 0, "must be >= 0")]
Positive = Annotated[float, Check(lambda v: v > 0, "must be > 0")]
NonNegative = Annotated[float, Check(lambda v: v >= 0, "must be >= 0")]


#: the most cohorts a run keeps in flight (``pipeline-depth``)
MAX_PIPELINE_DEPTH = 8


@dataclass
class SpecFedConfig:
    """The run configuration: the one source of every key's type, default and meaning.

    ``conf/specfed.yaml`` (and its copy in the package), the ``[tool.flwr.app.config]`` table of
    ``pyproject.toml`` and the key table of ``docs/CONFIG.md`` are generated from this class
    (``python -m specfed_flwr.config --write``; ``tests/test_config_keys.py`` names any key that
    drifts). Each field's docstring is its CONFIG.md meaning; ``Literal`` fields list their
    choices, ``Annotated`` ones their bound.
    """

    # models
    target: str = "default"
    """target model: `default` (embedded SmolLM2-135M-Instruct, fp32), an HF hub id or local folder,
    or `tiny:SEED[:VOCAB]` (random tiny Llama for tests)"""
    draft: str = "default"
    """draft model for the devices (same forms; a SuperNode's `node_config` may choose its own)"""
    draft_quantization: Literal["int4", "int8", "none"] = "int4"
    """`int4` (int4 body + int8 head; the default: the smallest draft, and at the same acceptance
    as int8; which of the two is faster per round varies from run to run on this shared CPU, see
    BENCHMARKS.md), `int8` or `none`: weight-only quantization of the draft's linear layers"""
    device: str = "auto"
    """target device: `auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`"""
    target_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the target's weights and compute: `float32`, `bfloat16` or `float16` (see *Reduced precision*
    below). The draft's precision is `draft-quantization`"""
    target_device_map: str = ""
    """`""`: the whole target on `device`; otherwise passed to `from_pretrained(device_map=...)`:
    `auto` (accelerate splits the target over the GPUs, then CPU), `balanced`, `balanced_low_0`,
    `sequential`, `cpu`, `cuda[:N]`. Needs `accelerate` installed"""
    verify_numerics: Literal["auto", "batched", "stepwise"] = "auto"
    """how the target's verification forward computes attention: `batched` (all gamma + 1 positions
    of a row in one masked attention call: fastest), `stepwise` (each position its own call over
    exactly the keys it sees, as the target's own `generate` computes it one token at a time: logits
    bit-for-bit those of `generate`, so reduced-precision near-ties resolve the same way; costs one
    small attention call per position and layer). `auto` = `stepwise` for a `bfloat16`/`float16`
    target, `batched` for `float32`. Wraps `sdpa` and `eager` attention"""
    # protocol
    mode: Literal["collaborative", "per-device"] = "collaborative"
    """`collaborative` (SpecFed: every device drafts every sequence, the server aggregates) or
    `per-device` (TK-SLT: each device drafts its own requests)"""
    top_k: PositiveInt = 8
    """K, token ids + probabilities sent per drafted position (fixed K; with `uplink-budget` the
    per-position cap is min(`max-k`, 255) instead; greedy runs with a variable-K encoding send 1)"""
    draft_length: NonNegativeInt = 4
    """gamma, drafted positions per round (with `adaptive`, the first round's; then chosen per device)"""
    adaptive: bool = True
    """choose gamma and K per device every round from its measured alpha, round cost and bandwidth
    (Lambert-W model, docs/THEORY.md); `draft-length` and `top-k` are the starting values, `max-gamma`
    and `max-k` the caps. The default: the benchmark measures it beside the best fixed gamma.
    `false` = fixed `draft-length` and `top-k` every round"""
    reconstruction: Literal["uniform", "temperature", "exact"] = "exact"
    """server-side q_hat rule: `uniform` (diffusion), `temperature` (scaling), `exact` (renormalised
    top-K)"""
    draft_sampling: Literal["sparse", "full"] = "sparse"
    """`sparse`: devices sample from the top-K they send (exact); `full`: from the full q
    (paper-faithful, biased by at most 1 - S per position)"""
    draft_selection: Literal["auto", "consensus", "pick", "vote"] = "auto"
    """how the server builds the draft path: `consensus` (server samples from q_bar: exact for any
    rule), `pick` (a device's token, chosen by weight), `vote` (the token with the most weight
    behind it per position; what greedy runs use); `auto` picks the exact scheme that fits"""
    draft_ahead: bool = True
    """devices keep drafting between requests, guessing that every draft is accepted and that the
    bonus token is their own next draft; a confirmed guess is served without a forward (hits and
    misses per client in the summary). Exact in every mode: randomness is keyed by position"""
    pipeline_depth: str = "auto"
    """cohorts of active sequences in flight at once: while one cohort's drafts travel and devices
    draft, the target verifies another. `1` = strict rounds; `auto` with `draft-ahead` (the
    default): 1 + floor(latency / (verify + draft)), i.e. one cohort (the devices draft the next
    round during the verify; a second cohort would halve their batches and break their guesses)
    unless the transport's own latency outlasts a whole cycle; without drafting ahead it starts at 2
    (one cohort verifies while the other drafts) and adds cohorts to cover the latency: 2 +
    ceil(latency / (verify + draft)), exactly 2 while the devices are saturated (their requests
    queue at them). latency = exchange time minus drafting time (the least of the last 6 rounds); at
    most 4. With a fixed depth a sampled output is reproducible run to run"""
    target_steps_while_waiting: Literal["auto", "on", "off"] = "auto"
    """when the server has nothing to verify or prefill and a round's drafts are late (before any
    round completed: the devices are prefilling; or past twice the recent median exchange: a slow or
    lost device), the target decodes that round's sequences one step at a time (what a round with
    an empty draft emits, so the output law is unchanged); the late round then keeps only drafts that
    start with the tokens decoded meanwhile. `auto` = on unless the devices share the server's CPUs
    (worker threads, the simulation engine, devices on this machine), where a target step only takes
    compute from the drafting it waits for"""
    standby_messages: Literal["auto", "off"] = "auto"
    """deployment engine: queue a small standby message behind a node's draft request when nothing
    else is queued for it; the device holds it about as long as the server takes to send the next
    request, so the node's SuperNode is not in Flower's hard-coded 3 s idle sleep when that request
    arrives. `auto` = for nodes whose handshake reports `specfed-flwr device-runtime` (never on the
    simulation engine, nor on Flower's stock path, where every message costs a new process)"""
    uplink_encoding: Literal["auto", "fixed-k", "budgeted", "budgeted-compact"] = "auto"
    """how a reply travels (docs/DESIGN.md, wire format): `fixed-k` (K uint16/int32 ids + K float16
    probabilities per position, 12 B per sequence of header), `budgeted` (a uint8 count per position,
    then only the slots it sends, float16), `budgeted-compact` (as budgeted, probabilities as uint8
    codes in the log domain, 16 steps per halving, 1.0 down to 1.7e-5; header 8 B + 3 B per
    sequence). `auto` = `budgeted-compact` in greedy runs (one slot per position: the drafted token
    and its probability, all greedy verification and the weights use; about 5 B per position all-in
    at 12 sequences x gamma 4) and in sampling runs with an `uplink-budget`; `fixed-k` in sampling
    runs without one. Exact in every mode: a device samples from exactly the (quantised) values it
    sends. `budgeted-compact` needs `max-gamma` <= 255"""
    uplink_budget: NonNegative = 0.0
    """bytes per drafted position on average, all-in (headers and counts included for one sequence
    drafting gamma positions; more sequences spend less); `0` = off (`top-k` slots per position).
    Devices water-fill: every position sends its drafted token, the other slots go to the largest
    probabilities of the positions drafted for the reply (each removes that much missing mass 1 - S),
    none to a position whose missing mass is <= 2^-10. The server refuses a reply with more than
    max(1, (budget - 1 - header / gamma) / slot bytes) slots per drafted position. Needs a variable-K
    `uplink-encoding` (`auto` picks `budgeted-compact`)"""
    temperature: NonNegative = 0.0
    """0 = greedy (output equals the target's greedy `generate`), > 0 = sampling at that temperature"""
    # the target's sampler (exact mode keeps its law: the server warps the target's logits the same way)
    top_p: Annotated[float, Check(lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)")] = 1.0
    """nucleus sampling of the target's law, in (0, 1] (1 = off)"""
    top_k_sampling: Annotated[int, Check(lambda v: v >= 0, "must be >= 0 (0 = off)")] = 0
    """keep only the k most likely tokens of the target's law (0 = off). Not `top-k`, which is how
    many ids a device sends per position"""
    min_p: Annotated[float, Check(lambda v: 0 <= v < 1, "must be in [0, 1) (0 = off)")] = 0.0
    """drop tokens whose probability is below min-p x the top one, in [0, 1) (0 = off)"""
    repetition_penalty: Annotated[float, Check(lambda v: v > 0, "must be > 0 (1 = off)")] = 1.0
    """CTRL penalty on every token already in the sequence, prompt included: a positive logit is
    divided by it, a negative one multiplied (1 = off). Also applies in greedy mode, as in
    `generate`"""
    stop: str = ""
    """a stop string, or a JSON list of them (`'["\\n\\n", "END"]'`); a sequence ends with the token
    that completes one (finish reason `stop`). Needs the target's tokenizer"""
    seed: int = 0
    """seed of the server's and devices' sampling: a prompt without its own `seed` draws with the
    key (this seed, its index in the prompt file); every draw is keyed by sequence and position"""
    # workload
    max_new_tokens: PositiveInt = 48
    """new tokens per prompt (also the per-request maximum)"""
    max_active_sequences: PositiveInt = 16
    """sequences decoded concurrently (each round carries all of them)"""
    prompts: str = "default"
    """`default` (shipped set: chat, code, summarisation, QA), a `.jsonl` file of `{"prompt":
    "..."}` or `{"prompt_ids": [token ids]}` records, or a text file (one per line)"""
    chat_template: bool = True
    """wrap prompts in the tokenizer's chat template"""
    results: str = "results/specfed_results.jsonl"
    """results file (one JSON line per finished sequence, flushed as it finishes)"""
    resume: bool = True
    """skip prompts already in the results file"""
    # limits and faults
    max_k: PositiveInt = 64
    """largest K a reply may carry (limits: enforced, counted in the summary's `limits`, logged the
    first time)"""
    max_gamma: PositiveInt = 16
    """largest draft length a reply may carry"""
    max_reply_bytes: PositiveInt = 8_000_000
    """largest reply accepted"""
    max_prompt_tokens: PositiveInt = 4096
    """longest prompt accepted (a longer one is refused and listed in the summary's
    `refused_prompts`; the others run)"""
    round_timeout: Positive = 60.0
    """seconds a round waits for replies; late replies are not waited for"""
    handshake_timeout: Positive = 600.0
    """seconds to wait for devices to load their drafts and answer the handshake"""
    min_nodes: PositiveInt = 1
    """wait for at least this many SuperNodes before starting"""
    node_wait_timeout: Positive = 120.0
    """...for at most this long"""
    max_missed_rounds: PositiveInt = 3
    """a device missing this many rounds in a row is deselected"""
    rejoin_after_rounds: int = 5
    """...and asked again after this many rounds (doubling, up to 64x, while its probes keep
    failing); also how often a device whose weight collapsed is probed"""
    max_rounds: PositiveInt = 100_000
    """safety stop"""
    # bias-aware weights
    weight_ema: Annotated[float, Check(lambda v: 0 < v <= 1, "must be in (0, 1]")] = 0.3
    """weight of the newest measurement in the bias-aware weights"""
    weight_sharpness: Positive = 2.0
    """exponent of the weights (higher: trust the best device more)"""
    weight_drop_below: float = 0.05
    """a device whose measured agreement falls below this gets weight 0"""
    # default link profile of a device (node_config may override per device)
    uplink_mbps: Positive = 10.0
    """default uplink bandwidth of a device, in Mbit/s (for accounting and the adaptive controller;
    a device's `node_config` may override it)"""
    downlink_mbps: Positive = 50.0
    """default downlink bandwidth of a device, in Mbit/s (accounting)"""
    rtt_ms: NonNegative = 20.0
    """default round-trip time of a device, in ms (for accounting and the adaptive controller)"""

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
        """Refuse a value the run cannot use, with one line naming the key. Choices and bounds come
        from the field types; what relates two keys is checked here."""
        for name, hint in _HINTS.items():
            value = getattr(self, name)
            choices = _choices(hint)
            if choices is not None and value not in choices:
                raise ConfigError(f"config key '{_kebab(name)}': {value!r} is not one of {', '.join(choices)}")
            for check in _checks(hint):
                if not check.ok(value):
                    raise ConfigError(f"config key '{_kebab(name)}': {check.text}, got {value}")
        if self.draft_length > self.max_gamma:
            raise ConfigError(f"config key 'draft-length': {self.draft_length} exceeds max-gamma {self.max_gamma}")
        if self.top_k > self.max_k:
            raise ConfigError(f"config key 'top-k': {self.top_k} exceeds max-k {self.max_k}")
        self.stop_strings()
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
        if self.uplink_budget > 0 and self.uplink_encoding == "fixed-k":
            raise ConfigError("config key 'uplink-budget': a budget needs a variable-K uplink-encoding "
                              "(budgeted, budgeted-compact or auto), not fixed-k")
        if self.encoding() == "budgeted-compact" and self.max_gamma > 255:
            raise ConfigError(f"config key 'max-gamma': {self.max_gamma} exceeds 255, the most positions a "
                              "budgeted-compact reply carries per sequence (uint8 lengths)")
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


_FIELDS = {f.name: f for f in dataclasses.fields(SpecFedConfig)}
_HINTS = typing.get_type_hints(SpecFedConfig, include_extras=True)


def _base(hint: Any) -> type:
    """The plain type a field holds: ``Annotated[int, ...]`` -> int, ``Literal["a", "b"]`` -> str."""
    if typing.get_origin(hint) is Annotated:
        return _base(typing.get_args(hint)[0])
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    return hint


def _choices(hint: Any) -> tuple[Any, ...] | None:
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _checks(hint: Any) -> list[Check]:
    if typing.get_origin(hint) is not Annotated:
        return []
    return [m for m in hint.__metadata__ if isinstance(m, Check)]


def _coerce(name: str, value: Any) -> Any:
    kind = _base(_HINTS[name]).__name__
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
