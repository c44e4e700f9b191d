"""Logit transforms shared by target and draft, so p and q are shaped alike (required for exactness)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Distribution actually sampled from: temperature, then top-k, then top-p (nucleus), float64.

    Works on one row [V] or a batch [n, V]. Greedy callers use argmax on raw logits instead.
    """
    x = np.asarray(logits, dtype=np.float64) / max(params.temperature, 1e-6)
    if params.top_k and params.top_k < x.shape[-1]:
        kth = np.partition(x, -params.top_k, axis=-1)[..., -params.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(axis=-1, keepdims=True)
    probs = np.exp(x)
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing the line stays in).
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= params.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def keep_top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Keep the k most likely tokens of a 1-D distribution, renormalized. A remote draft samples from this,
    so the sparse distribution it sends the verifier is exactly the one it drew from."""
    if k <= 0 or np.count_nonzero(probs) <= k:
        return probs
    keep = np.argpartition(probs, -k)[-k:]
    truncated = np.zeros_like(probs)
    truncated[keep] = probs[keep]
    return truncated / truncated.sum()


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw from a 1-D distribution."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))
