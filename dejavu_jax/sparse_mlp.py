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
- `mlp_decode_rows_split`: the same over neurons split across a tp mesh (`dejavu_jax.parallel`): each device chooses
  among and runs the kernels over its own neurons inside `shard_map`, then one all-reduce adds the partial fc2
  outputs (top-K selection then keeps each shard's share of K: see its docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dejavu_jax.parallel import TP_AXIS
from dejavu_jax.sparsity import topk_mask

from kernels.masked_mlp import MaskedMLPPlan, masked_fc1, nonzero_fc2, nonzero_fc2_residual, threshold_fc1


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


def fc2_finishes(knobs: tuple) -> bool:
    """Whether the decode kernels' `knobs` ask fc2 to add the residual itself (`MaskedMLPPlan.fc2_residual`)."""
    return bool(dict(knobs or ()).get("fc2_residual", MaskedMLPPlan.fc2_residual))


def mlp_decode_rows(
    x, fc1_w, fc1_b, fc2_w_t, fc2_b, kind: str, mask=None, hidden=None, predictor=None, knobs: tuple = (), finish=None
):
    """x [B, d] (one decode step) -> out [B, d] on the row-masked kernels.

    kind "mask": the rows where mask [ffn] != 0; "threshold": the rows whose score from `hidden` [B, r] and
    `predictor` (a `sparsity.MLPPredictor`) reaches its threshold, chosen inside the fc1 kernel; "topk": the union
    over the batch of each row's `predictor.k` best scores (`sparsity.topk_mask`); "lossless": dense fc1 (XLA). fc2
    reads only the rows whose h is nonzero for some batch row. `knobs`: the kernels' plan overrides
    (`kernels.masked_mlp.MaskedMLPPlan` fields; empty = its per-shape defaults). `finish` (residual [B, d], sync):
    fc2's launch also adds the residual (`nonzero_fc2_residual`); returns (residual + out, sync) instead.
    """
    h = _decode_hidden(x, fc1_w, fc1_b, kind, mask, hidden, predictor, predictor.k if kind == "topk" else 0, knobs)
    if finish is not None:
        return nonzero_fc2_residual(h, fc2_w_t, fc2_b, *finish, knobs=knobs)
    return nonzero_fc2(h, fc2_w_t, fc2_b, knobs=knobs)


DECODE_KINDS = ("mask", "threshold", "topk", "lossless")


def _decode_hidden(x, fc1_w, fc1_b, kind, mask, hidden, predictor, k: int, knobs):
    """relu(fc1) [B, ffn] of one decode step over the rows `kind` chooses (exact zeros elsewhere); "topk" keeps each
    batch row's `k` best scores."""
    if kind == "mask":
        return masked_fc1(x, fc1_w, fc1_b, mask, knobs=knobs)
    if kind == "threshold":
        return threshold_fc1(
            x,
            fc1_w,
            fc1_b,
            hidden,
            predictor.w2_t,
            predictor.b2,
            predictor.threshold,
            w2_scale=predictor.w2_scale,
            knobs=knobs,
        )
    if kind == "topk":
        chosen = topk_mask(predictor.scores_from_hidden(hidden), k)  # [B, ffn]
        return masked_fc1(x, fc1_w, fc1_b, jnp.any(chosen, axis=0).astype(jnp.int32), knobs=knobs)
    if kind == "lossless":
        return mlp_hidden(x, fc1_w, fc1_b)
    raise ValueError(f"kind must be one of {DECODE_KINDS}. Got {kind!r}")


def shard_topk(k: int, tp: int) -> int:
    """The neurons each of `tp` shards keeps under top-K selection of `k`: ceil(k / tp), so the shards together keep
    at least `k`."""
    return -(-k // tp)


def mlp_decode_rows_split(
    mesh, x, fc1_w, fc1_b, fc2_w_t, fc2_b, kind: str, mask=None, hidden=None, predictor=None, knobs: tuple = ()
):
    """`mlp_decode_rows` for weights split on ffn over `mesh`'s tp axis (the Megatron layout), each device choosing
    among and computing only its own neurons, with no collective but the one psum of the output.

    x [B, d] and `hidden` [B, r] (the predictor's first matmul) replicated; mask [ffn], and the predictor's w2_t
    [ffn, r] and b2 [ffn], split like the neurons (`parallel.shard_sparse_weights`); its threshold replicated. Per
    kind, on each device:
    - "mask": its rows where mask != 0;
    - "threshold": its rows whose score reaches the threshold: together exactly the single-device choice;
    - "lossless": dense fc1 over its neurons, then fc2 over the nonzero ones: exactly the single-device choice;
    - "topk": per shard, NOT the single-device choice: each device keeps the union over the batch of each row's
      `shard_topk(predictor.k, tp)` best scores among its own neurons, so every shard contributes equally (a shard
      holding more of the global best K loses some, a shard holding fewer adds its best others).
    Each device's fc2 gives a partial [B, d] without the bias; one psum (fp32) adds them and fc2_b is added once.
    The partials are rounded to x.dtype before the sum, so in half precision this differs from one device by
    rounding."""
    if kind not in DECODE_KINDS:
        raise ValueError(f"kind must be one of {DECODE_KINDS}. Got {kind!r}")
    k = shard_topk(predictor.k, mesh.shape[TP_AXIS]) if kind == "topk" else 0
    split, replicated = P(TP_AXIS), P()
    # Only the leaves a kind reads cross into shard_map; the predictor's first layer stays outside (its output
    # `hidden` is the replicated input).
    scorer = scorer_spec = None
    if predictor is not None:
        scorer = predictor.replace(w1_t=None, b1=None)
        scale_spec = None if scorer.w2_scale is None else split  # int8 codes' scales split with their rows
        scorer_spec = scorer.replace(w2_t=split, b2=split, threshold=replicated, w2_scale=scale_spec)

    def local(x, fc1_w, fc1_b, fc2_w_t, mask, hidden, scorer):  # this device's neurons: fc1_w, fc2_w_t [ffn/tp, d]
        h = _decode_hidden(x, fc1_w, fc1_b, kind, mask, hidden, scorer, k, knobs)
        partial = nonzero_fc2(h, fc2_w_t, jnp.zeros((fc2_w_t.shape[1],), h.dtype), knobs=knobs)
        return lax.psum(partial.astype(jnp.float32), TP_AXIS)

    in_specs = (replicated, split, split, split, split if mask is not None else None, replicated, scorer_spec)
    out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=replicated, check_vma=False)(
        x, fc1_w, fc1_b, fc2_w_t, mask, hidden, scorer
    )
    return (out + fc2_b.astype(jnp.float32)).astype(x.dtype)
