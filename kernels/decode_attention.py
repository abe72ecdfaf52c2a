"""Decode attention: one new query token per sequence against the KV cache, in one launch.

    out[b, j] = softmax_s(q[b, j] · keys[b, head(j), s] | allowed[b, s]) · values[b, head(j), s]

with `q` [B, h, hd] (already scaled by hd**-0.5, as the model does), `keys` / `values` [B, H, S, hd]
(the model's cache layout), `allowed` [B, S] bool (the cache slots the query may read: real tokens at
or before its own slot) and optional `head_idx` [h] int32: q holds only those heads and the kernel
reads K/V of those heads only (head(j) = head_idx[j]); None means h == H, all heads in order. This
replaces XLA's three small kernels per layer at decode (scores reduce, masked softmax, probs · V) and
serves head-sparse attention (DejaVu) without gathering the cache first.

Numerics: fp32 inside (scores, softmax with max subtraction, accumulation of probs · V), one rounding
to q.dtype at the end. Masked slots contribute nothing. A row (b, j) with no allowed slot returns
zeros - unlike the model's dense path, whose softmax over all-`finfo.min` scores is uniform; in the
model every query may read at least its own slot, so the two never differ there.

Design (Triton-lowered Pallas, like kernels/sparse_mlp.py):

* Grid (B, h, split_s). Program (b, j, s) owns head head_idx[j] of sequence b (the head gather is the
  grid: a scalar load of head_idx[j] then plain 2-D tile loads of that head's K/V) and the s-th range
  of S-blocks. It runs an online softmax over its blocks of block_s slots: running max m, running sum
  l, an unnormalised fp32 accumulator [hd].
* split_s (flash-decoding): at batch 1, B·h = 32-72 programs reach only a quarter to half of an
  H100's 132 SMs, and a decode attention read is bandwidth bound; splitting S multiplies the programs.
  With split_s > 1 each program writes its (m, l, acc) and a few plain-JAX ops merge the splits
  (M = max m; out = Σ e^(m-M) acc / Σ e^(m-M) l) - one small fusion over [B, h, split_s, hd] fp32.
  With split_s = 1 the kernel normalises and writes q.dtype itself (no glue at all). The plan picks
  split_s so that B·h·split_s reaches ~2 programs per SM (`_TARGET_PROGRAMS`) while every split owns
  at least one block.
* Blocks: block_s is a power of two <= S (default: K and V tiles of <= `_TILE_ELEMS` elements each).
  S need not be a multiple of block_s: the last block is shifted back to end exactly at S and its
  slots already covered by the previous block are masked, so every load is an unmasked, in-bounds
  power-of-two tile (the trick sparse_mlp uses for ragged d). Any S >= 1 works.
* hd need not be a power of two (opt-2.7b: 80): the head dimension is split into power-of-two pieces
  (its binary digits: 80 = 64 + 16, 128 = 128), each loaded and reduced as its own tile; the score is
  the sum over pieces. No masked loads, no padding, no bytes read twice.
* Batch-1 decode has one query row per program, so scores and probs · V are multiply-and-sum on the
  CUDA cores (`dot` needs >= 16 rows).

`decode_attention_append` is the decode step's form: the same launch also writes the new token's K/V into the
caches in place (aliased outputs; split 0 of each head writes, every split masks that slot and adds the new token
from registers, so no program reads a slot being written). Alone the kernel is slower than XLA's attention at short
caches (each program reads so few bytes that the launch and its DRAM round trips dominate), and in the model, where
it also replaces the two cache-update kernels, decode time is unchanged (bench/results/NOTES.md). The model's
default therefore stays XLA (`attention_impl="xla"`).

`interpret=None` (the default) runs the Pallas interpreter unless the default backend is a GPU
(kernels/platform.py).

Index contract: head_idx is not range-checked inside the kernel (on GPU a head >= H reads outside the
cache; in interpret mode it is clamped). Duplicates are fine (each copy is computed). A negative entry is
padding: its program reads no slot, its output row is zeros (and the append variant writes nothing for it), so a
list of static length can carry fewer heads without reading the bytes of any.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels.block_math import cdiv, next_pow2, pow2_pieces, prev_pow2
from kernels.platform import resolve_interpret

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Elements of one K (or V) tile per loop step: 8 KiB of fp16 each, 16 KiB of K+V in flight per
# program (Little's law on an H100: ~3 TB/s x ~0.7 us / 132 SMs ~ 16 KiB per SM).
_TILE_ELEMS = 4096
# Two programs per H100 SM (132 SMs): split_s aims for at least this many programs.
_TARGET_PROGRAMS = 264
# Running max before any allowed slot: finite, so no inf - inf.
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class DecodeAttentionPlan:
    """Static launch configuration, derived from shapes and knobs by `plan_decode_attention`."""

    batch: int
    heads: int  # h, heads computed (len(head_idx) or H)
    seq: int  # S, cache slots
    head_dim: int
    block_s: int  # slots per tile (power of two <= S)
    split_s: int  # programs sharing one (b, head)'s slots
    blocks_per_split: int
    num_warps: int
    num_stages: int

    @property
    def n_blocks(self) -> int:
        return cdiv(self.seq, self.block_s)

    @property
    def hd_pieces(self) -> tuple[tuple[int, int], ...]:
        return pow2_pieces(self.head_dim)

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.batch, self.heads, self.split_s)


def _check_positive(name: str, value, *, pow2: bool) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (pow2 and value & (value - 1)):
        kind = "a positive power of two" if pow2 else "a positive int"
        raise ValueError(f"{name} must be {kind}. Got {value!r}")


def plan_decode_attention(
    batch: int,
    heads: int,
    seq: int,
    head_dim: int,
    *,
    block_s: int | None = None,
    split_s: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> DecodeAttentionPlan:
    """Resolves the knobs left as None into a static plan (pure Python, no tracing).

    block_s larger than S is clamped to the largest power of two <= S; split_s larger than the number
    of S-blocks is clamped to it (and rounded so that no split is empty).
    """
    _check_positive("block_s", block_s, pow2=True)
    for name, value in (("split_s", split_s), ("num_warps", num_warps), ("num_stages", num_stages)):
        _check_positive(name, value, pow2=False)
    cap = prev_pow2(seq)
    if block_s is None:
        bs = min(cap, max(1, prev_pow2(max(1, _TILE_ELEMS // head_dim))))
    else:
        bs = min(block_s, cap)
    n_blocks = cdiv(seq, bs)
    if split_s is None:
        split_s = max(1, cdiv(_TARGET_PROGRAMS, batch * heads))
    sp = min(split_s, n_blocks)
    bps = cdiv(n_blocks, sp)
    sp = cdiv(n_blocks, bps)
    if num_warps is None:
        num_warps = 4 if bs * next_pow2(head_dim) <= _TILE_ELEMS else 8
    if num_stages is None:
        num_stages = 2
    return DecodeAttentionPlan(
        batch=batch,
        heads=heads,
        seq=seq,
        head_dim=head_dim,
        block_s=bs,
        split_s=sp,
        blocks_per_split=bps,
        num_warps=num_warps,
        num_stages=num_stages,
    )


# ----------------------------------------------------------------------------------------------
# Kernel body.
# ----------------------------------------------------------------------------------------------


def _decode_attention_kernel(*refs, plan: DecodeAttentionPlan, append: bool):
    # Inputs:  head_idx [h] int32, (append: cursor [1] int32,) q [B, h, hd],
    #          (append: k_new, v_new [B, h, hd],) keys, values [B, H, S, hd], allowed [B, S] int8.
    # Outputs: split_s == 1: o [B, h, hd] q.dtype; split_s > 1: o [B, h, split_s, hd] fp32
    #          (unnormalised), m, l [B, h, split_s] fp32; (append: keys, values, aliased to the inputs).
    if append:
        head_idx_ref, cursor_ref, q_ref, k_new_ref, v_new_ref, k_ref, v_ref, allowed_ref, *out_refs = refs
        k_out_ref, v_out_ref = out_refs[-2:]
        out_refs = out_refs[:-2]
    else:
        head_idx_ref, q_ref, k_ref, v_ref, allowed_ref, *out_refs = refs
    b, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    live = head_idx_ref[j] >= 0  # a negative entry is padding: no slot read, zeros out
    head = jnp.maximum(head_idx_ref[j], 0)  # scalar
    cursor = cursor_ref[0] if append else None  # scalar
    bs, pieces = plan.block_s, plan.hd_pieces
    ragged = plan.seq % bs != 0
    qs = tuple(q_ref[b, j, pl.ds(c0, w)].astype(jnp.float32) for c0, w in pieces)  # [w] each

    def body(kb, carry):
        m, l, acc = carry  # [], [], [w] each
        if ragged:
            # The last block is shifted back to end at S; slots of the previous block are masked.
            start = jnp.minimum(kb * bs, plan.seq - bs)
            fresh = start + jnp.arange(bs, dtype=jnp.int32) >= kb * bs  # [bs]
        else:
            start = pl.multiple_of(kb * bs, bs)
            fresh = None
        slots = pl.ds(start, bs)
        valid = allowed_ref[b, slots] != 0  # [bs]
        if fresh is not None:
            valid = valid & fresh
        if append:
            # The cursor slot is being written by split 0 of this head: nobody reads it from memory,
            # its token enters from registers after the loop.
            valid = valid & (start + jnp.arange(bs, dtype=jnp.int32) != cursor)
        scores = jnp.zeros((bs,), jnp.float32)
        for (c0, w), qp in zip(pieces, qs):
            k = k_ref[b, head, slots, pl.ds(c0, w)].astype(jnp.float32)  # [bs, w]
            scores = scores + jnp.sum(k * qp[None, :], axis=1)  # [bs]
        scores = jnp.where(valid, scores, _NEG)
        m_new = jnp.maximum(m, jnp.max(scores))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(scores - m_new), 0.0)  # [bs]
        new_acc = []
        for (c0, w), a in zip(pieces, acc):
            v = v_ref[b, head, slots, pl.ds(c0, w)].astype(jnp.float32)  # [bs, w]
            new_acc.append(a * alpha + jnp.sum(p[:, None] * v, axis=0))  # [w]
        return m_new, l * alpha + jnp.sum(p), tuple(new_acc)

    lo = split * plan.blocks_per_split
    hi = lo + plan.blocks_per_split
    if plan.n_blocks % plan.blocks_per_split != 0:
        hi = jnp.minimum(hi, plan.n_blocks)
    hi = jnp.where(live, hi, lo)
    init = (jnp.float32(_NEG), jnp.float32(0.0), tuple(jnp.zeros((w,), jnp.float32) for _, w in pieces))
    m, l, acc = lax.fori_loop(lo, hi, body, init)

    if append:
        # The new token: split 0 adds it to the online softmax and writes its K/V into the cache.
        k_new = tuple(k_new_ref[b, j, pl.ds(c0, w)] for c0, w in pieces)  # [w] each
        v_new = tuple(v_new_ref[b, j, pl.ds(c0, w)] for c0, w in pieces)
        score = sum(jnp.sum(kp.astype(jnp.float32) * qp) for kp, qp in zip(k_new, qs))
        include = (split == 0) & (allowed_ref[b, cursor] != 0) & live
        m_new = jnp.where(include, jnp.maximum(m, score), m)
        alpha = jnp.exp(m - m_new)
        p = jnp.where(include, jnp.exp(score - m_new), 0.0)
        acc = tuple(a * alpha + p * vp.astype(jnp.float32) for a, vp in zip(acc, v_new))
        m, l = m_new, l * alpha + p

        @pl.when((split == 0) & live)
        def _write_new_token():
            for (c0, w), kp, vp in zip(pieces, k_new, v_new):
                k_out_ref[b, head, cursor, pl.ds(c0, w)] = kp.astype(k_out_ref.dtype)
                v_out_ref[b, head, cursor, pl.ds(c0, w)] = vp.astype(v_out_ref.dtype)

    if plan.split_s == 1:
        (o_ref,) = out_refs
        # A row with no allowed slot has l == 0 and acc == 0: it returns zeros.
        inv = jnp.where(l > 0.0, 1.0 / jnp.maximum(l, 1e-30), 0.0)
        for (c0, w), a in zip(pieces, acc):
            o_ref[b, j, pl.ds(c0, w)] = (a * inv).astype(o_ref.dtype)
    else:
        o_ref, m_ref, l_ref = out_refs
        for (c0, w), a in zip(pieces, acc):
            o_ref[b, j, split, pl.ds(c0, w)] = a
        m_ref[b, j, split] = m
        l_ref[b, j, split] = l


# ----------------------------------------------------------------------------------------------
# pallas_call layer.
# ----------------------------------------------------------------------------------------------


def _decode_attention_call(head_idx, q, keys, values, allowed_i8, *, plan, interpret, new_kv=None, cursor=None):
    """One launch. With new_kv = (k_new, v_new) [B, h, hd] and cursor [1] int32 it also writes the new
    token's K/V into the caches in place (aliased outputs, returned last) and attends to it."""
    batch, heads, hd = plan.batch, plan.heads, plan.head_dim
    if plan.split_s == 1:
        out_shape = [jax.ShapeDtypeStruct((batch, heads, hd), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((batch, heads, plan.split_s, hd), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, plan.split_s), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, plan.split_s), jnp.float32),
        ]
    append = new_kv is not None
    if append:
        inputs = (head_idx, cursor, q, *new_kv, keys, values, allowed_i8)
        out_shape += [jax.ShapeDtypeStruct(keys.shape, keys.dtype), jax.ShapeDtypeStruct(values.shape, values.dtype)]
        aliases = {5: len(out_shape) - 2, 6: len(out_shape) - 1}
    else:
        inputs = (head_idx, q, keys, values, allowed_i8)
        aliases = {}
    outs = pl.pallas_call(
        functools.partial(_decode_attention_kernel, plan=plan, append=append),
        out_shape=tuple(out_shape),
        grid=plan.grid,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=interpret,
        name="decode_attention_append" if append else "decode_attention",
    )(*inputs)
    return tuple(outs)


