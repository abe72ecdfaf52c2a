"""Head-sparse attention projections: the q/k/v and out projections of the chosen heads only, reading their weight
rows in place (no gathered copy of the weights).

    head_qkv:      out[p, b, j] = x[b] · qkv_w[parts[p], head_idx[j]]ᵀ + qkv_b[parts[p], head_idx[j]]
    head_out_proj: out[b]       = Σ_j heads_out[b, j] · out_w[head_idx[j]] + out_b
    head_qkv_pairs: out[b, j]   = x[b] · qkv_w[part_idx[j], head_idx[j]]ᵀ + qkv_b[part_idx[j], head_idx[j]]
    head_qkv_into_cache: K and V of every head written into the KV cache at one slot, and Q of head_idx, in one launch
    head_window_into_cache: K and V of the chosen heads and of a rotation of forced heads over a window of R recent
                   inputs written into the cache, and Q of the chosen heads from the new token, in one launch (the
                   K/V repair of dejavu_jax/sparse_attention.py)

in the model's layout (dejavu_jax/model.py, `OPTAttention`): `qkv_w` [3, H, hd, d] and `out_w` [H, hd, d], so a head
is a contiguous block of hd rows of d values in qkv_w[z] and in out_w. `x` [B, d]; `heads_out` [B, h, hd], the
attention output of the chosen heads; `head_idx` [h] int32 (unsorted, duplicates computed once per copy, h >= 1).
With head_idx = arange(H) both equal the dense projections. `parts` (static) picks which of Q (0), K (1), V (2) to
project, e.g. (0,) for Q alone or (1, 2) for K and V. `head_qkv_pairs` takes one (part, head) pair per output entry
instead, so one launch can project, say, K and V of some heads and Q of others (the same kernel over the weights
viewed as [1, 3·H, hd, d]: entry j reads "head" part_idx[j]·H + head_idx[j]).

Numerics follow the model's dense einsums run in the activation dtype: products summed in fp32, biases added in fp32,
one rounding to the activation dtype at the end. `head_out_proj` sums fp32 partials over head groups (one per grid
row) outside the kernel, in a fixed order (deterministic).

Design (Triton-lowered Pallas):
* `head_qkv`: grid (part, chosen head, row block). Program (p, j, r) loads head_idx[j] as a scalar (the gather is the
  grid) and reads rows [r·block_rows, (r+1)·block_rows) of qkv_w[parts[p], head_idx[j]] with plain 2-D tile loads,
  walking d in power-of-two column blocks, `qkv_step_blocks` of them per loop step. Rows are blocked by the largest
  power of two dividing hd (at most `block_rows`): hd = 80 gives blocks of 16, so every load is unmasked and no byte
  is read twice. Loading a program's whole row block in one step (`qkv_block_d=2048, qkv_step_blocks=0`: every
  load in flight at once, as the masked MLP's fc1 does) measured no faster on an H100 (44.2 vs 43.7 µs a layer at
  opt-6.7b with half the heads, 65.9 vs 63.1 at opt-13b; end to end 3.05 vs 2.94 ms a token:
  bench/results/kernels_head_sparse_NVIDIA-H100-80GB-HBM3_2026-11-28.md), so the default stays one 512-column
  block a step.
* `head_out_proj`: grid (head group, column block of d). Program (g, c) walks its group's chosen heads (a
  `fori_loop`), reading out_w[head_idx[j], rows, cols] in row blocks, and writes an fp32 partial [B, block_d]; the
  wrapper sums the groups and adds out_b. Groups multiply the programs when d has few column blocks.
* `head_window_into_cache` (one sequence): grid (1, entry, row block) over 2(n + f) K/V entries and n Q entries. A
  K/V program gathers the R buffer rows of the window in slot order ([R, block_d] tiles), multiplies them with its
  `window_block_rows` weight rows through `dot` and stores the [R, rows] result as one contiguous slice of the cache
  (the window is R consecutive slots); a forced entry derives its head from the cursor and returns at once where that
  head is chosen too or held by another device; a Q program runs the per-row path on the new token alone.
* Batch: below `DOT_MIN_BATCH` rows both kernels multiply and sum on the CUDA cores, unrolled over the rows; from
  `DOT_MIN_BATCH` rows (and row blocks of at least 16) x / heads_out are padded to a power of two >= 16 rows and the
  tiles go through `dot` (Triton's dot needs >= 16 on each side). Up to `MAX_BATCH` rows.

LayerNorm: below `DOT_MIN_BATCH` rows, `head_qkv_pairs` and `head_qkv_into_cache` can take the pre-LayerNorm x with
the LayerNorm's scale and bias and normalise it themselves (kernels/layernorm.py).

Index contract: head_idx is not range-checked inside the kernels (on GPU an out-of-range head reads outside the
weights). Shapes: d a multiple of 16, any hd >= 1. `interpret=None` runs the Pallas interpreter unless the default
backend is a GPU (kernels/platform.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.block_math import cdiv, next_pow2, pow2_divisor
from kernels import layernorm as ln
from kernels import split_sum
from kernels.layernorm import normalized_block, row_stats
from kernels.platform import resolve_interpret

DOT_MIN_BATCH = 16
MAX_BATCH = 64
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Elements of one weight tile (and of one padded-x tile on the dot path) per step: 16 KiB of fp16.
TILE_ELEMENTS = 8192
# Two programs per H100 SM (132 SMs): head_out_proj splits the heads into groups until it has this many programs.
TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class HeadSparsePlan:
    """Static launch configuration of both kernels (block sizes are powers of two)."""

    batch: int
    d: int
    head_dim: int
    heads: int  # h, chosen heads
    qkv_block_rows: int = 16  # rows of a head one head_qkv program owns (capped to a power of two dividing hd)
    qkv_block_d: int = 512  # columns per head_qkv load (capped to a power of two dividing d, and on dots)
    # column blocks loaded per step of a head_qkv program (the largest divisor of d / block_d not above it); 0 = all
    qkv_step_blocks: int = 1
    qkv_warps: int = 4
    # Triton software-pipelining stages of head_qkv's column loop (its loads feed dots from 16 rows)
    qkv_stages: int = 1
    out_block_rows: int = 32  # rows of a head per head_out_proj step
    out_block_d: int = 256  # columns of d per head_out_proj program
    out_groups: int = 0  # head groups of head_out_proj (fp32 partials); 0 = enough for `TARGET_PROGRAMS`
    out_warps: int = 4
    out_stages: int = 1  # the same for head_out_proj's loop over its group's heads
    # 1: a decode step computing every head's K/V writes them into the cache from the projection kernel
    # (`head_qkv_into_cache`, batch < DOT_MIN_BATCH) instead of two cache writes after it; read by the caller
    # through `plan_flag`. On by default: measured faster (bench/results/NOTES.md, "The three fusion knobs on an H100")
    qkv_cache_write: int = 1
    # 1: a decode step with every head's K/V (below DOT_MIN_BATCH rows) hands the q/k/v kernel the pre-LayerNorm
    # input and the LayerNorm, which the kernel applies (kernels/layernorm.py); read by the model through
    # `plan_flag`. On by default, measured with `qkv_cache_write`
    qkv_layernorm: int = 1
    # 1: a batch-1 decode step with the K/V repair (a window of R >= 16 inputs, a power of two) projects the window
    # and writes it into the cache in one launch (`head_window_into_cache`); 0: `head_qkv_pairs` over the window's
    # rows, then XLA scatters them into the cache. Read by the caller through `plan_flag`
    window_cache_write: int = 1
    # rows of a head one `head_window_into_cache` program owns (capped to a power of two dividing hd, at least 16 for
    # the window's dots): 32 decoded faster than 16 on an H100 (bench/results/NOTES.md, "The K/V repair in one launch")
    window_block_rows: int = 32
    # Triton software-pipelining stages of `head_window_into_cache`'s column loop: 2 decoded faster than 1, 3 and 4
    # on an H100 (bench/results/NOTES.md, "The window kernel pipelined")
    window_stages: int = 2
    # 1: a batch-1 repair step hands `head_window_into_cache` the pre-LayerNorm input and the LayerNorm, which the
    # kernel applies, also writing the buffer's new row (no LayerNorm and no buffer write in XLA); read by the model
    # through `plan_flag`. On by default: measured faster (the same section)
    window_layernorm: int = 1
    # split_s of the head path's Pallas decode attention (kernels/decode_attention.py): 0 = that kernel's own plan;
    # 1 = no flash-decoding merge after it (one program per head over every slot). Read by the caller (`plan_flag`)
    attention_split: int = 0
    # 1: a decode step's `head_out_proj` also adds out_proj's bias and the residual, its last programs summing the
    # head groups' partials (`head_out_proj_residual`, kernels/split_sum.py): no XLA reduction or residual add after
    # it. Read by the model through `plan_flag`
    out_residual: int = 0
    # 1 (with out_residual): the last of those programs also applies the MLP's LayerNorm to the new row (one program
    # reads the whole row: a serial tail, against XLA's two LayerNorm kernels). Read by the model (`plan_flag`)
    out_layernorm: int = 0
    # 1: at batch 1 with the Pallas decode attention, `head_out_proj` merges that kernel's flash-decoding splits
    # itself (each program for the heads it reads): no merge kernel between them. Read by the caller (`plan_flag`)
    out_merge: int = 0
    # 1: at batch 1, head_qkv carries its products over d as a [rows, block_d] tile and reduces them once at the end
    # (a block reduction is a barrier; `kernels.block_math`), and a LayerNorm's statistics reduce once per sum;
    # 0: one reduction per column block
    sum_once: int = 1

    def __post_init__(self):
        for name in ("qkv_block_rows", "qkv_block_d", "out_block_rows", "out_block_d", "window_block_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two. Got {value!r}")
        if self.sum_once not in (0, 1):
            raise ValueError(f"sum_once must be 0 or 1. Got {self.sum_once!r}")
        zero_ok = (
            "out_groups",
            "qkv_step_blocks",
            "qkv_cache_write",
            "qkv_layernorm",
            "window_cache_write",
            "window_layernorm",
            "attention_split",
            "out_residual",
            "out_layernorm",
            "out_merge",
        )
        for name in ("qkv_warps", "out_warps", "qkv_stages", "out_stages", "window_stages", *zero_ok):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name in zero_ok else 1):
                raise ValueError(
                    f"{name} must be a {'non-negative' if name in zero_ok else 'positive'} int. Got {value!r}"
                )

    @property
    def rows_qkv(self) -> int:
        return pow2_divisor(self.head_dim, self.qkv_block_rows)

    @property
    def qkv_blocks_per_step(self) -> int:
        """Column blocks one head_qkv step loads: a divisor of d / bd_qkv."""
        blocks = self.d // self.bd_qkv
        want = self.qkv_step_blocks or blocks
        return max(n for n in range(1, min(want, blocks) + 1) if blocks % n == 0)

    @property
    def rows_out(self) -> int:
        return pow2_divisor(self.head_dim, self.out_block_rows)

    @property
    def qkv_dot(self) -> bool:
        return self.batch >= DOT_MIN_BATCH and self.rows_qkv >= 16

    @property
    def out_dot(self) -> bool:
        return self.batch >= DOT_MIN_BATCH and self.rows_out >= 16

    def batch_rows(self, dot: bool) -> int:
        """Rows a kernel computes: B, or B padded to a power of two >= 16 for dots."""
        return max(16, next_pow2(self.batch)) if dot else self.batch

    def _block_d(self, cap: int, dot: bool) -> int:
        """Columns per tile: a power of two dividing d, at most cap (and on dots at most `TILE_ELEMENTS` / rows)."""
        if dot:
            cap = min(cap, max(16, TILE_ELEMENTS // self.batch_rows(True)))
        return pow2_divisor(self.d, cap)

    @property
    def bd_qkv(self) -> int:
        return self._block_d(self.qkv_block_d, self.qkv_dot)

    @property
    def bd_out(self) -> int:
        return self._block_d(self.out_block_d, self.out_dot)

    @property
    def heads_per_group(self) -> int:
        groups = self.out_groups or cdiv(TARGET_PROGRAMS, self.d // self.bd_out)
        return cdiv(self.heads, max(1, min(self.heads, groups)))

    @property
    def groups(self) -> int:
        return cdiv(self.heads, self.heads_per_group)  # no empty group


# ---- kernels ---------------------------------------------------------------------------------------------------


def _dot_precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _head_qkv_kernel(part_ref, head_idx_ref, x_ref, w_ref, b_ref, *rest, plan: HeadSparsePlan, eps=None):
    # part_ref [P] int32, head_idx_ref [h] int32, x_ref [Bp, d], w_ref [3, H, hd, d], b_ref [3, H, hd]; with a
    # LayerNorm (eps) its scale and bias [d]; out_ref [P, Bp, h, hd].
    *ln_refs, out_ref = rest
    p, j = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(pl.program_id(2) * plan.rows_qkv, plan.rows_qkv), plan.rows_qkv)
    acc = _qkv_rows(
        x_ref, w_ref, b_ref, part_ref[p], head_idx_ref[j], rows, plan, _layernorm(x_ref, ln_refs, plan, eps)
    )
    if plan.qkv_dot:
        out_ref[p, :, j, rows] = acc.astype(out_ref.dtype)
    else:
        for b, a in enumerate(acc):
            out_ref[p, b, j, rows] = a.astype(out_ref.dtype)


def _layernorm(x_ref, ln_refs, plan: HeadSparsePlan, eps):
    """(row stats, scale_ref, bias_ref) of the LayerNorm a kernel applies to x, or None."""
    if eps is None:
        return None
    return (row_stats(x_ref, plan.batch, plan.d, plan.bd_qkv, eps, once=bool(plan.sum_once)), *ln_refs)


def _qkv_rows(x_ref, w_ref, b_ref, z, head, rows, plan: HeadSparsePlan, layernorm=None):
    """x · w[z, head, rows]ᵀ + b[z, head, rows] in fp32: [Bp, rb] on the dot path, else a tuple of B [rb].
    `layernorm` (row stats, scale_ref, bias_ref; the per-row path only): x is normalised as it is loaded."""
    rb, bd, dot = plan.rows_qkv, plan.bd_qkv, plan.qkv_dot
    n_rows = plan.batch_rows(dot)

    def x_row(b, cols):
        if layernorm is None:
            return x_ref[b, cols].astype(jnp.float32)
        return normalized_block(x_ref, b, cols, *layernorm)

    per_step = plan.qkv_blocks_per_step
    # one sequence: the products are carried as a [rb, bd] tile and reduced once after the loop
    tile = not dot and plan.batch == 1 and plan.sum_once

    def step(s, acc):
        for i in range(per_step):  # static: the step's loads can all be in flight at once
            start = (s * per_step + i) * bd  # a Python int when the whole row block is one step
            cols = pl.ds(start if isinstance(start, int) else pl.multiple_of(start, bd), bd)
            w = w_ref[z, head, rows, cols]  # [rb, bd]
            if dot:
                acc = acc + plgpu.dot(x_ref[:, cols], w, trans_b=True, precision=_dot_precision(w.dtype))
                continue
            w = w.astype(jnp.float32)
            if tile:
                acc = tuple(a + w * x_row(b, cols)[None, :] for b, a in enumerate(acc))
            else:
                acc = tuple(a + jnp.sum(w * x_row(b, cols)[None, :], axis=1) for b, a in enumerate(acc))
        return acc

    shape = (rb, bd) if tile else (rb,)
    init = jnp.zeros((n_rows, rb), jnp.float32) if dot else tuple(jnp.zeros(shape, jnp.float32) for _ in range(n_rows))
    steps = plan.d // (bd * per_step)
    acc = step(0, init) if steps == 1 else lax.fori_loop(0, steps, step, init)
    if tile:
        acc = tuple(jnp.sum(a, axis=1) for a in acc)
    bias = b_ref[z, head, rows].astype(jnp.float32)  # [rb]
    return acc + bias[None, :] if dot else tuple(a + bias for a in acc)


def _head_qkv_cache_kernel(head_idx_ref, cursor_ref, x_ref, w_ref, b_ref, *rest, plan, q_scale, eps=None):
    # head_idx_ref [n] int32, cursor_ref [1] int32, x_ref [B, d], w_ref [1, 3H, hd, d] (part z's head h is "head"
    # z·H + h), b_ref [1, 3H, hd]; k_ref / v_ref [B, H, S, hd] (aliased to the inputs: written at the cursor only);
    # q_ref [B, n, hd]. Entry j < H: K of head j; H <= j < 2H: V of head j - H; then Q of head_idx[j - 2H]. With a
    # LayerNorm (eps), its scale and bias [d] come before the aliased cache inputs.
    *ln_refs, _k_in, _v_in, q_ref, k_ref, v_ref = rest
    n_heads = k_ref.shape[1]
    j, cursor = pl.program_id(1), cursor_ref[0]
    rows = pl.ds(pl.multiple_of(pl.program_id(2) * plan.rows_qkv, plan.rows_qkv), plan.rows_qkv)
    q_head = head_idx_ref[jnp.maximum(j - 2 * n_heads, 0)]
    live = (j < 2 * n_heads) | (q_head >= 0)  # a negative Q entry is padding: no weights read, zero Q
    flat = jnp.where(j < 2 * n_heads, n_heads + j, jnp.maximum(q_head, 0))

    @pl.when(live)
    def _():
        acc = _qkv_rows(x_ref, w_ref, b_ref, 0, flat, rows, plan, _layernorm(x_ref, ln_refs, plan, eps))

        @pl.when(j < n_heads)
        def _():
            for b, a in enumerate(acc):
                k_ref[b, j, cursor, rows] = a.astype(k_ref.dtype)

        @pl.when((j >= n_heads) & (j < 2 * n_heads))
        def _():
            for b, a in enumerate(acc):
                v_ref[b, j - n_heads, cursor, rows] = a.astype(v_ref.dtype)

        @pl.when(j >= 2 * n_heads)
        def _():
            for b, a in enumerate(acc):
                q_ref[b, j - 2 * n_heads, rows] = (a * q_scale).astype(q_ref.dtype)

    @pl.when(~live)
    def _():
        for b in range(plan.batch):
            q_ref[b, j - 2 * n_heads, rows] = jnp.zeros((plan.rows_qkv,), q_ref.dtype)


def _head_window_cache_kernel(q_idx_ref, meta_ref, x_ref, *rest, plans, n, forced, total_heads, q_scale, eps=None):
    # q_idx_ref [n] int32: the n chosen heads (K/V and Q), -1 for padding; meta_ref [2] int32:
    # the cursor and the first head this call's weights hold (of `total_heads`); x_ref [1, d]: the new token's input
    # (with a LayerNorm (eps), its pre-LayerNorm input); then w_ref [1, 3H, hd, d], b_ref [1, 3H, hd] (part z's head
    # h is "head" z·H + h), with a LayerNorm its scale and bias [d]; then the aliased inputs and the outputs: recent
    # [R, d], the inputs of slots cursor-R+1 .. cursor at row slot mod R (with a LayerNorm the row of `cursor` is
    # written here: program (0, 0, 0) stores it apart from its window, and every window takes it from x instead of
    # the buffer), k / v [1, H, S, hd], then q [1, n, hd].
    # Entries j < m = n + forced: K of chosen head j (j < n) or of forced head j - n; the next m: V of the same; then
    # Q of chosen head j - 2m.
    window_plan, q_plan = plans
    if eps is None:
        w_ref, b_ref, recent_ref, _k_in, _v_in, q_ref, k_ref, v_ref = rest
        layernorm = None
    else:
        w_ref, b_ref, scale_ref, bias_ref, _r_in, _k_in, _v_in, q_ref, recent_ref, k_ref, v_ref = rest
        stats = row_stats(x_ref, 1, q_plan.d, q_plan.bd_qkv, eps, once=bool(q_plan.sum_once))
        layernorm = (stats, scale_ref, bias_ref)
    n_heads, window = k_ref.shape[1], recent_ref.shape[0]
    m = n + forced
    j, row_block, cursor = pl.program_id(1), pl.program_id(2), meta_ref[0]
    rb = window_plan.rows_qkv
    rows = pl.ds(pl.multiple_of(row_block * rb, rb), rb)
    is_v = (j >= m) & (j < 2 * m)
    entry = jnp.where(is_v, j - m, j)

    def window_kv(head):
        # The window as R consecutive slots from `start`, so the cache takes them as one contiguous store. Before
        # slot R-1 exists the window reaches past the cursor: those slots get the buffer's stale rows, which no
        # step reads before this head's next computation (at most R steps later) rewrites them.
        start = jnp.maximum(cursor - (window - 1), 0)
        buffer_rows = (start + lax.iota(jnp.int32, window)) % window
        flat = (1 + is_v.astype(jnp.int32)) * n_heads + head
        new_row = None if layernorm is None else (cursor - start, layernorm)
        acc = _window_rows(x_ref, recent_ref, buffer_rows, w_ref, b_ref, flat, rows, window_plan, new_row)
        slots = pl.ds(start, window)

        @pl.when(~is_v)
        def _():
            k_ref[0, head, slots, rows] = acc.astype(k_ref.dtype)

        @pl.when(is_v)
        def _():
            v_ref[0, head, slots, rows] = acc.astype(v_ref.dtype)

    @pl.when((j < 2 * m) & (entry < n) & (q_idx_ref[jnp.minimum(entry, n - 1)] >= 0))  # a negative entry: padding
    def _():
        window_kv(q_idx_ref[jnp.minimum(entry, n - 1)])

    if layernorm is not None:

        @pl.when((j == 0) & (row_block == 0))
        def _():
            # One program stores the buffer's new row (whether or not its entry is padding); the windows take that
            # row from x, never from the buffer.
            bd = q_plan.bd_qkv
            for s in range(q_plan.d // bd):  # static
                cols = pl.ds(s * bd, bd)
                recent_ref[cursor % window, cols] = normalized_block(x_ref, 0, cols, *layernorm).astype(
                    recent_ref.dtype
                )

    @pl.when((j < 2 * m) & (entry >= n))
    def _():
        # A forced head: the rotation's (cursor·f + i) mod total_heads, skipped where it is not among this call's
        # heads, or is chosen too (the chosen entry computes the same window): one vector load of the list, masked
        # to a power of two (-1 past n), so the caller pads nothing in XLA.
        rotated = (cursor * forced + entry - n) % total_heads - meta_ref[1]
        width = next_pow2(n)
        listed = plgpu.load(q_idx_ref.at[pl.ds(0, width)], mask=lax.iota(jnp.int32, width) < n, other=-1)
        chosen_too = jnp.sum((listed == rotated).astype(jnp.int32)) > 0  # (Triton lowers no reduce_or)

        @pl.when((rotated >= 0) & (rotated < n_heads) & ~chosen_too)
        def _():
            window_kv(jnp.clip(rotated, 0, n_heads - 1))

    q_entry = jnp.maximum(j - 2 * m, 0)

    @pl.when((j >= 2 * m) & (q_idx_ref[q_entry] >= 0))
    def _():
        (acc,) = _qkv_rows(x_ref, w_ref, b_ref, 0, q_idx_ref[q_entry], rows, q_plan, layernorm)
        q_ref[0, q_entry, rows] = (acc * q_scale).astype(q_ref.dtype)

    @pl.when((j >= 2 * m) & (q_idx_ref[q_entry] < 0))
    def _():
        q_ref[0, q_entry, rows] = jnp.zeros((window_plan.rows_qkv,), q_ref.dtype)


def _window_rows(x_ref, recent_ref, buffer_rows, w_ref, b_ref, flat, rows, plan: HeadSparsePlan, new_row=None):
    """recent[buffer_rows] · w[0, flat, rows]ᵀ + b[0, flat, rows] in fp32 [R, rb], on the dot path (R >= 16 rows).
    `new_row` (the cursor's window row, the LayerNorm): that window row is LayerNorm(x) instead of the buffer's."""
    bd = plan.bd_qkv
    window = recent_ref.shape[0]

    def step(s, acc):
        cols = pl.ds(pl.multiple_of(s * bd, bd), bd)
        x = recent_ref[buffer_rows, cols]  # [R, bd]: the window in slot order (a gather of R rows)
        if new_row is not None:
            at, layernorm = new_row
            normed = normalized_block(x_ref, 0, cols, *layernorm).astype(x.dtype)  # [bd]
            x = jnp.where((lax.iota(jnp.int32, window) == at)[:, None], normed[None, :], x)

        w = w_ref[0, flat, rows, cols]  # [rb, bd]
        return acc + plgpu.dot(x, w, trans_b=True, precision=_dot_precision(w.dtype))

    init = jnp.zeros((window, plan.rows_qkv), jnp.float32)
    acc = lax.fori_loop(0, plan.d // bd, step, init)
    return acc + b_ref[0, flat, rows].astype(jnp.float32)[None, :]


def _head_out_proj_kernel(head_idx_ref, h_ref, *rest, plan: HeadSparsePlan, finish=None, splits=False):
    # head_idx_ref [h] int32, h_ref [Bp, h, hd] (with `splits`: h_ref o [B, h, S, hd] fp32 and then m, l [B, h, S]
    # fp32, the attention's unmerged splits), w_ref [H, hd, d]; out_ref [groups, Bp, d] fp32. With `finish`
    # (gpu, eps or None): then out_b [d], the residual [B, d], with eps the LayerNorm's scale and bias [d], the sync
    # counters (aliased); the outputs partials, the new residual [B, d], with eps its LayerNorm [B, d], sync.
    if splits:
        m_ref, l_ref, w_ref, *rest = rest
    else:
        w_ref, *rest = rest
    if finish is None:
        (out_ref,) = rest
    else:
        gpu, eps = finish
        if eps is None:
            bias_ref, res_ref, _sync_in, out_ref, new_ref, sync_ref = rest
        else:
            bias_ref, res_ref, scale_ref, shift_ref, _sync_in, out_ref, new_ref, normed_ref, sync_ref = rest
    g = pl.program_id(0)
    rb, bd, dot, hpg = plan.rows_out, plan.bd_out, plan.out_dot, plan.heads_per_group
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * bd, bd), bd)
    n_rows = plan.batch_rows(dot)

    def add_head(head, j, acc):
        for r0 in range(0, plan.head_dim, rb):  # static
            rows = pl.ds(r0, rb)
            w = w_ref[head, rows, cols]  # [rb, bd]
            if dot:
                acc = acc + plgpu.dot(h_ref[:, j, rows], w, precision=_dot_precision(w.dtype))
            else:
                w = w.astype(jnp.float32)
                acc = tuple(a + jnp.sum(head_rows(b, j, r0)[:, None] * w, axis=0) for b, a in enumerate(acc))
        return acc

    def head_rows(b, j, r0):  # fp32 [rb]: entry j's attention output rows, in the activation dtype's values
        rows = pl.ds(r0, rb)
        if not splits:
            return h_ref[b, j, rows].astype(jnp.float32)
        n_splits = m_ref.shape[2]
        m = [m_ref[b, j, s] for s in range(n_splits)]  # static
        top = functools.reduce(jnp.maximum, m)
        weights = [jnp.exp(v - top) for v in m]
        num = sum(wt * h_ref[b, j, s, rows] for s, wt in enumerate(weights))
        den = sum(wt * l_ref[b, j, s] for s, wt in enumerate(weights))
        inv = jnp.where(den > 0.0, 1.0 / jnp.maximum(den, 1e-30), 0.0)
        return (num * inv).astype(w_ref.dtype).astype(jnp.float32)

    def step(j, acc):
        head = head_idx_ref[j]  # scalar; a negative entry is padding: its weight rows are not read
        return lax.cond(head >= 0, lambda a: add_head(head, j, a), lambda a: a, acc)

    init = jnp.zeros((n_rows, bd), jnp.float32) if dot else tuple(jnp.zeros((bd,), jnp.float32) for _ in range(n_rows))
    acc = lax.fori_loop(g * hpg, jnp.minimum((g + 1) * hpg, plan.heads), step, init)
    if dot:
        out_ref[g, :, cols] = acc
    else:
        for b in range(n_rows):
            out_ref[g, b, cols] = acc[b]
    if finish is not None:
        col_blocks = plan.d // bd

        def layernorm_row():  # the last column block's finisher normalises the whole new row
            @pl.when(split_sum.last_to_arrive(sync_ref, col_blocks, col_blocks, gpu))
            def _():
                _normalize_rows(new_ref, normed_ref, scale_ref, shift_ref, plan, eps, gpu)
                split_sum.reset(sync_ref, col_blocks)

        split_sum.finish_column_block(
            sync_ref,
            out_ref,
            bias_ref,
            res_ref,
            new_ref,
            cols=cols,
            groups=plan.groups,
            gpu=gpu,
            after=None if eps is None else layernorm_row,
        )


def _normalize_rows(x_ref, out_ref, scale_ref, shift_ref, plan: HeadSparsePlan, eps: float, gpu: bool):
    """out = LayerNorm(x) over whole rows, x stored by other programs of this launch (one program runs this)."""
    bd = pow2_divisor(plan.d, 2048)

    def load(ref_at):
        return split_sum.load_shared(ref_at, gpu)

    stats = row_stats(x_ref, plan.batch, plan.d, bd, eps, once=bool(plan.sum_once), load=load)
    for b in range(plan.batch):
        for c0 in range(0, plan.d, bd):  # static
            cols = pl.ds(c0, bd)
            out_ref[b, cols] = normalized_block(x_ref, b, cols, stats, scale_ref, shift_ref, load).astype(out_ref.dtype)


# ---- pallas_call layer -----------------------------------------------------------------------------------------


def _head_qkv_call(part_idx, head_idx, x, qkv_w, qkv_b, *, plan, interpret, layernorm=None):
    n_parts = part_idx.shape[0]
    eps, ln_args = ln.call_args(layernorm)
    return pl.pallas_call(
        functools.partial(_head_qkv_kernel, plan=plan, eps=eps),
        out_shape=jax.ShapeDtypeStruct((n_parts, x.shape[0], plan.heads, plan.head_dim), x.dtype),
        grid=(n_parts, plan.heads, plan.head_dim // plan.rows_qkv),
        compiler_params=plgpu.CompilerParams(num_warps=plan.qkv_warps, num_stages=plan.qkv_stages),
        interpret=interpret,
        name="head_qkv",
    )(part_idx, head_idx, x, qkv_w, qkv_b, *ln_args)


def _head_out_proj_call(head_idx, heads_out, out_w, *, plan, interpret, finish_args=None, eps=None):
    """The partials [groups, Bp, d] fp32; with `finish_args` (out_b, residual, (ln scale, bias) or (), sync) also
    the finished rows: (partials, new residual, [its LayerNorm,] sync). `heads_out`: [Bp, h, hd], or the attention's
    unmerged splits (o, m, l)."""
    splits = isinstance(heads_out, tuple)
    heads_in = heads_out if splits else (heads_out,)
    partials = jax.ShapeDtypeStruct((plan.groups, heads_in[0].shape[0], plan.d), jnp.float32)
    kernel = functools.partial(_head_out_proj_kernel, plan=plan, splits=splits)
    if finish_args is None:
        out_shape, extra, aliases = partials, (), {}
    else:
        out_b, residual, ln_args, sync = finish_args
        kernel = functools.partial(kernel, finish=(not interpret, eps))
        row = jax.ShapeDtypeStruct(residual.shape, residual.dtype)
        out_shape = (partials, row, *([row] if ln_args else []), jax.ShapeDtypeStruct(sync.shape, sync.dtype))
        extra = (out_b, residual, *ln_args, sync)
        aliases = {2 + len(heads_in) + len(extra) - 1: len(out_shape) - 1}
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(plan.groups, plan.d // plan.bd_out),
        compiler_params=plgpu.CompilerParams(num_warps=plan.out_warps, num_stages=plan.out_stages),
        input_output_aliases=aliases,
        interpret=interpret,
        name="head_out_proj",
    )(head_idx, *heads_in, out_w, *extra)


# ---- public wrappers -------------------------------------------------------------------------------------------


def _check_common(act, act_name, head_idx, n_heads, hd, d, weight, weight_name):
    batch = act.shape[0]
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(
            f"batch must be in [1, {MAX_BATCH}] (use the dense projection for larger batches). Got {batch}"
        )
    if jnp.dtype(act.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"{act_name} dtype must be float32, bfloat16 or float16. Got {act.dtype}")
    if weight.dtype != act.dtype:
        raise ValueError(f"{weight_name} must have {act_name}'s dtype. Got {weight.dtype} and {act.dtype}")
    if d % 16 or hd < 1 or n_heads < 1:
        raise ValueError(
            f"d must be a multiple of 16, with at least one head of hd >= 1. Got d={d}, {weight_name} {weight.shape}"
        )
    if head_idx.ndim != 1 or not jnp.issubdtype(head_idx.dtype, jnp.integer):
        raise ValueError(f"head_idx must be a rank-1 integer array [h]. Got shape {head_idx.shape}, {head_idx.dtype}")
    if head_idx.shape[0] < 1:
        raise ValueError("head_idx must choose at least one head. Got an empty head_idx")


def _check_qkv(x, qkv_w, qkv_b, head_idx):
    """The checks both q/k/v wrappers share -> (H, hd, d)."""
    if x.ndim != 2:
        raise ValueError(f"x must be [batch, d]. Got shape {x.shape}")
    if qkv_w.ndim != 4 or qkv_w.shape[0] != 3 or qkv_w.shape[3] != x.shape[1]:
        raise ValueError(f"qkv_w must be [3, H, hd, d] with d = x.shape[1]. Got {qkv_w.shape} and x {x.shape}")
    _, n_heads, hd, d = qkv_w.shape
    _check_common(x, "x", head_idx, n_heads, hd, d, qkv_w, "qkv_w")
    if qkv_b.shape != (3, n_heads, hd):
        raise ValueError(f"qkv_b must be [3, H, hd] = {(3, n_heads, hd)}. Got {qkv_b.shape}")
    return n_heads, hd, d


def _plan(batch, d, hd, heads, knobs) -> HeadSparsePlan:
    return HeadSparsePlan(batch=batch, d=d, head_dim=hd, heads=heads, **dict(knobs or ()))


def window_row_block(head_dim: int, knobs=None) -> int:
    """Rows of a head one `head_window_into_cache` program owns: `window_block_rows` (from `knobs`, else the plan's
    default) capped to a power of two dividing head_dim. The window's dots need at least 16."""
    return pow2_divisor(head_dim, dict(knobs or ()).get("window_block_rows", HeadSparsePlan.window_block_rows))


def plan_flag(knobs, name: str) -> int:
    """A `HeadSparsePlan` field that the callers read (`qkv_cache_write`, `qkv_layernorm`): its value in `knobs`
    ((name, value) pairs), else the plan's default."""
    return dict(knobs or ()).get(name, HeadSparsePlan.__dataclass_fields__[name].default)


def _pad_rows(a, rows):
    return a if a.shape[0] == rows else jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1))


