"""Head-sparse decode attention: one decode step of a small batch that reads only the chosen heads' attention
weights, and keeps every head's K/V exact.

The rule (GUIDE.md, sparse seams): a head, whenever it is computed, attends over exact K/V for every earlier token.
A step computes Q, attention and the out_proj contribution of the chosen heads only (kernels/head_sparse.py reads
their weight rows in place). For K/V, two exact ways, chosen by `DecodeTuning.head_kv` (static):

- "repair" (the default): only the computed heads get K/V. The cache keeps, per layer, the last R attention inputs
  of every sequence (`KVCache.recent_inputs` [B, R, d], row = slot mod R). Besides the chosen heads, f = ceil(H / R)
  heads are forced each step by a rotation (`forced_heads`), so every head is computed at least once every R steps.
  A computed head (chosen or forced) recomputes its K/V for the window of slots [c-R+1, c] from the buffer and
  writes them to the cache: its previous computation was at most R steps ago, so every slot before the window is
  already exact. Per step it reads the K/V weights of the chosen and forced heads only; the price is R times the
  arithmetic on those rows (on tensor cores) and R slots written per head. At batch 1 with R >= 16 (a power of two)
  one launch does it all (`head_window_into_cache`: the window's rows through `dot`, K/V written into the cache by
  the kernel, the forced heads derived from the cursor in the kernel and skipped where chosen too, Q of the chosen
  heads from the new token); otherwise one `head_qkv_pairs` over the window's R·B rows and XLA scatters into the
  cache (the `window_cache_write=0` knob forces this path).
- "all": every head's K/V of the new token each step (in the same `head_qkv_pairs` launch as the chosen heads' Q);
  Q, attention and out_proj stay sparse. No buffer, but it reads every head's K/V weights (2/3 of the QKV weights)
  every step. Below 16 sequences that launch also writes the K/V into the cache (`head_qkv_into_cache`), replacing
  the two cache writes after it, and applies the attention LayerNorm to the pre-LayerNorm input the model hands it:
  the `qkv_cache_write` and `qkv_layernorm` knobs, on by default since they measured faster on an H100
  (bench/results/generate_NVIDIA-H100-80GB-HBM3_2026-12-06_knobs_opt-6.7b.md); `--tuning head_qkv_cache_write=0`
  / `head_qkv_layernorm=0` turn them off.

Why "repair" is the default: on an H100 (opt-6.7b, batch 1, prompt 128, 16 of 32 heads beside 10% fixed MLP rows,
one process: bench/results/generate_NVIDIA-H100-80GB-HBM3_2026-12-07_repair-window_opt-6.7b.md) the one-launch
repair decoded at 2.56 ms a token with 16-row blocks and 2.50 with 32 (then set through `qkv_block_rows`, now the
`window_block_rows` default) against 2.68 for every head's K/V (dense 5.33); its window kernel took 29.5 µs a layer
against 37.2 for the "all" launch (profiles of 2026-12-07). The same repair through `head_qkv_pairs` and XLA
scatters ran at 3.50: that path's projection ran at ~3x its weight bytes, which is why "all" had been the default
before the one-launch kernel. With the window kernel's column loop pipelined over two stages and the attention
LayerNorm applied in the kernel (both defaults since, measured in one process at 2.27 against 2.40 without them,
bench/results/generate_NVIDIA-H100-80GB-HBM3_2026-12-07_heads-combined_opt-6.7b.md) "all" ran at 2.62 in the plan
sweep beside 2.46 (…_head-plans_opt-6.7b.md).

Batch: the step computes the union of the batch's chosen heads (a static list of min(H, B·k) entries, padded with
repeats of a real head); each sequence's out_proj sums only the heads it chose (the others' outputs are zeroed
before `head_out_proj`), so a sequence's output does not depend on what its neighbours chose. The model takes this
step for at most `DecodeTuning.head_max_batch` sequences (default 1): at batch 8 the union is nearly every head and
the step decoded at 0.36x dense on an H100 (opt-6.7b, prompt 1024, 16 of 32 heads a sequence), while computing every
head and zeroing the unchosen outputs ran at 0.98x (bench/results/generate_NVIDIA-H100-80GB-HBM3_2026-12-06_heads*).
At batch 1 the chosen heads' index list (`sparsity.exactly_k`'s top-k indices) is the step's head list as is: no
mask to compact, no padding and nothing to zero.

Tensor parallelism (`head_sparse_decode_split`): with the weights and the cache split on heads, each device runs this
step over the chosen heads it holds (`shard_head_list`: a static bound per device; the padding entries reach the
batch-1 launches as -1, which they skip, and are zeroed before out_proj elsewhere),
and one psum adds the out_proj partials. Both K/V modes run per device; "repair" keeps the global forced rotation
(each device recomputes the forced heads it holds), so every head is still computed at least once every R steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dejavu_jax.parallel import TP_AXIS
from kernels.block_math import cdiv
from kernels.decode_attention import decode_attention, decode_attention_unmerged
from kernels.layernorm import wrapper_kwargs
from kernels.head_sparse import (
    DOT_MIN_BATCH,
    MAX_BATCH,
    head_out_proj,
    head_out_proj_residual,
    head_qkv_into_cache,
    head_qkv_pairs,
    head_window_into_cache,
    plan_flag,
    window_row_block,
)

HEAD_KV_MODES = ("repair", "all")


class AttentionWeights(NamedTuple):
    qkv_w: jax.Array  # [3, H, hd, d]
    qkv_b: jax.Array  # [3, H, hd]
    out_w: jax.Array  # [H, hd, d]
    out_b: jax.Array  # [d]


class HeadSparseStep(NamedTuple):
    out: jax.Array  # [B, d]: the attention block's output (out_proj of the chosen heads, bias included)
    keys: jax.Array  # [B, H, S, hd]: the cache after this step
    values: jax.Array  # [B, H, S, hd]
    recent: Optional[jax.Array]  # [B, R, d]: the ring buffer after this step ("repair"), else None
    head_idx: jax.Array  # [n] int32: the heads whose attention was computed (the batch's union, padded)
    head_used: jax.Array  # [B, n] bool: sequence b's out_proj summed entry j (it chose the head; not a padding copy)
    # [B, n, hd]: attention outputs of head_idx, zero where not head_used; None where out_proj merged the attention's
    # splits itself (the `out_merge` knob)
    heads_out: Optional[jax.Array]
    # With `finish` (`head_sparse_decode`): `out` is the new residual, `normed` its LayerNorm (or None), `sync` the
    # counters to hand on
    normed: Optional[jax.Array] = None
    sync: Optional[jax.Array] = None


def forced_count(n_heads: int, window: int) -> int:
    """f = ceil(H / R): heads forced per step so that each is computed at least once every R steps."""
    return cdiv(n_heads, window)


def forced_heads(cursor, n_heads: int, window: int):
    """[f] int32: the heads forced at the step writing slot `cursor`: (cursor·f + j) mod H for j < f.

    Why every head is computed at least once every R steps: the blocks [c·f, c·f + f) of consecutive steps c tile
    the integers, and head h is forced at step c exactly when one of the integers h + m·H (m = 0, 1, ...) falls in
    step c's block, i.e. at c_m = floor((h + m·H) / f). Consecutive forcings are therefore c_{m+1} - c_m <=
    ceil(H / f) steps apart, and f = ceil(H / R) >= H / R gives ceil(H / f) <= R. So any R consecutive steps force
    every head at least once.
    """
    f = forced_count(n_heads, window)
    return ((cursor * f + jnp.arange(f, dtype=jnp.int32)) % n_heads).astype(jnp.int32)


class ForcedRotation(NamedTuple):
    """The repair's forced heads (`forced_heads`) as a step over the heads [first, first + H) of the model's `total`
    sees them (one device: first 0, H = total; under tensor parallelism its slice)."""

    total: int  # H of the whole model (static)
    window: int  # R (static)
    first: Any  # int32 scalar: the first head this step's weights and cache hold

    @property
    def count(self) -> int:
        return forced_count(self.total, self.window)

    def local_list(self, cursor, local_heads: int):
        """[f] int32: the forced heads as local indices; those held elsewhere become local head 0 (a padding entry,
        which recomputes head 0's window: exact values, harmless)."""
        return shard_heads(forced_heads(cursor, self.total, self.window), self.first, local_heads)[0]


def window_slots(cursor, window: int):
    """[R] int32: the slot whose input ring-buffer row r holds once slot `cursor` is written: the s in
    [cursor-R+1, cursor] with s = r (mod R); negative where that slot does not exist yet."""
    rows = jnp.arange(window, dtype=jnp.int32)
    return cursor - (cursor - rows) % window


def write_recent_inputs(recent, x, first_slot):
    """recent [B, R, d] with the chunk x [B, T, d] (slots first_slot .. first_slot+T-1) written at row slot mod R;
    only the last R tokens of a longer chunk stay."""
    window, tokens = recent.shape[1], x.shape[1]
    if tokens == 1:  # a decode step: one row, a dynamic update in place instead of a scatter
        return lax.dynamic_update_slice(recent, x.astype(recent.dtype), (0, first_slot % window, 0))
    kept = min(tokens, window)
    slots = first_slot + tokens - kept + jnp.arange(kept, dtype=jnp.int32)
    return recent.at[:, slots % window].set(x[:, tokens - kept :].astype(recent.dtype))


def head_list(chosen_any, size: int):
    """chosen_any [H] bool -> (idx [size] int32, real [size] bool): the chosen heads in ascending order, padded with
    repeats of the first (real False on padding; with none chosen, every entry is padding on head 0). At most `size`
    heads may be chosen."""
    idx = jnp.nonzero(chosen_any, size=size, fill_value=-1)[0].astype(jnp.int32)
    real = idx >= 0
    return jnp.where(real, idx, jnp.maximum(idx[0], 0)), real


def shard_heads(global_heads, first, local_heads: int):
    """global_heads [...] int32 -> (local [...] int32, mine [...] bool): the entries that live on the shard holding
    heads [first, first + local_heads), as its local indices; the others become head 0 (padding, mine False)."""
    local = global_heads - first
    mine = (local >= 0) & (local < local_heads)
    return jnp.where(mine, local, 0).astype(jnp.int32), mine


def shard_head_list(chosen, chosen_idx, first, local_heads: int, k: int):
    """One shard's step head list under tensor parallelism: (q_heads [n] int32, local indices into the shard's
    `local_heads` heads [first, first + local_heads); used [B, n] bool: sequence b chose entry j's head, and the
    entry is no padding). chosen [B, H] bool (their union at most B·`k` heads: `k` per row, or the batch's union in
    every row); chosen_idx [B, k] int32 or None, as for `head_sparse_decode`. n = min(local_heads, B·k), static, so
    a shard holding fewer of a token's heads (or none) pads; a padding entry names head 0 with `used` False: the
    step's window kernel, Pallas attention and out_proj skip it (they read no bytes for it), other paths compute
    head 0 and zero it before out_proj like an unchosen head of a batch's union.

    - B·k >= local_heads: every local head, in order (no compaction);
    - B == 1 with chosen_idx: the k chosen heads as listed, the other shards' heads as padding (no compaction);
    - otherwise the union over the batch of the shard's chosen heads (`head_list`)."""
    batch = chosen.shape[0]
    n = min(local_heads, batch * k)
    local_chosen = lax.dynamic_slice_in_dim(chosen, first, local_heads, axis=1)  # [B, local_heads]
    if n == local_heads:
        return jnp.arange(local_heads, dtype=jnp.int32), local_chosen
    if batch == 1 and chosen_idx is not None:
        q_heads, mine = shard_heads(chosen_idx[0].astype(jnp.int32), first, local_heads)
        return q_heads, mine[None, :]
    q_heads, real = head_list(jnp.any(local_chosen, axis=0), n)
    return q_heads, jnp.take(local_chosen, q_heads, axis=1) & real[None, :]


def _qkv_pairs_rows(rows, weights: AttentionWeights, part_idx, head_idx, knobs: tuple = (), layernorm=None):
    """`head_qkv_pairs` over any number of rows [N, d]: kernel calls of at most MAX_BATCH rows -> [N, n, hd]."""
    w, b, ln = weights.qkv_w, weights.qkv_b, wrapper_kwargs(layernorm)
    pieces = [
        head_qkv_pairs(rows[i : i + MAX_BATCH], w, b, part_idx, head_idx, knobs=knobs, **ln)
        for i in range(0, rows.shape[0], MAX_BATCH)
    ]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)