def _merge_splits(o, m, l, dtype):
    """Flash-decoding merge: o [B, h, split, hd] unnormalised, m / l [B, h, split] -> [B, h, hd]."""
    m_max = jnp.max(m, axis=-1, keepdims=True)  # [B, h, 1]
    w = jnp.exp(m - m_max)  # [B, h, split]
    denom = jnp.sum(w * l, axis=-1)  # [B, h]
    num = jnp.einsum("bhs,bhsk->bhk", w, o, precision=lax.Precision.HIGHEST)
    inv = jnp.where(denom > 0.0, 1.0 / jnp.maximum(denom, 1e-30), 0.0)
    return (num * inv[..., None]).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Public wrapper.
# ----------------------------------------------------------------------------------------------


def _check_inputs(q, keys, values, allowed, head_idx) -> None:
    if q.ndim != 3:
        raise ValueError(f"q must be rank 3 [batch, heads, head_dim]. Got shape {q.shape}")
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of float32, bfloat16, float16. Got {q.dtype}")
    if keys.ndim != 4:
        raise ValueError(f"keys must be rank 4 [batch, heads, slots, head_dim]. Got shape {keys.shape}")
    if values.shape != keys.shape:
        raise ValueError(f"values must have the shape of keys. Got {values.shape} and {keys.shape}")
    for name, arr in (("keys", keys), ("values", values)):
        if arr.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype. Got {arr.dtype} and {q.dtype}")
    batch, n_heads, seq, hd = keys.shape
    if seq < 1 or hd < 1:
        raise ValueError(f"keys must have at least one slot and head_dim >= 1. Got shape {keys.shape}")
    if q.shape[0] != batch or q.shape[2] != hd:
        raise ValueError(
            f"q must be [batch, heads, head_dim] matching keys' batch and head_dim. Got {q.shape} and {keys.shape}"
        )
    if head_idx is None:
        if q.shape[1] != n_heads:
            raise ValueError(
                f"with head_idx=None q must hold all heads (q.shape[1] == keys.shape[1]). Got "
                f"{q.shape} and {keys.shape}"
            )
    else:
        if head_idx.ndim != 1 or head_idx.shape[0] != q.shape[1]:
            raise ValueError(f"head_idx must be rank 1 [h] with h = q.shape[1]. Got {head_idx.shape} and {q.shape}")
        if not jnp.issubdtype(head_idx.dtype, jnp.integer):
            raise ValueError(f"head_idx must be an integer array. Got {head_idx.dtype}")
    if allowed.shape != (batch, seq):
        raise ValueError(f"allowed must be [batch, slots] = {(batch, seq)}. Got {allowed.shape} and keys {keys.shape}")
    if allowed.dtype != jnp.bool_:
        raise ValueError(f"allowed must be a bool array. Got {allowed.dtype}")


