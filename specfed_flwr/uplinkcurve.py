"""Bytes vs alpha of the uplink encodings at fixed prefixes (issue 13's curve), for the benchmark.

At every fixed prefix we know the target's p and the draft's q (temperature 1, as
``bench.collect_prefixes`` gives them). For each encoding and size we build exactly what a
device would send, measure its bytes all-in (headers and count bytes included, by encoding the
reply with ``wire``) and alpha = sum_x min(p(x), q_hat(x)), q_hat being what the server
reconstructs with the ``exact`` rule (the renormalised sent sparse q). ``alpha_full`` is the
same prefixes with the full draft distribution: the ceiling any encoding can reach.

* ``fixed-k`` (K slots, float16): ``bench.fixed_prefix_alpha`` itself (its ``exact`` alpha and
  ``alpha_full_q``), bytes = the fixed-K reply of one sequence drafting ``gamma`` positions.
* ``budgeted`` / ``budgeted-compact`` (one ``budget`` in bytes per position): the prefixes are
  cut into replies of ``gamma`` consecutive positions of one sequence, and each position is
  sparsified the way ``HFDraftProposer`` does for a reply (``sparsify`` with the allowance plus
  the slots the earlier positions of the reply left unspent). One sequence per reply is the
  conservative case: more sequences share the compact header and spend less.

``uplink_curve`` is pure (tensors in, records out); ``uplink_curve_for_pair`` collects the
prefixes of a model pair first. ``greedy_bytes_per_position`` gives the all-in bytes of the
greedy settings (one slot per position in the variable-K encodings).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .draft_payload import sparsify
from .reconstruction import reconstruct_sparse
from .sparse import agreement
from .wire import ENCODINGS, make_reply, payload_bytes, slot_allowance

__all__ = ["DEFAULT_BUDGETS", "DEFAULT_KS", "greedy_bytes_per_position", "uplink_curve", "uplink_curve_for_pair"]

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_BUDGETS = (6, 8, 12, 16, 24, 32, 48, 64, 96)


def _fixed_k_record(p: torch.Tensor, q: torch.Tensor, k: int, gamma: int, temperature: float) -> dict[str, Any]:
    from .bench.law import Prefixes, fixed_prefix_alpha  # the benchmark's own fixed-prefix maths

    m, v = p.shape
    fixed = fixed_prefix_alpha(Prefixes(p, q, [(0, i) for i in range(m)]), k, ["exact"])
    k = min(int(k), v)
    reply = make_reply([1], [gamma], np.zeros((1, gamma, k), dtype=np.int64) + np.arange(k),
                       np.full((1, gamma, k), 1.0 / (k + 1)), v)  # shape is all that sets the bytes
    return {
        "encoding": "fixed-k", "k": k, "budget": None, "temperature": float(temperature), "gamma": int(gamma),
        "bytes_per_position_all_in": payload_bytes(reply) / gamma,
        "alpha_fixed_prefixes": float(fixed["alpha"]["exact"]),
        "alpha_full_fixed_prefixes": float(fixed["alpha_full_q"]),
        "kept_mass": float(fixed["kept_mass"]), "mean_slots": float(k), "prefixes": int(m),
    }


def _budgeted_record(p: torch.Tensor, q: torch.Tensor, encoding: str, budget: float, gamma: int, k_max: int,
                     temperature: float) -> dict[str, Any]:
    """Replies of ``gamma`` consecutive prefixes, each position sparsified with the reply's carry."""
    m, v = p.shape
    k_max = min(int(k_max), v)
    allowance = max(1.0, slot_allowance(budget, encoding, v, gamma))
    compact = encoding == "budgeted-compact"
    total_bytes, alpha_sum, kept_sum, slots_sum = 0, 0.0, 0.0, 0
    for start in range(0, m, gamma):
        rows = range(start, min(start + gamma, m))
        g = len(rows)
        ids_r = np.zeros((1, g, k_max), dtype=np.int64)  # [1, G, K] one reply of one sequence
        probs_r = np.zeros((1, g, k_max), dtype=np.float32)
        carry = 0.0
        for j, i in enumerate(rows):
            slots = allowance + carry
            ids, probs, _ = sparsify(q[i:i + 1], k_max, "greedy", slots=slots, compact=compact)  # [1, K] each
            spent = int((probs > 0).sum())
            carry = max(0.0, slots - spent)
            ids_r[0, j], probs_r[0, j] = ids[0].numpy(), probs[0].float().numpy()
        reply = make_reply([1], [g], ids_r, probs_r, v, encoding=encoding)
        total_bytes += payload_bytes(reply)
        counts = torch.from_numpy(reply.counts[0].astype(np.int64))  # [G]
        ids_t = torch.from_numpy(reply.token_ids[0].astype(np.int64))  # [G, K]
        probs_t = torch.from_numpy(reply.probs[0].astype(np.float32))  # [G, K]
        q_hat = reconstruct_sparse(ids_t, probs_t, v, "exact", counts)  # batch [G]
        batch_q = type(q_hat)(q_hat.ids[:, None], q_hat.values[:, None], q_hat.fill[:, None], v)  # batch [G, 1]
        alpha_sum += float(agreement(p[list(rows)].float(), batch_q).sum())
        kept_sum += float(q[list(rows)].gather(1, ids_t.clamp_min(0)).mul(
            (torch.arange(ids_t.shape[1]) < counts[:, None]).float()).sum())
        slots_sum += int(counts.sum())
    return {
        "encoding": encoding, "k": None, "budget": float(budget), "temperature": float(temperature), "gamma": int(gamma),
        "bytes_per_position_all_in": total_bytes / m,
        "alpha_fixed_prefixes": alpha_sum / m,
        "alpha_full_fixed_prefixes": float(torch.minimum(p, q).sum(dim=1).mean()),
        "kept_mass": kept_sum / m, "mean_slots": slots_sum / m, "prefixes": int(m), "k_max": k_max,
    }


