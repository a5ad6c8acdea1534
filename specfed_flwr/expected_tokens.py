"""The expected tokens one verification step emits: ``E[N] = (1 - alpha^(gamma+1)) / (1 - alpha)``.

Why a module of its own: ``theory`` (the strict round model and the adaptive controller) and
``ahead_cost`` (the round of a device that drafts ahead, which ``theory``'s controller uses) both
need it, and ``ahead_cost`` sits below ``theory`` in the import order.
"""

from __future__ import annotations

import numpy as np


def expected_tokens_per_step(alpha, gamma) -> float | np.ndarray:
    """(1 - alpha^(gamma+1)) / (1 - alpha): expected tokens emitted per verification step.

    Vectorised over ``alpha`` and ``gamma`` (real gamma allowed); the alpha -> 1 limit is
    gamma + 1 and alpha <= 0 gives 1 (only the correction token). alpha is clipped to [0, 1].
    """
    al = np.clip(np.asarray(alpha, dtype=np.float64), 0.0, 1.0)
    g = np.asarray(gamma, dtype=np.float64)
    if np.any(g < 0):
        raise ValueError("gamma must be >= 0")
    al, g = np.broadcast_arrays(al, g)
    near_one = (1.0 - al) < 1e-12
    safe = np.where(near_one, 0.5, al)
    with np.errstate(divide="ignore"):
        log_a = np.log(safe)  # log(0) = -inf -> expm1(-inf) = -1 -> 1 token
    val = -np.expm1((g + 1.0) * log_a) / (1.0 - safe)
    # first-order correction near alpha = 1: (g+1) - g(g+1)/2 * (1 - alpha)
    limit = (g + 1.0) - 0.5 * g * (g + 1.0) * (1.0 - al)
    out = np.where(near_one, limit, val)
    return float(out) if np.ndim(out) == 0 else out