@functools.partial(jax.jit, static_argnames=("block_s", "split_s", "num_warps", "num_stages", "interpret"))
def decode_attention(
    q,  # [B, h, hd], scaled by hd**-0.5
    keys,  # [B, H, S, hd]
    values,  # [B, H, S, hd]
    allowed,  # [B, S] bool
    head_idx=None,  # [h] int, or None: all H heads in order
    *,
    block_s: int | None = None,
    split_s: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
):
    """softmax(q · Kᵀ masked by `allowed`) · V per (sequence, head), as [B, h, hd] in q.dtype.

    Knobs left as None are chosen by `plan_decode_attention`. A row with no allowed slot gives zeros.
    `interpret=None` runs the Pallas interpreter unless the default backend is a GPU.
    """
    _check_inputs(q, keys, values, allowed, head_idx)
    interpret = resolve_interpret(interpret)
    if q.shape[1] == 0:
        return jnp.zeros((keys.shape[0], 0, keys.shape[3]), q.dtype)
    out, _ = _launch(
        q,
        keys,
        values,
        allowed,
        head_idx,
        dict(block_s=block_s, split_s=split_s, num_warps=num_warps, num_stages=num_stages),
        interpret,
    )
    return out


@functools.partial(jax.jit, static_argnames=("block_s", "split_s", "num_warps", "num_stages", "interpret"))
def decode_attention_unmerged(
    q,
    keys,
    values,
    allowed,
    head_idx=None,
    *,
    block_s: int | None = None,
    split_s: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
):
    """`decode_attention` without the flash-decoding merge after it, for a consumer that merges the splits itself
    (`kernels.head_sparse.head_out_proj`): with one split per head, the output [B, h, hd] in q.dtype as
    `decode_attention` gives it; else `(o [B, h, split, hd] unnormalised, m, l [B, h, split])` fp32, which
    `merge_splits` turns into that output. At least one head."""
    _check_inputs(q, keys, values, allowed, head_idx)
    if q.shape[1] == 0:
        raise ValueError("decode_attention_unmerged needs at least one head")
    knobs = dict(block_s=block_s, split_s=split_s, num_warps=num_warps, num_stages=num_stages)
    plan, outs = _plan_and_call(q, keys, values, allowed, head_idx, knobs, resolve_interpret(interpret))
    return outs[0] if plan.split_s == 1 else outs


