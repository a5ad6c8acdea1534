"""The round cost when devices draft ahead, and the draft length that maximises throughput there.

``theory.round_time`` is the strict round of the SPEC: ``T(gamma) = a * gamma + b``, the devices
draft (``a`` per position) and then the server verifies (``b`` per round), one after the other.
A device that drafts ahead (``draft-ahead``, ``client_core.DraftClient``) does not wait: right
after its reply it drafts the next ``gamma + 1`` positions on the guess that all of this round
is accepted and that the bonus token is its own next draft, while the server verifies. When the
guess holds for every row of its batch the next reply is already there, and the round costs
whichever of the two is longer:

    T_hit(gamma)  = max(b, a * (gamma + 1))
    T_miss(gamma) = b + a * gamma            (the rows that missed are drafted again, after the verify)

A row's guess holds with probability ``alpha ** (gamma + 1)`` (every draft accepted and the
bonus token guessed; i.i.d. acceptance as in the SPEC), so a batch of ``rows`` rows all hit with
``alpha ** ((gamma + 1) * rows)`` and the expected round is

    T(gamma) = P_hit * T_hit + (1 - P_hit) * T_miss.

This is what makes the strict formula wrong for a device that drafts ahead: its measured drafting
time per reply is ~0 on a hit (the drafts were made meanwhile), so ``a`` read from that time says
drafts are free and the Lambert-W optimum runs to ``gamma_max``, while the device's real cost per
drafted position, ahead work included, is what bounds a round. ``a`` here is that real cost (the
device's compute per batched draft step, reported as ``compute_seconds / forward_steps``) and
``b`` the server's own time per round plus the exchange's latency beyond drafting.

There is no closed form; the curve is cheap to evaluate, so the best integer gamma is found by
enumeration.
"""

from __future__ import annotations

from .expected_tokens import expected_tokens_per_step


def round_time_drafting_ahead(alpha: float, gamma: int, a: float, b: float, rows: int = 1) -> float:
    """Expected seconds of one round of ``rows`` sequences whose device drafts ahead (module docstring)."""
    if gamma < 0 or rows < 1:
        raise ValueError(f"gamma must be >= 0 and rows >= 1, got gamma={gamma}, rows={rows}")
    if a < 0 or b < 0:
        raise ValueError(f"costs must be >= 0, got a={a}, b={b}")
    al = min(max(float(alpha), 0.0), 1.0)
    hit = al ** ((gamma + 1) * rows)
    return hit * max(b, a * (gamma + 1)) + (1.0 - hit) * (b + a * gamma)


def throughput_drafting_ahead(alpha: float, gamma: int, a: float, b: float, rows: int = 1) -> float:
    """Modelled tokens per second per sequence: E[N](alpha, gamma) / T(gamma)."""
    t = round_time_drafting_ahead(alpha, gamma, a, b, rows)
    return float(expected_tokens_per_step(alpha, gamma)) / t if t > 0 else float("inf")


def best_gamma_drafting_ahead(alpha: float, a: float, b: float, rows: int = 1, *, gamma_min: int = 1,
                              gamma_max: int = 16) -> int:
    """The integer gamma in [max(gamma_min, 1), gamma_max] with the highest modelled throughput
    (ties go to the shorter draft: the same tokens for less device work)."""
    lo = max(int(gamma_min), 1)
    if gamma_max < lo:
        raise ValueError(f"gamma_max ({gamma_max}) must be >= {lo}")
    if a == 0 and b == 0:
        return int(gamma_max)
    best, best_t = lo, -1.0
    for g in range(lo, int(gamma_max) + 1):
        t = throughput_drafting_ahead(alpha, g, a, b, rows)
        if t > best_t * (1.0 + 1e-12):
            best, best_t = g, t
    return best


__all__ = ["round_time_drafting_ahead", "throughput_drafting_ahead", "best_gamma_drafting_ahead"]