@functools.partial(jax.jit, static_argnames=("parts", "knobs", "interpret"))
def head_qkv(x, qkv_w, qkv_b, head_idx, *, parts=(0, 1, 2), knobs=None, interpret=None):
    """[len(parts), B, h, hd] in x.dtype: x · qkv_w[z, head_idx[j]]ᵀ + qkv_b[z, head_idx[j]] for z in `parts`.

    x [B, d], qkv_w [3, H, hd, d], qkv_b [3, H, hd], head_idx [h] int. `parts`: a non-empty tuple of distinct
    values in {0, 1, 2} (Q, K, V). `knobs`: a tuple of (field, value) pairs of `HeadSparsePlan`; None = defaults.
    """
    n_heads, hd, d = _check_qkv(x, qkv_w, qkv_b, head_idx)
    parts = tuple(parts)
    if not parts or len(set(parts)) != len(parts) or not set(parts) <= {0, 1, 2}:
        raise ValueError(f"parts must be a non-empty tuple of distinct values in (0, 1, 2). Got {parts}")
    plan = _plan(x.shape[0], d, hd, head_idx.shape[0], knobs)
    out = _head_qkv_call(
        jnp.asarray(parts, jnp.int32),
        head_idx.astype(jnp.int32),
        _pad_rows(x, plan.batch_rows(plan.qkv_dot)),
        qkv_w,
        qkv_b.astype(x.dtype),
        plan=plan,
        interpret=resolve_interpret(interpret),
    )
    return out[:, : plan.batch]