def merge_splits(o, m, l, dtype):
    """The flash-decoding merge of `decode_attention_unmerged`'s splits: [B, h, hd] in dtype."""
    return _merge_splits(o, m, l, dtype)


def _plan_and_call(q, keys, values, allowed, head_idx, knobs, interpret, new_kv=None, cursor=None):
    """(plan, the kernel's outputs) of one launch (inputs already checked, at least one head)."""
    batch, n_heads, seq, hd = keys.shape
    plan = plan_decode_attention(batch, q.shape[1], seq, hd, **knobs)
    if head_idx is None:
        head_idx = jnp.arange(n_heads, dtype=jnp.int32)
    outs = _decode_attention_call(
        head_idx.astype(jnp.int32),
        q,
        keys,
        values,
        allowed.astype(jnp.int8),
        plan=plan,
        interpret=interpret,
        new_kv=new_kv,
        cursor=cursor,
    )
    return plan, outs


def _launch(q, keys, values, allowed, head_idx, knobs, interpret, new_kv=None, cursor=None):
    """Plan, launch and finish one call of the kernel (inputs already checked, at least one head).

    Returns (out [B, h, hd] in q.dtype, the kernel's extra outputs: the updated caches with new_kv, else ()).
    """
    plan, outs = _plan_and_call(q, keys, values, allowed, head_idx, knobs, interpret, new_kv, cursor)
    n_attention_outs = 1 if plan.split_s == 1 else 3
    attention, extra = outs[:n_attention_outs], outs[n_attention_outs:]
    out = attention[0] if plan.split_s == 1 else _merge_splits(*attention, q.dtype)
    return out, extra


