"""Results file: one JSON line per finished sequence, appended and flushed as it finishes.

An interrupted run loses nothing already written, and a new run with the same results
file skips the prompts already there (resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .round_report import SequenceResult


def prompt_key(index: int, prompt: Any) -> str:
    return json.dumps([index, prompt], sort_keys=True)


def load_done(path: str | Path) -> dict[str, dict[str, Any]]:
    """Records already in the file, keyed by (index, prompt); a torn last line is ignored."""
    path = Path(path)
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: that sequence is generated again
        if isinstance(record, dict) and "index" in record and "token_ids" in record:
            key = prompt_key(record["index"], record.get("prompt") if record.get("prompt") is not None else record.get("prompt_ids"))
            done[key] = record
    return done


class ResultsWriter:
    def __init__(self, path: str | Path, *, resume: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and self.path.exists():
            self.path.unlink()
        self._repair_tail()
        self.done = load_done(self.path)
        self.written = 0

    def _repair_tail(self) -> None:
        """Drop a torn last line (a crash mid-write) so appends start on a fresh line."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def is_done(self, index: int, prompt: Any) -> bool:
        return prompt_key(index, prompt) in self.done

    def write(self, result: SequenceResult) -> None:
        record = result.as_record()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[prompt_key(result.index, result.prompt if result.prompt is not None else result.prompt_ids)] = record
        self.written += 1