def window_kernel_applies(batch: int, window: int, slots: int, head_dim: int, knobs: tuple = ()) -> bool:
    """Whether a "repair" step projects its window with `head_window_into_cache` (K/V written into the cache by the
    projection launch): one sequence, R >= 16 a power of two (the window's rows go through `dot`), a cache of at least
    R slots, row blocks of at least 16, and the `window_cache_write` knob on."""
    return (
        batch == 1
        and window >= DOT_MIN_BATCH
        and not window & (window - 1)
        and slots >= window
        and window_row_block(head_dim, knobs) >= 16
        and bool(plan_flag(knobs, "window_cache_write"))
    )


def kv_q_pairs(kv_heads, q_heads):
    """(part_idx, head_idx) [2m + n] int32 for one `head_qkv_pairs` launch: K of the m `kv_heads`, then V of them,
    then Q of the n `q_heads`."""
    m, n = kv_heads.shape[0], q_heads.shape[0]
    part_idx = jnp.asarray([1] * m + [2] * m + [0] * n, jnp.int32)  # static: a constant
    return part_idx, jnp.concatenate([kv_heads, kv_heads, q_heads]).astype(jnp.int32)


def write_window_kv(keys, values, kv_heads, new_keys, new_values, cursor):
    """keys / values [B, H, S, hd] with new_keys / new_values [B, R, m, hd] (heads `kv_heads`, window row r = the
    slot `window_slots(cursor, R)[r]`) written; slots before 0 are left alone. A head listed twice must come with
    identical K/V in both entries (it then writes the same values twice)."""
    slots = window_slots(cursor, new_keys.shape[1])
    slots = jnp.where(slots >= 0, slots, keys.shape[2])  # out of range: dropped by the scatter
    at = (slice(None), kv_heads[None, :], slots[:, None])  # -> [B, R, m, hd]
    new_keys, new_values = new_keys.astype(keys.dtype), new_values.astype(values.dtype)
    return keys.at[at].set(new_keys, mode="drop"), values.at[at].set(new_values, mode="drop")


