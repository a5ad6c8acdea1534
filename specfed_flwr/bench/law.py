"""The fixed-prefix law maths of ``specfed-flwr bench``: paired alpha and kept mass per K and
reconstruction rule, the exact one-step output law of a scheme (so its TV to the target), and a
Monte Carlo run of the engine's own functions that checks that law.

No sampling noise: the target's and the draft's next-token distributions are taken once at fixed
prefixes (every position of the target's greedy answers) and every scheme is judged on them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .run_local import make_config

if TYPE_CHECKING:
    from ..specs import ModelPair


@dataclass
class Prefixes:
    p: torch.Tensor  # [M, V] target softmax at temperature 1
    q: torch.Tensor  # [M, V] draft softmax at temperature 1
    where: list[tuple[int, int]]  # (prompt index, generated tokens before the prefix)


@torch.inference_mode()
def collect_prefixes(pair: "ModelPair", prompts: list[list[int]], continuations: list[list[int]]) -> Prefixes:
    """Target and draft next-token distributions at every position of the target's greedy continuation."""
    ps, qs, where = [], [], []
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        seq = prompt + cont[:-1] if cont else prompt
        x = torch.tensor([seq], dtype=torch.long)
        n = max(1, len(cont))
        lt = pair.target(input_ids=x.to(next(pair.target.parameters()).device)).logits[0, -n:, : pair.vocab_size]
        ld = pair.draft(input_ids=x).logits[0, -n:, : pair.vocab_size]
        ps.append(torch.softmax(lt.float().cpu(), dim=-1))
        qs.append(torch.softmax(ld.float().cpu(), dim=-1))
        where += [(i, j) for j in range(n)]
    return Prefixes(torch.cat(ps), torch.cat(qs), where)


