"""The server -> client draft request of one round.

Per sequence the server sends only the tokens accepted since that client last heard
(``starts[b]`` is where the delta begins in the sequence; a client that lost its state is
sent the whole sequence with start 0), and how many positions to draft. K, the temperature
and the sampling mode are per client per round. Sequences the server finished are listed in
``release`` so the client frees their caches.

Per row the request also carries the sequence's randomness key (``keys``: devices key their
draft uniforms by it and the absolute position, see ``randomness.py``) and the row's own sampler
(``temperatures`` / ``top_ps`` / ``top_ks``: a prompt's own temperature / top-p, so devices draft
each row from the law the server verifies it against).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

SAMPLING_MODES = ("sparse", "full")
ENCODINGS = ("fixed-k", "budgeted", "budgeted-compact")  # = wire.ENCODINGS


class ProtocolError(ValueError):
    """A draft request that a client cannot act on."""


@dataclass
class DraftRequest:
    seq_ids: np.ndarray  # int64 [B]
    starts: np.ndarray  # int64 [B]: position in the sequence where the delta begins
    delta_offsets: np.ndarray  # int64 [B+1]: delta of sequence b is delta_tokens[offsets[b]:offsets[b+1]]
    delta_tokens: np.ndarray  # int32 [N]
    gammas: np.ndarray  # int32 [B]: positions to draft
    k: int = 8
    temperature: float = 0.0
    sampling: str = "sparse"
    seed: int = 0
    round: int = 0
    # the target's sampler settings, so devices draft from the same warped law (acceptance only:
    # exactness never depends on what the devices draft from)
    top_k_sampling: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    release: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # int64 [R]
    # how the reply travels (wire.ENCODINGS) and its byte budget per drafted position (0: k slots each;
    # with a budget, k is the cap per position)
    encoding: str = "fixed-k"
    budget: float = 0.0
    # per row: randomness key (0..2**63-1) and the row's sampler (temperature > 0, top-p, top-k-sampling);
    # None in the constructor only: ``build`` / ``from_parts`` always fill them
    keys: np.ndarray | None = None  # int64 [B]
    temperatures: np.ndarray | None = None  # float64 [B]: the row's sampling temperature (> 0; unused when greedy)
    top_ps: np.ndarray | None = None  # float64 [B]
    top_ks: np.ndarray | None = None  # int32 [B]

    @classmethod
    def build(
        cls,
        entries: list[tuple[int, int, list[int], int]],
        *,
        k: int,
        temperature: float,
        sampling: str,
        seed: int,
        round: int,
        release: list[int] | None = None,
        top_k_sampling: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        encoding: str = "fixed-k",
        budget: float = 0.0,
        keys: list[int] | None = None,
        rows: list[tuple[float, float, int]] | None = None,
    ) -> "DraftRequest":
        """From ``(seq_id, start, delta, gamma)`` tuples; ``keys`` (per entry, default: from
        ``seed`` and the sequence id) and ``rows`` (per entry ``(temperature, top_p,
        top_k_sampling)``, default: the request's own) are the rows' randomness keys and samplers."""
        from .randomness import sequence_key

        if keys is None:
            keys = [sequence_key(None, seed, e[0]) for e in entries]
        if rows is None:
            rows = [(float(temperature) if temperature > 0 else 1.0, float(top_p), int(top_k_sampling))] * len(entries)
        offsets = np.zeros(len(entries) + 1, dtype=np.int64)
        for i, (_, _, delta, _) in enumerate(entries):
            offsets[i + 1] = offsets[i] + len(delta)
        flat = [t for _, _, delta, _ in entries for t in delta]
        return cls(
            seq_ids=np.array([e[0] for e in entries], dtype=np.int64),
            starts=np.array([e[1] for e in entries], dtype=np.int64),
            delta_offsets=offsets,
            delta_tokens=np.array(flat, dtype=np.int32),
            gammas=np.array([e[3] for e in entries], dtype=np.int32),
            k=int(k),
            temperature=float(temperature),
            sampling=sampling,
            seed=int(seed),
            round=int(round),
            release=np.array(release or [], dtype=np.int64),
            top_k_sampling=int(top_k_sampling),
            top_p=float(top_p),
            min_p=float(min_p),
            repetition_penalty=float(repetition_penalty),
            encoding=str(encoding),
            budget=float(budget),
            keys=np.array(keys, dtype=np.int64).reshape(-1),
            temperatures=np.array([r[0] for r in rows], dtype=np.float64),
            top_ps=np.array([r[1] for r in rows], dtype=np.float64),
            top_ks=np.array([r[2] for r in rows], dtype=np.int32),
        )

    def delta(self, b: int) -> np.ndarray:
        return self.delta_tokens[self.delta_offsets[b] : self.delta_offsets[b + 1]]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "seq_ids": self.seq_ids,
            "starts": self.starts,
            "delta_offsets": self.delta_offsets,
            "delta_tokens": self.delta_tokens,
            "gammas": self.gammas,
            "release": self.release,
            "keys": self.keys,
            "temperatures": self.temperatures,
            "top_ps": self.top_ps,
            "top_ks": self.top_ks,
        }

    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "temperature": self.temperature,
            "sampling": self.sampling,
            "seed": self.seed,
            "round": self.round,
            "top-k-sampling": self.top_k_sampling,
            "top-p": self.top_p,
            "min-p": self.min_p,
            "repetition-penalty": self.repetition_penalty,
            "encoding": self.encoding,
            "uplink-budget": self.budget,
        }

    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays().values()))

    @classmethod
    def from_parts(cls, arrays: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> "DraftRequest":
        """Rebuild and validate a request received over the wire."""
        kinds = {"keys": "iu", "top_ks": "iu", "temperatures": "f", "top_ps": "f"}
        for name, kind in kinds.items():  # a float key or a string temperature is refused, not cast
            if name in arrays and np.asarray(arrays[name]).dtype.kind not in kind:
                raise ProtocolError(f"draft request field {name!r} has dtype {np.asarray(arrays[name]).dtype}, "
                                    f"expected {'integers' if kind == 'iu' else 'floats'}")
        try:
            req = cls(
                seq_ids=np.asarray(arrays["seq_ids"], dtype=np.int64),
                starts=np.asarray(arrays["starts"], dtype=np.int64),
                delta_offsets=np.asarray(arrays["delta_offsets"], dtype=np.int64),
                delta_tokens=np.asarray(arrays["delta_tokens"], dtype=np.int32),
                gammas=np.asarray(arrays["gammas"], dtype=np.int32),
                release=np.asarray(arrays.get("release", np.zeros(0)), dtype=np.int64),
                k=int(config["k"]),
                temperature=float(config["temperature"]),
                sampling=str(config["sampling"]),
                seed=int(config["seed"]),
                round=int(config.get("round", 0)),
                top_k_sampling=int(config.get("top-k-sampling", 0)),
                top_p=float(config.get("top-p", 1.0)),
                min_p=float(config.get("min-p", 0.0)),
                repetition_penalty=float(config.get("repetition-penalty", 1.0)),
                encoding=str(config.get("encoding", "fixed-k")),
                budget=float(config.get("uplink-budget", 0.0)),
                keys=np.asarray(arrays["keys"], dtype=np.int64),
                temperatures=np.asarray(arrays["temperatures"], dtype=np.float64),
                top_ps=np.asarray(arrays["top_ps"], dtype=np.float64),
                top_ks=np.asarray(arrays["top_ks"], dtype=np.int32),
            )
        except KeyError as exc:
            raise ProtocolError(f"draft request is missing {exc.args[0]!r}") from None
        req.validate()
        return req

    def validate(self, vocab_size: int | None = None) -> None:
        b = self.seq_ids.shape[0]
        for name in ("seq_ids", "starts", "gammas", "keys", "temperatures", "top_ps", "top_ks"):
            value = getattr(self, name)
            if value is None or value.shape != (b,):
                got = "no value" if value is None else f"shape {value.shape}"
                raise ProtocolError(f"draft request field {name!r} has {got}, expected shape ({b},)")
        if self.delta_offsets.shape != (b + 1,) or self.delta_offsets[0] != 0 or np.any(np.diff(self.delta_offsets) < 0):
            raise ProtocolError("draft request field 'delta_offsets' is not a non-decreasing offset array starting at 0")
        if self.delta_offsets[-1] != self.delta_tokens.shape[0]:
            raise ProtocolError("draft request field 'delta_offsets' does not end at the number of delta tokens")
        if np.any(self.starts < 0) or np.any(self.gammas < 0):
            raise ProtocolError("draft request has a negative start or draft length")
        if self.k < 1:
            raise ProtocolError(f"draft request asks for k={self.k}; k must be >= 1")
        if self.sampling not in SAMPLING_MODES:
            raise ProtocolError(f"draft request sampling mode {self.sampling!r} is not one of {SAMPLING_MODES}")
        if self.temperature < 0 or not np.isfinite(self.temperature):
            raise ProtocolError(f"draft request temperature {self.temperature} must be >= 0")
        if self.top_k_sampling < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p < 1 \
                or not (self.repetition_penalty > 0 and np.isfinite(self.repetition_penalty)):
            raise ProtocolError(f"draft request sampler settings out of range: top-k-sampling {self.top_k_sampling}, "
                                f"top-p {self.top_p}, min-p {self.min_p}, repetition-penalty {self.repetition_penalty}")
        if self.encoding not in ENCODINGS:
            raise ProtocolError(f"draft request encoding {self.encoding!r} is not one of {ENCODINGS}")
        if not (self.budget >= 0 and np.isfinite(self.budget)):
            raise ProtocolError(f"draft request uplink budget {self.budget} must be >= 0")
        if np.any(self.keys < 0):
            raise ProtocolError("draft request has a negative randomness key (keys are 0..2**63-1)")
        if not (np.all(np.isfinite(self.temperatures)) and np.all(self.temperatures > 0)
                and np.all((self.top_ps > 0) & (self.top_ps <= 1)) and np.all(self.top_ks >= 0)):
            raise ProtocolError("draft request has a row sampler out of range (temperatures must be > 0, "
                                "top_ps in (0, 1], top_ks >= 0)")
        if vocab_size is not None and self.delta_tokens.size and (
            self.delta_tokens.min() < 0 or self.delta_tokens.max() >= vocab_size
        ):
            raise ProtocolError(f"draft request carries token ids outside the vocabulary (size {vocab_size})")


@dataclass
class RoundPlan:
    """One round the server planned: the cohort it drafts for and the request of every device.

    ``committed[s]`` is sequence s's committed length when the round was planned: a device that
    answers has applied the deltas up to there."""

    round: int
    cohort: int | None  # None: every active sequence (strict rounds)
    seq_ids: list[int]
    requests: dict[str, DraftRequest]
    committed: dict[int, int]
    # (gamma, K) each asked device was given: the fixed settings, or the adaptive controller's
    # choice for this round (a row near its token budget drafts fewer than gamma)
    settings: dict[str, tuple[int, int]] = field(default_factory=dict)

    def prefilling(self) -> set[int]:
        """Sequences every asked device receives whole (start 0): their drafts wait for the devices
        to prefill the prompt first, however long that takes."""
        starts: dict[int, list[int]] = {}
        for request in self.requests.values():
            for seq_id, start in zip(request.seq_ids.tolist(), request.starts.tolist()):
                starts.setdefault(int(seq_id), []).append(int(start))
        return {s for s, st in starts.items() if all(x == 0 for x in st)}
