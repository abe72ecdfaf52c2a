"""Residual add + LayerNorm in one Pallas GPU launch, for the decode step.

    h_new = h + (delta + delta_bias) rounded to h.dtype
    y     = LayerNorm(h_new) * scale + bias          (fp32 statistics, y in h.dtype)

`delta` is a block's output before its bias (the fp32 product of out_proj or fc2); `delta_bias` may be None
(the delta is already final, e.g. the sparse MLP's output). Returns (h_new, y).

Why: at batch 1 XLA spends three small kernels on this (the bias + residual add, the LayerNorm statistics,
the normalisation), each ~1.5 us of launch and DRAM latency for 8 KB of data, twice per layer. One program
per row does all three with the row in registers: h_new is read back from nowhere.

The row is cut into power-of-two pieces (Triton vectors must be power-of-two long): d = 5120 is 4096 + 1024,
so every hidden size loads unmasked and in bounds. The arithmetic is the model's jnp LayerNorm's: one pass
E[x] and E[x^2] in fp32, variance clamped at 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.block_math import pow2_pieces

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _add_layer_norm_kernel(*refs, pieces, eps: float, has_bias: bool):
    if has_bias:
        h_ref, delta_ref, delta_bias_ref, scale_ref, bias_ref, h_out_ref, y_ref = refs
    else:
        h_ref, delta_ref, scale_ref, bias_ref, h_out_ref, y_ref = refs
    row = pl.program_id(0)
    d = sum(w for _, w in pieces)
    rows32, total, total_sq = [], jnp.float32(0.0), jnp.float32(0.0)
    for c0, w in pieces:
        cols = pl.ds(c0, w)
        delta = delta_ref[row, cols].astype(jnp.float32)
        if has_bias:
            delta = delta + delta_bias_ref[cols].astype(jnp.float32)
        h_new = h_ref[row, cols] + delta.astype(h_ref.dtype)    # rounded as the unfused path rounds
        h_out_ref[row, cols] = h_new
        x = h_new.astype(jnp.float32)
        total = total + jnp.sum(x)
        total_sq = total_sq + jnp.sum(x * x)
        rows32.append(x)
    mean = total / d
    var = jnp.maximum(total_sq / d - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + eps)
    for (c0, w), x in zip(pieces, rows32):
        cols = pl.ds(c0, w)
        y = (x - mean) * inv * scale_ref[cols].astype(jnp.float32) + bias_ref[cols].astype(jnp.float32)
        y_ref[row, cols] = y.astype(y_ref.dtype)


def _check_inputs(h, delta, delta_bias, scale, bias) -> None:
    if h.ndim != 2:
        raise ValueError(f"h must be rank 2 [rows, d]. Got shape {h.shape}")
    if jnp.dtype(h.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"h dtype must be one of float32, bfloat16, float16. Got {h.dtype}")
    if delta.shape != h.shape:
        raise ValueError(f"delta must have h's shape {h.shape}. Got {delta.shape}")
    d = h.shape[1]
    for name, arr in (("delta_bias", delta_bias), ("scale", scale), ("bias", bias)):
        if arr is not None and arr.shape != (d,):
            raise ValueError(f"{name} must be [d] = ({d},). Got {arr.shape}")


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_layer_norm(h, delta, delta_bias, scale, bias, *, eps: float, num_warps: int | None = None,
                   interpret: bool = False):
    """(h + (delta + delta_bias), LayerNorm of that) for h, delta [rows, d]; see the module docstring.

    delta may be any float dtype (fp32 for a product before its bias); delta_bias [d] or None.
    `interpret=True` runs the kernel in the Pallas interpreter (CPU tests).
    """
    _check_inputs(h, delta, delta_bias, scale, bias)
    rows, d = h.shape
    if num_warps is None:
        num_warps = 4 if d <= 4096 else 8
    has_bias = delta_bias is not None
    inputs = (h, delta) + ((delta_bias,) if has_bias else ()) + (scale, bias)
    return pl.pallas_call(
        functools.partial(_add_layer_norm_kernel, pieces=pow2_pieces(d), eps=eps, has_bias=has_bias),
        out_shape=(jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(h.shape, h.dtype)),
        grid=(rows,),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="add_layer_norm",
    )(*inputs)


def add_layer_norm_reference(h, delta, delta_bias, scale, bias, *, eps: float):
    """Pure-jnp twin of `add_layer_norm` (the model's unfused arithmetic)."""
    _check_inputs(h, delta, delta_bias, scale, bias)
    delta = delta.astype(jnp.float32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(jnp.float32)
    h_new = h + delta.astype(h.dtype)
    x = h_new.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return h_new, y.astype(h.dtype)
