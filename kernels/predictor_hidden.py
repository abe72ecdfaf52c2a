"""The low-rank predictor's first layer at decode, one launch: p = standardize(x) · w1_tᵀ + b1.

    x [B, d] (the layer's residual), w1_t [r, d] (output-major: a hidden unit's weights are one row), b1 [r]
    -> p [B, r] in w1_t's dtype, the input of the predictor's second matmul (fused into `masked_mlp.threshold_fc1`).

`standardize` is a LayerNorm without affine (zero mean, unit variance over d, in fp32). XLA runs it as a reduction
fusion and then the GEMV as a second one whose few hundred output rows leave most of the GPU idle; here every
program recomputes the statistics of x (a few KB, from L2) and reads `block_r` rows of w1_t, so the 2–10 MB of
weights are spread over many programs and the normalised x never reaches memory.

Numerics follow `predictor_hidden_reference` (the runtime's `MLPPredictor.hidden`): the normalised x is rounded
to w1_t's dtype, products are summed in fp32, b1 added in fp32, the result rounded to w1_t's dtype.

With `ln_scale` and `ln_bias` the same launch also writes LN(x), the model's LayerNorm of x with its affine scale and
bias: at decode x is also the input of the attention LayerNorm, so writing it here takes XLA's LayerNorm kernels
(statistics, then normalisation) out of the step. Its numerics are `dejavu_jax.model.layer_norm`'s: one-pass fp32
statistics (E[x], E[x^2] - E[x]^2, as `kernels.layernorm.row_stats`) with `ln_eps`, scale and bias applied in fp32,
the result rounded to x's dtype. The statistics come from the x blocks the program loads for p; the output is split
into column chunks of `LN_BLOCK` (capped to a power of two dividing d), chunk j written by program j mod the number
of programs. p follows the same numerics with or without it.

`predictor_hidden(..., chooser=HeadChooser(...))`: with a second predictor that scores heads (the next layer's head
predictor), the same launch also finishes it: each of the second predictor's programs, once its rows of p2 are
stored, takes a ticket (kernels/split_sum.py); the last to arrive computes the heads' fp32 scores p2 · w2_tᵀ + b2
and chooses the k best by rank (`dejavu_jax.sparsity.exactly_k`'s "rank" method: by score, descending, ties to the
lower index), or with a threshold `threshold_k`'s list (-1 where the score is below it). So no XLA kernel runs
between this launch and the head kernels that read the list.

Shapes: batch 1..`MAX_BATCH` (unrolled per row); r and d multiples of 16; d is read in power-of-two column blocks
that divide it. Triton lowering, with an `interpret` mode for CPU tests.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels import layernorm as ln
from kernels import split_sum
from kernels.block_math import block_row_dots, block_total, cdiv, next_pow2, pow2_divisor
from kernels.platform import resolve_interpret

MAX_BATCH = 16
# The most heads a `HeadChooser` ranks: its last program compares every pair (opt-175b has 96).
CHOOSE_MAX_HEADS = 128
# fp32 elements of the scoring weights the choosing program holds at once (a [heads, rank columns] tile).
CHOOSE_TILE = 8192
# Every program issues all its weight loads before reducing, so its tile [block_r, d] must fit its registers: 4 rows
# at d = 4096 and 5120 (rank 256) beat XLA on an H100; 16 rows at d = 5120 (rank 1024) made decoding slower than
# XLA (bench/results/NOTES.md, "The predictor's first layer on a kernel, and tuning in the decode loop").
STEP_ELEMENTS = 20480
# Columns of the optional LayerNorm output per store: small, so that the chunks spread over the programs.
LN_BLOCK = 128


def _hidden_kernel(
    x_ref,
    *refs,
    batch,
    d,
    block_r,
    block_d,
    normalize,
    eps,
    ln_eps,
    ln_block,
    n_programs,
    sum_once,
    first_programs,
    choose=None,
):
    # x_ref [B, d]; w_ref [r, d], b_ref [r]; with a second predictor (first_programs: the programs of the first),
    # its w_ref [r2, d] and b_ref [r2]; with a LayerNorm (ln_eps) its scale_ref and bias_ref [d]; with `choose`
    # (k, by_threshold, gpu): the second predictor's w2_t [H, r2], b2 [H], with by_threshold its threshold [1] fp32,
    # and the sync counters (aliased); then
    # the outputs p_ref [B, r], with a second predictor its p_ref [B, r2], with a LayerNorm ln_ref [B, d], with
    # `choose` idx_ref [B, k'] and sync.
    refs = list(refs)
    sets = [(refs.pop(0), refs.pop(0))]
    if first_programs:
        sets.append((refs.pop(0), refs.pop(0)))
    scale_ref, bias_ref = (refs.pop(0), refs.pop(0)) if ln_eps is not None else (None, None)
    if choose is not None:
        w2_ref, b2_ref = refs.pop(0), refs.pop(0)
        threshold_ref = refs.pop(0) if choose[1] else None
        refs.pop(0)  # the sync counters' input (aliased to the output)
    outs = [refs.pop(0) for _ in sets]
    ln_ref = refs.pop(0) if ln_eps is not None else None
    if choose is not None:
        idx_ref, sync_ref = refs.pop(0), refs.pop(0)
    program = pl.program_id(0)

    def body(w_ref, b_ref, p_ref, block):
        rows = pl.ds(pl.multiple_of(block * block_r, block_r), block_r)
        chunks = [pl.ds(c0, block_d) for c0 in range(0, d, block_d)]  # static
        w = [w_ref[rows, c].astype(jnp.float32) for c in chunks]  # issue every weight load first
        bias = b_ref[rows].astype(jnp.float32)
        ln_stats = []
        for b in range(batch):
            xs = [x_ref[b, c].astype(jnp.float32) for c in chunks]
            total = block_total(xs, sum_once)
            if ln_eps is not None:  # the LayerNorm's one-pass statistics, from the blocks already loaded
                ln_stats.append(ln.stats_from_sums(total, block_total([v * v for v in xs], sum_once), d, ln_eps))
            if normalize:
                mean = total / d
                var = block_total([jnp.square(v - mean) for v in xs], sum_once) / d
                scale = jax.lax.rsqrt(var + eps)
                xs = [((v - mean) * scale).astype(w_ref.dtype).astype(jnp.float32) for v in xs]
            else:
                xs = [v.astype(w_ref.dtype).astype(jnp.float32) for v in xs]
            p_ref[b, rows] = (bias + block_row_dots(w, xs, sum_once)).astype(p_ref.dtype)
        if ln_eps is not None:
            _store_layernorm(x_ref, scale_ref, bias_ref, ln_ref, ln_stats, batch, d, ln_block, n_programs, program)

    if not first_programs:
        body(*sets[0], outs[0], program)
        return

    @pl.when(program < first_programs)
    def _():
        body(*sets[0], outs[0], program)

    @pl.when(program >= first_programs)
    def _():
        body(*sets[1], outs[1], program - first_programs)
        if choose is not None:
            k, _, gpu = choose

            @pl.when(split_sum.last_to_arrive(sync_ref, 0, n_programs - first_programs, gpu))
            def _():
                _choose_heads(outs[1], w2_ref, b2_ref, threshold_ref, idx_ref, batch, k, gpu)
                split_sum.reset(sync_ref, 0)


def _choose_heads(p_ref, w2_ref, b2_ref, threshold_ref, idx_ref, batch, k, gpu):
    """idx_ref[b] = the heads chosen from scores p_ref[b] · w2_refᵀ + b2 (p_ref stored by other programs): the k best
    by rank, -1 where below threshold_ref[0] (if given); with a threshold and k >= H, head j at entry j, -1 where
    below it. Blocks are padded to powers of two (masked loads; padding heads score -inf and rank last); w2 is read
    in column chunks of at most `CHOOSE_TILE` elements, so the tile stays in registers at any rank."""
    n_heads, r = w2_ref.shape
    hp, kp = next_pow2(n_heads), next_pow2(idx_ref.shape[1])
    chunk = min(next_pow2(r), max(16, CHOOSE_TILE // hp))
    heads, entries = jnp.arange(hp, dtype=jnp.int32), jnp.arange(kp, dtype=jnp.int32)
    real = heads < n_heads
    b2 = plgpu.load(b2_ref.at[pl.ds(0, hp)], mask=real, other=0.0).astype(jnp.float32)
    scores = [b2] * batch  # [hp] fp32 each
    for c0 in range(0, r, chunk):  # static
        in_rank = (c0 + jnp.arange(chunk, dtype=jnp.int32)) < r
        cols = pl.ds(c0, chunk)
        w2 = plgpu.load(w2_ref.at[pl.ds(0, hp), cols], mask=real[:, None] & in_rank[None, :], other=0.0)
        for b in range(batch):  # static; p was stored by other programs
            p = split_sum.load_shared(p_ref.at[pl.ds(b, 1), cols], gpu, mask=in_rank[None, :], other=0.0)
            scores[b] = scores[b] + jnp.sum(w2.astype(jnp.float32) * p.astype(jnp.float32), axis=1)
    threshold = None if threshold_ref is None else threshold_ref[0]
    for b in range(batch):  # static
        s = jnp.where(real, scores[b], -jnp.inf)
        if threshold is not None and k >= n_heads:  # no bound: every head in its own entry
            idx, score_at = heads, s
        else:
            above = (s[None, :] > s[:, None]) | ((s[None, :] == s[:, None]) & (heads[None, :] < heads[:, None]))
            rank = jnp.sum(above.astype(jnp.int32), axis=1)  # [hp], a permutation of 0 .. hp-1
            at_rank = rank[None, :] == entries[:, None]  # [kp, hp]
            idx = jnp.sum(jnp.where(at_rank, heads[None, :], 0), axis=1)
            score_at = jnp.sum(jnp.where(at_rank, s[None, :], 0.0), axis=1)
        if threshold is not None:
            idx = jnp.where(score_at >= threshold, idx, -1)
        kept = (entries < idx_ref.shape[1])[None, :]
        plgpu.store(idx_ref.at[pl.ds(b, 1), pl.ds(0, kp)], idx.astype(jnp.int32)[None, :], mask=kept)


def _store_layernorm(x_ref, scale_ref, bias_ref, ln_ref, stats, batch, d, ln_block, n_programs, program):
    """Writes this program's chunks of LN(x): chunk j (of d / ln_block) belongs to program j mod the program count,
    so every program stores at most cdiv(chunks, programs) of them and the chunks past the last are skipped."""
    n_chunks = d // ln_block
    for slot in range(cdiv(n_chunks, n_programs)):  # static
        j = program + slot * n_programs

        @pl.when(j < n_chunks)
        def _():
            cols = pl.ds(pl.multiple_of(j * ln_block, ln_block), ln_block)
            for b in range(batch):  # the chunk is re-read from x (a few hundred bytes)
                ln_ref[b, cols] = ln.normalized_block(x_ref, b, cols, stats, scale_ref, bias_ref).astype(ln_ref.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w2_t", "b2", "threshold", "sync"], meta_fields=["k"])
@dataclasses.dataclass(frozen=True)
class HeadChooser:
    """The second predictor's scoring layer, for a launch that also chooses its heads: w2_t [H, r2] (H <=
    `CHOOSE_MAX_HEADS`), b2 [H], k (static; the list keeps min(k, H) entries), threshold: None for top-K, else a
    scalar (traced or not) below which an entry is -1; sync: the int32 counters of kernels/split_sum.py (zero on
    entry, returned zero; aliased to the returned buffer: thread that one to the next such launch)."""

    w2_t: jax.Array
    b2: jax.Array
    threshold: Optional[jax.Array]
    sync: jax.Array
    k: int


# inline: traced into the caller's program, so that a stream annotation around the caller covers one call (XLA
# refuses an annotated call nested in another: `dejavu_jax.sparsity.on_stream`).
@functools.partial(
    jax.jit,
    static_argnames=("normalize", "eps", "block_r", "block_d", "num_warps", "interpret", "ln_eps", "sum_once"),
    inline=True,
)
def predictor_hidden(
    x,
    w1_t,
    b1,
    *,
    normalize=True,
    eps=1e-5,
    block_r=None,
    block_d=2048,
    num_warps=4,
    interpret=None,
    ln_scale=None,
    ln_bias=None,
    ln_eps=1e-5,
    sum_once=True,
    w1_t_second=None,
    b1_second=None,
    chooser: Optional[HeadChooser] = None,
):
    """p [B, r] in w1_t.dtype = (standardize(x) if normalize else x) · w1_tᵀ + b1.

    x [B, d], w1_t [r, d], b1 [r]. `block_r`: rows of w1_t per program (None: r / 64, at least 1, at most 16);
    `block_d`: columns per load (capped to a power of two dividing d). `interpret` None = decided by the backend.
    `sum_once`: each sum over d adds the column blocks elementwise and reduces once (False: one reduction per block;
    `kernels.block_math.block_total`).
    The default block_r is r / 64 (64 programs), at most 16, and at most `STEP_ELEMENTS` / d.
    With `ln_scale` and `ln_bias` [d] (both or neither), returns (p, ln_x): ln_x [B, d] in x.dtype is
    `dejavu_jax.model.layer_norm(x, ln_scale, ln_bias, ln_eps)`, written by the same launch.
    With `w1_t_second` [r2, d] and `b1_second` [r2] (a second predictor reading the same x with the same
    `normalize`, e.g. the next layer's head predictor beside this layer's MLP predictor), the same launch also gives
    its p2 [B, r2] (programs past the first predictor's take its rows): returns (p, p2) or (p, p2, ln_x).
    With a second predictor that scores heads and its `chooser`, the launch chooses them instead: returns (p, idx[,
    ln_x], sync). idx [B, min(k, H)] int32 is `dejavu_jax.sparsity.exactly_k(scores, k, "rank")`'s list, or with a
    threshold `threshold_k(scores, threshold, k)`'s (-1 where the score is below it), of the scores p2 · w2_tᵀ + b2
    in fp32 (p2 as rounded above, summed in another order than XLA's).
    """
    if x.ndim != 2 or w1_t.ndim != 2 or w1_t.shape[1] != x.shape[1]:
        raise ValueError(f"need x [batch, d] and w1_t [r, d]. Got {x.shape} and {w1_t.shape}")
    batch, d = x.shape
    r = w1_t.shape[0]
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be in [1, {MAX_BATCH}]. Got {batch}")
    if b1.shape != (r,):
        raise ValueError(f"b1 must be [r] = [{r}]. Got {b1.shape}")
    if d % 16 or r % 16:
        raise ValueError(f"d and r must be multiples of 16. Got d={d}, r={r}")
    if chooser is not None:
        _check_chooser(chooser, None if w1_t_second is None else w1_t_second.shape[0], d)
    layernorm = ln.checked(ln_scale, ln_bias, ln_eps, d)
    ln_eps, ln_args = ln.call_args(layernorm)
    block_r = pow2_divisor(r, block_r or max(1, min(16, r // 64, STEP_ELEMENTS // d)))
    second = ()
    if w1_t_second is not None:
        r2 = w1_t_second.shape[0]
        if w1_t_second.shape != (r2, d) or b1_second is None or b1_second.shape != (r2,) or r2 % 16:
            raise ValueError(
                f"the second predictor needs w1_t [r2, d={d}] (r2 a multiple of 16) and b1 [r2]. Got "
                f"{w1_t_second.shape} and {None if b1_second is None else b1_second.shape}"
            )
        if w1_t_second.dtype != w1_t.dtype:
            raise ValueError(f"both predictors need one dtype. Got {w1_t.dtype} and {w1_t_second.dtype}")
        block_r = pow2_divisor(r2, block_r)  # one row block for both
        second = (w1_t_second, b1_second)
    first_programs = r // block_r if second else 0
    n_programs = r // block_r + (second[0].shape[0] // block_r if second else 0)
    block_d = pow2_divisor(d, block_d)
    interpret = resolve_interpret(interpret)
    kernel = functools.partial(
        _hidden_kernel,
        batch=batch,
        d=d,
        block_r=block_r,
        block_d=block_d,
        normalize=normalize,
        eps=eps,
        ln_eps=ln_eps,
        ln_block=pow2_divisor(d, LN_BLOCK),
        n_programs=n_programs,
        sum_once=bool(sum_once),
        first_programs=first_programs,
        choose=None if chooser is None else (chooser.k, chooser.threshold is not None, not interpret),
    )
    out_shape = [jax.ShapeDtypeStruct((batch, r), w1_t.dtype)]
    if second:
        out_shape.append(jax.ShapeDtypeStruct((batch, second[0].shape[0]), w1_t.dtype))
    if layernorm is not None:
        out_shape.append(jax.ShapeDtypeStruct((batch, d), x.dtype))
    inputs = [x, w1_t, b1, *second, *ln_args]
    aliases = {}
    if chooser is not None:
        threshold = (
            [] if chooser.threshold is None else [jnp.reshape(jnp.asarray(chooser.threshold, jnp.float32), (1,))]
        )
        inputs += [chooser.w2_t, chooser.b2, *threshold, chooser.sync]
        k, sync = min(chooser.k, chooser.w2_t.shape[0]), chooser.sync
        out_shape += [jax.ShapeDtypeStruct((batch, k), jnp.int32), jax.ShapeDtypeStruct(sync.shape, sync.dtype)]
        aliases = {len(inputs) - 1: len(out_shape) - 1}
    out = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(n_programs,),
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="predictor_hidden",
    )(*inputs)
    if chooser is not None:
        p, _p2, *ln_x, idx, sync = out
        return (p, idx, *ln_x, sync)
    return out[0] if len(out) == 1 else tuple(out)


def _check_chooser(chooser: HeadChooser, r2_second, d: int) -> None:
    """`r2_second`: the second predictor's rank (None: no second predictor)."""
    n_heads, r2 = chooser.w2_t.shape
    if r2_second is None:
        raise ValueError("choosing heads needs the second predictor (w1_t_second, b1_second)")
    if not 1 <= n_heads <= CHOOSE_MAX_HEADS or r2 != r2_second or chooser.b2.shape != (n_heads,):
        raise ValueError(
            f"the chooser needs w2_t [H <= {CHOOSE_MAX_HEADS}, r2={r2_second}] and b2 [H]. Got "
            f"{chooser.w2_t.shape} and {chooser.b2.shape}"
        )
    if chooser.k < 1:
        raise ValueError(f"k must be positive. Got {chooser.k}")
    if not jnp.issubdtype(chooser.w2_t.dtype, jnp.floating):
        raise ValueError(f"the chooser scores with floating-point w2_t (not int8 codes). Got {chooser.w2_t.dtype}")
    if chooser.threshold is not None and jnp.size(chooser.threshold) != 1:
        raise ValueError(f"the chooser's threshold must be a scalar. Got shape {jnp.shape(chooser.threshold)}")
    split_sum.check_sync(chooser.sync, d, split_sum.MIN_BLOCK_D)


def predictor_hidden_reference(x, w1_t, b1, *, normalize=True, eps=1e-5):
    h = x.astype(jnp.float32)
    if normalize:
        mean = h.mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(jnp.square(h - mean).mean(-1, keepdims=True) + eps)
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(w1_t.dtype) == jnp.float32 else None
    p = jnp.einsum("bd,rd->br", h.astype(w1_t.dtype), w1_t, preferred_element_type=jnp.float32, precision=precision)
    return (p + b1.astype(jnp.float32)).astype(w1_t.dtype)
