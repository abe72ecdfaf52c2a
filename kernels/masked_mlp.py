"""Row-masked MLP kernels: the OPT MLP reading only the weight rows of chosen neurons, chosen without an index list.

    h   = relu(x · fc1_wᵀ + fc1_b) on the chosen neurons, 0 elsewhere      (`masked_fc1`)
    out = h · fc2_w_t + fc2_b, reading only the rows where some h ≠ 0      (`nonzero_fc2`)

`x` [B, d], `fc1_w` [ffn, d] (Hugging Face layout), `fc2_w_t` [ffn, d] (fc2's weight neuron-major, so a neuron's
weights are two contiguous rows). Every program owns a segment of rows, reads which of them are chosen, numbers the
chosen ones in registers (a prefix count) and gathers only those, in as many steps as it has chosen rows: no global
index list is built (no sort, no compaction pass, no static count K), a row that is not chosen costs no memory
traffic, the bytes read follow the number of chosen rows whatever it is, and with every row chosen the kernels
compute the dense MLP. Why not an index list: building one in XLA (`nonzero`) costs more than these kernels save over
it, and a sort more still (bench/results/NOTES.md, "Choosing neurons at decode without a sort").

How `masked_fc1` chooses its rows (static `selection`):
- ``"mask"``: a row mask [ffn] (int32, nonzero = chosen), e.g. fixed indices or a top-K scattered into a mask;
- ``"threshold"``: the rows whose predictor score reaches a threshold for some batch row, with the score computed in
  the kernel's prologue: score = p · w2_t[row] + b2[row], where p [B, r] is the predictor's hidden vector (its first
  matmul, done outside) and w2_t [ffn, r] the predictor's second matrix stored neuron-major. So the predictor's
  second matmul, the selection and fc1 are one launch, and the scores never reach memory. w2_t may hold int8 codes
  with one fp32 scale per row (`w2_scale`): score = (p · codes[row]) * scale[row] + b2[row], r + 4 bytes a row
  against 2r in fp16. `threshold_mask` is the same scoring as a launch of its own that writes the row mask for
  "mask", so the choice can be made apart from fc1 (on a side stream, beside the attention block).
`nonzero_fc2` is exact on its own: a row whose h is 0 for every batch row adds exactly 0, so skipping it changes
nothing. Fed by a dense fc1 it is the lossless sparse MLP (ReLU zeros skipped, no predictor).

Numerics follow the dense model run in the activation dtype: fp32 accumulation, biases added in fp32, h rounded to
x.dtype, the output rounded to x.dtype. fc2 sums fp32 partials over row groups (one per program row) outside the
kernel, in a fixed order (deterministic).

Shapes: batch 1..`MAX_BATCH` rows (unrolled multiply-and-sum on the CUDA cores; larger batches choose nearly every
row, where the dense MLP is the right kernel); d and r are split into power-of-two blocks that divide them (every
OPT width is a multiple of 128); ffn must be a multiple of the row blocks. Triton lowering (masked loads), with an
`interpret` mode for CPU tests.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.block_math import block_row_dots, pow2_divisor, prev_pow2
from kernels import split_sum
from kernels.platform import resolve_interpret

MAX_BATCH = 16
SELECTIONS = ("mask", "threshold")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# fc1 gathers block_k whole rows per step, all d columns in flight at once; past this many elements per step the
# tile no longer fits the registers of one program. On an H100, 16 rows at d = 4096 and 8 at d = 5120 measured
# fastest end to end; 16 at d = 5120 decoded 4% (fixed rows) to 8% (predicted) slower (bench/results/NOTES.md,
# "The predictor's first layer on a kernel, and tuning in the decode loop").
FC1_STEP_ELEMENTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class MaskedMLPPlan:
    """Static launch configuration of both kernels (block sizes are powers of two)."""

    batch: int
    d: int
    ffn: int
    rank: int = 0  # predictor rank with selection="threshold"
    fc1_segment: int = 64  # rows whose choice one fc1 program reads (and whose h it writes)
    fc1_block_k: int = 0  # chosen rows gathered per fc1 step; 0 = `FC1_STEP_ELEMENTS` // d, at most 16
    fc1_block_d: int = 2048  # columns per fc1 load (capped to a power of two dividing d)
    fc1_warps: int = 4
    fc2_segment: int = 256  # rows of fc2_w_t one fc2 program owns (one fp32 partial output each)
    fc2_block_k: int = 32  # nonzero rows gathered per fc2 step
    fc2_block_d: int = 256  # columns per fc2 program
    fc2_warps: int = 4
    # 1: fc1's dot products over d and the scores' over r add their column blocks elementwise and reduce once per
    # row block (`kernels.block_math.block_row_dots`); 0: one reduction per column block
    sum_once: int = 1
    # 1: a decode step's fc2 adds its bias and the residual in the same launch, its last programs summing the row
    # segments' partials (`nonzero_fc2_residual`, kernels/split_sum.py): no XLA reduction or residual add after it.
    # Read by the caller (`dejavu_jax.sparse_mlp`)
    fc2_residual: int = 0

    def __post_init__(self):
        for name in ("sum_once", "fc2_residual"):
            if getattr(self, name) not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1. Got {getattr(self, name)!r}")
        for name in ("fc1_segment", "fc1_block_k", "fc1_block_d", "fc2_segment", "fc2_block_k", "fc2_block_d"):
            value = getattr(self, name)
            if name == "fc1_block_k" and value == 0:
                continue
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two. Got {value}")

    @property
    def seg1(self) -> int:
        return min(self.fc1_segment, pow2_divisor(self.ffn, self.ffn))

    @property
    def seg2(self) -> int:
        return min(self.fc2_segment, pow2_divisor(self.ffn, self.ffn))

    @property
    def bk1(self) -> int:
        if self.fc1_block_k:
            return self.fc1_block_k
        return max(1, min(16, prev_pow2(max(1, FC1_STEP_ELEMENTS // self.d))))

    @property
    def bd1(self) -> int:
        return pow2_divisor(self.d, self.fc1_block_d)

    @property
    def bd2(self) -> int:
        return pow2_divisor(self.d, self.fc2_block_d)

    @property
    def score_chunk(self) -> int:
        """Rank columns per score load (a [seg1, chunk] tile of at most 8192 elements)."""
        return pow2_divisor(self.rank, max(16, 8192 // self.seg1)) if self.rank else 0

    @property
    def fc2_groups(self) -> int:
        return self.ffn // self.seg2


# ---- kernels ---------------------------------------------------------------------------------------------------


def _gather(ref_at, valid_mask, masked: bool):
    """Load gathered rows; invalid slots read 0. `masked`: skip their memory traffic (compiled Triton). The
    interpreter cannot discharge a masked gather, so there the slots (which point at a real row) are zeroed after
    an unmasked load."""
    if masked:
        return plgpu.load(ref_at, mask=valid_mask, other=0)
    return jnp.where(valid_mask, ref_at[...], 0)


#
# Both kernels compact their segment's chosen rows in registers: `pos` (an exclusive prefix count of the segment's
# mask) numbers the chosen rows 0..n-1, and step t gathers the rows numbered [t*block_k, (t+1)*block_k). The loop
# runs cdiv(n, block_k) times, so a program's cost follows its own count, and unchosen rows are never loaded.


def _number_rows(chosen):
    """(count, pos [seg]): how many rows of the segment are chosen, and each chosen row's number 0..count-1."""
    flags = chosen.astype(jnp.int32)
    return jnp.sum(flags), jnp.cumsum(flags) - 1


