"""Position-keyed randomness and per-prompt seeds.

1. Exactness with keyed draws: the real round pipeline (device ``sparsify`` -> ``reconstruct_sparse``
   -> ``select_draft_path`` -> ``verify_sampling``), every draw taken from ``randomness`` keyed by
   (sequence key, absolute position, stream) exactly as the engine takes them -- including the
   reuse of a position's uniforms when it is drafted again after a rejection -- keeps the target's
   next-token and next-two-token law (chi-square, >= 100k draws at a fixed prefix, 1 and 3
   drafters, rows with their own temperature / top-p next to rows with the run's). The oracle is
   transformers' own logits processors. A variant that shares one stream between the draft and the
   accept test is detected (the check has power).
2. Reproducibility through the engine: the same prompt + seed gives the same tokens alone, with
   other prompts, in another order, in other cohorts, at pipeline-depth 1, 3 and auto (one
   drafter; with several, the same prompt file at the same depth); another seed gives other
   tokens.
3. The wire: per-row keys and samplers are checked like every request field.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare, kstest

from specfed_flwr.aggregation import select_draft_path
from specfed_flwr.config import SpecFedConfig
from specfed_flwr.coordinator import Coordinator
from specfed_flwr.inprocess import InProcessEngine, ThreadTransport
from specfed_flwr.models import tiny_llama
from specfed_flwr.pipeline import run_rounds
from specfed_flwr.protocol import DraftRequest, ProtocolError
from specfed_flwr.draft_payload import sparsify
from specfed_flwr.randomness import (ACCEPT, DRAFT, RESIDUAL, SELECT, SELECT_RANK, counter_uniforms, keyed_uniforms,
                                     sequence_key)
from specfed_flwr.reconstruction import reconstruct_sparse
from specfed_flwr.sampling import SamplingSettings, seen_mask, warped_probs
from specfed_flwr.sparse import SparseQ
from specfed_flwr.verification import verify_sampling

from test_sampling_controls import Logits, _chi2, _hf_law
from test_sampling_exactness import V

DRAWS = 100_000


# ---- the counter hash ------------------------------------------------------------------------
def test_counter_uniforms_are_uniform_distinct_and_keyed():
    keys = np.array([sequence_key(None, 0, i) for i in range(2000)], dtype=np.uint64)
    u = counter_uniforms(keys.reshape(-1, 1), np.arange(50).reshape(1, -1), ACCEPT)  # [2000, 50]
    assert u.min() >= 0 and u.max() < 1
    assert kstest(u.ravel(), "uniform").pvalue > 1e-3
    assert len(np.unique(u)) == u.size  # no two (key, position) pairs share a draw
    other = counter_uniforms(keys.reshape(-1, 1), np.arange(50).reshape(1, -1), DRAFT)
    assert abs(np.corrcoef(u.ravel(), other.ravel())[0, 1]) < 0.01  # streams are unrelated
    assert (counter_uniforms(keys[:1], 7, ACCEPT) == u[0, 7]).all()  # a pure function
    # a prompt's own seed is its key whatever the run's seed and the prompt's index
    assert sequence_key(5, 0, 0) == sequence_key(5, 9, 3) != sequence_key(6, 0, 0)
    assert sequence_key(None, 0, 3) != sequence_key(None, 1, 3) != sequence_key(None, 0, 4)
    assert sequence_key(2**63 - 1) < 2**63


# ---- exactness with keyed draws at a fixed prefix ---------------------------------------------
ROW_OWN = SamplingSettings(temperature=1.4, top_p=0.8)  # the rows with their own temperature / top-p
ROW_RUN = SamplingSettings(temperature=1.0)  # the run's


def _keyed_round(keys, starts, client_q_fn, target_fn, gamma, clients, weights, k, rule, scheme, draft_stream):
    """One round for n rows with every draw position-keyed as in the engine (``round_steps``,
    ``proposer._sample``): keys [n] uint64, starts [n] the absolute position of the first draft.
    Returns (tokens [n, gamma+1] -1 padded, counts [n])."""
    n = keys.shape[0]
    client_tokens = torch.zeros((n, clients, gamma), dtype=torch.long)
    ids_all = torch.zeros((n, clients, gamma, k), dtype=torch.long)
    values_all = torch.zeros((n, clients, gamma, k))
    fill_all = torch.zeros((n, clients, gamma))
    draft_u = keyed_uniforms(keys, starts, gamma, draft_stream)  # [n, G]: every device keys by the row
    for i in range(clients):
        own = torch.zeros((n, 0), dtype=torch.long)
        for j in range(gamma):
            ids, probs, drafted = sparsify(client_q_fn(j, i, own), k, "sparse", uniforms=draft_u[:, j])
            client_tokens[:, i, j] = drafted
            q_hat = reconstruct_sparse(ids, probs.float(), V, rule)
            ids_all[:, i, j], values_all[:, i, j], fill_all[:, i, j] = q_hat.ids, q_hat.values, q_hat.fill
            own = torch.cat([own, drafted.unsqueeze(1)], dim=1)
    q = SparseQ(ids_all, values_all, fill_all, V)
    lengths = torch.full((n, clients), gamma, dtype=torch.long)
    select_u = torch.stack([keyed_uniforms(keys, starts, gamma, SELECT),
                            keyed_uniforms(keys, starts, gamma, SELECT_RANK)], dim=-1)  # [n, G, 2]
    path = select_draft_path(client_tokens, q, lengths, weights, scheme, uniforms=select_u)
    target = torch.stack([target_fn(j, path.tokens[:, :j]) for j in range(gamma + 1)], dim=1)  # [n, G+1, V]
    res = verify_sampling(target, path.q_bar, path.tokens, path.lengths,
                          accept_uniforms=keyed_uniforms(keys, starts, gamma, ACCEPT),
                          sample_uniforms=keyed_uniforms(keys, starts, gamma + 1, RESIDUAL))
    return res.tokens, res.num_tokens


def _keyed_two_tokens(tables: Logits, own_rows: torch.Tensor, clients: int, scheme: str, rule: str,
                      draft_stream: int = DRAFT):
    """First two tokens of DRAWS sequences at ``tables.PREFIX`` (keys as the engine derives them
    from the run seed and the index); rows in ``own_rows`` [n] bool use ROW_OWN, the others
    ROW_RUN, for the target's law AND the devices' drafts. Round 2 (for rows that emitted one
    token) starts one position later and reuses the round-1 uniforms of the positions it drafts
    again, exactly as the engine does."""
    n = DRAWS
    keys = np.array([sequence_key(None, 3, i) for i in range(n)], dtype=np.uint64)
    start = len(tables.PREFIX)
    rng = torch.Generator().manual_seed(17)
    d1 = [torch.randn(V, generator=rng) * 1.5 for _ in range(clients)]  # the drafts' logits
    d2 = [torch.randn((V, V), generator=rng) * 1.5 for _ in range(clients)]

    def law(logits, rows):  # [m, V] logits of the rows ``rows`` [m] -> their own warped law
        mask = own_rows[rows].unsqueeze(1)
        return torch.where(mask, warped_probs(logits, ROW_OWN), warped_probs(logits, ROW_RUN))

    def target(rows, history, j, toks):  # history: the tokens emitted before this round [m, h]
        full = torch.cat([history, toks], dim=1)
        if full.shape[1] == 0:
            l = tables.l1.expand(rows.shape[0], V)
        elif full.shape[1] == 1:
            l = tables.l2[full[:, 0]]
        else:
            l = tables.l3[full[:, 0], full[:, 1]]
        return law(l, rows)

    def draft(rows, history, i, j, own):
        full = torch.cat([history, own], dim=1)
        l = d1[i].expand(rows.shape[0], V) if full.shape[1] == 0 else d2[i][full[:, 0]]
        return law(l, rows)

    weights = torch.full((clients,), 1.0 / clients)
    all_rows = torch.arange(n)
    empty = torch.zeros((n, 0), dtype=torch.long)
    tokens, counts = _keyed_round(keys, np.full(n, start), lambda j, i, own: draft(all_rows, empty, i, j, own),
                                  lambda j, toks: target(all_rows, empty, j, toks), 2, clients, weights, 2, rule,
                                  scheme, draft_stream)
    first, second = tokens[:, 0].clone(), tokens[:, 1].clone()
    need = counts < 2
    rows = torch.nonzero(need).flatten()
    hist = first[rows].unsqueeze(1)  # [m, 1]
    tokens2, _ = _keyed_round(keys[rows.numpy()], np.full(rows.numel(), start + 1),
                              lambda j, i, own: draft(rows, hist, i, j, own),
                              lambda j, toks: target(rows, hist, j, toks), 1, clients, weights, 2, rule, scheme,
                              draft_stream)
    second[rows] = tokens2[:, 0]
    return first.numpy(), second.numpy()


def _oracle(tables: Logits, settings: SamplingSettings) -> np.ndarray:
    """transformers' own law of the first two tokens under ``settings``: [V * V]."""
    p1, p2 = tables.law(settings, _hf_law)
    return (p1.unsqueeze(1) * p2).numpy().ravel(), p1.numpy()