@functools.partial(
    jax.jit,
    static_argnames=("block_s", "split_s", "num_warps", "num_stages", "interpret"),
    donate_argnames=("keys", "values"),
)
def decode_attention_append(
    q,  # [B, h, hd], scaled by hd**-0.5
    k_new,  # [B, h, hd]: the new token's keys (of the heads in head_idx)
    v_new,  # [B, h, hd]
    keys,  # [B, H, S, hd], donated: updated in place
    values,  # [B, H, S, hd], donated
    allowed,  # [B, S] bool, the new token's own slot `cursor` included
    cursor,  # [] int: the slot the new token is written to
    head_idx=None,  # [h] int, or None: all H heads in order
    *,
    block_s: int | None = None,
    split_s: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
):
    """Writes the new token's K/V at slot `cursor` and attends to the updated cache, in one launch.

    Returns (out [B, h, hd], keys, values): exactly `decode_attention` over the caches after
    `keys[:, head_idx, cursor] = k_new` (likewise values). This replaces, per layer and decode step,
    the two cache-update kernels and the attention kernels of the XLA path. Heads not in head_idx keep
    their old slot contents. `cursor` is not range-checked on GPU (0 <= cursor < S is the caller's
    contract; the model's cursor always is).
    """
    _check_inputs(q, keys, values, allowed, head_idx)
    for name, arr in (("k_new", k_new), ("v_new", v_new)):
        if arr.shape != q.shape:
            raise ValueError(f"{name} must have q's shape [batch, heads, head_dim]. Got {arr.shape} and {q.shape}")
    if jnp.ndim(cursor) != 0 or not jnp.issubdtype(jnp.result_type(cursor), jnp.integer):
        raise ValueError(
            f"cursor must be an integer scalar. Got {jnp.result_type(cursor)} of shape {jnp.shape(cursor)}"
        )
    interpret = resolve_interpret(interpret)
    if q.shape[1] == 0:
        return jnp.zeros((keys.shape[0], 0, keys.shape[3]), q.dtype), keys, values
    out, (keys, values) = _launch(
        q,
        keys,
        values,
        allowed,
        head_idx,
        dict(block_s=block_s, split_s=split_s, num_warps=num_warps, num_stages=num_stages),
        interpret,
        new_kv=(k_new.astype(keys.dtype), v_new.astype(values.dtype)),
        cursor=jnp.reshape(jnp.asarray(cursor, jnp.int32), (1,)),
    )
    return out, keys, values


