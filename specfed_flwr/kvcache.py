"""KV-cache helpers shared by the draft proposer and the target verifier."""

from __future__ import annotations


def crop_cache(cache, current_len: int, keep: int) -> int:
    """Drop cached positions past ``keep``; returns the new length.

    transformers 5.x only crops by a negative count (``crop(-n)`` removes the last n).
    """
    if cache is not None and current_len > keep:
        cache.crop(-(current_len - keep))
        return keep
    return current_len