@pytest.mark.parametrize("clients,scheme,rule", [(1, "pick", "exact"), (3, "pick", "exact"), (3, "consensus", "uniform")])
def test_keyed_draws_keep_each_rows_own_law(clients, scheme, rule):
    tables = Logits(seed=4)
    own_rows = torch.arange(DRAWS) % 2 == 0
    first, second = _keyed_two_tokens(tables, own_rows, clients, scheme, rule)
    for rows, settings in ((own_rows.numpy(), ROW_OWN), (~own_rows.numpy(), ROW_RUN)):
        joint, p1 = _oracle(tables, settings)
        assert _chi2(np.bincount(first[rows], minlength=V), p1) > 1e-3
        assert _chi2(np.bincount(first[rows] * V + second[rows], minlength=V * V), joint) > 1e-3
    assert (np.bincount(first[own_rows.numpy()], minlength=V) == 0).any()  # top-p really cut the own rows


def test_sharing_a_stream_between_draft_and_accept_is_detected():
    """Not vacuous: if the devices drew their drafts with the accept test's uniforms, the accept
    test would no longer be independent of the draft, and the law breaks."""
    tables = Logits(seed=4)
    run_rows = torch.zeros(DRAWS, dtype=torch.bool)
    first, second = _keyed_two_tokens(tables, run_rows, 1, "pick", "exact", draft_stream=ACCEPT)
    joint, _ = _oracle(tables, ROW_RUN)
    assert chisquare(np.bincount(first * V + second, minlength=V * V), joint * DRAWS).pvalue < 1e-6


