"""Sampling controls (top-p, top-k-sampling, min-p, repetition penalty) keep the target's own
sampler's law exactly.

The oracle is transformers' own logits processors (``RepetitionPenaltyLogitsProcessor``,
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``, in
``generate``'s order) applied to the target's logits; the code under test is ``sampling.warp``
inside the real round pipeline (sparsify -> reconstruct -> select path -> verify), >= 100k draws
at a fixed prefix, next-token and next-two-token laws, 1 and 3 drafters; then one engine-level
run and greedy with a repetition penalty against ``generate``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from specfed_flwr.config import ConfigError, SpecFedConfig, load_config
from specfed_flwr.inprocess import InProcessEngine
from specfed_flwr.models import tiny_llama
from specfed_flwr.sampling import SamplingSettings, path_seen, seen_mask, warp, warped_probs

from test_sampling_exactness import V, _speculative_step  # the real round pipeline, vectorised over draws

DRAWS = 100_000
SETTINGS = {
    "top-p=0.8": SamplingSettings(top_p=0.8),
    "top-k-sampling=3": SamplingSettings(top_k=3),
    "repetition-penalty=1.3": SamplingSettings(repetition_penalty=1.3),
}


def _hf_law(logits: torch.Tensor, history: list[list[int]], s: SamplingSettings) -> torch.Tensor:
    """logits [N, V], per-row token histories -> [N, V] the law ``generate(do_sample=True)`` samples from."""
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                         TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    out = []
    for row, hist in enumerate(history):
        ids = torch.tensor([hist or [0]])
        x = logits[row : row + 1].clone()
        if s.repetition_penalty != 1.0 and hist:
            x = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, x)
        if s.temperature != 1.0:
            x = TemperatureLogitsWarper(s.temperature)(ids, x)
        if s.top_k:
            x = TopKLogitsWarper(s.top_k)(ids, x)
        if s.top_p < 1.0:
            x = TopPLogitsWarper(s.top_p)(ids, x)
        if s.min_p > 0.0:
            x = MinPLogitsWarper(s.min_p)(ids, x)
        out.append(torch.softmax(x.double(), dim=-1)[0])
    return torch.stack(out)


@pytest.mark.parametrize("settings", [
    SamplingSettings(top_p=0.8), SamplingSettings(top_k=3), SamplingSettings(min_p=0.2),
    SamplingSettings(repetition_penalty=1.3), SamplingSettings(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
                                                               repetition_penalty=1.2),
])
def test_warp_is_transformers_sampler(settings):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((64, 40), generator=g) * 3
    history = [torch.randint(0, 40, (int(torch.randint(0, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(64)]
    ours = warped_probs(logits, settings, seen_mask(history, 40)).double()
    theirs = _hf_law(logits, history, settings)
    assert torch.equal(ours > 0, theirs > 0)  # same support
    assert torch.allclose(ours, theirs, atol=1e-6)
    if settings.truncates:
        assert bool(((ours == 0).sum(-1) > 0).all())  # the warp really cut something on every row


def test_path_seen_is_the_history_of_each_position():
    path = torch.tensor([[3, 4, 0], [5, -1, -1]])
    seen = path_seen([[1], [2, 2]], path, torch.tensor([3, 1]), 8)  # [2, 4, 8]
    assert seen[0, 0].nonzero().flatten().tolist() == [1]
    assert seen[0, 2].nonzero().flatten().tolist() == [1, 3, 4]
    assert seen[0, 3].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert seen[1, 1].nonzero().flatten().tolist() == [2, 5]
    assert seen[1, 3].nonzero().flatten().tolist() == [2, 5]  # padding beyond the path ignored


class Logits:
    """Target logits at a fixed prefix: l1 [V], l2 [V, V] (after x1), l3 [V, V, V] (after x1, x2)."""

    PREFIX = [1, 1, 3]

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.randn(V, generator=g) * 1.5
        self.l2 = torch.randn((V, V), generator=g) * 1.5
        self.l3 = torch.randn((V, V, V), generator=g) * 1.5

    def law(self, settings: SamplingSettings, warp_fn):
        """(p1 [V], p2 [V, V]) from ``warp_fn(logits [N, V], histories)``."""
        p1 = warp_fn(self.l1.unsqueeze(0), [self.PREFIX], settings)[0]
        p2 = warp_fn(self.l2, [self.PREFIX + [x] for x in range(V)], settings)
        return p1, p2


def _ours(logits, histories, settings):
    return warped_probs(logits, settings, seen_mask(histories, logits.shape[-1]))


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a token outside the warped support was emitted"
    return float(chisquare(counts[keep], probs[keep] / probs[keep].sum() * counts[keep].sum()).pvalue)


def _two_tokens(tables: Logits, settings: SamplingSettings, clients: int, seed: int):
    """First two emitted tokens of DRAWS independent rows through the real pipeline, the target's
    law computed by ``sampling.warp`` per position (history = prefix + path so far)."""
    gen = torch.Generator().manual_seed(seed)
    rng = torch.Generator().manual_seed(seed + 1)
    q1 = [torch.softmax(torch.randn(V, generator=rng), -1) for _ in range(clients)]  # unwarped, unrelated drafts
    q2 = [torch.softmax(torch.randn((V, V), generator=rng), -1) for _ in range(clients)]
    weights = torch.full((clients,), 1.0 / clients)

    def target(prefix_rows, j, toks):
        n = toks.shape[0]
        hist = [tables.PREFIX + prefix_rows[r] + toks[r].tolist() for r in range(n)]
        if len(prefix_rows[0]) + j == 0:
            l = tables.l1.expand(n, V)
        elif len(prefix_rows[0]) + j == 1:
            first = [(prefix_rows[r] + toks[r].tolist())[0] for r in range(n)]
            l = tables.l2[first]
        else:
            both = [(prefix_rows[r] + toks[r].tolist())[:2] for r in range(n)]
            l = tables.l3[[b[0] for b in both], [b[1] for b in both]]
        return warped_probs(l, settings, seen_mask(hist, V))

    n = DRAWS
    tokens, counts = _speculative_step(
        n, client_q_fn=lambda j, i, own: q1[i].expand(n, V) if j == 0 else q2[i][own[:, 0]],
        target_fn=lambda j, toks: target([[]] * toks.shape[0], j, toks), gamma=2, clients=clients,
        weights=weights, k=2, mode="sparse", rule="exact", scheme="pick", gen=gen)
    first, second = tokens[:, 0].clone(), tokens[:, 1].clone()
    need = counts < 2
    if int(need.sum()):
        prefix = first[need]
        m = int(need.sum())
        rows = [[int(x)] for x in prefix]
        tokens2, _ = _speculative_step(
            m, client_q_fn=lambda j, i, own: q2[i][prefix], target_fn=lambda j, toks: target(rows, j, toks),
            gamma=1, clients=clients, weights=weights, k=2, mode="sparse", rule="exact", scheme="pick", gen=gen)
        second[need] = tokens2[:, 0]
    return first.numpy(), second.numpy()


@pytest.mark.parametrize("clients", [1, 3])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_output_keeps_the_warped_target_law(name, clients):
    settings = SETTINGS[name]
    tables = Logits(seed=4)
    p1, p2 = tables.law(settings, _hf_law)  # the oracle: transformers' own sampler
    assert (p1 != torch.softmax(tables.l1.double(), -1)).any()  # the setting changes the law here
    first, second = _two_tokens(tables, settings, clients, seed=7)
    assert _chi2(np.bincount(first, minlength=V), p1.numpy()) > 1e-3
    joint = (p1.unsqueeze(1) * p2).numpy().ravel()
    assert _chi2(np.bincount(first * V + second, minlength=V * V), joint) > 1e-3


def test_the_check_detects_an_unwarped_target():
    """Not vacuous: verifying against the plain softmax gives a law the chi-square rejects."""
    tables = Logits(seed=4)
    first, _ = _two_tokens(tables, SamplingSettings(), 1, seed=7)
    p1, _ = tables.law(SETTINGS["top-p=0.8"], _hf_law)
    counts = np.bincount(first, minlength=V)
    keep = p1.numpy() > 0
    assert counts[~keep].sum() > 0 or chisquare(counts[keep], p1.numpy()[keep] * counts[keep].sum()).pvalue < 1e-6


ENGINE_V = 6
ENGINE_DRAWS = 12_000


def test_engine_keeps_the_warped_law_with_three_drafters():
    """The same through the whole in-process engine: top-p 0.8 and repetition penalty 1.3 together."""
    settings = SamplingSettings(top_p=0.8, repetition_penalty=1.3)
    target = tiny_llama(seed=10, vocab_size=ENGINE_V)
    drafts = [tiny_llama(seed=11 + i, vocab_size=ENGINE_V) for i in range(3)]
    prefix = [1, 4, 2]
    with torch.inference_mode():
        l1 = target(torch.tensor([prefix])).logits[0, -1:]
        l2 = torch.cat([target(torch.tensor([prefix + [x]])).logits[0, -1:] for x in range(ENGINE_V)])
    p1 = _hf_law(l1, [prefix], settings)[0]
    p2 = _hf_law(l2, [prefix + [x] for x in range(ENGINE_V)], settings)
    cfg = SpecFedConfig(top_k=3, draft_length=3, max_new_tokens=2, max_active_sequences=ENGINE_DRAWS,
                        max_k=ENGINE_V, temperature=1.0, top_p=0.8, repetition_penalty=1.3, seed=2,
                        weight_drop_below=0.0, max_prompt_tokens=16)
    result = InProcessEngine(target, drafts, cfg, eos_token_ids=[]).generate([prefix] * ENGINE_DRAWS)
    pairs = np.array([s.token_ids for s in result.sequences])  # [DRAWS, 2]
    assert result.metrics["drafted_positions"] > ENGINE_DRAWS // 2
    assert _chi2(np.bincount(pairs[:, 0], minlength=ENGINE_V), p1.numpy()) > 1e-3
    joint = (p1.unsqueeze(1) * p2).numpy().ravel()
    assert _chi2(np.bincount(pairs[:, 0] * ENGINE_V + pairs[:, 1], minlength=ENGINE_V ** 2), joint) > 1e-3


def test_greedy_with_repetition_penalty_equals_generate():
    target, draft = tiny_llama(seed=0, vocab_size=64), tiny_llama(seed=1, vocab_size=64)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 9, 3)]
    expected, plain = [], []
    for p in prompts:
        x = torch.tensor([p])
        kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
        expected.append(target.generate(x, repetition_penalty=1.3, **kw)[0, len(p):].tolist())
        plain.append(target.generate(x, **kw)[0, len(p):].tolist())
    assert expected != plain  # the penalty matters on these prompts
    cfg = SpecFedConfig(top_k=4, draft_length=4, max_new_tokens=16, max_k=64, temperature=0.0, repetition_penalty=1.3)
    assert InProcessEngine(target, [draft], cfg, eos_token_ids=[]).generate(prompts).token_ids == expected


@pytest.mark.parametrize("key,value", [("top-p", 1.5), ("top-p", 0), ("top-k-sampling", -1), ("min-p", 1.0),
                                       ("repetition-penalty", 0.0), ("target-dtype", "float64"),
                                       ("target-device-map", "everywhere")])
def test_bad_values_stop_the_run_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}'") as err:
        load_config({key: value})
    assert "\n" not in str(err.value)


def test_devices_draft_from_the_warped_draft_law():
    """A device sends (and samples from) its own law under the target's sampler settings: with
    top-k-sampling=3 at most 3 slots are non-zero, and the sent top-K is the warped draft law."""
    from specfed_flwr.proposer import HFDraftProposer

    draft = tiny_llama(seed=3, vocab_size=64)
    proposer = HFDraftProposer(draft)
    prompt = [5, 9, 9, 2]
    proposer.sync(1, 0, prompt)
    settings = SamplingSettings(top_k=3, repetition_penalty=1.3)
    reply = proposer.propose([1], [3], 8, temperature=0.8, sampling="sparse", seed=1, warp=settings)
    probs = reply.probs[0].astype(np.float32)  # [G, K]
    assert ((probs > 0).sum(-1) <= 3).all()
    drafted = proposer.drafted_tokens(1)
    with torch.inference_mode():
        logits = draft(torch.tensor([prompt + drafted[:1]])).logits[0, -2:]  # positions 0 and 1
    want = warped_probs(logits, SamplingSettings(temperature=0.8, top_k=3, repetition_penalty=1.3),
                        seen_mask([prompt, prompt + drafted[:1]], 64))
    for j in range(2):
        sent = dict(zip(reply.token_ids[0, j].tolist(), probs[j].tolist()))
        top = torch.topk(want[j], 3)
        for token, p in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(sent[token] - p) < 2e-3