def _step_rows(t, block_k, base, chosen, pos, count):
    """Step t's rows: (sel [block_k, seg] one-hot slot -> segment row, row [block_k] absolute row index,
    valid [block_k]: the slot holds a chosen row)."""
    slot = t * block_k + jnp.arange(block_k, dtype=jnp.int32)
    sel = (pos[None, :] == slot[:, None]) & chosen[None, :]
    row = base + jnp.sum(jnp.where(sel, jnp.arange(chosen.shape[0], dtype=jnp.int32)[None, :], 0), axis=1)
    return sel, row, slot < count


def _threshold_rows(base, plan, p_ref, w2t_ref, b2_ref, thr_ref, scale_ref=None):
    """[seg1] bool: the segment's rows whose score p[b] · w2_t[row] + b2[row] reaches the threshold for some b.
    With `scale_ref`, w2_t holds int8 codes: score = (p[b] · codes[row]) * scale[row] + b2[row]."""
    rows = pl.ds(base, plan.seg1)
    scale = None if scale_ref is None else scale_ref[rows]
    chunks = [pl.ds(c0, plan.score_chunk) for c0 in range(0, plan.rank, plan.score_chunk)]  # static
    best = None
    for b in range(plan.batch):
        b2 = b2_ref[rows].astype(jnp.float32)
        w2 = [w2t_ref[rows, cols].astype(jnp.float32) for cols in chunks]  # [seg1, chunk] each
        dots = block_row_dots(w2, [p_ref[b, cols].astype(jnp.float32) for cols in chunks], bool(plan.sum_once))
        score = b2 + (dots if scale is None else dots * scale)
        best = score if best is None else jnp.maximum(best, score)
    return best >= thr_ref[0]


