"""Between engine objects and the wire messages of verifier.proto (both directions), and the auth metadata.

The generated stubs (verifier_pb2*.py) are committed; regenerate them with `make proto` after editing
verifier.proto.
"""

from __future__ import annotations

import numpy as np

from specserve.cluster import verifier_pb2 as pb
from specserve.engine.sampling import SamplingParams
from specserve.engine.target import Window

AUTH_HEADER = "authorization"  # gRPC metadata keys are lower case


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def params_to_wire(params: SamplingParams) -> pb.SamplingParams:
    wire = pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p)
    if params.seed is not None:
        wire.seed = params.seed
    return wire


def params_from_wire(wire: pb.SamplingParams) -> SamplingParams:
    """Only what verification uses: max_tokens and stop strings stay with the front-end."""
    seed = wire.seed if wire.HasField("seed") else None
    return SamplingParams(temperature=wire.temperature, top_k=wire.top_k, top_p=wire.top_p, min_p=wire.min_p, seed=seed)


def window_to_wire(window: Window) -> pb.Window:
    wire = pb.Window(append=window.append, drafts=window.drafts, predict=window.predict)
    if not window.params.greedy:  # greedy verification never looks at q: send tokens only
        for q in window.probs:
            if q is None:  # a point mass (n-gram drafts): no entries
                wire.dists.add()
            else:
                ids = np.flatnonzero(q)
                wire.dists.add(ids=ids.tolist(), probs=q[ids].tolist())
    return wire


class ProtocolError(ValueError):
    """A malformed message from a client."""


def window_from_wire(
    wire: pb.Window, n_vocab: int, params: SamplingParams, rng: np.random.Generator
) -> tuple[Window, int]:
    """The engine's Window, checked; also the number of tokens it adds to the cache before rollback."""
    tokens = [*wire.append, *wire.drafts]
    if not wire.append:
        raise ProtocolError("a window must append at least one token")
    if any(t < 0 or t >= n_vocab for t in tokens):
        raise ProtocolError(f"token id out of range [0, {n_vocab})")
    if wire.drafts and not wire.predict:
        raise ProtocolError("drafts in a window that asks for no verdict")
    probs: list[np.ndarray | None] = [None] * len(wire.drafts)
    if wire.dists:
        if len(wire.dists) != len(wire.drafts):
            raise ProtocolError(f"{len(wire.dists)} draft distributions for {len(wire.drafts)} drafts")
        for i, dist in enumerate(wire.dists):
            if not dist.ids:
                continue
            ids, values = np.asarray(dist.ids), np.asarray(dist.probs, dtype=np.float64)
            if len(ids) != len(values) or (ids < 0).any() or (ids >= n_vocab).any():
                raise ProtocolError(f"draft distribution {i}: ids and probs do not match the vocabulary")
            if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
                raise ProtocolError(f"draft distribution {i}: probabilities must be finite, >= 0, not all 0")
            q = np.zeros(n_vocab, dtype=np.float64)
            q[ids] = values
            probs[i] = q
    window = Window(
        append=list(wire.append), drafts=list(wire.drafts), probs=probs, predict=wire.predict, params=params, rng=rng
    )
    return window, len(tokens)