def _checked_layernorm(ln_scale, ln_bias, ln_eps, d: int, plan: HeadSparsePlan):
    """`layernorm.checked`, on the per-row path only (the dot path does not normalise)."""
    layernorm = ln.checked(ln_scale, ln_bias, ln_eps, d)
    if layernorm is not None and plan.qkv_dot:
        raise ValueError(f"the q/k/v kernels apply a LayerNorm below {DOT_MIN_BATCH} rows. Got {plan.batch}")
    return layernorm


@functools.partial(jax.jit, static_argnames=("knobs", "interpret", "ln_eps"))
def head_qkv_pairs(
    x, qkv_w, qkv_b, part_idx, head_idx, *, knobs=None, interpret=None, ln_scale=None, ln_bias=None, ln_eps=1e-5
):
    """[B, n, hd] in x.dtype: x · qkv_w[part_idx[j], head_idx[j]]ᵀ + qkv_b[part_idx[j], head_idx[j]].

    x [B, d], qkv_w [3, H, hd, d], qkv_b [3, H, hd], part_idx and head_idx [n] int (parts in {0, 1, 2}; neither is
    range-checked, as for `head_qkv`). Each entry reads only its own hd rows, so mixed lists (K/V of some heads, Q of
    others) cost one launch and no weight bytes beyond their rows. `knobs`: as for `head_qkv`. With `ln_scale` and
    `ln_bias` [d] (below `DOT_MIN_BATCH` rows), x is the pre-LayerNorm input and the kernel normalises it (eps
    `ln_eps`; kernels/layernorm.py).
    """
    n_heads, hd, d = _check_qkv(x, qkv_w, qkv_b, head_idx)
    if part_idx.shape != head_idx.shape or not jnp.issubdtype(part_idx.dtype, jnp.integer):
        raise ValueError(
            f"part_idx must be an integer array shaped like head_idx {head_idx.shape}. "
            f"Got shape {part_idx.shape}, {part_idx.dtype}"
        )
    plan = _plan(x.shape[0], d, hd, head_idx.shape[0], knobs)
    # A row-major reshape is free: part z's head h is "head" z·H + h of one part.
    flat_idx = part_idx.astype(jnp.int32) * n_heads + head_idx.astype(jnp.int32)
    out = _head_qkv_call(
        jnp.zeros((1,), jnp.int32),
        flat_idx,
        _pad_rows(x, plan.batch_rows(plan.qkv_dot)),
        qkv_w.reshape(1, 3 * n_heads, hd, d),
        qkv_b.astype(x.dtype).reshape(1, 3 * n_heads, hd),
        plan=plan,
        interpret=resolve_interpret(interpret),
        layernorm=_checked_layernorm(ln_scale, ln_bias, ln_eps, d, plan),
    )
    return out[0, : plan.batch]


