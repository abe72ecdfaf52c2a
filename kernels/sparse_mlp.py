"""Sparse MLP: the OPT MLP computed over a chosen set of neurons only (DejaVu contextual sparsity).

    out = relu(x · fc1_w[idx]ᵀ + fc1_b[idx]) · fc2_w_t[idx] + fc2_b

Layout: `x` [B, d]; `fc1_w` [ffn, d] (Hugging Face layout, one row per neuron); `fc2_w_t` [ffn, d] (fc2's
weight stored neuron-major: row i holds neuron i's output weights); `active_idx` [K], the neurons computed
for the whole batch. A neuron's weights are two contiguous rows, so the kernels read only the K active rows
of each matrix, once: at batch 1 the op is bandwidth bound and its floor is 2·K·d·itemsize bytes / copy
bandwidth.

Numerics match the dense model run in the activation dtype: both matmuls accumulate in fp32, biases are
added in fp32, the hidden activation h = relu(·) is rounded to x.dtype before fc2 (as a dense bf16/fp16
model does), and the output is rounded to x.dtype. fp32 inputs use full-precision (non-TF32) dots. Every
sum has a fixed order (no atomics), so a result is the same run to run.

Design: two Triton-lowered Pallas kernels (the row gathers `w_ref[idx, pl.ds(..)]` need the Triton
lowering), planned by `plan_sparse_mlp` from the shapes:

* fc1, grid (Kp / block_k, split_d): a program gathers the fc1 rows of block_k neurons and reduces them
  against x over its share of the column blocks. With split_d = 1 it adds the bias, applies the ReLU and
  writes h [B, Kp] in x.dtype; with split_d > 1 it writes fp32 partial sums over d-ranges, which plain
  JAX finishes (sum, bias, ReLU). Splitting d gives small K enough programs to fill the GPU.
* fc2, grid (d / block_d, split_k): a program owns one column block of the output and gathers the fc2
  rows of its share of the neurons. With split_k = 1 it adds fc2_b and writes the output in x.dtype;
  with split_k > 1 the fp32 partial outputs are summed in plain JAX.

fc2 cannot start before h is complete, hence two launches. A one-kernel form (each program adding its
neurons' fc2 contribution to the output with fp32 atomics) and a two-launch form without the plain-JAX
glue (hand-prefetched loops) were measured slower and removed; the measurements, and why batch 1 stays
above its floor at small K, are in bench/results/NOTES.md.

Batch: below `DOT_MIN_BATCH` rows the kernels multiply and sum on the CUDA cores, unrolled over the rows
(x is not padded); from `DOT_MIN_BATCH` rows x is padded to a power of two >= 16 rows and the tiles go
through `dot` (tensor cores; Triton's dot needs >= 16 on each side). Above `MAX_BATCH` rows use the dense
MLP.

Padding: K is static; it is padded up to a multiple of block_k (`SparseMLPPlan.k_multiple`) with index 0
and the padded h columns are zeroed, so padding never changes the result (it costs reading fewer than
block_k extra rows; calibrate K to the multiple and there are none). d need not be a power of two: a
ragged last column block is shifted back to end at d and its already-covered columns are masked, so
every load and store is an unmasked power-of-two block.

Index contract: duplicate indices are allowed and count once per occurrence (a neuron listed twice
contributes twice). Indices are NOT range-checked inside the kernels: on GPU an index outside [0, ffn)
reads outside the weight rows (undefined result, possibly a fault); in interpret mode it is clamped.
Callers holding untrusted indices check them first. K = 0 returns fc2_b broadcast to [B, d].

`interpret=None` (the default) runs the Pallas interpreter unless the default backend is a GPU
(kernels/platform.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.block_math import cdiv, next_pow2, prev_pow2
from kernels.platform import resolve_interpret

# Batches from this size pad x to >= 16 rows and use tensor-core dots; smaller ones multiply-and-sum.
DOT_MIN_BATCH = 16
MAX_BATCH = 128
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Elements per weight tile load: 16 KiB of fp16 per program per loop step keeps enough bytes in
# flight per SM (Little's law: ~3 TB/s x ~0.7 us / 132 SMs ~ 16 KiB) without register spills.
_TILE_ELEMS = 8192
# Two programs per H100 SM (132 SMs): the splits aim for at least this many programs per kernel.
_TARGET_PROGRAMS = 264
_DEFAULT_BLOCK_D = 512
_MAX_BLOCK_D = 4096
# Cap on split_k's fp32 partial outputs: 1/2 of the fc2 bytes read, or 8 MB (they stay in L2).
_PARTIAL_BYTES_FRACTION = 2
_PARTIAL_BYTES_MIN = 8 << 20


@dataclasses.dataclass(frozen=True)
class SparseMLPPlan:
    """Static launch configuration, derived from shapes and knobs by `plan_sparse_mlp`."""

    batch: int  # B, rows of x
    batch_rows: int  # rows the kernels compute: B, or B padded to a power of two >= 16 for dots
    k: int  # active neurons
    k_padded: int  # K rounded up to block_k
    d: int
    block_k: int  # neurons per tile
    block_d: int  # columns per tile
    split_d: int  # fc1: programs sharing one k-block's reduction over d
    d_blocks_per_split: int
    split_k: int  # fc2: programs sharing one column block's reduction over K
    k_blocks_per_split: int
    use_dot: bool
    num_warps: int
    num_stages: int

    @property
    def k_multiple(self) -> int:
        """K is padded to a multiple of this (calibrate K to it and the kernels read no padded rows)."""
        return self.block_k

    @property
    def n_k_blocks(self) -> int:
        return self.k_padded // self.block_k

    @property
    def n_d_blocks(self) -> int:
        return cdiv(self.d, self.block_d)

    @property
    def fc1_grid(self) -> tuple[int, int]:
        return (self.n_k_blocks, self.split_d)

    @property
    def fc2_grid(self) -> tuple[int, int]:
        return (self.n_d_blocks, self.split_k)


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1 or value & (value - 1)):
        raise ValueError(f"{name} must be a positive power of two. Got {value!r}")


def _split(n_blocks: int, split: int) -> tuple[int, int]:
    """(splits, blocks per split) for at most `split` splits of n_blocks, none of them empty."""
    per_split = cdiv(n_blocks, min(split, n_blocks))
    return cdiv(n_blocks, per_split), per_split


def plan_sparse_mlp(
    batch: int,
    k: int,
    d: int,
    dtype,
    *,
    block_k: int | None = None,
    block_d: int | None = None,
    split_d: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
) -> SparseMLPPlan:
    """Resolves the knobs left as None into a static plan (pure Python, no tracing).

    block_d larger than d is clamped to the largest power of two <= d; split_d / split_k larger than
    the number of blocks they split are clamped to it (and rounded so that no split is empty).
    """
    _check_block("block_k", block_k)
    _check_block("block_d", block_d)
    for name, value in (
        ("split_d", split_d),
        ("split_k", split_k),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int. Got {value!r}")
    if use_dot is None:
        use_dot = batch >= DOT_MIN_BATCH
    if use_dot and d < 16:
        raise ValueError(f"use_dot needs d >= 16 (dot blocks are >= 16 per side). Got d={d}")
    if use_dot and block_k is not None and block_k < 16:
        raise ValueError(f"use_dot needs block_k >= 16. Got block_k={block_k}")
    batch_rows = max(16, next_pow2(batch)) if use_dot else batch

    d_cap = min(_MAX_BLOCK_D, prev_pow2(d))
    if use_dot:
        # The fc2 dot accumulates [batch_rows, block_d] fp32 in registers.
        d_cap = max(16, min(d_cap, _TILE_ELEMS // batch_rows))
    if block_d is not None:
        bd = min(block_d, prev_pow2(d))
    elif block_k is not None:
        bd = min(max(16, _TILE_ELEMS // block_k), d_cap)  # Keep the tile at _TILE_ELEMS.
    else:
        bd = min(_DEFAULT_BLOCK_D, d_cap)
    if block_k is not None:
        bk = block_k
    else:
        bk = max(16 if use_dot else 1, min(max(1, _TILE_ELEMS // bd), next_pow2(max(k, 1))))
    k_padded = cdiv(max(k, 1), bk) * bk
    n_kb = k_padded // bk
    n_db = cdiv(d, bd)

    # Each kernel's grid alone may not fill the GPU (few k-blocks for fc1, few column blocks for fc2):
    # the splits make up the difference.
    sd, dps = _split(n_db, split_d if split_d is not None else max(1, cdiv(_TARGET_PROGRAMS, n_kb)))
    if split_k is None:
        split_k = max(1, cdiv(_TARGET_PROGRAMS, n_db))
        partial_bytes = 4 * batch_rows * d  # One split's fp32 [batch_rows, d].
        budget = max(k * d * jnp.dtype(dtype).itemsize // _PARTIAL_BYTES_FRACTION, _PARTIAL_BYTES_MIN)
        split_k = min(split_k, max(1, budget // partial_bytes))
    sk, kps = _split(n_kb, split_k)

    if num_warps is None:
        num_warps = 8 if bk * bd >= _TILE_ELEMS else 4
    if num_stages is None:
        num_stages = 2
    return SparseMLPPlan(
        batch=batch,
        batch_rows=batch_rows,
        k=k,
        k_padded=k_padded,
        d=d,
        block_k=bk,
        block_d=bd,
        split_d=sd,
        d_blocks_per_split=dps,
        split_k=sk,
        k_blocks_per_split=kps,
        use_dot=bool(use_dot),
        num_warps=num_warps,
        num_stages=num_stages,
    )


# ----------------------------------------------------------------------------------------------
# Kernel bodies.
# ----------------------------------------------------------------------------------------------


def _d_block(j, plan: SparseMLPPlan):
    """Start column of column block j, and (ragged d only) a [block_d] mask of columns j covers first.

    A ragged last block is shifted back to end exactly at d, so loads stay unmasked and in bounds;
    the columns it shares with block j-1 are masked out wherever they would be counted twice.
    """
    bd = plan.block_d
    if plan.d % bd == 0:
        return pl.multiple_of(j * bd, bd), None
    start = jnp.minimum(j * bd, plan.d - bd)
    fresh = start + jnp.arange(bd, dtype=jnp.int32) >= j * bd
    return start, fresh


def _split_range(split, per_split, total):
    """Loop bounds [lo, hi) of blocks owned by one split; the last split may own fewer."""
    lo = split * per_split
    if total % per_split == 0:
        return lo, lo + per_split
    return lo, jnp.minimum(lo + per_split, total)


def _dot_precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _fc1_step(j, acc, x_ref, w1_ref, neuron_idx, plan: SparseMLPPlan):
    """acc[b, k] += sum over column block j of x[b, :] * W1[neuron_idx[k], :]."""
    start, fresh = _d_block(j, plan)
    w = w1_ref[neuron_idx, pl.ds(start, plan.block_d)]  # [block_k, block_d]
    if plan.use_dot:
        x = x_ref[pl.ds(0, plan.batch_rows), pl.ds(start, plan.block_d)]  # [batch_rows, block_d]
        if fresh is not None:
            x = jnp.where(fresh[None, :], x, jnp.zeros_like(x))
        return acc + plgpu.dot(x, w, trans_b=True, precision=_dot_precision(w.dtype))
    w = w.astype(jnp.float32)
    new_acc = []
    for b in range(plan.batch_rows):
        xb = x_ref[b, pl.ds(start, plan.block_d)].astype(jnp.float32)  # [block_d]
        if fresh is not None:
            xb = jnp.where(fresh, xb, 0.0)
        new_acc.append(acc[b] + jnp.sum(w * xb[None, :], axis=1))  # [block_k]
    return tuple(new_acc)


def _activate(acc, b1, k0, plan: SparseMLPPlan, dtype):
    """h = relu(acc + b1) rounded to the activation dtype; padded neurons (k >= K) give 0."""
    valid = None
    if plan.k_padded != plan.k:
        valid = k0 + jnp.arange(plan.block_k, dtype=jnp.int32) < plan.k  # [block_k]

    def one(a):
        h = jnp.maximum(a + b1, 0.0)
        if valid is not None:
            h = jnp.where(valid, h, 0.0)
        return h.astype(dtype)

    if plan.use_dot:
        return one(acc)  # [batch_rows, block_k]
    return tuple(one(a) for a in acc)  # batch_rows x [block_k]


def _fc2_contribution(h, w, plan: SparseMLPPlan):
    """h · W2 rows for one tile: [batch_rows, block_k] x [block_k, block_d], fp32."""
    if plan.use_dot:
        return plgpu.dot(h.astype(w.dtype), w, precision=_dot_precision(w.dtype))
    w = w.astype(jnp.float32)
    return tuple(jnp.sum(hb.astype(jnp.float32)[:, None] * w, axis=0) for hb in h)


def _fc1_kernel(
    idx_ref,  # [Kp] int32, padded with index 0
    x_ref,  # [batch_rows, d]
    w1_ref,  # [ffn, d]
    b1_ref,  # [ffn]
    h_ref,  # split_d == 1: [batch_rows, Kp] x.dtype, h = relu(x W1[idx]^T + b1[idx]), 0 at pads
    # split_d > 1:  [split_d, batch_rows, Kp] fp32 partial sums of x W1[idx]^T
    *,
    plan: SparseMLPPlan,
):
    k0 = pl.multiple_of(pl.program_id(0) * plan.block_k, plan.block_k)
    split = pl.program_id(1)
    neuron_idx = idx_ref[pl.ds(k0, plan.block_k)]  # [block_k]
    lo, hi = _split_range(split, plan.d_blocks_per_split, plan.n_d_blocks)
    if plan.use_dot:
        init = jnp.zeros((plan.batch_rows, plan.block_k), jnp.float32)
    else:
        init = tuple(jnp.zeros((plan.block_k,), jnp.float32) for _ in range(plan.batch_rows))
    acc = lax.fori_loop(lo, hi, lambda j, a: _fc1_step(j, a, x_ref, w1_ref, neuron_idx, plan), init)

    cols = pl.ds(k0, plan.block_k)
    if plan.split_d == 1:
        b1 = b1_ref[neuron_idx].astype(jnp.float32)
        h = _activate(acc, b1, k0, plan, h_ref.dtype)
        if plan.use_dot:
            h_ref[pl.ds(0, plan.batch_rows), cols] = h
        else:
            for b, hb in enumerate(h):
                h_ref[b, cols] = hb
    elif plan.use_dot:
        h_ref[split, pl.ds(0, plan.batch_rows), cols] = acc
    else:
        for b, ab in enumerate(acc):
            h_ref[split, b, cols] = ab


def _fc2_kernel(
    idx_ref,  # [Kp] int32, padded with index 0
    h_ref,  # [batch_rows, Kp] x.dtype, zero at padded neurons
    w2_ref,  # [ffn, d]  (fc2 weight, neuron-major)
    b2_ref,  # [d]
    out_ref,  # split_k == 1: [batch_rows, d] x.dtype, h W2[idx] + b2
    # split_k > 1:  [split_k, batch_rows, d] fp32 partial sums of h W2[idx]
    *,
    plan: SparseMLPPlan,
):
    # A ragged last column block overlaps block j-1; both write the same full sums there, so the
    # stores need no mask.
    start, _ = _d_block(pl.program_id(0), plan)
    split = pl.program_id(1)
    cols = pl.ds(start, plan.block_d)
    lo, hi = _split_range(split, plan.k_blocks_per_split, plan.n_k_blocks)

    def idx_block(kb):
        return idx_ref[pl.ds(pl.multiple_of(kb * plan.block_k, plan.block_k), plan.block_k)]

    def step(kb, carry):
        acc, neuron_idx = carry
        # The next block's indices load alongside this block's rows, so the gather's address
        # dependency costs one memory latency per program rather than one per step.
        next_idx = idx_block(jnp.minimum(kb + 1, plan.n_k_blocks - 1))
        k0 = pl.multiple_of(kb * plan.block_k, plan.block_k)
        w = w2_ref[neuron_idx, cols]  # [block_k, block_d]
        if plan.use_dot:
            h = h_ref[pl.ds(0, plan.batch_rows), pl.ds(k0, plan.block_k)]  # [batch_rows, block_k]
            return acc + _fc2_contribution(h, w, plan), next_idx
        h = tuple(h_ref[b, pl.ds(k0, plan.block_k)] for b in range(plan.batch_rows))
        return tuple(a + c for a, c in zip(acc, _fc2_contribution(h, w, plan))), next_idx

    if plan.use_dot:
        init = jnp.zeros((plan.batch_rows, plan.block_d), jnp.float32)
    else:
        init = tuple(jnp.zeros((plan.block_d,), jnp.float32) for _ in range(plan.batch_rows))
    acc, _ = lax.fori_loop(lo, hi, step, (init, idx_block(lo)))

    if plan.split_k == 1:
        b2 = b2_ref[cols].astype(jnp.float32)  # [block_d]
        if plan.use_dot:
            out_ref[pl.ds(0, plan.batch_rows), cols] = (acc + b2[None, :]).astype(out_ref.dtype)
        else:
            for b, ab in enumerate(acc):
                out_ref[b, cols] = (ab + b2).astype(out_ref.dtype)
    elif plan.use_dot:
        out_ref[split, pl.ds(0, plan.batch_rows), cols] = acc
    else:
        for b, ab in enumerate(acc):
            out_ref[split, b, cols] = ab


# ----------------------------------------------------------------------------------------------
# pallas_call layer.
# ----------------------------------------------------------------------------------------------


def _fc1_call(idx, x, fc1_w, fc1_b, *, plan: SparseMLPPlan, interpret: bool):
    """h [batch_rows, Kp] in x.dtype, or with split_d > 1 its fp32 partial sums [split_d, batch_rows, Kp]."""
    if plan.split_d == 1:
        out_shape = jax.ShapeDtypeStruct((plan.batch_rows, plan.k_padded), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((plan.split_d, plan.batch_rows, plan.k_padded), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fc1_kernel, plan=plan),
        out_shape=out_shape,
        grid=plan.fc1_grid,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=interpret,
        name="sparse_mlp_fc1",
    )(idx, x, fc1_w, fc1_b)


def _fc2_call(idx, h, fc2_w_t, fc2_b, *, plan: SparseMLPPlan, interpret: bool):
    """out [batch_rows, d] in h.dtype, or with split_k > 1 fp32 partial sums [split_k, batch_rows, d]."""
    if plan.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((plan.batch_rows, plan.d), h.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((plan.split_k, plan.batch_rows, plan.d), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fc2_kernel, plan=plan),
        out_shape=out_shape,
        grid=plan.fc2_grid,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=interpret,
        name="sparse_mlp_fc2",
    )(idx, h, fc2_w_t, fc2_b)


# ----------------------------------------------------------------------------------------------
# Public wrapper.
# ----------------------------------------------------------------------------------------------


def _check_inputs(x, fc1_w, fc1_b, fc2_w_t, fc2_b, active_idx) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be rank 2 [batch, d]. Got shape {x.shape}")
    batch, d = x.shape
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be one of float32, bfloat16, float16. Got {x.dtype}")
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be in [1, {MAX_BATCH}] (use the dense MLP for larger batches). Got {batch}")
    if fc1_w.ndim != 2 or fc1_w.shape[1] != d:
        raise ValueError(f"fc1_w must be [ffn, d] with d = x.shape[1]. Got {fc1_w.shape} and x {x.shape}")
    ffn = fc1_w.shape[0]
    if fc2_w_t.shape != fc1_w.shape:
        raise ValueError(
            f"fc2_w_t must be [ffn, d] (fc2 weight transposed), the shape of fc1_w. Got "
            f"{fc2_w_t.shape} and {fc1_w.shape}"
        )
    if fc1_b.shape != (ffn,):
        raise ValueError(f"fc1_b must be [ffn] = ({ffn},). Got {fc1_b.shape} and fc1_w {fc1_w.shape}")
    if fc2_b.shape != (d,):
        raise ValueError(f"fc2_b must be [d] = ({d},). Got {fc2_b.shape} and x {x.shape}")
    for name, arr in (("fc1_w", fc1_w), ("fc1_b", fc1_b), ("fc2_w_t", fc2_w_t), ("fc2_b", fc2_b)):
        if arr.dtype != x.dtype:
            raise ValueError(
                f"{name} must have x's dtype; cast the weights once at load time. Got {arr.dtype} and {x.dtype}"
            )
    if active_idx.ndim != 1:
        raise ValueError(f"active_idx must be rank 1 [K]. Got shape {active_idx.shape}")
    if not jnp.issubdtype(active_idx.dtype, jnp.integer):
        raise ValueError(f"active_idx must be an integer array. Got {active_idx.dtype}")


@functools.partial(
    jax.jit,
    static_argnames=("block_k", "block_d", "split_d", "split_k", "num_warps", "num_stages", "use_dot", "interpret"),
)
def sparse_mlp(
    x,  # [B, d]
    fc1_w,  # [ffn, d]
    fc1_b,  # [ffn]
    fc2_w_t,  # [ffn, d]
    fc2_b,  # [d]
    active_idx,  # [K] int
    *,
    block_k: int | None = None,
    block_d: int | None = None,
    split_d: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    interpret: bool | None = None,
):
    """relu(x · fc1_w[idx]ᵀ + fc1_b[idx]) · fc2_w_t[idx] + fc2_b, as [B, d] in x.dtype.

    Knobs left as None are chosen by `plan_sparse_mlp` from the shapes. `interpret=None` runs the
    Pallas interpreter unless the default backend is a GPU. Indices are not range-checked (module
    docstring).
    """
    _check_inputs(x, fc1_w, fc1_b, fc2_w_t, fc2_b, active_idx)
    interpret = resolve_interpret(interpret)
    batch, d = x.shape
    k = active_idx.shape[0]
    plan = plan_sparse_mlp(
        batch,
        k,
        d,
        x.dtype,
        block_k=block_k,
        block_d=block_d,
        split_d=split_d,
        split_k=split_k,
        num_warps=num_warps,
        num_stages=num_stages,
        use_dot=use_dot,
    )
    if k == 0:
        return jnp.broadcast_to(fc2_b, (batch, d)).astype(x.dtype)

    idx = active_idx.astype(jnp.int32)
    if plan.k_padded != k:
        idx = jnp.pad(idx, (0, plan.k_padded - k))
    x_rows = x if plan.batch_rows == batch else jnp.pad(x, ((0, plan.batch_rows - batch), (0, 0)))

    h = _fc1_call(idx, x_rows, fc1_w, fc1_b, plan=plan, interpret=interpret)
    if plan.split_d > 1:
        pre = jnp.sum(h, axis=0) + jnp.take(fc1_b, idx).astype(jnp.float32)[None, :]
        valid = jnp.arange(plan.k_padded) < k
        h = jnp.where(valid[None, :], jnp.maximum(pre, 0.0), 0.0).astype(x.dtype)
    out = _fc2_call(idx, h, fc2_w_t, fc2_b, plan=plan, interpret=interpret)
    if plan.split_k > 1:
        out = (jnp.sum(out, axis=0) + fc2_b.astype(jnp.float32)[None, :]).astype(x.dtype)
    return out[:batch]


def sparse_mlp_reference(x, fc1_w, fc1_b, fc2_w_t, fc2_b, active_idx):
    """Pure-jnp twin of `sparse_mlp`: gather the active rows, two fp32-accumulated matmuls."""
    idx = active_idx.astype(jnp.int32)
    w1 = jnp.take(fc1_w, idx, axis=0)  # [K, d]
    w2 = jnp.take(fc2_w_t, idx, axis=0)  # [K, d]
    b1 = jnp.take(fc1_b, idx).astype(jnp.float32)  # [K]
    pre = jnp.einsum("bd,kd->bk", x, w1, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    h = jnp.maximum(pre + b1[None, :], 0.0).astype(x.dtype)  # [B, K]
    out = jnp.einsum("bk,kd->bd", h, w2, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    return (out + fc2_b.astype(jnp.float32)[None, :]).astype(x.dtype)
