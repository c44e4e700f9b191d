"""Prefix reuse: a new sequence starts from the KV cache of a live or recent one that shares its prompt
prefix, instead of recomputing it (the same system prompt, a chat that continues).

For the target the reuse is exact: only whole prefill chunks are copied, aligned at the chunk size from
position 0, so the copied keys and values are bit for bit what the new sequence's own prefill would
compute (the backends are batch-invariant and a chunk sees exactly the same earlier chunks). For the
draft any prefix will do: its numerics only change proposals, never the output.
"""

from __future__ import annotations

import collections

from specserve.engine.model import Sequence
from specserve.engine.proposers import common_prefix


class PrefixCache:
    """Recent sequences of one model with the prompt each started from; `fork` copies the best prefix."""

    def __init__(self, max_entries: int = 8, align: int = 1):
        self.align = align  # reuse only multiples of this many tokens (the prefill chunk for exactness)
        # The latest sequences, live or finished; a prompt region is never rewritten, so it can be read
        # while its own generation continues in the scheduler thread.
        self._entries: collections.deque[tuple[list[int], Sequence]] = collections.deque(maxlen=max_entries)

    def remember(self, prompt: list[int], sequence: Sequence) -> None:
        self._entries.append((prompt, sequence))

    def fork(self, prompt: list[int], sequence: Sequence, limit: int | None = None) -> int:
        """Fill a fresh `sequence` with the longest reusable prefix of `prompt`; returns its length."""
        limit = len(prompt) - 1 if limit is None else limit  # leave a token to evaluate: it gives the logits
        best, donor = 0, None
        for tokens, other in self._entries:
            shared = min(common_prefix(tokens, prompt), limit, other.n_past)
            shared -= shared % self.align
            if shared > best:
                best, donor = shared, other
        return sequence.copy_prefix(donor, best) if donor is not None else 0