def _select_fc1_kernel(x_ref, w_ref, b_ref, *refs, plan: MaskedMLPPlan, selection: str, masked: bool):
    # x_ref [B, d], w_ref [ffn, d], b_ref [ffn]; refs: the selection's inputs, then h_ref [B, ffn].
    *sel_refs, h_ref = refs
    seg, bk, bd = plan.seg1, plan.bk1, plan.bd1
    base = pl.multiple_of(pl.program_id(0) * seg, seg)
    if selection == "mask":
        (mask_ref,) = sel_refs
        chosen = mask_ref[pl.ds(base, seg)] != 0  # [seg]
    else:
        chosen = _threshold_rows(base, plan, *sel_refs)
    count, pos = _number_rows(chosen)

    def step(t, h_seg):
        sel, row, valid = _step_rows(t, bk, base, chosen, pos, count)
        tile_mask = jnp.broadcast_to(valid[:, None], (bk, bd))
        cols = [pl.ds(c0, bd) for c0 in range(0, plan.d, bd)]  # static: the step's loads can all be in flight at once
        w = [_gather(w_ref.at[row, c], tile_mask, masked).astype(jnp.float32) for c in cols]
        bias = _gather(b_ref.at[row], valid, masked).astype(jnp.float32)
        out = []
        for b in range(plan.batch):
            acc = block_row_dots(w, [x_ref[b, c].astype(jnp.float32) for c in cols], bool(plan.sum_once))
            h = jnp.where(valid, jnp.maximum(acc + bias, 0.0), 0.0).astype(h_ref.dtype).astype(jnp.float32)
            out.append(h_seg[b] + jnp.sum(jnp.where(sel, h[:, None], 0.0), axis=0))  # scatter into the segment
        return tuple(out)

    init = tuple(jnp.zeros((seg,), jnp.float32) for _ in range(plan.batch))
    h_seg = lax.fori_loop(0, (count + bk - 1) // bk, step, init)
    for b in range(plan.batch):
        h_ref[b, pl.ds(base, seg)] = h_seg[b].astype(h_ref.dtype)


def _threshold_mask_kernel(p_ref, w2t_ref, b2_ref, thr_ref, *refs, plan: MaskedMLPPlan):
    # refs: (w2_scale [ffn] with int8 codes,) then mask_ref [ffn] int32. The segments of `_select_fc1_kernel`.
    *scale_refs, mask_ref = refs
    base = pl.multiple_of(pl.program_id(0) * plan.seg1, plan.seg1)
    chosen = _threshold_rows(base, plan, p_ref, w2t_ref, b2_ref, thr_ref, *scale_refs)
    mask_ref[pl.ds(base, plan.seg1)] = chosen.astype(jnp.int32)


def _nonzero_fc2_kernel(h_ref, w_ref, *rest, plan: MaskedMLPPlan, masked: bool, finish: bool = False):
    # h_ref [B, ffn], w_ref [ffn, d]; out_ref [groups, B, d] fp32: this segment's share of h · w. With `finish`:
    # inputs fc2_b [d], the residual [B, d] and the sync counters (aliased) before it, the new residual [B, d] and
    # sync after it.
    if finish:
        bias_ref, res_ref, _sync_in, out_ref, new_ref, sync_ref = rest
    else:
        (out_ref,) = rest
    group, seg, bk, bd = pl.program_id(0), plan.seg2, plan.fc2_block_k, plan.bd2
    base = pl.multiple_of(group * seg, seg)
    cols = pl.ds(pl.multiple_of(pl.program_id(1) * bd, bd), bd)
    chosen = h_ref[0, pl.ds(base, seg)] != 0
    for b in range(1, plan.batch):
        chosen = chosen | (h_ref[b, pl.ds(base, seg)] != 0)
    count, pos = _number_rows(chosen)

    def step(t, acc):
        _, row, valid = _step_rows(t, bk, base, chosen, pos, count)
        w = _gather(w_ref.at[row, cols], jnp.broadcast_to(valid[:, None], (bk, bd)), masked)
        w = w.astype(jnp.float32)  # [bk, bd]
        out = []
        for b in range(plan.batch):
            h = _gather(h_ref.at[b, row], valid, masked).astype(jnp.float32)  # [bk]
            out.append(acc[b] + jnp.sum(h[:, None] * w, axis=0))
        return tuple(out)

    init = tuple(jnp.zeros((bd,), jnp.float32) for _ in range(plan.batch))
    acc = lax.fori_loop(0, (count + bk - 1) // bk, step, init)
    for b in range(plan.batch):
        out_ref[group, b, cols] = acc[b]
    if finish:
        split_sum.finish_column_block(
            sync_ref, out_ref, bias_ref, res_ref, new_ref, cols=cols, groups=plan.fc2_groups, gpu=masked
        )


# ---- pallas_call layer -----------------------------------------------------------------------------------------


def _select_fc1_call(x, fc1_w, fc1_b, sel_args, *, plan, selection, interpret):
    return pl.pallas_call(
        functools.partial(_select_fc1_kernel, plan=plan, selection=selection, masked=not interpret),
        out_shape=jax.ShapeDtypeStruct((plan.batch, plan.ffn), x.dtype),
        grid=(plan.ffn // plan.seg1,),
        compiler_params=plgpu.CompilerParams(num_warps=plan.fc1_warps, num_stages=1),
        interpret=interpret,
        name=f"select_fc1_{selection}",
    )(x, fc1_w, fc1_b, *sel_args)


def _threshold_mask_call(p, w2_t, b2, thr, scaled, *, plan, interpret):
    return pl.pallas_call(
        functools.partial(_threshold_mask_kernel, plan=plan),
        out_shape=jax.ShapeDtypeStruct((plan.ffn,), jnp.int32),
        grid=(plan.ffn // plan.seg1,),
        compiler_params=plgpu.CompilerParams(num_warps=plan.fc1_warps, num_stages=1),
        interpret=interpret,
        name="threshold_mask",
    )(p, w2_t, b2, thr, *scaled)


def _nonzero_fc2_call(h, fc2_w_t, *, plan, interpret, finish_args=None):
    """The partials [groups, B, d] fp32; with `finish_args` (fc2_b, residual, sync) (partials, new residual, sync)."""
    partials = jax.ShapeDtypeStruct((plan.fc2_groups, plan.batch, plan.d), jnp.float32)
    out_shape, extra, aliases = partials, (), {}
    if finish_args is not None:
        _, residual, sync = finish_args
        row, counters = (
            jax.ShapeDtypeStruct(residual.shape, residual.dtype),
            jax.ShapeDtypeStruct(sync.shape, sync.dtype),
        )
        out_shape, extra, aliases = (partials, row, counters), finish_args, {4: 2}
    return pl.pallas_call(
        functools.partial(_nonzero_fc2_kernel, plan=plan, masked=not interpret, finish=finish_args is not None),
        out_shape=out_shape,
        grid=(plan.fc2_groups, plan.d // plan.bd2),
        compiler_params=plgpu.CompilerParams(num_warps=plan.fc2_warps, num_stages=1),
        input_output_aliases=aliases,
        interpret=interpret,
        name="nonzero_fc2",
    )(h, fc2_w_t, *extra)


# ---- public wrappers -------------------------------------------------------------------------------------------


def _check_sizes(batch, dtype, d, ffn):
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be in [1, {MAX_BATCH}] (use the dense MLP for larger batches). Got {batch}")
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype must be float32, bfloat16 or float16. Got {dtype}")
    if d % 16 or ffn % 16:
        raise ValueError(f"d and ffn must be multiples of 16. Got d={d}, ffn={ffn}")


def _check_weights(x, w, b, name):
    if x.ndim != 2:
        raise ValueError(f"x must be [batch, d]. Got shape {x.shape}")
    batch, d = x.shape
    if w.ndim != 2 or w.shape[1] != d:
        raise ValueError(f"{name} must be [ffn, d] with d = x.shape[1]. Got {w.shape} and x {x.shape}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"the bias of {name} must be [{w.shape[0]}]. Got {b.shape}")
    _check_sizes(batch, x.dtype, d, w.shape[0])


def _plan(batch, d, ffn, knobs, rank=0) -> MaskedMLPPlan:
    return MaskedMLPPlan(batch=batch, d=d, ffn=ffn, rank=rank, **dict(knobs or ()))


@functools.partial(jax.jit, static_argnames=("knobs", "interpret"))
def masked_fc1(x, fc1_w, fc1_b, row_mask, *, knobs=None, interpret=None):
    """h [B, ffn] in x.dtype: relu(x · fc1_w[n] + fc1_b[n]) where row_mask[n] != 0, exactly 0 elsewhere.

    x [B, d], fc1_w [ffn, d], fc1_b [ffn], row_mask [ffn] int. `knobs`: a tuple of (field, value) pairs of
    `MaskedMLPPlan` (block sizes, warps); None = defaults. `interpret` None = decided by the backend.
    """
    _check_weights(x, fc1_w, fc1_b, "fc1_w")
    if row_mask.shape != (fc1_w.shape[0],):
        raise ValueError(f"row_mask must be [ffn] = [{fc1_w.shape[0]}]. Got {row_mask.shape}")
    plan = _plan(x.shape[0], x.shape[1], fc1_w.shape[0], knobs)
    return _select_fc1_call(
        x,
        fc1_w,
        fc1_b.astype(x.dtype),
        (row_mask.astype(jnp.int32),),
        plan=plan,
        selection="mask",
        interpret=resolve_interpret(interpret),
    )


def _scale_args(w2_scale, w2_t) -> tuple:
    """The kernel's extra input for int8 codes in w2_t: (their scale [ffn] fp32,), or () for float rows."""
    if w2_scale is None:
        if jnp.issubdtype(w2_t.dtype, jnp.integer):
            raise ValueError(f"int8 codes in w2_t need their w2_scale. Got w2_t of {w2_t.dtype} and no scale")
        return ()
    if w2_t.dtype != jnp.int8:
        raise ValueError(f"w2_scale goes with int8 codes in w2_t. Got w2_t of {w2_t.dtype}")
    if w2_scale.shape != (w2_t.shape[0],):
        raise ValueError(f"w2_scale must be [ffn] = [{w2_t.shape[0]}]. Got {w2_scale.shape}")
    return (w2_scale.astype(jnp.float32),)


@functools.partial(jax.jit, static_argnames=("knobs", "interpret"))
def threshold_fc1(x, fc1_w, fc1_b, p, w2_t, b2, threshold, *, w2_scale=None, knobs=None, interpret=None):
    """h [B, ffn]: `masked_fc1` over the rows n with max_b (p[b] · w2_t[n] + b2[n]) >= threshold.

    p [B, r] (the predictor's hidden vector), w2_t [ffn, r] (r a multiple of 16: pad with zero columns), b2 [ffn],
    threshold: a scalar (−inf chooses every row). `w2_scale` [ffn] fp32: w2_t holds int8 codes and row n's weights
    are w2_t[n] * w2_scale[n] (the dot is taken over the codes in fp32, then scaled): r + 4 bytes a row, not 2r.
    """
    _check_weights(x, fc1_w, fc1_b, "fc1_w")
    ffn = fc1_w.shape[0]
    _check_scoring(p, w2_t, b2, x.shape[0], ffn)
    plan = _plan(x.shape[0], x.shape[1], ffn, knobs, w2_t.shape[1])
    return _select_fc1_call(
        x,
        fc1_w,
        fc1_b.astype(x.dtype),
        (p, w2_t, b2.astype(jnp.float32), _threshold_arg(threshold), *_scale_args(w2_scale, w2_t)),
        plan=plan,
        selection="threshold",
        interpret=resolve_interpret(interpret),
    )


# inline: traced into the caller's program, so that a stream annotation around the caller covers one call (XLA
# refuses an annotated call nested in another: `dejavu_jax.sparsity.on_stream`).
@functools.partial(jax.jit, static_argnames=("knobs", "interpret"), inline=True)
def threshold_mask(p, w2_t, b2, threshold, *, w2_scale=None, knobs=None, interpret=None):
    """[ffn] int32: 1 for the rows n with max_b (p[b] · w2_t[n] + b2[n]) >= threshold, else 0.

    The rows `threshold_fc1` chooses (the same arguments, the same arithmetic), as a row mask for `masked_fc1`: the
    scoring as its own launch, which can then run apart from fc1 (on a side stream, before the attention block).
    """
    if p.ndim != 2:
        raise ValueError(f"p must be [batch, r]. Got shape {p.shape}")
    ffn = w2_t.shape[0] if w2_t.ndim == 2 else -1
    _check_scoring(p, w2_t, b2, p.shape[0], ffn)
    # The mask kernel reads no d-wide rows: any valid width stands in for d (its segments always divide ffn).
    _check_sizes(p.shape[0], p.dtype, 16, ffn)
    plan = _plan(p.shape[0], 16, ffn, knobs, w2_t.shape[1])
    scaled = _scale_args(w2_scale, w2_t)
    return _threshold_mask_call(
        p,
        w2_t,
        b2.astype(jnp.float32),
        _threshold_arg(threshold),
        scaled,
        plan=plan,
        interpret=resolve_interpret(interpret),
    )


def _check_scoring(p, w2_t, b2, batch: int, ffn: int):
    if w2_t.ndim != 2 or w2_t.shape[0] != ffn or p.shape != (batch, w2_t.shape[1]):
        raise ValueError(f"need w2_t [ffn={ffn}, r] and p [batch={batch}, r]. Got {w2_t.shape} and {p.shape}")
    r = w2_t.shape[1]
    if r & (r - 1):
        raise ValueError(f"the predictor rank must be a power of two here (pad w2_t and p with zeros). Got {r}")
    if b2.shape != (ffn,):
        raise ValueError(f"b2 must be [ffn] = [{ffn}]. Got {b2.shape}")


def _threshold_arg(threshold):
    return jnp.reshape(jnp.asarray(threshold, jnp.float32), (1,))


@functools.partial(jax.jit, static_argnames=("knobs", "interpret"))
def nonzero_fc2(h, fc2_w_t, fc2_b, *, knobs=None, interpret=None):
    """h · fc2_w_t + fc2_b as [B, d] in h.dtype, reading only the rows n where some h[b, n] != 0 (exact).

    h [B, ffn], fc2_w_t [ffn, d], fc2_b [d].
    """
    _check_fc2(h, fc2_w_t, fc2_b)
    plan = _plan(h.shape[0], fc2_w_t.shape[1], h.shape[1], knobs)
    partials = _nonzero_fc2_call(h, fc2_w_t, plan=plan, interpret=resolve_interpret(interpret))
    return (jnp.sum(partials, axis=0) + fc2_b.astype(jnp.float32)).astype(h.dtype)


def _check_fc2(h, fc2_w_t, fc2_b) -> None:
    if h.ndim != 2 or fc2_w_t.ndim != 2 or h.shape[1] != fc2_w_t.shape[0]:
        raise ValueError(f"need h [batch, ffn] and fc2_w_t [ffn, d]. Got {h.shape} and {fc2_w_t.shape}")
    d = fc2_w_t.shape[1]
    _check_sizes(h.shape[0], h.dtype, d, h.shape[1])
    if fc2_b.shape != (d,):
        raise ValueError(f"fc2_b must be [d] = [{d}]. Got {fc2_b.shape}")


@functools.partial(jax.jit, static_argnames=("knobs", "interpret"), donate_argnames=("sync",))
def nonzero_fc2_residual(h, fc2_w_t, fc2_b, residual, sync, *, knobs=None, interpret=None):
    """(residual + `nonzero_fc2`(h, fc2_w_t, fc2_b), sync) in one launch, with the model's roundings (fc2's output
    rounded to h.dtype, then the add rounded to residual.dtype). `sync`: the int32 counters of kernels/split_sum.py,
    zero on entry, returned zero (donated: thread the returned buffer to the next such launch)."""
    _check_fc2(h, fc2_w_t, fc2_b)
    d = fc2_w_t.shape[1]
    if residual.shape != (h.shape[0], d):
        raise ValueError(f"residual must be [B, d] = {(h.shape[0], d)}. Got {residual.shape}")
    plan = _plan(h.shape[0], d, h.shape[1], knobs)
    split_sum.check_sync(sync, d, plan.bd2)
    _, new, sync = _nonzero_fc2_call(
        h, fc2_w_t, plan=plan, interpret=resolve_interpret(interpret), finish_args=(fc2_b, residual, sync)
    )
    return new, sync


# ---- references ------------------------------------------------------------------------------------------------


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def threshold_rows_reference(p, w2_t, b2, threshold, w2_scale=None):
    """[ffn] bool: rows whose score reaches the threshold for some batch row (w2_t int8 codes with `w2_scale`)."""
    if w2_scale is not None:
        scores = jnp.einsum("br,nr->bn", p.astype(jnp.float32), w2_t.astype(jnp.float32), precision="highest")
        scores = scores * w2_scale
    else:
        scores = jnp.einsum("br,nr->bn", p, w2_t, preferred_element_type=jnp.float32, precision=_precision(p.dtype))
    return jnp.max(scores + b2.astype(jnp.float32), axis=0) >= threshold


def masked_fc1_reference(x, fc1_w, fc1_b, row_mask):
    pre = jnp.einsum("bd,nd->bn", x, fc1_w, preferred_element_type=jnp.float32, precision=_precision(x.dtype))
    h = jnp.maximum(pre + fc1_b.astype(jnp.float32), 0.0)
    return jnp.where(row_mask != 0, h, 0.0).astype(x.dtype)


def nonzero_fc2_reference(h, fc2_w_t, fc2_b):
    out = jnp.einsum("bn,nd->bd", h, fc2_w_t, preferred_element_type=jnp.float32, precision=_precision(h.dtype))
    return (out + fc2_b.astype(jnp.float32)).astype(h.dtype)
