"""Prompt sets: the shipped default (chat, code, summarisation, QA) or a user file."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path


def default_prompt_records() -> list[dict]:
    text = (importlib.resources.files("specfed_flwr") / "data" / "prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


#: per-prompt overrides a JSONL record may carry
PROMPT_OPTIONS = ("max_new_tokens", "stop", "temperature", "top_p", "seed")
MAX_SEED = 2**63 - 1  # a per-prompt seed is a non-negative signed 64-bit integer (``randomness.MAX_SEED``)


def prompt_options(spec: str) -> list[dict]:
    """Per-prompt overrides of a ``.jsonl`` prompt file, one dict per prompt (``{}`` when none):
    ``max_new_tokens`` (1..the run's max-new-tokens), ``stop`` (a string or a list of them),
    ``temperature`` (>= 0; > 0 only in a sampling run), ``top_p`` (in (0, 1]) and ``seed`` (an
    integer in 0..2**63-1: the prompt's sampled output is then reproducible on its own, whatever
    else is in the file, see ``randomness.py``)."""
    from .config import ConfigError, parse_stop

    if spec == "default" or Path(spec).suffix != ".jsonl":
        return [{} for _ in load_prompts(spec)]
    path = Path(spec).expanduser()
    out = []
    for n, line in enumerate([l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()], 1):
        record = json.loads(line)
        options = {}
        if "seed" in record:
            value = record["seed"]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
                raise ValueError(f"{path}:{n}: seed must be an integer in 0..2**63-1, got {value!r}")
            options["seed"] = value
        if "max_new_tokens" in record:
            value = record["max_new_tokens"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{path}:{n}: max_new_tokens must be a positive integer, got {value!r}")
            options["max_new_tokens"] = value
        for key, low_ok in (("temperature", True), ("top_p", False)):
            if key in record:
                value = record[key]
                good = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    value >= 0 if low_ok else 0 < value <= 1)
                if not good:
                    raise ValueError(f"{path}:{n}: {key} must be {'>= 0' if low_ok else 'in (0, 1]'}, got {value!r}")
                options[key] = float(value)
        if "stop" in record:
            try:
                options["stop"] = parse_stop(record["stop"], "stop")
            except ConfigError as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
        out.append(options)
    return out


def load_prompts(spec: str) -> list[str] | list[list[int]]:
    """``default``, a ``.jsonl`` file of {"prompt": "..."} or {"prompt_ids": [token ids]}
    objects (ids: already tokenized, e.g. for models without a tokenizer), or a text file with
    one prompt per line."""
    if spec == "default":
        return [r["prompt"] for r in default_prompt_records()]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"config key 'prompts': {spec!r} is neither 'default' nor an existing file")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if "prompt_ids" in record:
                    ids = record["prompt_ids"]
                    if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                        raise TypeError
                    prompts.append(list(ids))
                else:
                    prompts.append(str(record["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{path}:{n}: expected a JSON object with a 'prompt' string or a non-empty 'prompt_ids' list of token ids"
                ) from None
    else:
        prompts = lines
    if not prompts:
        raise ValueError(f"config key 'prompts': {path} holds no prompts")
    return prompts
