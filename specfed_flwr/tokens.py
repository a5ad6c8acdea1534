"""Text in and out: prompts to token ids (chat template), token ids to text, the EOS ids.

One module for it so that the server, the in-process engine, the benchmark and the tests turn a
prompt into the same ids (the target's own ``generate`` is only comparable on the same ids).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .round_report import SequenceResult


def format_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    """Token ids for a user message: the chat template with the assistant generation prompt when the
    tokenizer has one and ``chat`` is true, else the plain encoding."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(text)]


def encode_prompt(tokenizer: Any, prompt: str | Sequence[int], chat_template: bool) -> list[int]:
    """A text prompt through ``format_prompt``; a token-id prompt as it is."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer; pass token ids instead")
    return format_prompt(tokenizer, prompt, chat_template)


def decode_texts(tokenizer: Any, results: "list[SequenceResult]") -> None:
    """Fill ``text`` of every result (special tokens skipped)."""
    if tokenizer is None:
        return
    for r in results:
        r.text = tokenizer.decode(r.token_ids, skip_special_tokens=True)


def default_eos_ids(model: Any, tokenizer: Any = None) -> list[int]:
    """EOS ids the target's own ``generate`` would stop on."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