def decode_attention_append_reference(q, k_new, v_new, keys, values, allowed, cursor, head_idx=None):
    """Pure-jnp twin of `decode_attention_append`: scatter the new K/V, then `decode_attention_reference`."""
    heads = jnp.arange(keys.shape[1]) if head_idx is None else head_idx.astype(jnp.int32)
    heads = jnp.where(heads >= 0, heads, keys.shape[1])  # padding: out of range, dropped
    keys = keys.at[:, heads, cursor].set(k_new.astype(keys.dtype), mode="drop")
    values = values.at[:, heads, cursor].set(v_new.astype(values.dtype), mode="drop")
    return decode_attention_reference(q, keys, values, allowed, head_idx), keys, values


def decode_attention_reference(q, keys, values, allowed, head_idx=None):
    """Pure-jnp twin of `decode_attention`: gather heads, scores, masked softmax, probs · V, fp32 math."""
    live = None
    if head_idx is not None:
        idx = head_idx.astype(jnp.int32)
        live = idx >= 0  # negative entries are padding: zeros
        keys = jnp.take(keys, jnp.maximum(idx, 0), axis=1)  # [B, h, S, hd]
        values = jnp.take(values, jnp.maximum(idx, 0), axis=1)
    scores = jnp.einsum(
        "bhk,bhsk->bhs", q.astype(jnp.float32), keys.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )  # [B, h, S]
    mask = allowed[:, None, :]  # [B, 1, S]
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)  # [B, h, S]
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhs,bhsk->bhk", p, values.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    out = jnp.where(l > 0.0, out / jnp.where(l > 0.0, l, 1.0), 0.0)  # no allowed slot: zeros
    if live is not None:
        out = jnp.where(live[None, :, None], out, 0.0)
    return out.astype(q.dtype)
