"""What a run reports: each finished sequence, each round, each client, and the run as a whole.

Plain records, shared by every engine (in-process, Flower simulation, deployment): the Coordinator
fills them (``coordinator.py``), ``summary.summarize`` folds them into the summary's numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .faults import Fault


@dataclass
class SequenceResult:
    index: int
    seq_id: int
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    rounds: int
    drafted: int  # draft path positions verified
    accepted: int  # of those, accepted
    alpha: float | None  # mean sum_x min(p, q_bar) over this sequence's verified positions
    owner: str | None = None
    prompt: str | None = None
    text: str | None = None

    @property
    def tau(self) -> float:
        """Mean tokens emitted per round (accepted drafts + correction/bonus)."""
        return len(self.token_ids) / self.rounds if self.rounds else 0.0

    def as_record(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "prompt": self.prompt,
            "text": self.text,
            "prompt_ids": self.prompt_ids,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "owner": self.owner,
            "metrics": {
                "rounds": self.rounds,
                "drafted": self.drafted,
                "accepted": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
                "alpha": self.alpha,
                "tau": self.tau,
            },
        }


@dataclass
class RoundReport:
    round: int
    active_sequences: int
    clients_asked: int
    clients_replied: int
    drafted: int
    accepted: int
    emitted: int
    alpha: float | None
    verify_seconds: float
    server_seconds: float
    uplink_bytes: int
    downlink_bytes: int
    finished: list[SequenceResult]
    faults: dict[str, Fault]
    weights: dict[str, float]
    exchange_seconds: float | None = None  # wall time of the round's message exchange, when known
    cohort: int | None = None  # the cohort this round verified (None: every active sequence)
    pipeline_depth: int = 1  # cohorts in flight when it was verified
    # client -> (gamma, K) it was asked for: fixed, or what the adaptive controller chose
    settings: dict[str, tuple[int, int]] = field(default_factory=dict)

    def line(self) -> str:
        alpha = f"{self.alpha:.3f}" if self.alpha is not None else "  -  "
        faults = f" faults={','.join(self.faults)}" if self.faults else ""
        return (
            f"round {self.round}: {self.active_sequences} active, {self.clients_replied}/{self.clients_asked} clients, "
            f"accepted {self.accepted}/{self.drafted}, +{self.emitted} tokens, alpha {alpha}, "
            f"verify {self.verify_seconds * 1000:.0f} ms, up {self.uplink_bytes} B"
            + (f", exchange {self.exchange_seconds * 1000:.0f} ms" if self.exchange_seconds is not None else "")
            + faults
        )


@dataclass
class GenerationResult:
    """What a run produced, whatever the engine: the finished sequences (by prompt index), the
    summary (``Coordinator.summary``) and every round's report."""

    sequences: list[SequenceResult]
    summary: dict[str, Any]
    rounds: list[RoundReport]

    @property
    def metrics(self) -> dict[str, Any]:
        """The summary, under the name the in-process engine has always used."""
        return self.summary

    @property
    def token_ids(self) -> list[list[int]]:
        return [s.token_ids for s in self.sequences]

    @property
    def texts(self) -> list[str | None]:
        return [s.text for s in self.sequences]


@dataclass
class ClientStats:
    rounds_asked: int = 0
    rounds_replied: int = 0
    positions: int = 0
    uplink_bytes: int = 0
    # the top-K part of the uplink (K ids + K probabilities per valid position), without the
    # per-sequence header and the padding of short rows: the per-position cost the wire format
    # promises and that compression is measured on
    topk_bytes: int = 0
    downlink_bytes: int = 0
    draft_seconds: float = 0.0
    faults: list[str] = field(default_factory=list)  # "round N: reason" of every dropped reply
    # what the server did about this client: deselected / rejoined / weight collapsed / restored
    events: list[str] = field(default_factory=list)
    fault_kinds: dict[str, int] = field(default_factory=dict)  # ``FaultKind`` value -> count
    event_kinds: dict[str, int] = field(default_factory=dict)  # ``EventKind`` value of ``events`` -> count
    resyncs: int = 0  # rounds the device answered without its draft state (whole sequences resent)
    resync_rounds: list[int] = field(default_factory=list)  # the rounds those were
    proactive_hits: int = 0  # rows the device had drafted ahead when the request came (guess confirmed)
    proactive_misses: int = 0  # rows whose drafts made ahead the device had to drop

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # copies the lists and dicts
        # every uplink byte of this client (headers, counts, padding) over the positions it drafted
        out["bytes_per_position_all_in"] = self.uplink_bytes / self.positions if self.positions else None
        return out


#: the limits a run enforces (config key -> what hitting it means)
LIMITS = {
    "max_k": "replies refused for carrying more than max-k slots per position",
    "max_gamma": "replies refused for carrying more than max-gamma positions",
    "max_reply_bytes": "replies refused for being larger than max-reply-bytes",
    "max_active_sequences": "rounds in which sequences waited because max-active-sequences were active",
    "max_new_tokens": "sequences stopped at max-new-tokens",
    "max_prompt_tokens": "prompts refused for being longer than max-prompt-tokens",
}
