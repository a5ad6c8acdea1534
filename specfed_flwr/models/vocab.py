"""Which token ids a model's distributions cover, and whether a target and a draft share them:
``token_vocab_size`` (a tokenizer's ids capped by the model's output rows), ``tokenizer_fingerprint``
and ``check_vocab_compatible`` (refuses a pair whose ids would not mean the same)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch.nn as nn


class VocabularyMismatchError(ValueError):
    """The target and the draft do not share a vocabulary; their token ids would not mean the same."""


def _vocab_size_of(obj: Any) -> int:
    if hasattr(obj, "get_output_embeddings") and obj.get_output_embeddings() is not None:
        out = obj.get_output_embeddings()
        if hasattr(out, "out_features"):
            return int(out.out_features)
        if hasattr(out, "weight"):
            return int(out.weight.shape[0])
    if hasattr(obj, "config"):
        cfg = obj.config.get_text_config() if hasattr(obj.config, "get_text_config") else obj.config
        return int(cfg.vocab_size)
    if hasattr(obj, "get_vocab"):
        return len(obj)
    raise TypeError(f"cannot tell the vocabulary size of a {type(obj).__name__}")


def _split(obj: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a model, a tokenizer, or a (model, tokenizer) tuple."""
    if isinstance(obj, tuple) and len(obj) == 2:
        return obj[0], obj[1]
    if hasattr(obj, "get_vocab") and not isinstance(obj, nn.Module):
        return None, obj
    return obj, None


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """``{"vocab_size": len(tokenizer), "vocab_sha256": sha256 over the sorted (token, id) pairs}``."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    return {"vocab_size": int(len(tokenizer)), "vocab_sha256": digest.hexdigest()}


def token_vocab_size(model: Any, tokenizer: Any = None) -> int:
    """How many token ids this model's distributions cover: the tokenizer's ids, capped by the model's
    output rows.

    Checkpoints often pad the embedding/head matrix past the tokenizer (Qwen2.5 0.5B has 151936
    rows, 7B 152064, both for the same 151665-id tokenizer): the padding rows are no token, so they
    are kept out of every distribution (draft and target), the wire and the server. Without a
    tokenizer (tiny test models) every output row is a token.
    """
    rows = _vocab_size_of(model) if model is not None else None
    if tokenizer is None:
        if rows is None:
            raise TypeError("token_vocab_size needs a model or a tokenizer")
        return int(rows)
    n = int(len(tokenizer))
    return n if rows is None else min(n, int(rows))


def check_vocab_compatible(target_model_or_tok: Any, draft_model_or_tok: Any, *, target_name: str = "target",
                           draft_name: str = "draft") -> int:
    """Refuse a pair whose token ids would not mean the same thing; returns the shared vocabulary size.

    Each side may be a model, a tokenizer, or a ``(model, tokenizer)`` tuple. When both sides have
    a tokenizer, the tokenizers decide: same (token, id) table, else refused naming both. The
    models' padded output sizes may then differ (see ``token_vocab_size``); the shared vocabulary
    is the target's token ids, and the draft must have an output row for each. Without both
    tokenizers nothing shows which rows are padding, so the output sizes must be equal.
    """
    t_model, t_tok = _split(target_model_or_tok)
    d_model, d_tok = _split(draft_model_or_tok)
    if t_tok is not None and d_tok is not None:
        t_fp, d_fp = tokenizer_fingerprint(t_tok), tokenizer_fingerprint(d_tok)
        if t_fp != d_fp:
            raise VocabularyMismatchError(
                f"tokenizer mismatch: {target_name} has {t_fp['vocab_size']} tokens (vocab sha256 "
                f"{t_fp['vocab_sha256'][:12]}) but {draft_name} has {d_fp['vocab_size']} (vocab sha256 "
                f"{d_fp['vocab_sha256'][:12]}); the token ids would not mean the same"
            )
        shared = token_vocab_size(t_model, t_tok)
        if d_model is not None and _vocab_size_of(d_model) < shared:
            raise VocabularyMismatchError(
                f"vocabulary mismatch: {target_name} scores {shared} token ids but {draft_name} has only "
                f"{_vocab_size_of(d_model)} output rows; the draft cannot propose every token"
            )
        return int(shared)
    t_size = _vocab_size_of(t_model if t_model is not None else t_tok)
    d_size = _vocab_size_of(d_model if d_model is not None else d_tok)
    if t_size != d_size:
        raise VocabularyMismatchError(
            f"vocabulary mismatch: {target_name} has {t_size} tokens but {draft_name} has {d_size}; the draft must "
            "share the target's tokenizer (same vocabulary size and token ids; give both tokenizers to accept "
            "embedding matrices padded to different sizes)"
        )
    return int(t_size)