# ---- reproducibility through the engine -------------------------------------------------------
VOCAB = 64
NEW = 12


@pytest.fixture(scope="module")
def models():
    """One drafter: a sequence's draft path then depends only on the sequence itself. With several
    drafters the path also depends on the bias-aware weights and the roster, which every sequence
    of the run shapes (docs/DESIGN.md, "Randomness"): see the last test of this block."""
    return tiny_llama(seed=0, vocab_size=VOCAB), [tiny_llama(seed=1, vocab_size=VOCAB)]


def _run(models, items, depth="1", run_seed=0, max_active=16, adaptive=True):
    """``items``: (prompt ids, options) -> the generated tokens per item, through a Coordinator and
    the pipelined loop with devices on worker threads (what ``InProcessEngine.generate`` does,
    with the per-prompt seed passed to ``submit``). ``adaptive`` (the default): the other rows'
    gamma and K follow measured timings, a seeded row keeps draft-length and top-k."""
    target, drafts = models
    config = SpecFedConfig(top_k=4, draft_length=3, max_new_tokens=NEW, max_k=VOCAB, temperature=1.0, seed=run_seed,
                           pipeline_depth=depth, max_active_sequences=max_active, draft_ahead=True, adaptive=adaptive)
    engine = InProcessEngine(target, drafts, config, eos_token_ids=[])
    coordinator = Coordinator(engine.target, config, eos_token_ids=[])
    for i, (prompt, options) in enumerate(items):
        coordinator.submit(prompt, index=i, **options)
    transport = ThreadTransport(engine.clients)
    try:
        run_rounds(coordinator, transport, list(engine.clients), depth=config.depth(),
                   round_timeout=config.round_timeout, max_rounds=config.max_rounds)
    finally:
        transport.close()
    return [s.token_ids for s in sorted(coordinator.finished, key=lambda r: r.index)]


