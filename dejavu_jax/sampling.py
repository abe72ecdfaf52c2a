"""Token sampling: greedy, temperature, top-k, top-p, all traced so changing them never recompiles."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Host-side sampling settings, validated. temperature 0 (or greedy=True) is greedy decoding."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 and finite. Got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (0 turns it off). Got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off). Got {self.top_p}")

    def check_vocab(self, vocab_size: int) -> None:
        """top_k must not exceed the vocabulary (only known once the model is)."""
        if self.top_k > vocab_size:
            raise ValueError(
                f"top_k {self.top_k} exceeds the vocabulary of {vocab_size} tokens; use at most "
                f"{vocab_size}, or 0 for off"
            )

    def to_device(self) -> "SamplingParams":
        greedy = self.greedy or self.temperature == 0
        return SamplingParams(
            temperature=jnp.float32(0.0 if greedy else self.temperature),
            top_k=jnp.int32(self.top_k),
            top_p=jnp.float32(self.top_p),
        )


@struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [] float32; 0 means greedy
    top_k: jax.Array  # [] int32; 0 means off
    top_p: jax.Array  # [] float32; 1 means off


def sample_tokens(logits: jax.Array, rng: jax.Array, params: SamplingParams) -> jax.Array:
    """logits [B, V] float32 -> tokens [B] int32. Greedy skips the sort (a cond, not a select)."""
    return jax.lax.cond(
        params.temperature > 0, _sample, lambda l, r, p: jnp.argmax(l, axis=-1).astype(jnp.int32), logits, rng, params
    )


def _sample(logits, rng, params: SamplingParams):
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(params.temperature, 1e-6)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    # top-k: keep logits >= the k-th largest.
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    kth = jnp.take(sorted_logits, k - 1, axis=-1)[:, None]
    sorted_logits = jnp.where(jnp.arange(vocab)[None] < k, sorted_logits, -jnp.inf)
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p (always the first token).
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = (mass_before < params.top_p) & jnp.isfinite(sorted_logits)
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    masked = jnp.where((scaled >= kth) & (scaled >= threshold), scaled, -jnp.inf)
    return jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)
