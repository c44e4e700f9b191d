"""The one protocol the engine uses to run a model; the backends (specserve/backends) implement it.

A backend object is one sequence on a model: it holds that sequence's KV cache. `eval` appends tokens and
returns logits; `truncate` rolls the cache back to a prefix (how rejected draft tokens are undone); `reset`
empties it. `new_sequence` opens another sequence on the same weights, and `eval_batch` appends to several
sequences of one model in one pass (how concurrent requests share a forward pass).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # `specserve --help` imports this module (for its error type) and no numpy
    import numpy as np


class Backend(Protocol):
    name: str  # e.g. "llama.cpp" or "torch-int8"
    n_vocab: int
    n_ctx: int
    weights: object  # the model this sequence runs on, shared by all its sequences
    copies_prefix: bool  # whether `copy_prefix` can copy anything (else remembering sequences only pins memory)
    # Whether every row's logits are independent of the other rows of its pass, by construction (else which
    # window sizes are exact is measured: backends/choose.py)
    batch_invariant: bool
    # Whether `eval_batch` runs its sequences in one pass (its cost follows the total rows), or one after
    # another (the cost of each sequence's rows, added up): how the cost model prices a batch (engine/costs.py)
    batches_sequences: bool
    model_path: Path  # the file this backend runs

    @property
    def n_past(self) -> int:
        """Number of tokens in the KV cache."""
        ...

    def eval(self, tokens: list[int], all_logits: bool = True) -> np.ndarray:
        """Append tokens; return float32 logits [len(tokens), n_vocab], or [1, n_vocab] for the last
        position only when all_logits is False (a prefill needs just that)."""
        ...

    def truncate(self, length: int) -> None:
        """Drop every cached position from `length` on."""
        ...

    def reset(self) -> None: ...

    def new_sequence(self) -> Backend:
        """Another sequence on the same weights, with its own empty KV cache."""
        ...

    def copy_prefix(self, other: Backend, length: int) -> int:
        """Replace this sequence's cache by the first `length` positions of another sequence of the same
        model (prefix reuse); returns how many positions were copied (0 if unsupported)."""
        ...

    def eval_batch(self, work: list[tuple[Backend, list[int], bool]]) -> list[np.ndarray]:
        """`eval` for several sequences of this model at once: (sequence, tokens, all_logits) each."""
        ...

    def memory_bytes(self) -> int:
        """Bytes of weights this backend holds (for bench reports)."""
        ...


class ContextOverflowError(ValueError):
    """More tokens than the model's context window."""