P = [5, 9, 2, 7]
OTHERS = [([3, 3, 1], {}), ([8, 1, 4, 4, 2], {"seed": 11}), ([6], {"temperature": 0.5}), ([2, 9], {"top_p": 0.7})]


def test_same_prompt_and_seed_reproduce_whatever_else_runs(models):
    me = (P, {"seed": 1234})
    alone = _run(models, [me])[0]
    assert len(alone) == NEW
    assert _run(models, [me] + OTHERS, depth="3")[0] == alone
    assert _run(models, OTHERS[::-1] + [me], depth="auto")[-1] == alone
    assert _run(models, OTHERS[:2] + [me] + OTHERS[2:], depth="1", max_active=2)[2] == alone  # other cohorts
    assert _run(models, [me], run_seed=77)[0] == alone  # the prompt's seed, not the run's
    twice = _run(models, [me, (P, {"seed": 1234}), (P, {"seed": 99})], depth="3")
    assert twice[0] == twice[1] == alone
    assert twice[2] != alone  # another seed samples another output


def test_own_temperature_and_top_p_with_a_seed_reproduce(models):
    me = (P, {"seed": 5, "temperature": 0.6, "top_p": 0.9})
    alone = _run(models, [me], depth="1")[0]
    assert _run(models, OTHERS + [me], depth="3")[-1] == alone
    assert _run(models, [(P, {"seed": 5})], depth="1")[0] != alone  # the row's own law is used


def test_without_a_seed_the_run_seed_and_index_decide(models):
    """Rows without their own seed reproduce at fixed settings (with ``adaptive`` their gamma follows
    measured timings, so only their law is fixed)."""
    a = _run(models, [(P, {}), (P, {})], depth="1", adaptive=False)
    assert a[0] != a[1]  # two sequences, two keys
    assert _run(models, [(P, {}), (P, {})], depth="3", adaptive=False) == a  # still independent of the depth
    assert _run(models, [(P, {}), (P, {})], depth="1", run_seed=1, adaptive=False) != a


def test_several_drafters_reproduce_the_same_run(models):
    """With two drafters a seeded prompt is reproduced by the same prompt file at the same fixed
    depth and fixed settings (weights and roster evolve identically: with ``adaptive`` the other
    rows' drafts, which shape the weights, follow measured timings), and another seed still
    changes it."""
    two = (models[0], models[1] + [tiny_llama(seed=2, vocab_size=VOCAB)])
    items = OTHERS[:2] + [(P, {"seed": 1234})] + OTHERS[2:]
    first = _run(two, items, depth="2", adaptive=False)
    assert _run(two, items, depth="2", adaptive=False) == first
    assert _run(two, items[:2] + [(P, {"seed": 4321})] + items[3:], depth="2", adaptive=False)[2] != first[2]


def test_a_bad_seed_is_refused_at_submit(models):
    from specfed_flwr.target import TargetVerifier

    coordinator = Coordinator(TargetVerifier(models[0], vocab_size=VOCAB), SpecFedConfig(max_k=VOCAB))
    for bad in (-1, 2**63, 1.5, "3", True):
        with pytest.raises(ValueError, match="seed must be an integer in 0..2"):
            coordinator.submit(P, seed=bad)


