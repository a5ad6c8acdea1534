"""Stop strings (run-wide ``stop`` and per prompt) and per-prompt overrides in a JSONL prompt file."""

from __future__ import annotations

import json

import pytest
import torch

from specfed_flwr.config import ConfigError, SpecFedConfig, load_config
from specfed_flwr.inprocess import InProcessEngine
from specfed_flwr.models import tiny_llama
from specfed_flwr.prompts import load_prompts, prompt_options

VOCAB = 64
NEW = 16


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


@pytest.fixture(scope="module")
def setup():
    target, draft = tiny_llama(seed=0, vocab_size=VOCAB), tiny_llama(seed=1, vocab_size=VOCAB)
    prompts = [[3, 8, 1], [9, 9, 2, 5]]
    oracle = []
    for p in prompts:
        x = torch.tensor([p])
        oracle.append(target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                      pad_token_id=0, eos_token_id=None)[0, len(p):].tolist())
    return target, draft, prompts, oracle


def _cut_at_stop(tokens, stops, tok):
    """The reference rule: the shortest prefix whose decoded text contains a stop string."""
    for n in range(1, len(tokens) + 1):
        if any(s in tok.decode(tokens[:n]) for s in stops):
            return tokens[:n], "stop"
    return tokens, "length"


def _engine(setup, **cfg):
    target, draft, _, _ = setup
    config = SpecFedConfig(top_k=4, draft_length=4, max_new_tokens=NEW, max_k=VOCAB, temperature=0.0, chat_template=False,
                           **cfg)
    return InProcessEngine(target, [draft], config, tokenizer=_tokenizer(), eos_token_ids=[])


def test_run_wide_stop_string_ends_like_the_reference(setup):
    _, _, prompts, oracle = setup
    tok = _tokenizer()
    stop = tok.decode([oracle[0][6]])  # a word the first prompt's output reaches mid-way
    result = _engine(setup, stop=json.dumps([stop, "never-there"])).generate(prompts)
    for seq, full in zip(result.sequences, oracle):
        want, reason = _cut_at_stop(full, [stop], tok)
        assert seq.token_ids == want and seq.finish_reason == reason
    assert result.sequences[0].finish_reason == "stop" and len(result.sequences[0].token_ids) <= 7


def test_per_prompt_overrides_from_jsonl(setup, tmp_path):
    _, _, prompts, oracle = setup
    tok = _tokenizer()
    stop = tok.decode([oracle[1][4]])
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt_ids": prompts[0], "max_new_tokens": 5}) + "\n"
                    + json.dumps({"prompt_ids": prompts[1], "stop": [stop]}) + "\n")
    assert prompt_options(str(path)) == [{"max_new_tokens": 5}, {"stop": [stop]}]
    result = _engine(setup).generate(load_prompts(str(path)), options=prompt_options(str(path)))
    assert result.sequences[0].token_ids == oracle[0][:5]
    assert result.sequences[1].token_ids == _cut_at_stop(oracle[1], [stop], tok)[0]
    assert result.sequences[1].finish_reason == "stop"


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x", "seed": -1}, r"p\.jsonl:1: seed must be an integer in 0\.\.2\*\*63-1, got -1"),
    ({"prompt": "x", "seed": 2.5}, r"p\.jsonl:1: seed must be an integer .* got 2\.5"),
    ({"prompt": "x", "seed": 3.0}, r"p\.jsonl:1: seed must be an integer .* got 3\.0"),
    ({"prompt": "x", "seed": "7"}, r"p\.jsonl:1: seed must be an integer .* got '7'"),
    ({"prompt": "x", "seed": True}, r"p\.jsonl:1: seed must be an integer .* got True"),
    ({"prompt": "x", "seed": 2**63}, r"p\.jsonl:1: seed must be an integer .* got 9223372036854775808"),
    ({"prompt": "x", "top_p": 1.5}, "top_p must be in"),
    ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"prompt": "x", "stop": [""]}, "config key 'stop'"),
])
def test_bad_prompt_records_fail_cleanly(tmp_path, record, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=message):
        prompt_options(str(path))


def test_a_bad_seed_names_its_line(tmp_path):
    """The line number is the record's, not the first one's; the largest seed is accepted."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a", "seed": 2**63 - 1}) + "\n\n" + json.dumps({"prompt": "b", "seed": -5}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: seed must be"):
        prompt_options(str(path))
    path.write_text(json.dumps({"prompt": "a", "seed": 2**63 - 1}) + "\n" + json.dumps({"prompt": "b", "seed": 0}) + "\n")
    assert prompt_options(str(path)) == [{"seed": 2**63 - 1}, {"seed": 0}]


def test_bad_stop_config_and_stop_without_tokenizer(setup):
    with pytest.raises(ConfigError, match="config key 'stop'"):
        load_config({"stop": "[1, 2]"})
    target, draft, prompts, _ = setup
    cfg = SpecFedConfig(max_k=VOCAB, stop="END")
    with pytest.raises(ValueError, match="stop strings need the target's tokenizer"):
        InProcessEngine(target, [draft], cfg, eos_token_ids=[]).generate(prompts)


def test_per_prompt_temperature_and_top_p_in_a_sampling_run(setup):
    """Row overrides change only the law that row is verified against: temperature 0 gives the
    target's greedy output (a point mass on the argmax), top_p 0.1 keeps every first token in the
    nucleus, and rows without overrides still sample at the run's temperature."""
    from specfed_flwr.sampling import SamplingSettings, warped_probs

    target, draft, prompts, oracle = setup
    config = SpecFedConfig(top_k=4, draft_length=4, max_new_tokens=NEW, max_k=VOCAB, temperature=1.5, seed=3)
    n = 60
    batch = [prompts[0]] + [prompts[1]] * n + [prompts[1]] * n
    options = [{"temperature": 0.0}] + [{"top_p": 0.1}] * n + [{}] * n
    result = InProcessEngine(target, [draft], config, eos_token_ids=[]).generate(batch, options=options)
    assert result.sequences[0].token_ids == oracle[0]
    with torch.inference_mode():
        logits = target(torch.tensor([prompts[1]])).logits[0, -1:]
    nucleus = set(torch.nonzero(warped_probs(logits, SamplingSettings(temperature=1.5, top_p=0.1))[0]).flatten().tolist())
    assert len(nucleus) < VOCAB // 4
    assert {s.token_ids[0] for s in result.sequences[1 : n + 1]} <= nucleus
    assert not {s.token_ids[0] for s in result.sequences[n + 1 :]} <= nucleus  # the run's own law is wider


def test_a_sampling_prompt_in_a_greedy_run_is_refused(setup):
    target, draft, prompts, _ = setup
    engine = InProcessEngine(target, [draft], SpecFedConfig(max_k=VOCAB, temperature=0.0), eos_token_ids=[])
    with pytest.raises(ValueError, match="needs a sampling run"):
        engine.generate(prompts[:1], options=[{"temperature": 0.8}])
