"""A bigram language model behind the engine's Model protocol: a real implementation of the protocol, small
enough to reason about exactly (next-token logits depend on the last token only)."""

from pathlib import Path

import numpy as np

V = 5
TABLE = np.log(
    np.array(
        [
            [0.1, 0.5, 0.2, 0.1, 0.1],
            [0.2, 0.1, 0.4, 0.2, 0.1],
            [0.3, 0.3, 0.1, 0.2, 0.1],
            [0.1, 0.1, 0.1, 0.1, 0.6],
            [0.25, 0.25, 0.2, 0.2, 0.1],
        ]
    )
)


class TableModel:
    """A bigram language model behind the Model protocol; `passes` counts its sequences' evals."""

    name, n_vocab, n_ctx = "table", V, 1000
    model_path, converted_to = Path("table.gguf"), None  # no file: its weights are the table
    copies_prefix = False

    def __init__(self):
        self.passes = 0

    def new_sequence(self) -> "TableSequence":
        return TableSequence(self)

    def eval_batch(self, work):
        return [seq.eval(tokens, all_logits) for seq, tokens, all_logits in work]

    def memory_bytes(self):
        return 0


class TableSequence:
    """A sequence of a `TableModel` (its KV cache: the token list)."""

    def __init__(self, model: TableModel):
        self.model, self.tokens = model, []

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def eval(self, tokens, all_logits=True):
        self.model.passes += 1
        self.tokens += tokens
        rows = np.stack([TABLE[t] for t in tokens])
        return rows if all_logits else rows[-1:]

    def truncate(self, length):
        del self.tokens[length:]

    def reset(self):
        self.tokens = []

    def copy_prefix(self, other, length):
        return 0
