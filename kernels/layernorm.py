"""LayerNorm applied by a kernel to the rows of x it loads, so the decode step runs no LayerNorm kernels before it.

The model's LayerNorm (`dejavu_jax.model.layer_norm`): one pass in fp32 (mean E[x], variance E[x^2] - E[x]^2), the
normalised, scaled and shifted row rounded to x's dtype. Every program of a kernel recomputes a row's statistics
from x (a few KB, from L2) in its prologue, then normalises each column block as it loads it.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.block_math import block_total


def _plain_load(ref_at):
    return ref_at[...]


def row_stats(x_ref, rows: int, d: int, block_d: int, eps: float, once: bool = True, load=_plain_load) -> list:
    """[(mean, 1 / std)] per row of x_ref [rows, d] in fp32, walking d in blocks of `block_d` (which divides d);
    `once`: each sum reduces its blocks once (`kernels.block_math.block_total`); `load(ref_at)` reads a block."""
    stats = []
    for b in range(rows):
        blocks = [load(x_ref.at[b, pl.ds(c0, block_d)]).astype(jnp.float32) for c0 in range(0, d, block_d)]  # static
        total, squares = block_total(blocks, once), block_total([v * v for v in blocks], once)
        stats.append(stats_from_sums(total, squares, d, eps))
    return stats


def stats_from_sums(total, squares, d: int, eps: float):
    """(mean, 1 / std) of a row of d values from their sum and sum of squares: the model's one-pass formula."""
    mean = total / d
    return mean, lax.rsqrt(jnp.maximum(squares / d - mean * mean, 0.0) + eps)


def normalized_block(x_ref, b: int, cols, stats: list, scale_ref, bias_ref, load=_plain_load):
    """LayerNorm(x)[b, cols] as fp32 values of x's dtype (rounded as the model rounds them)."""
    mean, rstd = stats[b]
    v = load(x_ref.at[b, cols]).astype(jnp.float32)
    y = (v - mean) * rstd * scale_ref[cols].astype(jnp.float32) + bias_ref[cols].astype(jnp.float32)
    return y.astype(x_ref.dtype).astype(jnp.float32)


# ---- the LayerNorm between the callers, the kernel wrappers and their pallas_calls --------------------------------
# A caller holds it as `layernorm` = (scale [d], bias [d], eps) or None; a jitted wrapper takes it as the keyword
# arguments ln_scale, ln_bias and ln_eps (eps static); a pallas_call takes scale and bias as inputs, eps in the kernel.


def wrapper_kwargs(layernorm) -> dict:
    """`layernorm` as a kernel wrapper's ln_scale / ln_bias / ln_eps keywords ({} for None)."""
    return {} if layernorm is None else dict(zip(("ln_scale", "ln_bias", "ln_eps"), layernorm))


def checked(ln_scale, ln_bias, ln_eps, d: int):
    """A wrapper's keywords back as `layernorm` (None without a LayerNorm), scale and bias checked to be [d]."""
    if ln_scale is None and ln_bias is None:
        return None
    if ln_scale is None or ln_bias is None or ln_scale.shape != (d,) or ln_bias.shape != (d,):
        raise ValueError(f"the LayerNorm needs scale and bias of shape [d] = [{d}]")
    return ln_scale, ln_bias, float(ln_eps)


def call_args(layernorm) -> tuple:
    """(eps for the kernel or None, the pallas_call inputs: (scale, bias) or ())."""
    return (None, ()) if layernorm is None else (layernorm[2], tuple(layernorm[:2]))
