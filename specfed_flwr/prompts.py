"""Prompt sets: the shipped default (chat, code, summarisation, QA) or a user file."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path


def default_prompt_records() -> list[dict]:
    text = (importlib.resources.files("specfed_flwr") / "data" / "prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
