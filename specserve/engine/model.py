"""The protocols the engine runs models through; the backends (specserve/backends) implement them.

A `Model` is the weights of one model in this process: it opens `Sequence`s and evaluates several of them in
one pass (`eval_batch`, how concurrent requests share a forward pass). A `Sequence` is one token sequence's
KV cache on its model: `eval` appends tokens and returns logits, `truncate` rolls the cache back to a prefix
(how rejected draft tokens are undone), `reset` empties it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # `specserve --help` imports this module (for its error type) and no numpy
    import numpy as np


class Model(Protocol):
    name: str  # the backend, e.g. "llama.cpp" or "torch-q4"
    n_vocab: int
    n_ctx: int
    model_path: Path  # the file it runs
    # None: it runs the file's weights as they are; else the type it converted them to on load (torch-int8's
    # int8): another model, said so wherever the served model is named (`quantize.weights_in_words`)
    converted_to: str | None
    copies_prefix: (
        bool  # whether `Sequence.copy_prefix` can copy anything (else remembering sequences only pins memory)
    )
    # Whether every row's logits are independent of the other rows of its pass, by construction (else which
    # window sizes are exact is measured: backends/choose/)
    batch_invariant: bool
    # Whether `eval_batch` runs its sequences in one pass (its cost follows the total rows), or one after
    # another (the cost of each sequence's rows, added up): how the cost model prices a batch (engine/costs.py)
    batches_sequences: bool

    def new_sequence(self) -> Sequence:
        """A sequence on these weights, with its own empty KV cache."""
        ...

    def eval_batch(self, work: list[tuple[Sequence, list[int], bool]]) -> list[np.ndarray]:
        """`Sequence.eval` for several sequences of this model at once: (sequence, tokens, all_logits) each."""
        ...

    def memory_bytes(self) -> int:
        """Bytes of weights this model holds (for bench reports)."""
        ...


class Sequence(Protocol):
    model: Model  # the weights it runs on

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

    def reset(self) -> None:
        """Empty the cache (and give back what it holds, e.g. a llama.cpp context)."""
        ...

    def copy_prefix(self, other: Sequence, length: int) -> int:
        """Replace this sequence's cache by the first `length` positions of another sequence of the same
        model (prefix reuse); returns how many positions were copied (0 if unsupported)."""
        ...


class TokenText(Protocol):
    """What a generation needs of a tokenizer: each token's bytes (text is decoded from them incrementally,
    so a character split across tokens comes out whole) and the tokens that end a reply."""

    stop_ids: frozenset[int]

    def decode_bytes(self, ids: list[int]) -> bytes: ...


class ContextOverflowError(ValueError):
    """More tokens than the model's context window."""