def _attention_xla(q, keys, values, allowed, head_idx):
    """q [B, h, hd] against the cache heads `head_idx` -> [B, h, hd] fp32: the model's masked softmax."""
    keys, values = keys[:, head_idx], values[:, head_idx]  # [B, h, S, hd]
    scores = jnp.einsum("bhk,bhsk->bhs", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bhs,bhsk->bhk", probs, values, preferred_element_type=jnp.float32)


def head_sparse_decode(
    x,
    weights: AttentionWeights,
    keys,
    values,
    recent,
    chosen,
    k: int,
    cursor,
    allowed,
    *,
    chosen_idx=None,
    head_kv: str = "all",
    attention_impl: str = "xla",
    knobs: tuple = (),
    layernorm=None,
    padded: bool = False,
    finish=None,
) -> HeadSparseStep:
    """One decode step of the attention block over the chosen heads.

    x [B, d]: the new tokens' attention input (after the LayerNorm), written at slot `cursor`; keys / values
    [B, H, S, hd]: the cache, exact for every head up to the rule above; recent [B, R, d]: the input ring buffer
    ("repair", in x's dtype; None for "all"); chosen [B, H] bool: each sequence's heads, at most `k` (static) per
    row or the batch's union (at most B·`k`) in every row, at least one; chosen_idx [B, k] int32 or None: the same
    choice as index lists (k distinct heads per row, `sparsity.exactly_k`; with `padded` (static) also -1 entries,
    no head: `sparsity.threshold_k`). At B == 1 a given chosen_idx is the step's head list as is (no compaction of
    the mask; `chosen` may then be None); larger batches compute the union of `chosen`. allowed [B, S] bool: the
    slots the new token may read (its own included). `attention_impl`: "xla" or "pallas"
    (kernels/decode_attention.py). `knobs`: `kernels.head_sparse.HeadSparsePlan` overrides for both
    projections. B <= MAX_BATCH. `layernorm`
    (scale [d], bias [d], eps; with "all" for B below `kernels.head_sparse.DOT_MIN_BATCH`, with "repair" where
    `window_kernel_applies`): x is the pre-LayerNorm input and the projection kernel normalises it (the
    `qkv_layernorm` / `window_layernorm` knobs ask the model for this; the repair's kernel then also writes the
    normalised row into the buffer). `finish` (residual [B, d], sync, the MLP's LayerNorm or None): out_proj's
    launch also adds the residual and applies that LayerNorm (`kernels.head_sparse.head_out_proj_residual`, the
    `out_residual` knob): the step's `out` is then the new residual, `normed` its LayerNorm, `sync` the counters.

    Launches: one `head_qkv_pairs` (K/V and Q together, below) and one `head_out_proj` per step while the rows fit
    one kernel call (B·R <= MAX_BATCH in "repair", B <= MAX_BATCH in "all").
    """
    _check_step(x, recent, chosen, chosen_idx, k, head_kv, layernorm)
    batch, n_heads = x.shape[0], weights.qkv_w.shape[1]
    as_list = batch == 1 and chosen_idx is not None
    if chosen is None and not as_list:
        raise ValueError("chosen [B, H] is needed unless B == 1 and chosen_idx is given. Got chosen=None")
    if as_list:
        # k distinct heads, each used by the one sequence: no compaction; with `padded`, -1 entries as padding.
        q_heads, used = chosen_idx[0].astype(jnp.int32), None
        if padded:
            q_heads, used = jnp.maximum(q_heads, 0), (q_heads >= 0)[None, :]
    else:
        q_heads, real = head_list(jnp.any(chosen, axis=0), min(n_heads, batch * k))  # [n]
        used = jnp.take(chosen, q_heads, axis=1) & real[None, :]  # [B, n]
    forced = ForcedRotation(n_heads, recent.shape[1], 0) if head_kv == "repair" else None
    return _decode_heads(
        x,
        weights,
        keys,
        values,
        recent,
        q_heads,
        used,
        forced,
        cursor,
        allowed,
        head_kv,
        attention_impl,
        knobs,
        layernorm,
        finish,
    )


def _check_step(x, recent, chosen, chosen_idx, k: int, head_kv: str, layernorm=None) -> None:
    batch = x.shape[0]
    if layernorm is not None and (batch >= DOT_MIN_BATCH or (head_kv == "repair" and batch != 1)):
        raise ValueError(
            f"the projection kernel applies the LayerNorm with head_kv='all' below {DOT_MIN_BATCH} sequences, with "
            f"'repair' for one. Got head_kv={head_kv!r}, {batch} sequences"
        )
    if head_kv not in HEAD_KV_MODES:
        raise ValueError(f"head_kv must be one of {HEAD_KV_MODES}. Got {head_kv!r}")
    if batch > MAX_BATCH:
        raise ValueError(f"head-sparse decoding takes at most {MAX_BATCH} sequences. Got {batch}")
    if head_kv == "repair" and recent is None:
        raise ValueError(
            "head_kv='repair' needs the cache's recent inputs: create it with "
            "KVCache.create(..., recent_window=policy.recent_window)"
        )
    if head_kv == "repair" and recent.dtype != x.dtype:
        # The window's rows feed the same kernel as x (and give the current token's Q): one dtype.
        raise ValueError(
            f"head_kv='repair' needs the cache in the model's dtype. Got a cache of {recent.dtype} and inputs of "
            f"{x.dtype}: create the cache with the params' dtype"
        )
    if chosen_idx is not None and chosen_idx.shape != (batch, k):
        raise ValueError(f"chosen_idx must be [B, k] = {(batch, k)}. Got {chosen_idx.shape}")


def _decode_heads(
    x,
    weights: AttentionWeights,
    keys,
    values,
    recent,
    q_heads,
    used,
    forced,
    cursor,
    allowed,
    head_kv,
    attention_impl,
    knobs: tuple = (),
    layernorm=None,
    finish=None,
) -> HeadSparseStep:
    """The step over the head list q_heads [n] (indices into the weights' and cache's heads); used [B, n] bool or
    None (every entry used by every sequence); forced: the rotation of heads "repair" also recomputes (None for
    "all")."""
    batch, d = x.shape
    n_heads, head_dim = weights.qkv_w.shape[1], weights.qkv_w.shape[2]
    n = q_heads.shape[0]
    # The one-launch projections, the Pallas attention and out_proj skip negative entries (no weight or cache bytes
    # read, zero outputs): padding entries, which no sequence uses (another device's heads under tensor parallelism,
    # a short batch union), become -1 for them.
    listed = q_heads if used is None else jnp.where(jnp.any(used, axis=0), q_heads, -1)
    # HF scales the query after q_proj, bias included. The one-launch projections apply the scale in fp32 before
    # their rounding (no XLA multiply after them); the others return q unscaled, multiplied below.
    q_scale, scaled = head_dim**-0.5, False
    with jax.named_scope("qkv_proj"):
        if head_kv == "repair":
            window = recent.shape[1]
            if window_kernel_applies(batch, window, keys.shape[2], head_dim, knobs):
                # One launch: the window's K/V of the chosen and the forced heads (a forced head that is chosen too,
                # or held by another device, is skipped) written into the cache by the kernel, and Q of the chosen
                # heads from x (with a LayerNorm, x is normalised there and written into the buffer too).
                if layernorm is None:
                    recent = write_recent_inputs(recent, x[:, None], cursor)
                q, keys, values, buffer = head_window_into_cache(
                    x,
                    recent[0],
                    weights.qkv_w,
                    weights.qkv_b,
                    listed,
                    keys,
                    values,
                    cursor,
                    forced=forced.count,
                    total_heads=forced.total,
                    first_head=forced.first,
                    knobs=knobs,
                    q_scale=q_scale,
                    **wrapper_kwargs(layernorm),
                )
                recent, scaled = buffer[None], True
            else:
                if layernorm is not None:
                    raise ValueError(
                        "the repair applies the LayerNorm only in head_window_into_cache (window_kernel_applies)"
                    )
                # One launch over the window's rows: K/V of the chosen ++ forced heads (a forced head that is also
                # chosen is listed twice and writes identical K/V twice; no compaction), and Q of the chosen heads,
                # taken from the buffer row of the current token (it holds x once written, in x's dtype).
                recent = write_recent_inputs(recent, x[:, None], cursor)
                kv_heads = jnp.concatenate([q_heads, forced.local_list(cursor, n_heads)])
                m = kv_heads.shape[0]
                pairs = kv_q_pairs(kv_heads, q_heads)
                rows = _qkv_pairs_rows(recent.reshape(batch * window, d), weights, *pairs, knobs)
                rows = rows.reshape(batch, window, 2 * m + n, head_dim)
                keys, values = write_window_kv(keys, values, kv_heads, rows[:, :, :m], rows[:, :, m : 2 * m], cursor)
                q = lax.dynamic_index_in_dim(rows, cursor % window, axis=1, keepdims=False)[:, 2 * m :]
        elif plan_flag(knobs, "qkv_cache_write") and batch < DOT_MIN_BATCH:
            # The same launch writing K/V into the cache itself (no cache writes after it).
            q, keys, values = head_qkv_into_cache(
                x,
                weights.qkv_w,
                weights.qkv_b,
                listed,
                keys,
                values,
                cursor,
                knobs=knobs,
                q_scale=q_scale,
                **wrapper_kwargs(layernorm),
            )
            scaled = True
        else:
            # One launch: K/V of every head and Q of the chosen ones (2H + n heads' rows). Projecting Q, K and V of
            # all heads would read H - n more heads' Q rows; all-heads ++ chosen with parts (0, 1, 2) would read
            # H + 2n more.
            all_heads = jnp.arange(n_heads, dtype=jnp.int32)
            rows = _qkv_pairs_rows(x, weights, *kv_q_pairs(all_heads, q_heads), knobs, layernorm)  # [B, 2H + n, hd]
            start = (0, 0, cursor, 0)
            keys = lax.dynamic_update_slice(keys, rows[:, :n_heads, None].astype(keys.dtype), start)
            values = lax.dynamic_update_slice(values, rows[:, n_heads : 2 * n_heads, None].astype(values.dtype), start)
            q = rows[:, 2 * n_heads :]
        if not scaled:  # q is already in x's dtype, so this is one multiply
            q = (q * q_scale).astype(x.dtype)  # [B, n, hd]
    merged_by_out_proj = (
        attention_impl == "pallas"
        and plan_flag(knobs, "out_merge")
        and batch < DOT_MIN_BATCH
        and (used is None or batch == 1)
    )
    with jax.named_scope("attention"):
        if attention_impl == "pallas":
            split = plan_flag(knobs, "attention_split") or None  # None: the kernel's own plan
            if merged_by_out_proj:
                # out_proj's launch merges the flash-decoding splits (`out_merge`): no merge kernel between them.
                splits = decode_attention_unmerged(q, keys, values, allowed, listed, split_s=split)
                heads_out = splits if not isinstance(splits, tuple) else None
            else:
                heads_out = decode_attention(q, keys, values, allowed, listed, split_s=split)
        else:
            heads_out = _attention_xla(q, keys, values, allowed, q_heads)
    if heads_out is None:  # out_proj merges the splits; the step records no merged output
        used = jnp.ones((batch, n), bool) if used is None else used
    elif used is None:
        used = jnp.ones((batch, n), bool)  # every entry is a head every sequence chose: nothing to zero
        heads_out = heads_out.astype(x.dtype)
    elif batch == 1 and attention_impl == "pallas":
        heads_out = heads_out.astype(x.dtype)  # one sequence's unused entries are -1 in `listed`: zeros already
    else:
        heads_out = jnp.where(used[..., None], heads_out, 0).astype(x.dtype)
    proj_in = splits if heads_out is None else heads_out
    with jax.named_scope("out_proj"):
        if finish is not None:
            residual, sync, mlp_layernorm = finish
            out, normed, sync = head_out_proj_residual(
                proj_in,
                weights.out_w,
                weights.out_b,
                listed,
                residual,
                sync,
                knobs=knobs,
                **wrapper_kwargs(mlp_layernorm),
            )
            return HeadSparseStep(out, keys, values, recent, q_heads, used, heads_out, normed, sync)
        out = head_out_proj(proj_in, weights.out_w, weights.out_b, listed, knobs=knobs)
    return HeadSparseStep(out, keys, values, recent, q_heads, used, heads_out)


def head_sparse_decode_split(
    mesh,
    x,
    weights: AttentionWeights,
    keys,
    values,
    recent,
    chosen,
    k: int,
    cursor,
    allowed,
    *,
    chosen_idx=None,
    head_kv: str = "all",
    attention_impl: str = "xla",
    knobs: tuple = (),
    layernorm=None,
    padded: bool = False,
) -> HeadSparseStep:
    """`head_sparse_decode` for weights and cache split on heads over `mesh`'s tp axis (the Megatron layout,
    `dejavu_jax.parallel`): inside `jax.shard_map` each device computes the chosen heads that live on it, over its own
    weight rows and cache shard, and one psum adds the devices' out_proj partials: the one all-reduce the attention
    block needs anyway, no other collective.

    The choice is the single-device one: `chosen` [B, H] (needed here, with chosen_idx [B, k] optional as there;
    its -1 entries, where `padded`, name no device's head and so are padding on every device), x,
    `recent`, `cursor` and `allowed` are replicated, so every device sees the whole choice and takes its share
    (`shard_head_list`: a static min(H / tp, B·k) entries per device, padding zeroed before out_proj, so a device
    holding none of a token's heads adds zero). Each device writes its own heads' K/V into its own shard of the cache:
    "all" every local head's K/V of the new token; "repair" the window K/V of its chosen heads and of the globally
    forced heads (`forced_heads`) that live on it (the window kernel skips padding entries; the path through
    `head_qkv_pairs` recomputes head 0's window for them from the buffer: exact values, harmless). The out_proj bias
    is added once, after the psum; partials are summed in fp32 after rounding to x.dtype, so in half precision this
    differs from one device by rounding.

    Returns the step with keys / values split on heads as they came; head_idx [tp·n] (global head indices),
    head_used [B, tp·n] and heads_out [B, tp·n, hd] are the devices' lists side by side, padding included.
    """
    _check_step(x, recent, chosen, chosen_idx, k, head_kv, layernorm)
    if chosen is None:
        raise ValueError("the tensor-parallel step needs chosen [B, H]. Got chosen=None")
    n_heads, tp = weights.qkv_w.shape[1], mesh.shape[TP_AXIS]
    if n_heads % tp:
        raise ValueError(f"the tp axis ({tp} devices) must divide the {n_heads} heads")
    local_heads = n_heads // tp
    repair = head_kv == "repair"
    window = recent.shape[1] if repair else 0
    recent = recent if repair else None

    eps = None if layernorm is None else layernorm[2]
    ln = None if layernorm is None else layernorm[:2]

    def local(x, qkv_w, qkv_b, out_w, keys, values, recent, chosen, chosen_idx, cursor, allowed, ln):
        first = lax.axis_index(TP_AXIS) * local_heads
        q_heads, used = shard_head_list(chosen, chosen_idx, first, local_heads, k)
        forced = ForcedRotation(n_heads, window, first) if repair else None
        no_bias = jnp.zeros((out_w.shape[-1],), out_w.dtype)
        step = _decode_heads(
            x,
            AttentionWeights(qkv_w, qkv_b, out_w, no_bias),
            keys,
            values,
            recent,
            q_heads,
            used,
            forced,
            cursor,
            allowed,
            head_kv,
            attention_impl,
            knobs,
            None if ln is None else (*ln, eps),
        )
        out = lax.psum(step.out.astype(jnp.float32), TP_AXIS)
        return out, step.keys, step.values, step.recent, q_heads + first, step.head_used, step.heads_out

    replicated, heads_axis1 = P(), P(None, TP_AXIS)
    recent_spec = None if recent is None else replicated  # None: an empty subtree, no spec
    in_specs = (
        replicated,  # x
        heads_axis1,  # qkv_w [3, H, hd, d]
        heads_axis1,  # qkv_b [3, H, hd]
        P(TP_AXIS),  # out_w [H, hd, d]
        heads_axis1,  # keys [B, H, S, hd]
        heads_axis1,
        recent_spec,
        replicated,  # chosen
        None if chosen_idx is None else replicated,
        replicated,  # cursor
        replicated,  # allowed
        None if ln is None else (replicated, replicated),  # the LayerNorm's scale and bias
    )
    out_specs = (
        replicated,
        heads_axis1,
        heads_axis1,
        recent_spec,
        P(TP_AXIS),
        heads_axis1,
        heads_axis1,
    )
    out, keys, values, recent, head_idx, used, heads_out = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )(x, weights.qkv_w, weights.qkv_b, weights.out_w, keys, values, recent, chosen, chosen_idx, cursor, allowed, ln)
    out = (out + weights.out_b.astype(jnp.float32)).astype(x.dtype)
    return HeadSparseStep(out, keys, values, recent, head_idx, used, heads_out)