@torch.inference_mode()
def uplink_curve(
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    encodings: Sequence[str] = ENCODINGS,
    gamma: int = 4,
    k_max: int = 64,
    temperature: float = 1.0,
) -> list[dict[str, Any]]:
    """One record per (encoding, K or budget): bytes per drafted position all-in and alpha.

    ``p``, ``q`` [M, V]: target and draft distributions at M fixed prefixes (at ``temperature``,
    only recorded). ``ks`` size the fixed-k points, ``budgets`` (bytes per position) the budgeted
    ones, ``k_max`` caps a budgeted position's slots (the run's min(max-k, 255))."""
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"p and q must both be [M, V], got {tuple(p.shape)} and {tuple(q.shape)}")
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        raise ValueError(f"unknown encodings {unknown}; choose from {', '.join(ENCODINGS)}")
    p, q = p.float(), q.float()
    records = []
    for encoding in encodings:
        if encoding == "fixed-k":
            records += [_fixed_k_record(p, q, int(k), gamma, temperature) for k in ks]
        else:
            records += [_budgeted_record(p, q, encoding, float(b), gamma, k_max, temperature) for b in budgets]
    return records


def uplink_curve_for_pair(pair: Any, prompts: list[list[int]], continuations: list[list[int]],
                          **kwargs: Any) -> list[dict[str, Any]]:
    """The curve at every position of the given continuations (``bench.collect_prefixes``)."""
    from .bench.law import collect_prefixes

    pre = collect_prefixes(pair, prompts, continuations)
    return uplink_curve(pre.p, pre.q, **kwargs)


def greedy_bytes_per_position(vocab_size: int, *, sequences: int, gamma: int, encoding: str = "budgeted-compact",
                              k: int = 8) -> float:
    """All-in uplink bytes per drafted position of one greedy reply of ``sequences`` sequences that
    each draft ``gamma`` positions: one slot per position in the variable-K encodings, ``k`` in fixed-k."""
    slots = int(k) if encoding == "fixed-k" else 1
    b, g = int(sequences), int(gamma)
    ids = np.broadcast_to(np.arange(slots), (b, g, slots))
    reply = make_reply(np.arange(b) + 1, np.full(b, g), ids, np.full((b, g, slots), 0.9 / slots), vocab_size,
                       encoding=encoding)
    return payload_bytes(reply) / (b * g)