def topk_reply(q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a device sends for q [N, V] (greedy sparsify: top-K ids, float16 probabilities)."""
    from ..draft_payload import sparsify

    ids, probs, _ = sparsify(q, k, "greedy")
    return ids, probs.float()


def fixed_prefix_alpha(pre: Prefixes, k: int, rules: Sequence[str], chunk: int = 64) -> dict[str, Any]:
    """Mean alpha = sum_x min(p, q_hat) per rule, mean kept mass S and mean TV(q, q_hat) per rule."""
    from ..reconstruction import reconstruct

    v = pre.p.shape[1]
    alpha = {r: 0.0 for r in rules}
    tv_q = {r: 0.0 for r in rules}
    kept = 0.0
    m = pre.p.shape[0]
    for s in range(0, m, chunk):
        p, q = pre.p[s:s + chunk], pre.q[s:s + chunk]
        ids, probs = topk_reply(q, k)
        kept += float(q.gather(1, ids).sum())
        for r in rules:
            qh = reconstruct(ids, probs, v, r)
            alpha[r] += float(torch.minimum(p, qh).sum())
            tv_q[r] += float(0.5 * (q - qh).abs().sum())
    return {
        "alpha": {r: alpha[r] / m for r in rules},
        "alpha_full_q": float(torch.minimum(pre.p, pre.q).sum(dim=1).mean()),
        "kept_mass": kept / m,
        "tv_q_qhat": {r: tv_q[r] / m for r in rules},
        "prefixes": m,
    }


def _law_fixed_q(p: torch.Tensor, r: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
    """Exact one-step law when the draft token ~ r and the accept test uses qt (rows = prefixes)."""
    from ..theory import one_step_output_law

    return torch.from_numpy(one_step_output_law(p.double().numpy(), r.double().numpy(), qt.double().numpy()))


@torch.inference_mode()
def output_law(p: torch.Tensor, q: torch.Tensor, k: int, rule: str, sampling: str, *, cover: float = 1 - 1e-4,
               max_candidates: int = 4096, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """Exact law of the first token one speculative step emits at one prefix (1 client), and the
    draft mass left out of the enumeration (an upper bound on the law's error in TV).

    ``sparse``: the device samples from the renormalised float16 top-K it sends; the server then
    either verifies that token against q_hat (``exact`` rule: q_hat is that very distribution) or
    samples its own draft from q_hat (``consensus``, the other rules) -- both: law(x) from
    (r = q_hat, test = q_hat). ``full`` (paper-faithful): the token x ~ q (full draft softmax);
    the reply is the top-K with x in the last slot when it is outside, so q_hat depends on x; the
    law is enumerated over x (the most likely tokens covering ``cover`` of q).
    """
    from ..reconstruction import reconstruct

    v = p.shape[-1]
    p64 = p.double()
    ids, probs = topk_reply(q[None], k)
    qhat = reconstruct(ids, probs, v, rule)[0]
    if sampling == "sparse":
        return _law_fixed_q(p[None], qhat[None], qhat[None])[0], 0.0
    order = torch.argsort(q, descending=True)
    csum = torch.cumsum(q[order].double(), 0)
    n_cand = int(min(max_candidates, max(k, int(torch.searchsorted(csum, cover)) + 1), v))
    cand = order[:n_cand]
    law = torch.zeros(v, dtype=torch.float64)
    top_ids = ids[0]
    kk = top_ids.numel()
    # tokens inside the top-K: the reply (hence q_hat) is the same for all of them
    inside = top_ids
    res_base = torch.clamp(p64 - qhat.double(), min=0)
    z = res_base.sum()
    res_base = res_base / z if z > 0 else p64
    qx = q[inside].double()
    acc = torch.clamp(p64[inside] / qhat[inside].double().clamp_min(1e-300), max=1.0)
    law.index_add_(0, inside, qx * acc)
    law += float((qx * (1 - acc)).sum()) * res_base
    # tokens outside: top-(K-1) plus x in the last slot
    outside = cand[~torch.isin(cand, top_ids)]
    for s in range(0, outside.numel(), chunk):
        xs = outside[s:s + chunk]
        n = xs.numel()
        ids_x = top_ids.expand(n, kk).clone()
        probs_x = probs[0].expand(n, kk).clone()
        ids_x[:, kk - 1] = xs
        probs_x[:, kk - 1] = q[xs].to(torch.float16).float().clamp_min(float(np.finfo(np.float16).smallest_subnormal))
        qh = reconstruct(ids_x, probs_x, v, rule).double()
        qhx = qh.gather(1, xs[:, None]).squeeze(1)
        a = torch.clamp(p64[xs] / qhx.clamp_min(1e-300), max=1.0)
        res = torch.clamp(p64[None] - qh, min=0)
        zr = res.sum(dim=1, keepdim=True)
        res = torch.where(zr > 0, res / zr.clamp_min(1e-300), p64[None].expand_as(res))
        w = q[xs].double()
        law.index_add_(0, xs, w * a)
        law += ((w * (1 - a))[:, None] * res).sum(dim=0)
    left = max(0.0, 1.0 - float(q[top_ids].double().sum()) - float(q[outside].double().sum()))
    law += left * p64  # the draft mass not enumerated: attributed to p (error <= left in TV)
    return law, left


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(0.5 * (a.double() - b.double()).abs().sum())


@torch.inference_mode()
def monte_carlo_first_token(p: torch.Tensor, q: torch.Tensor, k: int, rule: str, sampling: str, n: int,
                            seed: int = 0, chunk: int = 512) -> torch.Tensor:
    """Histogram of the first emitted token over n independent one-step runs of the engine's own
    functions (sparsify -> reconstruct -> select_draft_path -> verify_sampling), 1 client."""
    from ..aggregation import select_draft_path
    from ..draft_payload import sparsify
    from ..reconstruction import reconstruct
    from ..verification import verify_sampling

    cfg = make_config(p.shape[-1], k=k, gamma=1, reconstruction=rule, draft_sampling=sampling, concurrency=1,
                      temperature=1.0, max_new_tokens=2)
    scheme = cfg.selection_scheme()
    gen = torch.Generator().manual_seed(seed)
    v = p.shape[-1]
    counts = torch.zeros(v, dtype=torch.float64)
    target = torch.stack([p, p])[None]  # [1, 2, V]
    done = 0
    while done < n:
        c = min(chunk, n - done)
        ids, probs16, drafted = sparsify(q.expand(c, v), k, sampling, gen)
        qh = reconstruct(ids, probs16.float(), v, rule)
        path = select_draft_path(drafted.view(c, 1, 1), qh.view(c, 1, 1, v), torch.ones((c, 1), dtype=torch.long),
                                 torch.ones(1), scheme, gen)
        res = verify_sampling(target.expand(c, 2, v), path.q_bar, path.tokens, path.lengths, gen)
        counts.index_add_(0, res.tokens[:, 0], torch.ones(c, dtype=torch.float64))
        done += c
    return counts / n


def noise_floor(p: torch.Tensor, n: int, reps: int = 3, seed: int = 1) -> float:
    """Median TV between an n-sample histogram drawn from p itself and p (the Monte Carlo floor)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(reps):
        draws = torch.multinomial(p, n, replacement=True, generator=gen)
        hist = torch.bincount(draws, minlength=p.numel()).double() / n
        out.append(tv(hist, p))
    return float(statistics.median(out))