# ---- devices draft each row from its own sampler ----------------------------------------------
def test_devices_draft_each_row_from_its_own_law():
    from specfed_flwr.client_core import DraftClient
    from specfed_flwr.proposer import HFDraftProposer

    draft = tiny_llama(seed=3, vocab_size=VOCAB)
    client = DraftClient(HFDraftProposer(draft))
    prompt = [5, 9, 9, 2]
    rows = [(0.5, 1.0, 2), (1.5, 0.3, 0)]
    request = DraftRequest.build([(1, 0, prompt, 2), (2, 0, prompt, 2)], k=8, temperature=1.0, sampling="sparse",
                                 seed=0, round=1, keys=[sequence_key(4), sequence_key(4)], rows=rows)
    request = DraftRequest.from_parts(request.arrays(), request.config())  # over the wire
    reply, _ = client.handle(request)
    with torch.inference_mode():
        logits = draft(torch.tensor([prompt])).logits[0, -1:]
    for row, (t, p, k) in enumerate(rows):
        want = warped_probs(logits, SamplingSettings(temperature=t, top_p=p, top_k=k))[0]
        sent = dict(zip(reply.token_ids[row, 0].tolist(), reply.probs[row, 0].astype(np.float32).tolist()))
        support = set(torch.nonzero(want).flatten().tolist())
        assert {tok for tok, q in sent.items() if q > 0} == support or len(support) > 8
        for tok in support & set(sent):
            assert abs(sent[tok] - float(want[tok])) < 2e-3
    assert (reply.probs[0, :, :].astype(np.float32) > 0).sum(-1).max() <= 2  # top-k 2 of the first row


# ---- the wire ------------------------------------------------------------------------------
def _request():
    return DraftRequest.build([(5, 0, [1, 2, 3], 4), (9, 7, [8], 2)], k=8, temperature=1.0, sampling="sparse", seed=1,
                              round=3, keys=[7, 2**63 - 1], rows=[(0.5, 0.9, 0), (1.0, 1.0, 3)])


def test_row_keys_and_samplers_roundtrip():
    back = DraftRequest.from_parts(_request().arrays(), _request().config())
    assert back.keys.tolist() == [7, 2**63 - 1] and back.temperatures.tolist() == [0.5, 1.0]
    assert back.top_ps.tolist() == [0.9, 1.0] and back.top_ks.tolist() == [0, 3]


@pytest.mark.parametrize("field,value,message", [
    ("keys", None, "missing 'keys'"),
    ("temperatures", None, "missing 'temperatures'"),
    ("keys", np.array([1.0, 2.0]), "'keys' has dtype float64"),
    ("temperatures", np.array([1, 1]), "'temperatures' has dtype int64"),
    ("keys", np.array([1, -2]), "negative randomness key"),
    ("keys", np.array([1]), r"'keys' has shape \(1,\)"),
    ("temperatures", np.array([0.0, 1.0]), "row sampler out of range"),
    ("top_ps", np.array([1.5, 1.0]), "row sampler out of range"),
    ("top_ks", np.array([0, -1], dtype=np.int32), "row sampler out of range"),
    ("temperatures", np.array([np.nan, 1.0]), "row sampler out of range"),
])
def test_bad_row_fields_are_refused(field, value, message):
    arrays = _request().arrays()
    if value is None:
        del arrays[field]
    else:
        arrays[field] = value
    with pytest.raises(ProtocolError, match=message):
        DraftRequest.from_parts(arrays, _request().config())


def test_the_in_process_engine_passes_a_prompts_own_seed(models):
    """``InProcessEngine.generate(options=...)`` (what ``specfed-flwr generate`` uses) hands a
    prompt's seed to the coordinator: alone or among other prompts, the output is the same."""
    target, drafts = models
    config = SpecFedConfig(top_k=4, draft_length=3, max_new_tokens=NEW, max_k=VOCAB, temperature=1.0,
                           pipeline_depth="1", draft_ahead=True)
    alone = InProcessEngine(target, drafts, config, eos_token_ids=[]).generate([P], options=[{"seed": 1234}])
    crowd = InProcessEngine(target, drafts, config, eos_token_ids=[]).generate(
        [o[0] for o in OTHERS] + [P], options=[o[1] for o in OTHERS] + [{"seed": 1234}])
    other = InProcessEngine(target, drafts, config, eos_token_ids=[]).generate([P], options=[{"seed": 99}])
    assert crowd.token_ids[-1] == alone.token_ids[0]
    assert other.token_ids[0] != alone.token_ids[0]
