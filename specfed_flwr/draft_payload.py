"""What a drafted position sends: its top-K, rounded, and the drafted token sampled from it.

``sparsify`` is the one place that decides it (the device's half of the exactness argument: the
server reconstructs q from exactly these values):

* greedy: the argmax is drafted (it is the top-1, so it is in slot 0 already);
* ``sparse`` (sparsify-then-sample, exact): the top-K probabilities are rounded to float16
  *first*, and the token is sampled from those rounded values renormalised -- the very
  distribution the server reconstructs with the ``exact`` rule;
* ``full`` (paper-faithful): the token is sampled from the full q; if it is outside the
  top-K it replaces the K-th slot, so the drafted token is always sent.

The drafted token is moved to slot 0 (see docs/DESIGN.md, wire format). Sampling is by inverse
CDF from one uniform per row, so a whole batch is sampled in one vectorised call.

**Per-position K under a byte budget** (``uplink-budget``, variable-K encodings of ``wire.py``).
The budget becomes an allowance of ``a`` slots per drafted position (``wire.slot_allowance``).
``water_fill`` spends a step's slots where they buy the most kept mass: every row keeps its
top-1, then the largest remaining probabilities over all rows of the step are added (each one
is exactly the missing mass 1 - S it removes), skipping a row once its missing mass is at most
``ONE_HOT_MISSING`` (nearly one-hot rows keep their bytes). Slots a step leaves unspent carry
to the next step of the same reply (the positions drafted in one ``propose`` all travel
together), so a reply never carries more than ``max(1, a)`` slots per position on average.
Positions drafted ahead may end up in a reply with other rows, so they are capped per row at
``floor(max(1, a))`` instead. In greedy runs a variable-K reply carries one slot per position
(the drafted token, i.e. the argmax, and its probability): greedy verification needs only the
token, the agreement weights the token and its probability. ``budgeted-compact`` rounds the kept probabilities to the wire's
uint8 log-domain code table *before* sampling, so in ``sparse`` mode the drafted token comes from
exactly the renormalised values the server decodes (the ``exact`` rule stays lossless).

Randomness is keyed by position (``position_uniform``; ``proposer.py`` says why a reply then does
not depend on batching or on drafting ahead). All functions here are pure: tensors in, tensors out.
"""

from __future__ import annotations

import numpy as np
import torch

from .randomness import DRAFT, counter_uniforms, inverse_cdf
from .wire import code_table, quantize_probs

_FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)
#: a row whose missing mass 1 - S is at most this gets no more slots from the water-filling
ONE_HOT_MISSING = 2.0 ** -10
_CODE_TABLE_T = torch.from_numpy(code_table().astype(np.float32))  # [256] the wire's dequantised values
_SMALLEST_CODE = float(code_table()[-1])


