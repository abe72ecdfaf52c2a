"""Sparse MLP: the OPT MLP computed for a chosen set of neurons only (DejaVu contextual sparsity).

    out = relu(x · W1[idx]ᵀ + b1[idx]) · W2ᵀ[idx] + b2

with `x` [B, d], `fc1_w` [ffn, d] (Hugging Face layout, one row per neuron), `fc2_w_t` [ffn, d]
(fc2's weight stored neuron-major: row i holds neuron i's output weights), and `active_idx` [K] the
neurons computed for the whole batch. A neuron's weights are two contiguous rows, so the kernels read
only the K active rows of each matrix, once: at batch 1 the op is bandwidth bound and its floor is
2·K·d·itemsize bytes / copy bandwidth.

Numerics match the dense model run in the activation dtype: both matmuls accumulate in fp32, biases are
added in fp32, the hidden activation h = relu(·) is rounded to x.dtype before fc2 (as a dense bf16/fp16
model does), and the output is rounded to x.dtype. fp32 inputs use full-precision (non-TF32) dots.

Three variants (static `variant=`), all Triton-lowered Pallas kernels (row gathers `w_ref[idx, pl.ds(..)]`):

* ``"fused"`` - one kernel, grid (Kp / block_k,). Each program owns block_k neurons: it gathers their
  fc1 rows and reduces over d (h for its neurons, bias, ReLU in registers), then gathers the same
  neurons' fc2 rows and atomically adds its [B, d] contribution to a zero-initialised fp32 output;
  program 0 also adds b2. Reads each active row once and never writes h, but issues
  (Kp / block_k)·B·d fp32 atomics, and the summation order (so the last bits) varies run to run.
  The auto-config keeps the tile at 8192 elements and trades block_k for block_d to aim at 264-528
  programs: more for small K (bandwidth), fewer for large K (atomics).
* ``"two_pass"`` - two kernels. fc1: grid (Kp / block_k, split_d), a gather-GEMV with bias+ReLU
  writing h [B, Kp] (with split_d > 1 it writes fp32 partial sums over d-ranges, finished - summed,
  biased, ReLU'd - in plain JAX). fc2: grid (d / block_d, split_k), each program gathers fc2 rows of
  its k-range for one column block; with split_k > 1 fp32 partial outputs are summed in plain JAX.
  Deterministic, no atomics; costs one more launch and the small h / partial-sum round trips.
* ``"two_pass_v2"`` - the same two passes, planned for small-K latency: exactly two launches and
  no plain-JAX glue by default. fc1 always reduces full rows (split_d = 1; h, bias, ReLU written
  by the kernel) and gets its programs from a small block_k (1-8 neurons x full d, 264+ programs);
  fc2 has split_k = 1 (each program owns one column block for all of K, writes out + b2 in x.dtype)
  and gets ~one program per SM from narrow column blocks (fc2_block_d 128 -> 32, i.e. >= 64-byte
  row segments, until d / fc2_block_d >= 128) over tall tiles (fc2_block_k up to 256 rows). Both
  loops are software-pipelined by hand (`prefetch` tiles carried in registers, the gather's index
  block loaded one step ahead of its rows), since Triton does not pipeline loads that feed no dot;
  at batch 1 tiles are accumulated elementwise and reduced once after the loop. fc1 and fc2 use
  different block_k: K is padded to fc2_block_k (rows of index 0, cached; fc1 skips whole padded
  blocks and fc2 masks them). Knobs split_d > 1 (fc2 then finishes h from fp32 partials in its
  loop) and split_k > 1 (partials summed in JAX) remain available.

Batch < 16 (`DOT_MIN_BATCH`) uses multiply-and-sum on the CUDA cores, unrolled over batch rows (no
padding of x); batch >= 16 pads x to a power of two >= 16 rows and uses `dot` (tensor cores).

Decision: DEFAULT_VARIANT = "auto" picks "two_pass" (AUTO_VARIANT) at every batch. Measured on an
H100 80GB (bench/results/kernels_mlp_quick_NVIDIA-H100-80GB-HBM3_2026-11-25.md, fp16, chained
calls): two_pass beat fused at all 12 points - opt-13b B=1 at 5/10/50% density 17.0 / 26.4 / 100.3
us vs fused 42.4 / 43.7 / 120.2 (fused with block_k=16: 39.7 / 44.8 / 122.0); B=16 23.3 / 36.1 /
129.3 vs 152.3 / 172.6 / 294.4; opt-66b B=1 38.3 / 69.7 / 297.3 vs 69.5 / 91.8 / 387.8; B=16 49.8 /
83.6 / 359.1 vs 304.6 / 371.6 / 608.5 - fused's fp32 atomics ((Kp / block_k)·B·d of them) cost more
than the h round trip and extra launches even at batch 1. Outputs agreed with the reference to
~3e-4 (fp16) everywhere. The full grid (bench/results/kernels_mlp_NVIDIA-H100-80GB-HBM3_2026-11-25.md,
53 of 80 configurations before its time cap) confirmed it: two_pass or "two_pass_v2_sk" (v2 kernels,
split_k=4) were best everywhere and within ~5% of each other at batch 1 (opt-13b 10%: 27.7 vs 26.6 us),
while "two_pass_v2" with split_k=1 was slower (33.4 us) and collapsed at batch 64 (1.2-12 ms: its fc2
loop does not scale with the batch). So two_pass stays AUTO_VARIANT; v2 is kept as a variant for study.

Floor at small K (issue 3's target: batch 1 within 1.5x of the bandwidth floor), measured on an H100
(bench/results/NOTES.md): met from 25% density, missed at 2.5-10% (1.6-3.1x). Evidence: XLA's dense MLP over
contiguous weights of the same bytes is itself 2.0-2.7x there; two_pass is four launches of >= 1.2 us each; the
SASS reads weights with 16-byte LDG.E.128 but each loop step waits out its DRAM round trip (barriers, layout
conversion and the reduction sit inside the loop) with 15-32% of the SM's warps active. What would close it: one
persistent launch (fc1, grid barrier, fc2), two loop steps of loads in flight, fusion with the neighbouring ops.

Padding: K is static; it is padded up to a multiple of block_k with index 0 and the padded h columns are
zeroed, so padding never changes the result (it costs reading < block_k extra rows). d need not be a
power of two: a ragged last column block is shifted back to end at d and its already-covered columns are
masked, so every load and store is an unmasked power-of-two block.

Index contract: duplicate indices are allowed and count once per occurrence (a neuron listed twice
contributes twice). Out-of-range indices are NOT checked inside the kernel: on GPU they read outside the
weight rows (undefined result, possibly a fault); in interpret mode they are clamped. Callers holding
untrusted indices use `check_active_idx` (host check, outside jit) first. K = 0 returns broadcast b2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.block_math import cdiv, next_pow2, prev_pow2

VARIANTS = ("fused", "two_pass", "two_pass_v2")
# "auto" = AUTO_VARIANT at every batch: two_pass beat fused at every measured point (module docstring).
DEFAULT_VARIANT = "auto"
AUTO_VARIANT = "two_pass"
# Batches from this size pad x to >= 16 rows and use tensor-core dots; smaller ones multiply-and-sum.
DOT_MIN_BATCH = 16
MAX_BATCH = 128
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

# Elements per weight tile load: 16 KiB of fp16 per program per loop step keeps enough bytes in
# flight per SM (Little's law: ~3 TB/s x ~0.7 us / 132 SMs ~ 16 KiB) without register spills.
_TILE_ELEMS = 8192
# Two programs per H100 SM (132 SMs); auto-config aims for at least this many programs.
_TARGET_PROGRAMS = 264
_DEFAULT_BLOCK_D = 512
_MAX_BLOCK_D = 4096
# Cap on split_k's fp32 partial outputs: 1/2 of the fc2 bytes read, or 8 MB (they stay in L2).
_PARTIAL_BYTES_FRACTION = 2
_PARTIAL_BYTES_MIN = 8 << 20
# Fused: smallest column block when growing block_k for large K (256-byte row segments in fp16).
_MIN_FUSED_BLOCK_D = 128
# two_pass_v2: fc1's widest column block; fc2's column block is narrowed from the max towards the
# min (64 B of fp16 per gathered row segment) until the grid has >= _V2_FC2_MIN_PROGRAMS programs
# (about one per H100 SM); tiles prefetched ahead by each loop.
_V2_FC1_MAX_BLOCK_D = 1024
_V2_FC2_MAX_BLOCK_D = 128
_V2_FC2_MIN_BLOCK_D = 32
_V2_FC2_MIN_PROGRAMS = 128
_V2_PREFETCH = 2


@dataclasses.dataclass(frozen=True)
class SparseMLPPlan:
    """Static launch configuration, derived from shapes and knobs by `plan_sparse_mlp`."""

    variant: str
    batch: int         # B, rows of x
    batch_rows: int    # rows the kernels compute: B, or B padded to a power of two >= 16 for dots
    k: int             # active neurons
    k_padded: int      # K rounded up to block_k
    d: int
    block_k: int       # neurons per tile
    block_d: int       # columns per tile
    split_d: int       # two_pass fc1: programs sharing one k-block's reduction over d
    d_blocks_per_split: int
    split_k: int       # two_pass fc2: programs sharing one column block's reduction over K
    k_blocks_per_split: int
    use_dot: bool
    num_warps: int
    num_stages: int
    # fc2's tiles; equal to block_k / block_d except in "two_pass_v2".
    fc2_block_k: int = 0
    fc2_block_d: int = 0
    fc2_num_warps: int = 0
    # two_pass_v2: weight tiles each loop issues ahead of the one it reduces (0: none).
    prefetch: int = 0

    @property
    def k_multiple(self) -> int:
        """K is padded to a multiple of this (calibrate K to it and the kernels read no padded rows)."""
        return max(self.block_k, self.fc2_block_k)

    @property
    def n_k_blocks(self) -> int:
        """fc1's k-blocks (two_pass_v2: only those holding real neurons; fc2 masks the rest)."""
        if self.variant == "two_pass_v2":
            return cdiv(self.k, self.block_k)
        return self.k_padded // self.block_k

    @property
    def n_fc2_k_blocks(self) -> int:
        return self.k_padded // self.fc2_block_k

    @property
    def n_fc2_d_blocks(self) -> int:
        return cdiv(self.d, self.fc2_block_d)

    @property
    def n_d_blocks(self) -> int:
        return cdiv(self.d, self.block_d)

    @property
    def grid(self) -> tuple[tuple[int, ...], ...]:
        """Grid of each pallas_call, in launch order."""
        if self.variant == "fused":
            return ((self.n_k_blocks,),)
        return ((self.n_k_blocks, self.split_d), (self.n_fc2_d_blocks, self.split_k))


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1 or value & (value - 1)):
        raise ValueError(f"{name} must be a positive power of two. Got {value!r}")


