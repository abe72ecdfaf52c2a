"""The OPT MLP as the model calls it: dense XLA, or the sparse-neuron kernel when it is faster.

Weights use one layout for both paths: `fc1_w` [ffn, d] (Hugging Face fc1.weight), `fc1_b` [ffn],
`fc2_w_t` [ffn, d] (fc2.weight transposed, neuron-major so a neuron's weights are contiguous rows),
`fc2_b` [d]. Both paths accumulate in fp32 and round the hidden activation to x.dtype, so with every
neuron selected the sparse path equals the dense one to accumulation-order rounding.
"""

from __future__ import annotations

import bisect
import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels.sparse_mlp import MAX_BATCH, plan_sparse_mlp, sparse_mlp

# Density K / ffn above which the dense MLP is at least as fast as the sparse kernel, by batch size
# (batch sizes between keys interpolate linearly in log2(batch); outside, the nearest key).
# Measured on an H100 (bench/results/kernels_mlp_NVIDIA-H100-80GB-HBM3_2026-11-25.md, opt-6.7b/13b/66b,
# densities 2.5-50%): sparse beats dense at every measured density up to 50% at batch 1, 16 and 64
# (1.4-1.9x at 50%); at batch 4 (multiply-and-sum path, no tensor cores) dense wins from ~38% (opt-66b)
# to ~43% (opt-13b).
SPARSE_CROSSOVER_DENSITY: dict[int, float] = {1: 0.5, 4: 0.38, 16: 0.5, 64: 0.5}


def crossover_density(batch: int) -> float:
    """The largest density at which the sparse kernel still beats dense, for `batch` rows."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1. Got {batch}")
    keys = sorted(SPARSE_CROSSOVER_DENSITY)
    if batch <= keys[0]:
        return SPARSE_CROSSOVER_DENSITY[keys[0]]
    if batch >= keys[-1]:
        return SPARSE_CROSSOVER_DENSITY[keys[-1]]
    hi = bisect.bisect_left(keys, batch)
    lo_key, hi_key = keys[hi - 1], keys[hi]
    t = (math.log2(batch) - math.log2(lo_key)) / (math.log2(hi_key) - math.log2(lo_key))
    lo_val, hi_val = SPARSE_CROSSOVER_DENSITY[lo_key], SPARSE_CROSSOVER_DENSITY[hi_key]
    return lo_val + t * (hi_val - lo_val)


def use_sparse_mlp(batch: int, k: int, ffn: int) -> bool:
    """Whether `k` active neurons of `ffn` at this batch size should run the sparse kernel."""
    return batch <= MAX_BATCH and k / ffn <= crossover_density(batch)


def round_k_to_block(k: int, *, ffn: int, d: int, batch: int = 1, dtype=jnp.float16,
                     variant: str | None = None) -> int:
    """K rounded up to the sparse kernel's K multiple (padding is free of effect but not of cost), <= ffn.

    Use it when calibrating K per layer, so the kernel reads no padded rows.
    """
    if not 0 <= k <= ffn:
        raise ValueError(f"k must be in [0, ffn={ffn}]. Got {k}")
    if k == 0:
        return 0
    kwargs = {} if variant is None else {"variant": variant}
    rounded = k
    for _ in range(8):  # Blocks depend on K (small K, smaller blocks); settles in a step or two.
        multiple = plan_sparse_mlp(batch, rounded, d, dtype, **kwargs).k_multiple
        nxt = min(ffn, -(-rounded // multiple) * multiple)
        if nxt == rounded:
            break
        rounded = nxt
    return rounded


def _precision(dtype):
    # fp32 is the test / reference dtype: keep it full precision rather than TF32 on GPU.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def mlp_dense(x, fc1_w, fc1_b, fc2_w_t, fc2_b, return_hidden: bool = False):
    """relu(x @ fc1_w.T + fc1_b) @ fc2_w_t + fc2_b for x [..., d], fp32 accumulation, x.dtype out.

    With `return_hidden`, also the post-ReLU hidden activation [..., ffn] (predictor labels come from it).
    """
    precision = _precision(x.dtype)
    pre = jnp.einsum("...d,fd->...f", x, fc1_w, preferred_element_type=jnp.float32,
                     precision=precision)
    h = jnp.maximum(pre + fc1_b.astype(jnp.float32), 0.0).astype(x.dtype)    # [..., ffn]
    out = jnp.einsum("...f,fd->...d", h, fc2_w_t, preferred_element_type=jnp.float32,
                     precision=precision)
    out = (out + fc2_b.astype(jnp.float32)).astype(x.dtype)
    return (out, h) if return_hidden else out


def mlp_sparse_or_dense(x, fc1_w, fc1_b, fc2_w_t, fc2_b, active_idx, *, interpret: bool = False,
                        variant: str | None = None):
    """The MLP over the neurons in `active_idx` [K] for x [..., d]; dense when K/ffn is too high.

    The choice is static (K and the row count are shapes). Dense computes every neuron, i.e. it is
    the exact MLP rather than the sparse approximation: past the crossover it is both faster and
    at least as accurate.
    """
    ffn, d = fc1_w.shape
    rows = math.prod(x.shape[:-1])
    k = active_idx.shape[0]
    if rows == 0 or not use_sparse_mlp(rows, k, ffn):
        return mlp_dense(x, fc1_w, fc1_b, fc2_w_t, fc2_b)
    kwargs = {} if variant is None else {"variant": variant}
    out = sparse_mlp(x.reshape(rows, d), fc1_w, fc1_b, fc2_w_t, fc2_b, active_idx,
                     interpret=interpret, **kwargs)
    return out.reshape(x.shape)


def mlp_sparse_per_token(x, fc1_w, fc1_b, fc2_w_t, fc2_b, active_idx, *, chunk: int = 64):
    """Each token's own neurons: x [N, d], active_idx [N, K] -> [N, d], reading only the chosen rows.

    For whole-sequence forwards (perplexity, tasks), where every token has its own prediction and the union over
    a window would be nearly dense. Rows are gathered per token (the kernel's reference semantics, one token at a
    time), in chunks of `chunk` tokens to bound the [chunk, K, d] gathers.
    """
    n, d = x.shape
    if active_idx.ndim != 2 or active_idx.shape[0] != n:
        raise ValueError(f"active_idx must be [tokens, K] for x [tokens, d]. Got {active_idx.shape} and {x.shape}")
    precision = _precision(x.dtype)
    pad = (-n) % chunk
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    idxs = jnp.pad(active_idx, ((0, pad), (0, 0))).reshape(-1, chunk, active_idx.shape[1])

    def one_chunk(args):
        xc, ic = args  # [chunk, d], [chunk, K]
        pre = jnp.einsum("cd,ckd->ck", xc, fc1_w[ic], preferred_element_type=jnp.float32, precision=precision)
        h = jnp.maximum(pre + fc1_b[ic].astype(jnp.float32), 0.0).astype(x.dtype)
        out = jnp.einsum("ck,ckd->cd", h, fc2_w_t[ic], preferred_element_type=jnp.float32, precision=precision)
        return (out + fc2_b.astype(jnp.float32)).astype(x.dtype)

    return jax.lax.map(one_chunk, (xs, idxs)).reshape(-1, d)[:n]