@functools.partial(jax.jit, static_argnames=("knobs", "interpret", "ln_eps", "q_scale"))
def head_qkv_into_cache(
    x,
    qkv_w,
    qkv_b,
    head_idx,
    keys,
    values,
    cursor,
    *,
    knobs=None,
    interpret=None,
    ln_scale=None,
    ln_bias=None,
    ln_eps=1e-5,
    q_scale: float = 1.0,
):
    """(q [B, n, hd], keys, values) in one launch: K and V of every head for the new token, written into the cache
    keys / values [B, H, S, hd] at slot `cursor` (in place where XLA can alias them; every other slot as it was),
    and Q of the n heads `head_idx`, as `head_qkv_pairs` computes them. Batch below `DOT_MIN_BATCH` (the per-row
    path); `cursor` is not range-checked on GPU (0 <= cursor < S is the caller's contract). Replaces, per layer and
    decode step, `head_qkv_pairs` over every head's K/V and the chosen Q plus the two cache writes after it.
    `ln_*` as for `head_qkv_pairs`. `q_scale` (static) multiplies Q in fp32 before its one rounding (the model's
    hd**-0.5, so that no XLA multiply follows the launch). A negative head_idx entry is padding: its Q comes back
    zeros and its weights are not read.
    """
    n_heads, hd, d = _check_qkv(x, qkv_w, qkv_b, head_idx)
    batch = x.shape[0]
    if batch >= DOT_MIN_BATCH:
        raise ValueError(f"head_qkv_into_cache takes fewer than {DOT_MIN_BATCH} rows. Got {batch}")
    if keys.shape != values.shape or keys.shape[:2] != (batch, n_heads) or keys.shape[3] != hd:
        raise ValueError(
            f"keys and values must be [B={batch}, H={n_heads}, S, hd={hd}]. Got {keys.shape}, {values.shape}"
        )
    n = head_idx.shape[0]
    plan = _plan(batch, d, hd, 2 * n_heads + n, knobs)
    eps, ln_args = ln.call_args(_checked_layernorm(ln_scale, ln_bias, ln_eps, d, plan))
    q, keys, values = pl.pallas_call(
        functools.partial(_head_qkv_cache_kernel, plan=plan, q_scale=float(q_scale), eps=eps),
        out_shape=(
            jax.ShapeDtypeStruct((batch, n, hd), x.dtype),
            jax.ShapeDtypeStruct(keys.shape, keys.dtype),
            jax.ShapeDtypeStruct(values.shape, values.dtype),
        ),
        grid=(1, plan.heads, hd // plan.rows_qkv),
        input_output_aliases={5 + len(ln_args): 1, 6 + len(ln_args): 2},
        compiler_params=plgpu.CompilerParams(num_warps=plan.qkv_warps, num_stages=plan.qkv_stages),
        interpret=resolve_interpret(interpret),
        name="head_qkv_cache",
    )(
        head_idx.astype(jnp.int32),
        jnp.reshape(jnp.asarray(cursor, jnp.int32), (1,)),
        x,
        qkv_w.reshape(1, 3 * n_heads, hd, d),
        qkv_b.astype(x.dtype).reshape(1, 3 * n_heads, hd),
        *ln_args,
        keys,
        values,
    )
    return q, keys, values


@functools.partial(jax.jit, static_argnames=("forced", "total_heads", "knobs", "interpret", "ln_eps", "q_scale"))
def head_window_into_cache(
    x,
    recent,
    qkv_w,
    qkv_b,
    q_heads,
    keys,
    values,
    cursor,
    *,
    forced: int = 0,
    total_heads: int = 0,
    first_head=0,
    knobs=None,
    interpret=None,
    ln_scale=None,
    ln_bias=None,
    ln_eps=1e-5,
    q_scale: float = 1.0,
):
    """(q [1, n, hd], keys, values, recent) in one launch, one sequence: K and V recomputed over the window of the R
    slots ending at `cursor` from their inputs and written into the cache keys / values [1, H, S, hd] (in place where
    XLA can alias them; other heads and slots as they were) for the n heads `q_heads` and the `forced` heads of the
    K/V repair's rotation, and Q of `q_heads` from x [1, d], the input at `cursor`.

    The rotation (`dejavu_jax.sparse_attention.forced_heads`): forced head i < f is (cursor·f + i) mod
    `total_heads` (0: H) of the whole model, of which these weights and cache hold heads [first_head, first_head +
    H) (under tensor parallelism a device holds a slice); a forced head outside them, or among q_heads (whose entry
    computes the same window), is skipped, so it costs no weight bytes. recent [R, d]: the ring buffer of inputs, slot
    s at row s mod R (R >= 16, a power of two: the window's rows go through `dot`); S >= R. Without a LayerNorm it
    must already hold x at row cursor mod R, and comes back as given. With `ln_scale` / `ln_bias` [d], x is the
    pre-LayerNorm input: the kernel normalises it (kernels/layernorm.py) and writes the result into the buffer's row
    cursor mod R itself (returned updated), so the step runs neither a LayerNorm nor a buffer write in XLA. Slots
    cursor-R+1 .. cursor that exist are written exactly; while cursor < R-1 the window is slots 0 .. R-1, and the
    slots past the cursor get the buffer's stale rows (the caller's contract: nothing reads a slot past the cursor
    before it is written again, as the K/V repair guarantees). A negative q_heads entry is padding: no K/V is
    written for it, its weights are not read, its Q comes back zeros. A head listed twice in q_heads writes the same
    values twice. `cursor` and q_heads are not range-checked on GPU. Numerics as `head_qkv_pairs` (fp32 sums, fp32
    bias, one rounding), Q multiplied by `q_scale` (static) in fp32 before its rounding; `knobs` as for `head_qkv`.
    """
    n_heads, hd, d = _check_qkv(x, qkv_w, qkv_b, q_heads)
    total_heads = total_heads or n_heads
    window = recent.shape[0] if recent.ndim == 2 else 0
    if x.shape[0] != 1:
        raise ValueError(f"head_window_into_cache takes one sequence. Got x {x.shape}")
    if recent.shape != (window, d) or window < DOT_MIN_BATCH or window & (window - 1) or recent.dtype != x.dtype:
        raise ValueError(
            f"recent must be [R, d={d}] in x's dtype with R >= {DOT_MIN_BATCH} a power of two. Got {recent.shape}, "
            f"{recent.dtype}"
        )
    if not 0 <= forced <= total_heads or total_heads < n_heads:
        raise ValueError(f"need 0 <= forced <= total_heads >= H={n_heads}. Got forced={forced}, total={total_heads}")
    if keys.shape != values.shape or keys.shape[:2] != (1, n_heads) or keys.shape[3] != hd or keys.shape[2] < window:
        raise ValueError(
            f"keys and values must be [1, H={n_heads}, S >= R={window}, hd={hd}]. Got {keys.shape}, {values.shape}"
        )
    n = q_heads.shape[0]
    m = n + forced
    # both entry kinds take the window's row blocks (one grid)
    rows = window_row_block(hd, knobs)
    if rows < 16:
        raise ValueError(f"the window's dots need row blocks of at least 16 (hd={hd}: blocks of {rows})")
    window_plan = _plan(window, d, hd, 2 * m + n, (*(knobs or ()), ("qkv_block_rows", rows)))
    q_plan = _plan(1, d, hd, 2 * m + n, (*(knobs or ()), ("qkv_block_rows", rows)))
    eps, ln_args = ln.call_args(ln.checked(ln_scale, ln_bias, ln_eps, d))
    cache_shapes = (jax.ShapeDtypeStruct(keys.shape, keys.dtype), jax.ShapeDtypeStruct(values.shape, values.dtype))
    first = 5 + len(ln_args)  # the aliased inputs: (recent,) keys, values
    if eps is None:
        out_shape = (jax.ShapeDtypeStruct((1, n, hd), x.dtype), *cache_shapes)
        aliases = {first + 1: 1, first + 2: 2}
    else:
        out_shape = (jax.ShapeDtypeStruct((1, n, hd), x.dtype), jax.ShapeDtypeStruct(recent.shape, recent.dtype))
        out_shape = (*out_shape, *cache_shapes)
        aliases = {first: 1, first + 1: 2, first + 2: 3}
    kernel = functools.partial(
        _head_window_cache_kernel,
        plans=(window_plan, q_plan),
        n=n,
        forced=forced,
        total_heads=total_heads,
        q_scale=float(q_scale),
        eps=eps,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(1, 2 * m + n, hd // window_plan.rows_qkv),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=window_plan.qkv_warps, num_stages=window_plan.window_stages),
        interpret=resolve_interpret(interpret),
        name="head_window_cache",
    )(
        q_heads.astype(jnp.int32),
        jnp.stack([jnp.asarray(cursor, jnp.int32), jnp.asarray(first_head, jnp.int32)]),
        x,
        qkv_w.reshape(1, 3 * n_heads, hd, d),
        qkv_b.astype(x.dtype).reshape(1, 3 * n_heads, hd),
        *ln_args,
        recent,
        keys,
        values,
    )
    if eps is None:
        q, keys, values = outs
    else:
        q, recent, keys, values = outs
    return q, keys, values, recent


def _check_out_proj(heads_out, out_w, out_b, head_idx) -> None:
    if heads_out.ndim != 3:
        raise ValueError(f"heads_out must be [batch, h, hd]. Got shape {heads_out.shape}")
    if out_w.ndim != 3 or out_w.shape[1] != heads_out.shape[2]:
        raise ValueError(
            f"out_w must be [H, hd, d] with hd = heads_out.shape[2]. Got {out_w.shape} and heads_out {heads_out.shape}"
        )
    n_heads, hd, d = out_w.shape
    _check_common(heads_out, "heads_out", head_idx, n_heads, hd, d, out_w, "out_w")
    if head_idx.shape[0] != heads_out.shape[1]:
        raise ValueError(
            f"head_idx must be [h] with h = heads_out.shape[1]. Got {head_idx.shape} and {heads_out.shape}"
        )
    if out_b.shape != (d,):
        raise ValueError(f"out_b must be [d] = [{d}]. Got {out_b.shape}")


@functools.partial(jax.jit, static_argnames=("knobs", "interpret"))
def head_out_proj(heads_out, out_w, out_b, head_idx, *, knobs=None, interpret=None):
    """[B, d] in out_w.dtype: Σ_j heads_out[b, j] · out_w[head_idx[j]] + out_b.

    heads_out [B, h, hd] (out_w's dtype), or below `DOT_MIN_BATCH` rows the Pallas decode attention's unmerged
    splits (o, m, l) (`kernels.decode_attention.decode_attention_unmerged`), merged by the kernel as `merge_splits`
    merges them; out_w [H, hd, d], out_b [d], head_idx [h] int. A negative head_idx entry is padding: it adds
    nothing and its weight rows are not read.
    """
    plan, heads_in = _out_proj_input(heads_out, out_w, out_b, head_idx, knobs)
    partials = _head_out_proj_call(
        head_idx.astype(jnp.int32), heads_in, out_w, plan=plan, interpret=resolve_interpret(interpret)
    )
    out = jnp.sum(partials[:, : plan.batch], axis=0) + out_b.astype(jnp.float32)
    return out.astype(out_w.dtype)


def _out_proj_input(heads_out, out_w, out_b, head_idx, knobs):
    """(plan, the kernel's attention input) of `head_out_proj`: heads_out [B, h, hd] padded to the plan's rows, or
    the Pallas decode attention's unmerged splits (o [B, h, S, hd], m, l [B, h, S]: `decode_attention_unmerged`),
    which the kernel merges, below `DOT_MIN_BATCH` rows."""
    if not isinstance(heads_out, tuple):
        _check_out_proj(heads_out, out_w, out_b, head_idx)
        plan = _plan(heads_out.shape[0], out_w.shape[2], out_w.shape[1], head_idx.shape[0], knobs)
        return plan, _pad_rows(heads_out, plan.batch_rows(plan.out_dot))
    o, m, l = heads_out
    if o.ndim != 4 or m.shape != o.shape[:3] or l.shape != o.shape[:3]:
        raise ValueError(f"splits must be o [B, h, S, hd] with m, l [B, h, S]. Got {o.shape}, {m.shape}, {l.shape}")
    _check_out_proj(jax.ShapeDtypeStruct(o.shape[:2] + o.shape[3:], out_w.dtype), out_w, out_b, head_idx)
    plan = _plan(o.shape[0], out_w.shape[2], out_w.shape[1], head_idx.shape[0], knobs)
    if plan.out_dot:
        raise ValueError(f"out_proj merges the attention's splits below {DOT_MIN_BATCH} rows. Got {o.shape[0]}")
    return plan, (o.astype(jnp.float32), m.astype(jnp.float32), l.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("ln_eps", "knobs", "interpret"), donate_argnames=("sync",))
def head_out_proj_residual(
    heads_out,
    out_w,
    out_b,
    head_idx,
    residual,
    sync,
    *,
    ln_scale=None,
    ln_bias=None,
    ln_eps=None,
    knobs=None,
    interpret=None,
):
    """`head_out_proj` finishing the attention block in the same launch: (new residual, its LayerNorm or None, sync).

    new residual [B, d] = residual + head_out_proj(...) with the model's roundings (out_proj's output rounded to
    residual.dtype, then the add rounded); with the LayerNorm (ln_scale, ln_bias [d], ln_eps) also
    LayerNorm(new residual), the MLP's input in a pre-LN layer. `sync`: the int32 counters of kernels/split_sum.py,
    zero on entry, returned zero (donated: thread the returned buffer to the next such launch).
    """
    plan, heads_in = _out_proj_input(heads_out, out_w, out_b, head_idx, knobs)
    d = out_w.shape[-1]
    if residual.shape != (plan.batch, d):
        raise ValueError(f"residual must be [B, d] = {(plan.batch, d)}. Got {residual.shape}")
    split_sum.check_sync(sync, d, plan.bd_out)
    layernorm = ln.checked(ln_scale, ln_bias, ln_eps, d)
    eps, ln_args = ln.call_args(layernorm)
    outs = _head_out_proj_call(
        head_idx.astype(jnp.int32),
        heads_in,
        out_w,
        plan=plan,
        interpret=resolve_interpret(interpret),
        finish_args=(out_b, residual, ln_args, sync),
        eps=eps,
    )
    if layernorm is None:
        _, new, sync = outs
        return new, None, sync
    _, new, normed, sync = outs
    return new, normed, sync


# ---- references ------------------------------------------------------------------------------------------------


def head_qkv_reference(x, qkv_w, qkv_b, head_idx, *, parts=(0, 1, 2)):
    """The gathered dense projection (what the model's `qkv_w[:, head_idx]` path computes)."""
    zs = jnp.asarray(parts, jnp.int32)
    w = qkv_w[zs][:, head_idx]  # [P, h, hd, d]
    out = jnp.einsum("bd,zhkd->zbhk", x, w, preferred_element_type=jnp.float32, precision=_dot_precision(x.dtype))
    return (out + qkv_b[zs][:, head_idx][:, None].astype(jnp.float32)).astype(x.dtype)


def head_qkv_pairs_reference(x, qkv_w, qkv_b, part_idx, head_idx):
    w = qkv_w[part_idx, head_idx]  # [n, hd, d]
    out = jnp.einsum("bd,jkd->bjk", x, w, preferred_element_type=jnp.float32, precision=_dot_precision(x.dtype))
    return (out + qkv_b[part_idx, head_idx][None].astype(jnp.float32)).astype(x.dtype)


def head_out_proj_reference(heads_out, out_w, out_b, head_idx):
    live = (head_idx >= 0)[None, :, None]  # negative entries are padding: nothing added
    out = jnp.einsum(
        "bhk,hkd->bd",
        jnp.where(live, heads_out, 0),
        out_w[jnp.maximum(head_idx, 0)],
        preferred_element_type=jnp.float32,
        precision=_dot_precision(heads_out.dtype),
    )
    return (out + out_b.astype(jnp.float32)).astype(heads_out.dtype)
