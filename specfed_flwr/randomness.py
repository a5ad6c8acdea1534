"""Position-keyed randomness: every random draw of a run is a pure function of (sequence key,
absolute position, stream), shared by the server and the devices.

Why: a sampled output then depends only on the sequence's own key and the models, never on
which other sequences share its batch or cohort, their order, the pipeline depth or how many
rounds ran before -- a prompt with its own ``seed`` is reproducible on its own. A generator
consumed in round order cannot give that: one extra sequence in the batch shifts every later
draw of every other sequence.

Exactness (docs/DESIGN.md, "Randomness"): speculative sampling needs each accept-test uniform,
each residual/bonus draw and each draft draw to be independent of everything that decided the
outcomes before it. The uniform of (key, position j, stream) is used for position j only, and
a position is *tested* at most once: it is either accepted or rejected (then the residual at j
is committed), and in both cases j is committed and never drafted again. A position drafted
past the first rejection was never tested, so its draft, selection and accept uniforms
influenced no outcome, and reusing them when the position is drafted again (from a new prefix)
is sound. Streams keep the draws of one position apart (draft vs accept vs residual vs
selection), so no uniform feeds two decisions.

The hash is a counter-based generator (splitmix64's finaliser, chained over key, stream and
position): for a fixed key and stream, distinct positions never collide (each step is a
bijection), and it is vectorised in numpy's wrapping uint64 arithmetic.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

#: stream ids: one per kind of decision at a position
DRAFT = 1  # the device's draft token (``draft_payload.sparsify``)
ACCEPT = 2  # the server's accept test u < p(x)/q(x)
RESIDUAL = 3  # the correction (residual) or bonus token the server emits at a position
SELECT = 4  # the server's draft-path selection: consensus slot / picked client
SELECT_RANK = 5  # consensus: which unlisted token, when the consensus draw falls outside the listed ids

MAX_SEED = 2**63 - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def sequence_key(seed: int | None, run_seed: int = 0, index: int = 0) -> int:
    """The 63-bit randomness key of a sequence: from the prompt's own ``seed`` when it has one
    (then nothing else of the run -- not the run's seed, not the prompt's index -- enters),
    else from the run's seed and the prompt's index. The two kinds never share a key by design
    (different hash inputs)."""
    text = f"prompt-seed:{int(seed)}" if seed is not None else f"run:{int(run_seed)}:{int(index)}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _fmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (a bijection of 64-bit words)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def counter_uniforms(keys, positions, stream: int) -> np.ndarray:
    """Uniforms in [0, 1) (float64, 53 random bits) of (key, position, stream).

    ``keys`` and ``positions``: non-negative integers, broadcast against each other (e.g. keys
    [B, 1] and positions [B, G] -> [B, G]); ``stream``: one of the stream ids above."""
    k = np.asarray(keys, dtype=np.uint64)
    p = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = _fmix(k + _GOLDEN * np.uint64(stream))
        h = _fmix(h ^ p)
        h = _fmix(h + _GOLDEN)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def keyed_uniforms(keys: list[int] | np.ndarray, starts: list[int] | np.ndarray, width: int, stream: int) -> torch.Tensor:
    """[B, width] float64: row b's uniforms at absolute positions starts[b] + 0..width-1.

    ``keys`` [B] the rows' sequence keys, ``starts`` [B] each row's committed length (the
    position of its first drafted token)."""
    k = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)  # [B, 1]
    positions = np.asarray(starts, dtype=np.int64).reshape(-1, 1) + np.arange(width, dtype=np.int64)  # [B, W]
    return torch.from_numpy(counter_uniforms(k, positions, stream))  # [B, W]


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``weights`` [N, M] >= 0 (rows not all zero), ``uniforms`` [N] in [0, 1) -> index [N] long.

    Index j is drawn with probability weights[j] / sum(weights): the first j whose cumulative
    weight exceeds u * total (float64 cumulative sums, so a long vocabulary row loses no mass to
    rounding). A zero-weight entry is never drawn, also when rounding makes u * total reach the
    total (then the last positive entry is taken).
    """
    cum = weights.double().cumsum(dim=1)  # [N, M]
    x = (uniforms.double().to(cum.device) * cum[:, -1]).unsqueeze(1)  # [N, 1]
    idx = torch.searchsorted(cum, x, right=True).squeeze(1)  # [N]
    positive = weights > 0  # [N, M]
    last = (positive * torch.arange(weights.shape[1], device=weights.device)).amax(dim=1)  # [N]
    return torch.minimum(idx, last)