def plan_sparse_mlp(
    batch: int,
    k: int,
    d: int,
    dtype,
    *,
    variant: str = DEFAULT_VARIANT,
    block_k: int | None = None,
    block_d: int | None = None,
    split_d: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    fc2_block_k: int | None = None,
    fc2_block_d: int | None = None,
    prefetch: int | None = None,
) -> SparseMLPPlan:
    """Resolves the knobs left as None into a static plan (pure Python, no tracing).

    fc2_block_k, fc2_block_d and prefetch apply to "two_pass_v2" only (the other variants use
    block_k / block_d for both kernels and do not prefetch).
    """
    if variant == "auto":
        variant = AUTO_VARIANT
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} or 'auto'. Got {variant!r}")
    _check_block("block_k", block_k)
    _check_block("block_d", block_d)
    _check_block("fc2_block_k", fc2_block_k)
    _check_block("fc2_block_d", fc2_block_d)
    for name, value in (("split_d", split_d), ("split_k", split_k), ("num_warps", num_warps),
                        ("num_stages", num_stages)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int. Got {value!r}")
    if prefetch is not None and (not isinstance(prefetch, int) or not 0 <= prefetch <= 4):
        raise ValueError(f"prefetch must be an int in [0, 4]. Got {prefetch!r}")
    if use_dot is None:
        use_dot = batch >= DOT_MIN_BATCH
    if use_dot and d < 16:
        raise ValueError(f"use_dot needs d >= 16 (dot blocks are >= 16 per side). Got d={d}")
    for name, value in (("block_k", block_k), ("fc2_block_k", fc2_block_k),
                        ("fc2_block_d", fc2_block_d)):
        if use_dot and value is not None and value < 16:
            raise ValueError(f"use_dot needs {name} >= 16. Got {name}={value}")
    batch_rows = max(16, next_pow2(batch)) if use_dot else batch
    itemsize = jnp.dtype(dtype).itemsize
    if variant == "two_pass_v2":
        return _plan_v2(batch, batch_rows, k, d, bool(use_dot), block_k=block_k, block_d=block_d,
                        split_d=split_d, split_k=split_k, num_warps=num_warps,
                        num_stages=num_stages, fc2_block_k=fc2_block_k, fc2_block_d=fc2_block_d,
                        prefetch=prefetch)

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
    min_bk = 16 if use_dot else 1
    if block_k is None:
        bk = max(min_bk, min(max(1, _TILE_ELEMS // bd), next_pow2(max(k, 1))))
        if variant == "fused" and block_d is None:
            # Few neurons: trade rows for columns (same tile size) so more programs share the work.
            while (cdiv(k, bk) < _TARGET_PROGRAMS and bk // 2 >= max(min_bk, 2)
                   and bd * 2 <= d_cap):
                bk //= 2
                bd *= 2
            # Many neurons: trade columns for rows (rows stay >= 256 B), since every program adds
            # a full [batch, d] to the output atomically.
            while (cdiv(k, bk) > 2 * _TARGET_PROGRAMS and bd // 2 >= _MIN_FUSED_BLOCK_D
                   and bk * 2 <= next_pow2(k)):
                bk *= 2
                bd //= 2
    else:
        bk = block_k
    k_padded = cdiv(max(k, 1), bk) * bk
    n_kb = k_padded // bk
    n_db = cdiv(d, bd)

    if variant == "two_pass":
        sd = split_d if split_d is not None else max(1, cdiv(_TARGET_PROGRAMS, n_kb))
        sd = min(sd, n_db)
        dps = cdiv(n_db, sd)
        sd = cdiv(n_db, dps)
        if split_k is not None:
            sk = split_k
        else:
            sk = max(1, cdiv(_TARGET_PROGRAMS, n_db))
            partial_bytes = 4 * batch_rows * d  # One split's fp32 [batch_rows, d].
            budget = max(k * d * itemsize // _PARTIAL_BYTES_FRACTION, _PARTIAL_BYTES_MIN)
            sk = min(sk, max(1, budget // partial_bytes))
        sk = min(sk, n_kb)
        kps = cdiv(n_kb, sk)
        sk = cdiv(n_kb, kps)
    else:
        sd, dps, sk, kps = 1, n_db, 1, n_kb

    if num_warps is None:
        num_warps = 8 if bk * bd >= _TILE_ELEMS else 4
    if num_stages is None:
        num_stages = 2
    return SparseMLPPlan(
        variant=variant, batch=batch, batch_rows=batch_rows, k=k, k_padded=k_padded, d=d,
        block_k=bk, block_d=bd, split_d=sd, d_blocks_per_split=dps, split_k=sk,
        k_blocks_per_split=kps, use_dot=bool(use_dot), num_warps=num_warps, num_stages=num_stages,
        fc2_block_k=bk, fc2_block_d=bd, fc2_num_warps=num_warps, prefetch=0)


def _v2_block_d(d: int, cap: int) -> int:
    """fc1's column block: the largest power of two <= cap that tiles d with <= 1/8 overlap waste."""
    bd = max(1, min(cap, prev_pow2(d)))
    while bd > 16 and cdiv(d, bd) * bd - d > d // 8:
        bd //= 2
    return bd


def _v2_warps(tile_elems: int) -> int:
    """~32 elements (64 B of fp16, four 16-byte loads) per thread per tile."""
    return max(2, min(8, tile_elems // 1024))


def _plan_v2(batch, batch_rows, k, d, use_dot, *, block_k, block_d, split_d, split_k, num_warps,
             num_stages, fc2_block_k, fc2_block_d, prefetch) -> SparseMLPPlan:
    """two_pass_v2: two launches and no plain-JAX glue by default (split_k = 1; module docstring)."""
    # fc1: full rows of few neurons per program (split_d = 1), enough programs from small block_k.
    bd1 = block_d if block_d is not None else _v2_block_d(
        d, min(_V2_FC1_MAX_BLOCK_D, max(16, _TILE_ELEMS // batch_rows) if use_dot else 1 << 30))
    bd1 = min(bd1, prev_pow2(d))
    if block_k is not None:
        bk1 = block_k
    elif use_dot:
        bk1 = 16
    else:
        bk1 = max(1, min(prev_pow2(max(1, k // _TARGET_PROGRAMS)), max(1, _TILE_ELEMS // bd1)))
    # fc2: one program per column block owns the whole K reduction (no partial sums); narrow
    # column blocks (>= 64 B per row segment) give it >= ~one program per SM.
    if fc2_block_d is not None:
        bd2 = min(fc2_block_d, prev_pow2(d))
    else:
        bd2 = min(_V2_FC2_MAX_BLOCK_D, prev_pow2(d))
        while bd2 > _V2_FC2_MIN_BLOCK_D and cdiv(d, bd2) < _V2_FC2_MIN_PROGRAMS:
            bd2 //= 2
        if use_dot:
            bd2 = max(16, min(bd2, _TILE_ELEMS // batch_rows))
    if fc2_block_k is not None:
        bk2 = fc2_block_k
    else:
        rows_cap = _TILE_ELEMS // bd2
        if use_dot:
            rows_cap = min(rows_cap, max(16, _TILE_ELEMS // batch_rows))
        bk2 = max(16 if use_dot else 1, min(rows_cap, next_pow2(max(k, 1))))
        # Padding K to bk2 costs cached reads of row 0 only, but keep it under 1/8 of K.
        while bk2 > 16 and cdiv(k, bk2) * bk2 - k > k // 8:
            bk2 //= 2
    bk2 = max(bk2, bk1)  # fc1's blocks must fit inside fc2's padded K.
    k_padded = cdiv(max(k, 1), bk2) * bk2
    n_db1 = cdiv(d, bd1)
    # split_d > 1 (knob only) makes every fc2 program re-finish h from fp32 partials (L2 reads of
    # split_d x batch_rows x Kp x 4 B per program), too costly at batch >= 16 to be the default.
    sd = min(split_d if split_d is not None else 1, n_db1)
    dps = cdiv(n_db1, sd)
    sd = cdiv(n_db1, dps)
    n_k2 = k_padded // bk2
    sk = min(split_k if split_k is not None else 1, n_k2)
    kps = cdiv(n_k2, sk)
    sk = cdiv(n_k2, kps)
    w1 = num_warps if num_warps is not None else _v2_warps(bk1 * bd1)
    w2 = num_warps if num_warps is not None else _v2_warps(bk2 * bd2)
    return SparseMLPPlan(
        variant="two_pass_v2", batch=batch, batch_rows=batch_rows, k=k, k_padded=k_padded, d=d,
        block_k=bk1, block_d=bd1, split_d=sd, d_blocks_per_split=dps, split_k=sk,
        k_blocks_per_split=kps, use_dot=use_dot, num_warps=w1,
        num_stages=num_stages if num_stages is not None else 1, fc2_block_k=bk2,
        fc2_block_d=bd2, fc2_num_warps=w2,
        prefetch=prefetch if prefetch is not None else (
            _V2_PREFETCH + 1 if bk1 * bd1 < _TILE_ELEMS // 2 else _V2_PREFETCH))


# ----------------------------------------------------------------------------------------------
# Kernel bodies.
# ----------------------------------------------------------------------------------------------


def _d_block(j, plan: SparseMLPPlan, bd: int | None = None):
    """Start column of column block j, and (ragged d only) a [bd] mask of columns j covers first.

    A ragged last block is shifted back to end exactly at d, so loads stay unmasked and in bounds;
    the columns it shares with block j-1 are masked out wherever they would be counted twice.
    `bd` defaults to plan.block_d.
    """
    bd = plan.block_d if bd is None else bd
    if plan.d % bd == 0:
        return pl.multiple_of(j * bd, bd), None
    start = jnp.minimum(j * bd, plan.d - bd)
    fresh = start + jnp.arange(bd, dtype=jnp.int32) >= j * bd
    return start, fresh


def _dot_precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _fc1_init(plan: SparseMLPPlan):
    if plan.use_dot:
        return jnp.zeros((plan.batch_rows, plan.block_k), jnp.float32)
    return tuple(jnp.zeros((plan.block_k,), jnp.float32) for _ in range(plan.batch_rows))


def _fc1_step(j, acc, x_ref, w1_ref, neuron_idx, plan: SparseMLPPlan):
    """acc[b, k] += sum over column block j of x[b, :] * W1[neuron_idx[k], :]."""
    start, fresh = _d_block(j, plan)
    w = w1_ref[neuron_idx, pl.ds(start, plan.block_d)]            # [block_k, block_d]
    if plan.use_dot:
        x = x_ref[pl.ds(0, plan.batch_rows), pl.ds(start, plan.block_d)]   # [batch_rows, block_d]
        if fresh is not None:
            x = jnp.where(fresh[None, :], x, jnp.zeros_like(x))
        return acc + plgpu.dot(x, w, trans_b=True, precision=_dot_precision(w.dtype))
    w = w.astype(jnp.float32)
    new_acc = []
    for b in range(plan.batch_rows):
        xb = x_ref[b, pl.ds(start, plan.block_d)].astype(jnp.float32)    # [block_d]
        if fresh is not None:
            xb = jnp.where(fresh, xb, 0.0)
        new_acc.append(acc[b] + jnp.sum(w * xb[None, :], axis=1))       # [block_k]
    return tuple(new_acc)


def _activate(acc, b1, k0, plan: SparseMLPPlan, dtype):
    """h = relu(acc + b1) rounded to the activation dtype; padded neurons (k >= K) give 0."""
    valid = None
    if plan.k_padded != plan.k:
        valid = k0 + jnp.arange(plan.block_k, dtype=jnp.int32) < plan.k    # [block_k]

    def one(a):
        h = jnp.maximum(a + b1, 0.0)
        if valid is not None:
            h = jnp.where(valid, h, 0.0)
        return h.astype(dtype)

    if plan.use_dot:
        return one(acc)                      # [batch_rows, block_k]
    return tuple(one(a) for a in acc)      # batch_rows x [block_k]


def _fc2_contribution(h, w, plan: SparseMLPPlan):
    """h · W2 rows for one tile: [batch_rows, block_k] x [block_k, block_d], fp32."""
    if plan.use_dot:
        return plgpu.dot(h.astype(w.dtype), w, precision=_dot_precision(w.dtype))
    w = w.astype(jnp.float32)
    return tuple(jnp.sum(hb.astype(jnp.float32)[:, None] * w, axis=0) for hb in h)


def _fused_mlp_kernel(
    idx_ref,       # [Kp] int32, padded with index 0
    x_ref,         # [batch_rows, d]
    w1_ref,        # [ffn, d]
    b1_ref,        # [ffn]
    w2_ref,        # [ffn, d]  (fc2 weight, neuron-major)
    b2_ref,        # [d]
    out_init_ref,  # [batch_rows, d] fp32 zeros, aliased to out_ref
    out_ref,       # [batch_rows, d] fp32, accumulated atomically by every program
    *,
    plan: SparseMLPPlan,
):
    del out_init_ref  # Same buffer as out_ref.
    pid = pl.program_id(0)
    k0 = pl.multiple_of(pid * plan.block_k, plan.block_k)
    neuron_idx = idx_ref[pl.ds(k0, plan.block_k)]                       # [block_k]
    b1 = b1_ref[neuron_idx].astype(jnp.float32)                         # [block_k]

    acc = lax.fori_loop(
        0, plan.n_d_blocks,
        lambda j, a: _fc1_step(j, a, x_ref, w1_ref, neuron_idx, plan), _fc1_init(plan))
    h = _activate(acc, b1, k0, plan, x_ref.dtype)

    def add_rows(start, fresh, value):
        """Atomically adds value ([batch_rows, block_d] or batch_rows x [block_d]) to out columns."""
        if plan.use_dot:
            if fresh is not None:
                value = jnp.where(fresh[None, :], value, 0.0)
            plgpu.atomic_add(out_ref, (pl.ds(0, plan.batch_rows), pl.ds(start, plan.block_d)), value)
            return
        for b, vb in enumerate(value):
            if fresh is not None:
                vb = jnp.where(fresh, vb, 0.0)
            plgpu.atomic_add(out_ref, (jnp.int32(b), pl.ds(start, plan.block_d)), vb)

    def fc2_step(j, carry):
        start, fresh = _d_block(j, plan)
        w = w2_ref[neuron_idx, pl.ds(start, plan.block_d)]                # [block_k, block_d]
        add_rows(start, fresh, _fc2_contribution(h, w, plan))
        return carry

    lax.fori_loop(0, plan.n_d_blocks, fc2_step, ())

    @pl.when(pid == 0)
    def _add_fc2_bias():
        def bias_step(j, carry):
            start, fresh = _d_block(j, plan)
            b2 = b2_ref[pl.ds(start, plan.block_d)].astype(jnp.float32)     # [block_d]
            if plan.use_dot:
                add_rows(start, fresh, jnp.broadcast_to(b2[None, :], (plan.batch_rows, plan.block_d)))
            else:
                add_rows(start, fresh, tuple(b2 for _ in range(plan.batch_rows)))
            return carry

        lax.fori_loop(0, plan.n_d_blocks, bias_step, ())


def _split_range(split, per_split, total):
    """Loop bounds [lo, hi) of blocks owned by one split; the last split may own fewer."""
    lo = split * per_split
    if total % per_split == 0:
        return lo, lo + per_split
    return lo, jnp.minimum(lo + per_split, total)


def _fc1_kernel(
    idx_ref,   # [Kp] int32, padded with index 0
    x_ref,     # [batch_rows, d]
    w1_ref,    # [ffn, d]
    b1_ref,    # [ffn]
    h_ref,     # split_d == 1: [batch_rows, Kp] x.dtype, h = relu(x W1[idx]^T + b1[idx]), 0 at pads
               # split_d > 1:  [split_d, batch_rows, Kp] fp32 partial sums of x W1[idx]^T
    *,
    plan: SparseMLPPlan,
):
    k0 = pl.multiple_of(pl.program_id(0) * plan.block_k, plan.block_k)
    split = pl.program_id(1)
    neuron_idx = idx_ref[pl.ds(k0, plan.block_k)]                       # [block_k]
    lo, hi = _split_range(split, plan.d_blocks_per_split, plan.n_d_blocks)
    acc = lax.fori_loop(
        lo, hi, lambda j, a: _fc1_step(j, a, x_ref, w1_ref, neuron_idx, plan), _fc1_init(plan))

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
    idx_ref,   # [Kp] int32, padded with index 0
    h_ref,     # [batch_rows, Kp] x.dtype, zero at padded neurons
    w2_ref,    # [ffn, d]  (fc2 weight, neuron-major)
    b2_ref,    # [d]
    out_ref,   # split_k == 1: [batch_rows, d] x.dtype, h W2[idx] + b2
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
        w = w2_ref[neuron_idx, cols]                                      # [block_k, block_d]
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
        b2 = b2_ref[cols].astype(jnp.float32)                             # [block_d]
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
# two_pass_v2 kernels.
# ----------------------------------------------------------------------------------------------


def _prefetch_loop(lo, hi, load_idx, load_tile, compute, acc, depth: int):
    """acc = compute(acc, load_tile(j, load_idx(j)), j) for j in [lo, hi), software-pipelined.

    The loop carries the next `depth` tiles (registers) and the index block one step beyond them:
    step j issues the loads of tile j + depth, then reduces tile j, so depth + 1 tiles are in flight
    while a program waits and a gather's address (the index block) is always loaded a step ahead.
    Past the end the loads repeat the last tile (cache hits, never used). `load_idx` may be None
    (a loop-invariant gather). hi > lo; either may be traced.
    """
    if load_idx is None:
        load_idx = lambda j: None  # noqa: E731
    if depth == 0:
        return lax.fori_loop(lo, hi, lambda j, a: compute(a, load_tile(j, load_idx(j)), j), acc)
    last = hi - 1

    def clamp(j):
        return jnp.minimum(j, last)

    idxs = [load_idx(clamp(lo + i)) for i in range(depth + 1)]
    tiles = tuple(load_tile(clamp(lo + i), idxs[i]) for i in range(depth))

    def body(j, carry):
        a, ahead, next_idx = carry
        new_tile = load_tile(clamp(j + depth), next_idx)
        new_idx = load_idx(clamp(j + depth + 1))
        a = compute(a, ahead[0], j)
        return a, ahead[1:] + (new_tile,), new_idx

    acc, _, _ = lax.fori_loop(lo, hi, body, (acc, tiles, idxs[depth]))
    return acc


def _v2_acc2d(plan: SparseMLPPlan) -> bool:
    """Batch 1 without dots: accumulate the whole tile elementwise, reduce once after the loop."""
    return not plan.use_dot and plan.batch_rows == 1


def _v2_fc1_kernel(
    idx_ref,   # [Kp] int32, padded with index 0
    x_ref,     # [batch_rows, d]
    w1_ref,    # [ffn, d]
    b1_ref,    # [ffn]
    h_ref,     # split_d == 1: [batch_rows, Kp] x.dtype, h at k < n_k_blocks * block_k (0 at k >= K)
               # split_d > 1:  [split_d, batch_rows, Kp] fp32 partial sums of x W1[idx]^T
    *,
    plan: SparseMLPPlan,
):
    bk, bd, rows = plan.block_k, plan.block_d, plan.batch_rows
    k0 = pl.multiple_of(pl.program_id(0) * bk, bk)
    split = pl.program_id(1)
    neuron_idx = idx_ref[pl.ds(k0, bk)]                                 # [bk]
    lo, hi = _split_range(split, plan.d_blocks_per_split, plan.n_d_blocks)

    def load_tile(j, _):
        start, fresh = _d_block(j, plan)
        w = w1_ref[neuron_idx, pl.ds(start, bd)]                         # [bk, bd]
        if plan.use_dot:
            x = x_ref[pl.ds(0, rows), pl.ds(start, bd)]                  # [rows, bd]
            if fresh is not None:
                x = jnp.where(fresh[None, :], x, jnp.zeros_like(x))
            return w, x
        xs = []
        for b in range(rows):
            xb = x_ref[b, pl.ds(start, bd)]                              # [bd]
            if fresh is not None:
                xb = jnp.where(fresh, xb, jnp.zeros_like(xb))
            xs.append(xb)
        return w, tuple(xs)

    def compute(acc, tile, j):
        w, x = tile
        if plan.use_dot:
            return acc + plgpu.dot(x, w, trans_b=True, precision=_dot_precision(w.dtype))
        w = w.astype(jnp.float32)
        if _v2_acc2d(plan):
            return acc + w * x[0].astype(jnp.float32)[None, :]
        return tuple(a + jnp.sum(w * xb.astype(jnp.float32)[None, :], axis=1)
                     for a, xb in zip(acc, x))

    if plan.use_dot:
        init = jnp.zeros((rows, bk), jnp.float32)
    elif _v2_acc2d(plan):
        init = jnp.zeros((bk, bd), jnp.float32)
    else:
        init = tuple(jnp.zeros((bk,), jnp.float32) for _ in range(rows))
    acc = _prefetch_loop(lo, hi, None, load_tile, compute, init, plan.prefetch)
    if _v2_acc2d(plan):
        acc = (jnp.sum(acc, axis=1),)                                    # 1 x [bk]

    cols = pl.ds(k0, bk)
    if plan.split_d == 1:
        b1 = b1_ref[neuron_idx].astype(jnp.float32)
        h = _activate(acc, b1, k0, plan, h_ref.dtype)
        if plan.use_dot:
            h_ref[pl.ds(0, rows), cols] = h
        else:
            for b, hb in enumerate(h):
                h_ref[b, cols] = hb
    elif plan.use_dot:
        h_ref[split, pl.ds(0, rows), cols] = acc
    else:
        for b, ab in enumerate(acc):
            h_ref[split, b, cols] = ab


def _v2_fc2_kernel(
    idx_ref,   # [Kp] int32, padded with index 0
    h_ref,     # fc1's output (see _v2_fc1_kernel); columns fc1 did not write hold garbage
    b1_ref,    # [ffn] (used to finish h when split_d > 1)
    w2_ref,    # [ffn, d]  (fc2 weight, neuron-major)
    b2_ref,    # [d]
    out_ref,   # split_k == 1: [batch_rows, d] x.dtype;  split_k > 1: [split_k, batch_rows, d] fp32
    *,
    plan: SparseMLPPlan,
):
    bk, bd, rows = plan.fc2_block_k, plan.fc2_block_d, plan.batch_rows
    # A ragged last column block overlaps block j-1; both store the same full sums there.
    start, _ = _d_block(pl.program_id(0), plan, bd)
    cols = pl.ds(start, bd)
    split = pl.program_id(1)
    lo, hi = _split_range(split, plan.k_blocks_per_split, plan.n_fc2_k_blocks)
    finish = plan.split_d > 1
    # Zero h where k >= K: columns fc1 never wrote, and (finishing here) padded neurons.
    mask_k = plan.n_k_blocks * plan.block_k < plan.k_padded or (finish and plan.k_padded != plan.k)

    def load_idx(kb):
        return idx_ref[pl.ds(pl.multiple_of(kb * bk, bk), bk)]            # [bk]

    def load_tile(kb, neuron_idx):
        k0 = pl.multiple_of(kb * bk, bk)
        w = w2_ref[neuron_idx, cols]                                     # [bk, bd]
        kcols = pl.ds(k0, bk)
        if finish:
            if plan.use_dot:
                parts = tuple(h_ref[s, pl.ds(0, rows), kcols] for s in range(plan.split_d))
            else:
                parts = tuple(tuple(h_ref[s, b, kcols] for b in range(rows))
                              for s in range(plan.split_d))
            return w, parts, b1_ref[neuron_idx]
        if plan.use_dot:
            return w, h_ref[pl.ds(0, rows), kcols], None                 # [rows, bk]
        return w, tuple(h_ref[b, kcols] for b in range(rows)), None

    def finish_h(hb, valid):
        if valid is not None:
            hb = jnp.where(valid, hb, jnp.zeros_like(hb))
        return hb

    def compute(acc, tile, kb):
        w, h, b1 = tile
        valid = None
        if mask_k:
            valid = kb * bk + jnp.arange(bk, dtype=jnp.int32) < plan.k            # [bk]
        if finish:
            b1 = b1.astype(jnp.float32)
            if plan.use_dot:
                pre = functools.reduce(lambda a, c: a + c, h)
                h = jnp.maximum(pre + b1[None, :], 0.0).astype(w.dtype)
            else:
                h = tuple(jnp.maximum(functools.reduce(lambda a, c: a + c, hb) + b1, 0.0)
                          .astype(w.dtype) for hb in zip(*h))
        if plan.use_dot:
            if valid is not None:
                h = jnp.where(valid[None, :], h, jnp.zeros_like(h))
            return acc + plgpu.dot(h.astype(w.dtype), w, precision=_dot_precision(w.dtype))
        h = tuple(finish_h(hb, valid) for hb in h)
        w = w.astype(jnp.float32)
        if _v2_acc2d(plan):
            return acc + h[0].astype(jnp.float32)[:, None] * w
        return tuple(a + jnp.sum(hb.astype(jnp.float32)[:, None] * w, axis=0)
                     for a, hb in zip(acc, h))

    if plan.use_dot:
        init = jnp.zeros((rows, bd), jnp.float32)
    elif _v2_acc2d(plan):
        init = jnp.zeros((bk, bd), jnp.float32)
    else:
        init = tuple(jnp.zeros((bd,), jnp.float32) for _ in range(rows))
    acc = _prefetch_loop(lo, hi, load_idx, load_tile, compute, init, plan.prefetch)
    if _v2_acc2d(plan):
        acc = (jnp.sum(acc, axis=0),)                                    # 1 x [bd]

    if plan.split_k == 1:
        b2 = b2_ref[cols].astype(jnp.float32)                             # [bd]
        if plan.use_dot:
            out_ref[pl.ds(0, rows), cols] = (acc + b2[None, :]).astype(out_ref.dtype)
        else:
            for b, ab in enumerate(acc):
                out_ref[b, cols] = (ab + b2).astype(out_ref.dtype)
    elif plan.use_dot:
        out_ref[split, pl.ds(0, rows), cols] = acc
    else:
        for b, ab in enumerate(acc):
            out_ref[split, b, cols] = ab


# ----------------------------------------------------------------------------------------------
# pallas_call layer.
# ----------------------------------------------------------------------------------------------


def _compiler_params(plan: SparseMLPPlan, num_warps: int | None = None):
    return plgpu.CompilerParams(num_warps=num_warps or plan.num_warps, num_stages=plan.num_stages)


def _fused_call(idx, x, fc1_w, fc1_b, fc2_w_t, fc2_b, *, plan, interpret):
    """Returns fp32 [batch_rows, d] = h W2[idx] + b2."""
    out_init = jnp.zeros((plan.batch_rows, plan.d), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fused_mlp_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct((plan.batch_rows, plan.d), jnp.float32),
        grid=plan.grid[0],
        input_output_aliases={6: 0},
        compiler_params=_compiler_params(plan),
        interpret=interpret,
        name="sparse_mlp_fused",
    )(idx, x, fc1_w, fc1_b, fc2_w_t, fc2_b, out_init)


def _fc1_call(idx, x, fc1_w, fc1_b, *, plan, interpret):
    if plan.split_d == 1:
        out_shape = jax.ShapeDtypeStruct((plan.batch_rows, plan.k_padded), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((plan.split_d, plan.batch_rows, plan.k_padded), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fc1_kernel, plan=plan),
        out_shape=out_shape,
        grid=plan.grid[0],
        compiler_params=_compiler_params(plan),
        interpret=interpret,
        name="sparse_mlp_fc1",
    )(idx, x, fc1_w, fc1_b)


def _fc2_call(idx, h, fc2_w_t, fc2_b, *, plan, interpret):
    if plan.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((plan.batch_rows, plan.d), h.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((plan.split_k, plan.batch_rows, plan.d), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fc2_kernel, plan=plan),
        out_shape=out_shape,
        grid=plan.grid[1],
        compiler_params=_compiler_params(plan),
        interpret=interpret,
        name="sparse_mlp_fc2",
    )(idx, h, fc2_w_t, fc2_b)


def _v2_calls(idx, x, fc1_w, fc1_b, fc2_w_t, fc2_b, *, plan, interpret):
    """two_pass_v2: fc1 then fc2; returns fc2's output (partials when split_k > 1)."""
    if plan.split_d == 1:
        h_shape = jax.ShapeDtypeStruct((plan.batch_rows, plan.k_padded), x.dtype)
    else:
        h_shape = jax.ShapeDtypeStruct((plan.split_d, plan.batch_rows, plan.k_padded), jnp.float32)
    h = pl.pallas_call(
        functools.partial(_v2_fc1_kernel, plan=plan),
        out_shape=h_shape,
        grid=plan.grid[0],
        compiler_params=_compiler_params(plan),
        interpret=interpret,
        name="sparse_mlp_v2_fc1",
    )(idx, x, fc1_w, fc1_b)
    if plan.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((plan.batch_rows, plan.d), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((plan.split_k, plan.batch_rows, plan.d), jnp.float32)
    return pl.pallas_call(
        functools.partial(_v2_fc2_kernel, plan=plan),
        out_shape=out_shape,
        grid=plan.grid[1],
        compiler_params=_compiler_params(plan, plan.fc2_num_warps),
        interpret=interpret,
        name="sparse_mlp_v2_fc2",
    )(idx, h, fc1_b, fc2_w_t, fc2_b)


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
        raise ValueError(
            f"batch must be in [1, {MAX_BATCH}] (use the dense MLP for larger batches). Got {batch}")
    if fc1_w.ndim != 2 or fc1_w.shape[1] != d:
        raise ValueError(f"fc1_w must be [ffn, d] with d = x.shape[1]. Got {fc1_w.shape} and x "
                         f"{x.shape}")
    ffn = fc1_w.shape[0]
    if fc2_w_t.shape != fc1_w.shape:
        raise ValueError(f"fc2_w_t must be [ffn, d] (fc2 weight transposed), the shape of fc1_w. Got "
                         f"{fc2_w_t.shape} and {fc1_w.shape}")
    if fc1_b.shape != (ffn,):
        raise ValueError(f"fc1_b must be [ffn] = ({ffn},). Got {fc1_b.shape} and fc1_w {fc1_w.shape}")
    if fc2_b.shape != (d,):
        raise ValueError(f"fc2_b must be [d] = ({d},). Got {fc2_b.shape} and x {x.shape}")
    for name, arr in (("fc1_w", fc1_w), ("fc1_b", fc1_b), ("fc2_w_t", fc2_w_t), ("fc2_b", fc2_b)):
        if arr.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype; cast the weights once at load time. Got "
                             f"{arr.dtype} and {x.dtype}")
    if active_idx.ndim != 1:
        raise ValueError(f"active_idx must be rank 1 [K]. Got shape {active_idx.shape}")
    if not jnp.issubdtype(active_idx.dtype, jnp.integer):
        raise ValueError(f"active_idx must be an integer array. Got {active_idx.dtype}")


@functools.partial(
    jax.jit,
    static_argnames=("variant", "block_k", "block_d", "split_d", "split_k", "num_warps",
                     "num_stages", "use_dot", "fc2_block_k", "fc2_block_d", "prefetch",
                     "interpret"))
def sparse_mlp(
    x,           # [B, d]
    fc1_w,       # [ffn, d]
    fc1_b,       # [ffn]
    fc2_w_t,     # [ffn, d]
    fc2_b,       # [d]
    active_idx,  # [K] int
    *,
    variant: str = DEFAULT_VARIANT,
    block_k: int | None = None,
    block_d: int | None = None,
    split_d: int | None = None,
    split_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    use_dot: bool | None = None,
    fc2_block_k: int | None = None,
    fc2_block_d: int | None = None,
    prefetch: int | None = None,
    interpret: bool = False,
):
    """relu(x · fc1_w[idx]ᵀ + fc1_b[idx]) · fc2_w_t[idx] + fc2_b, as [B, d] in x.dtype.

    Knobs left as None are chosen by `plan_sparse_mlp` from the shapes. `interpret=True` runs the
    kernels in the Pallas interpreter (CPU tests). Indices are not range-checked (module docstring).
    """
    _check_inputs(x, fc1_w, fc1_b, fc2_w_t, fc2_b, active_idx)
    batch, d = x.shape
    k = active_idx.shape[0]
    if k == 0:
        return jnp.broadcast_to(fc2_b, (batch, d)).astype(x.dtype)
    plan = plan_sparse_mlp(
        batch, k, d, x.dtype, variant=variant, block_k=block_k, block_d=block_d, split_d=split_d,
        split_k=split_k, num_warps=num_warps, num_stages=num_stages, use_dot=use_dot,
        fc2_block_k=fc2_block_k, fc2_block_d=fc2_block_d, prefetch=prefetch)

    idx = active_idx.astype(jnp.int32)
    if plan.k_padded != k:
        idx = jnp.pad(idx, (0, plan.k_padded - k))
    x_rows = x if plan.batch_rows == batch else jnp.pad(x, ((0, plan.batch_rows - batch), (0, 0)))

    if plan.variant == "fused":
        out = _fused_call(idx, x_rows, fc1_w, fc1_b, fc2_w_t, fc2_b, plan=plan, interpret=interpret)
        return out[:batch].astype(x.dtype)
    if plan.variant == "two_pass_v2":
        out = _v2_calls(idx, x_rows, fc1_w, fc1_b, fc2_w_t, fc2_b, plan=plan, interpret=interpret)
        if plan.split_k > 1:
            out = (jnp.sum(out, axis=0) + fc2_b.astype(jnp.float32)[None, :]).astype(x.dtype)
        return out[:batch]

    h = _fc1_call(idx, x_rows, fc1_w, fc1_b, plan=plan, interpret=interpret)
    if plan.split_d > 1:
        pre = jnp.sum(h, axis=0) + jnp.take(fc1_b, idx).astype(jnp.float32)[None, :]
        valid = jnp.arange(plan.k_padded) < k
        h = jnp.where(valid[None, :], jnp.maximum(pre, 0.0), 0.0).astype(x.dtype)
    out = _fc2_call(idx, h, fc2_w_t, fc2_b, plan=plan, interpret=interpret)
    if plan.split_k > 1:
        out = (jnp.sum(out, axis=0) + fc2_b.astype(jnp.float32)[None, :]).astype(x.dtype)
    return out[:batch]


def check_active_idx(active_idx, ffn: int, *, allow_duplicates: bool = True) -> None:
    """Host-side check of an index set before it reaches `sparse_mlp` (which does not range-check).

    Raises ValueError for a non-integer or non-1-D array, any index outside [0, ffn), or (with
    allow_duplicates=False) a repeated index. Needs a concrete array: call it outside jit.
    """
    try:
        idx = np.asarray(active_idx)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
        raise ValueError("check_active_idx needs a concrete array; call it outside jit. Got a traced "
                         f"value of shape {active_idx.shape}") from e
    if idx.ndim != 1:
        raise ValueError(f"active_idx must be rank 1 [K]. Got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"active_idx must be an integer array. Got {idx.dtype}")
    if idx.size == 0:
        return
    bad = (idx < 0) | (idx >= ffn)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"active_idx must lie in [0, ffn={ffn}). Got {int(idx[first])} at position "
                         f"{first} ({int(bad.sum())} out of range)")
    if not allow_duplicates:
        values, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"active_idx must not repeat a neuron. Got {int(values[counts > 1][0])} "
                             f"{int(counts[counts > 1][0])} times")


def sparse_mlp_reference(x, fc1_w, fc1_b, fc2_w_t, fc2_b, active_idx):
    """Pure-jnp twin of `sparse_mlp`: gather the active rows, two fp32-accumulated matmuls."""
    idx = active_idx.astype(jnp.int32)
    w1 = jnp.take(fc1_w, idx, axis=0)                                   # [K, d]
    w2 = jnp.take(fc2_w_t, idx, axis=0)                                 # [K, d]
    b1 = jnp.take(fc1_b, idx).astype(jnp.float32)                      # [K]
    pre = jnp.einsum("bd,kd->bk", x, w1, preferred_element_type=jnp.float32,
                     precision=lax.Precision.HIGHEST)
    h = jnp.maximum(pre + b1[None, :], 0.0).astype(x.dtype)            # [B, K]
    out = jnp.einsum("bk,kd->bd", h, w2, preferred_element_type=jnp.float32,
                     precision=lax.Precision.HIGHEST)
    return (out + fc2_b.astype(jnp.float32)[None, :]).astype(x.dtype)
