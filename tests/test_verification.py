"""``verification.py`` case by case, in the style of vLLM's rejection-sampler tests.

Each case names a situation (perfect match, early mismatch, empty draft, mixed lengths per row,
bonus token) and gives, per row, the target's choice at every position, the drafted tokens and
the draft length; the expected output follows from the rule alone. Sampling cases use point
masses (and p = q) so that the outcome does not depend on the random draw; the laws themselves
are checked by the chi-square tests in ``test_sampling_exactness.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from specfed_flwr.sparse import from_dense
from specfed_flwr.verification import verify_greedy, verify_sampling

V = 10
PAD = 9  # draft padding beyond a row's length: must be ignored


@dataclass
class Case:
    target: list[list[int]]  # per row: the target's choice at positions 0..G (G+1 entries)
    drafts: list[list[int]]  # per row: drafted tokens, padded with PAD to G
    lengths: list[int]  # per row: drafted positions
    accepted: list[int]  # expected accepted drafts per row
    tokens: list[list[int]]  # expected output per row: accepted drafts + correction/bonus


CASES = {
    "perfect_match": Case([[1, 2, 3, 4]], [[1, 2, 3]], [3], [3], [[1, 2, 3, 4]]),
    "early_mismatch": Case([[1, 2, 3, 4]], [[1, 5, 3]], [3], [1], [[1, 2]]),
    "first_token_mismatch": Case([[1, 2, 3, 4]], [[7, 2, 3]], [3], [0], [[1]]),
    "late_mismatch": Case([[1, 2, 3, 4]], [[1, 2, 8]], [3], [2], [[1, 2, 3]]),
    "empty_draft_no_positions": Case([[6]], [[]], [0], [0], [[6]]),
    "empty_draft_in_a_padded_batch": Case([[6, 2, 3]], [[PAD, PAD]], [0], [0], [[6]]),
    "padding_beyond_length_is_ignored": Case([[1, 2, 3, 4]], [[1, 2, PAD]], [2], [2], [[1, 2, 3]]),
    "mixed_lengths_per_row": Case(
        [[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1], [2, 3, 4, 5]],
        [[1, 2, 3], [5, PAD, PAD], [1, 0, PAD], [PAD, PAD, PAD]],
        [3, 1, 2, 0],
        [3, 1, 1, 0],
        [[1, 2, 3, 4], [5, 6], [1, 1], [2]],
    ),
    "bonus_token_after_a_short_full_accept": Case([[4, 8, 0]], [[4, PAD]], [1], [1], [[4, 8]]),
}


def _tensors(case: Case):
    g = max(len(d) for d in case.drafts)
    drafts = torch.tensor([d + [PAD] * (g - len(d)) for d in case.drafts], dtype=torch.long).reshape(len(case.drafts), g)
    lengths = torch.tensor(case.lengths, dtype=torch.long)
    target = torch.zeros(len(case.target), g + 1, V)  # [B, G+1, V] point masses
    for i, row in enumerate(case.target):
        for j, tok in enumerate(row[: g + 1]):
            target[i, j, tok] = 1.0
    return target, drafts, lengths


def _check(result, case: Case):
    assert result.num_accepted.tolist() == case.accepted
    assert [result.tokens_of(i) for i in range(len(case.tokens))] == case.tokens
    g = result.accepted.shape[1]
    assert result.accepted.tolist() == [[j < n for j in range(g)] for n in case.accepted]
    assert result.num_tokens.tolist() == [n + 1 for n in case.accepted]


@pytest.mark.parametrize("name", list(CASES))
def test_greedy(name):
    case = CASES[name]
    target, drafts, lengths = _tensors(case)
    logits = target * 7.0 - 3.0  # argmax = the target's choice
    _check(verify_greedy(logits, drafts, lengths), case)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_q", "sparse_q"])
@pytest.mark.parametrize("name", list(CASES))
def test_sampling_with_point_masses(name, sparse):
    """p a point mass on the target's choice, q a point mass on the drafted token: a draft is
    accepted iff it is the target's choice (p(x)/q(x) = 1 or 0); a rejection samples
    norm(max(0, p - q)) = the target's choice; a full accept samples the bonus from p."""
    case = CASES[name]
    target, drafts, lengths = _tensors(case)
    q = torch.nn.functional.one_hot(drafts.clamp_max(V - 1), V).float()  # [B, G, V]
    result = verify_sampling(target, from_dense(q) if sparse else q, drafts, lengths, torch.Generator().manual_seed(0))
    _check(result, case)


def test_sampling_accepts_every_draft_when_q_equals_p():
    """p = q (not point masses): u * q(x) < p(x) holds for every u in [0, 1), so each drafted
    token is accepted whatever it is, and the bonus token comes from p at the last position."""
    gen = torch.Generator().manual_seed(1)
    b, g = 64, 3
    p = torch.softmax(torch.randn(b, g + 1, V, generator=gen), dim=-1)  # [B, G+1, V]
    drafts = torch.multinomial(p[:, :g].reshape(-1, V), 1, generator=gen).reshape(b, g)
    result = verify_sampling(p, p[:, :g], drafts, torch.full((b,), g), gen)
    assert result.num_accepted.tolist() == [g] * b
    assert torch.equal(result.tokens[:, :g], drafts)


def test_sampling_accepts_a_token_the_draft_gave_no_mass_when_the_target_does():
    """q(x) = 0 < p(x) (possible with a reconstructed q_hat): min(1, p/q) = 1, accepted."""
    p = torch.zeros(1, 2, V)
    p[0, 0, 3] = 0.5
    p[0, 0, 4] = 0.5
    p[0, 1, 7] = 1.0
    q = torch.zeros(1, 1, V)
    q[0, 0, 4] = 1.0  # the draft "sent" token 3 with no mass on it
    result = verify_sampling(p, q, torch.tensor([[3]]), torch.tensor([1]), torch.Generator().manual_seed(0))
    assert result.tokens_of(0) == [3, 7]


def test_sampling_correction_comes_from_the_residual():
    """p = (0.5, 0.5) on tokens 1, 2 and q a point mass on 1: the draft 1 is accepted with
    probability 1/2; when rejected the correction is drawn from norm(max(0, p - q)) = token 2,
    never token 1 again."""
    b = 400
    p = torch.zeros(b, 2, V)
    p[:, 0, 1] = p[:, 0, 2] = 0.5
    p[:, 1, 5] = 1.0
    q = torch.zeros(b, 1, V)
    q[:, 0, 1] = 1.0
    result = verify_sampling(p, q, torch.ones(b, 1, dtype=torch.long), torch.ones(b, dtype=torch.long),
                             torch.Generator().manual_seed(0))
    rejected = result.num_accepted == 0
    assert 120 < int(rejected.sum()) < 280  # ~ Binomial(400, 1/2)
    assert set(result.tokens[rejected, 0].tolist()) == {2}
    assert set(result.tokens[~rejected, 1].tolist()) == {5}  # bonus after an accept
