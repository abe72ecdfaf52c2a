"""The OPT MLP as the model's block computes it, for each kind of `sparsity.MLPRows`.

Weights use one layout for every path: `fc1_w` [ffn, d] (Hugging Face fc1.weight), `fc1_b` [ffn],
`fc2_w_t` [ffn, d] (fc2.weight transposed, neuron-major so a neuron's weights are contiguous rows), `fc2_b` [d].
Every path accumulates in fp32 and rounds the hidden activation to x.dtype, so with every neuron chosen a sparse
path equals the dense one to accumulation-order rounding.

- `mlp_dense`: XLA's dense MLP.
- `mlp_per_token_rows`: whole-sequence forwards: each token's chosen neurons (a [..., ffn] mask) give relu(fc1),
  the others exact zeros, then fc2 — the function the decode kernels compute, in one batched pass.
- `mlp_decode_rows`: one decode step on the row-masked Pallas kernels (`kernels/masked_mlp.py`): only chosen rows of
  fc1, and only rows with a nonzero ReLU output of fc2, are read.
- `mlp_decode_rows_split`: the same over neurons split across a tp mesh (`dejavu_jax.parallel`): each device runs
  the kernels over its own neurons inside `shard_map`, then one all-reduce adds the partial fc2 outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dejavu_jax.parallel import TP_AXIS

from kernels.masked_mlp import masked_fc1, nonzero_fc2, threshold_fc1


def _precision(dtype):
    # fp32 is the test / reference dtype: keep it full precision rather than TF32 on GPU.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def mlp_hidden(x, fc1_w, fc1_b):
    """relu(x @ fc1_w.T + fc1_b) [..., ffn] in x.dtype (fp32 accumulation)."""
    pre = jnp.einsum("...d,fd->...f", x, fc1_w, preferred_element_type=jnp.float32, precision=_precision(x.dtype))
    return jnp.maximum(pre + fc1_b.astype(jnp.float32), 0.0).astype(x.dtype)


def mlp_output(h, fc2_w_t, fc2_b):
    """h @ fc2_w_t + fc2_b [..., d] in h.dtype (fp32 accumulation)."""
    out = jnp.einsum("...f,fd->...d", h, fc2_w_t, preferred_element_type=jnp.float32, precision=_precision(h.dtype))
    return (out + fc2_b.astype(jnp.float32)).astype(h.dtype)


def mlp_dense(x, fc1_w, fc1_b, fc2_w_t, fc2_b, return_hidden: bool = False):
    """relu(x @ fc1_w.T + fc1_b) @ fc2_w_t + fc2_b for x [..., d], fp32 accumulation, x.dtype out.

    With `return_hidden`, also the post-ReLU hidden activation [..., ffn] (predictor labels come from it).
    """
    h = mlp_hidden(x, fc1_w, fc1_b)
    out = mlp_output(h, fc2_w_t, fc2_b)
    return (out, h) if return_hidden else out


def mlp_per_token_rows(x, fc1_w, fc1_b, fc2_w_t, fc2_b, chosen):
    """x [..., d], chosen [..., ffn] bool -> out [..., d]: each token's MLP over its chosen neurons."""
    h = jnp.where(chosen, mlp_hidden(x, fc1_w, fc1_b), 0).astype(x.dtype)
    return mlp_output(h, fc2_w_t, fc2_b)


def mlp_decode_rows(
    x, fc1_w, fc1_b, fc2_w_t, fc2_b, kind: str, mask=None, hidden=None, predictor=None, knobs: tuple = ()
):
    """x [B, d] (one decode step) -> out [B, d] on the row-masked kernels.

    kind "mask": the rows where mask [ffn] != 0; "threshold": the rows whose score from `hidden` [B, r] and
    `predictor` (a `sparsity.MLPPredictor`) reaches its threshold, chosen inside the fc1 kernel; "lossless": dense
    fc1 (XLA). fc2 reads only the rows whose h is nonzero for some batch row. `knobs`: the kernels' plan overrides
    (`kernels.masked_mlp.MaskedMLPPlan` fields; empty = its per-shape defaults).
    """
    if kind == "mask":
        h = masked_fc1(x, fc1_w, fc1_b, mask, knobs=knobs)
    elif kind == "threshold":
        h = threshold_fc1(x, fc1_w, fc1_b, hidden, predictor.w2_t, predictor.b2, predictor.threshold, knobs=knobs)
    elif kind == "lossless":
        h = mlp_hidden(x, fc1_w, fc1_b)
    else:
        raise ValueError(f"kind must be 'mask', 'threshold' or 'lossless'. Got {kind!r}")
    return nonzero_fc2(h, fc2_w_t, fc2_b, knobs=knobs)


def mlp_decode_rows_split(mesh, x, fc1_w, fc1_b, fc2_w_t, fc2_b, kind: str, mask=None, knobs: tuple = ()):
    """`mlp_decode_rows` of kind "mask" for weights split on ffn over `mesh`'s tp axis (the Megatron layout):
    x [B, d] replicated, mask [ffn] split like the neurons. Each device computes fc1 over its chosen neurons and fc2
    over its nonzero ones, a partial [B, d] without the bias; one psum (fp32) adds them and fc2_b is added once.
    The partials are rounded to x.dtype before the sum, so in half precision this differs from one device by
    rounding."""
    if kind != "mask":
        raise ValueError(
            f"sparse decoding over a tp mesh supports fixed row masks (kind 'mask') only. Got kind {kind!r}"
        )

    def local(x, fc1_w, fc1_b, fc2_w_t, mask):  # this device's neurons: fc1_w, fc2_w_t [ffn/tp, d], mask [ffn/tp]
        h = masked_fc1(x, fc1_w, fc1_b, mask, knobs=knobs)
        partial = nonzero_fc2(h, fc2_w_t, jnp.zeros((fc2_w_t.shape[1],), h.dtype), knobs=knobs)
        return lax.psum(partial.astype(jnp.float32), TP_AXIS)

    split = P(TP_AXIS)
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(), split, split, split, split), out_specs=P(), check_vma=False)(
        x, fc1_w, fc1_b, fc2_w_t, mask
    )
    return (out + fc2_b.astype(jnp.float32)).astype(x.dtype)
