"""LayerNorm applied by a kernel to the rows of x it loads, so the decode step runs no LayerNorm kernels before it.

The model's LayerNorm (`dejavu_jax.model.layer_norm`): one pass in fp32 (mean E[x], variance E[x^2] - E[x]^2), the
normalised, scaled and shifted row rounded to x's dtype. Every program of a kernel recomputes a row's statistics
from x (a few KB, from L2) in its prologue, then normalises each column block as it loads it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def row_stats(x_ref, rows: int, d: int, block_d: int, eps: float) -> list:
    """[(mean, 1 / std)] per row of x_ref [rows, d] in fp32, walking d in blocks of `block_d` (which divides d)."""
    stats = []
    for b in range(rows):
        total, squares = 0.0, 0.0
        for c0 in range(0, d, block_d):  # static
            v = x_ref[b, pl.ds(c0, block_d)].astype(jnp.float32)
            total, squares = total + jnp.sum(v), squares + jnp.sum(v * v)
        mean = total / d
        stats.append((mean, lax.rsqrt(jnp.maximum(squares / d - mean * mean, 0.0) + eps)))
    return stats


def normalized_block(x_ref, b: int, cols, stats: list, scale_ref, bias_ref):
    """LayerNorm(x)[b, cols] as fp32 values of x's dtype (rounded as the model rounds them)."""
    mean, rstd = stats[b]
    v = x_ref[b, cols].astype(jnp.float32)
    y = (v - mean) * rstd * scale_ref[cols].astype(jnp.float32) + bias_ref[cols].astype(jnp.float32)
    return y.astype(x_ref.dtype).astype(jnp.float32)