def water_fill(vals: torch.Tensor, slots: float, one_hot: float = ONE_HOT_MISSING) -> torch.Tensor:
    """How many slots each row sends: ``vals`` [N, K] (each row's top-K, descending) -> counts [N] long.

    Every row keeps slot 0; the other ``floor(slots) - N`` slots go to the largest values over
    all rows, a value being exactly the missing mass its slot removes (greedy = optimal for this
    separable concave objective), except at rows whose missing mass is already <= ``one_hot``
    and at zero values. ``slots = inf`` keeps every eligible slot (the early stop alone)."""
    n, k = vals.shape
    counts = torch.ones(n, dtype=torch.long, device=vals.device)  # [N]
    if k <= 1 or n == 0:
        return counts
    extra = n * (k - 1) if slots == float("inf") else int(np.floor(float(slots) + 1e-9)) - n
    if extra <= 0:
        return counts
    missing_before = 1.0 - vals.cumsum(dim=1)[:, :-1]  # [N, K-1] missing mass before adding rank r >= 1
    cand = vals[:, 1:]  # [N, K-1]
    eligible = (missing_before > one_hot) & (cand > 0)  # [N, K-1]; a prefix of every row
    score = torch.where(eligible, cand, torch.full_like(cand, -1.0)).reshape(-1)  # [N(K-1)]
    take = min(extra, int(eligible.sum()))
    if take <= 0:
        return counts
    chosen = torch.topk(score, take).indices  # [take]
    return counts + torch.bincount(chosen // (k - 1), minlength=n)


def _on_code_table(vals: torch.Tensor) -> torch.Tensor:
    """float probabilities [...] -> float16 values of their nearest wire code (0: not sendable)."""
    codes = torch.from_numpy(quantize_probs(vals.detach().cpu().double().numpy()).astype(np.int64))
    return _CODE_TABLE_T[codes].to(torch.float16).to(vals.device)


def sparsify(
    q: torch.Tensor, k: int, mode: str, generator: torch.Generator | None = None, *,
    uniforms: torch.Tensor | None = None, slots: float | None = None, compact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` [N, V] -> (ids [N, K] long, probs [N, K] float16, drafted [N] long); drafted token in slot 0.

    ``mode`` is ``greedy``, ``sparse`` or ``full`` (see module docstring). ``uniforms`` [N] are
    the rows' sampling uniforms; without them N are drawn from ``generator``.

    ``slots``: the rows' total slot budget (``water_fill``); None: K slots per row. ``compact``:
    probabilities on the wire's uint8 code table. With either, a row sends only its first
    ``(probs > 0).sum()`` slots (the rest are zero): those are the values it samples from.
    """
    n, v = q.shape
    k = min(int(k), v)
    vals, ids = torch.topk(q.float(), k, dim=1)  # [N, K]
    probs = _on_code_table(vals) if compact else vals.to(torch.float16)  # [N, K]
    if slots is not None:
        counts = water_fill(vals, slots)  # [N]
        probs = torch.where(torch.arange(k).unsqueeze(0) < counts.unsqueeze(1), probs, torch.zeros_like(probs))
    if (slots is not None or compact) and bool((probs[:, 0] <= 0).any()):
        # the top-1 always travels, also where it is below the smallest sendable value
        floor = _SMALLEST_CODE if compact else _FP16_TINY
        probs[:, 0] = probs[:, 0].clamp_min(floor)
    if mode == "greedy":
        return ids, probs, ids[:, 0].clone()
    if mode not in ("sparse", "full"):
        raise ValueError(f"unknown draft sampling mode {mode!r}; choose greedy, sparse or full")
    if uniforms is None:
        uniforms = torch.rand(n, generator=generator, dtype=torch.float64)
    rows = torch.arange(n)
    if mode == "sparse":
        slot = inverse_cdf(probs.float(), uniforms)  # [N]
    else:
        drafted = inverse_cdf(q.float(), uniforms)  # [N]
        variable = slots is not None or compact
        sent = probs > 0 if variable else torch.ones_like(probs, dtype=torch.bool)  # [N, K] a prefix per row
        last = sent.sum(dim=1).clamp_min(1) - 1  # [N] the last sent slot
        hit = (ids == drafted.unsqueeze(1)) & sent  # [N, K]
        in_top = hit.any(dim=1)  # [N]
        slot = torch.where(in_top, hit.float().argmax(dim=1), last)
        missing = ~in_top
        if bool(missing.any()):
            ids = ids.clone()
            probs = probs.clone()
            rows_m = torch.nonzero(missing).squeeze(1)
            ids[rows_m, last[rows_m]] = drafted[rows_m]
            q_out = q[rows_m, drafted[rows_m]].float()
            if compact:
                outside = _on_code_table(q_out).clamp_min(_SMALLEST_CODE)
            else:
                outside = q_out.to(torch.float16).clamp_min(_FP16_TINY)
            probs[rows_m, last[rows_m]] = outside
    # move the drafted slot to slot 0
    first_ids, first_probs = ids[:, 0].clone(), probs[:, 0].clone()
    ids = ids.clone()
    probs = probs.clone()
    ids[rows, 0] = ids[rows, slot]
    probs[rows, 0] = probs[rows, slot]
    ids[rows, slot] = torch.where(slot == 0, ids[rows, 0], first_ids)
    probs[rows, slot] = torch.where(slot == 0, probs[rows, 0], first_probs)
    return ids, probs, ids[:, 0].clone()


def position_uniform(key: int, position: int) -> float:
    """The uniform in [0, 1) that samples ``position`` of the sequence whose randomness key is
    ``key`` (see module docstring and ``randomness.py``)."""
    return float(counter_uniforms(key, position, DRAFT))


__all__ = ["sparsify", "water_fill", "position_uniform", "ONE_HOT_MISSING"]
