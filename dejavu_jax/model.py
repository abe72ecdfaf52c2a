"""The Flax OPT model: HF `OPTForCausalLM` semantics for every OPT variant, with seams for sparse blocks.

Parameter layout (what `convert` writes), chosen for sparse decoding:
- attention `qkv_w` [3, heads, head_dim, d]: one fused projection, output-major like HF (a decode GEMV then reads
  contiguous rows: measured faster on H100 than the input-major layout), and a head is a contiguous block of rows,
  so the chosen heads are gathered with one index on axis 1; `out_w` [heads, head_dim, d] likewise.
- MLP `fc1_w` [ffn, d] and `fc2_w_t` [ffn, d]: both neuron-major, so a neuron's weights are two contiguous rows.

The seams: `OPTAttention` takes `HeadRows` (the heads whose outputs count; a small-batch decode step computes only
those, `dejavu_jax.sparse_attention`) and `OPTMLP` takes `MLPRows` (the neurons to compute). Which heads and rows a
layer computes is decided by `dejavu_jax.sparsity.head_rows` / `mlp_rows` from the static `SparsityPolicy` and the
traced `SparseWeights` the forward pass is given; the blocks hold no selection logic.

Activations for predictor training are `sow`n into the `intermediates` collection (free unless requested with
`mutable=["intermediates"]`): per layer the attention block's input (the residual before its LayerNorm), the MLP
block's input, the post-ReLU fc1 output and each head's output norm before out_proj. A sparse MLP sows
`mlp_density`: per token, the fraction of fc1 rows computed (lossless: of fc2 rows read).
"""

from __future__ import annotations

import enum
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from dejavu_jax.config import OPTConfig
from dejavu_jax.kv_cache import KVCache
from dejavu_jax.sparse_attention import (
    AttentionWeights,
    head_sparse_decode,
    head_sparse_decode_split,
    window_kernel_applies,
    write_recent_inputs,
)
from dejavu_jax.sparse_mlp import (
    fc2_finishes,
    mlp_decode_rows,
    mlp_decode_rows_split,
    mlp_dense,
    mlp_per_token_rows,
)
from dejavu_jax.sparsity import (
    DENSE,
    HeadRows,
    LayerChoice,
    MLPRows,
    SparseWeights,
    SparsityPolicy,
    head_rows,
    topk_mask,
)
from kernels.decode_attention import decode_attention_append
from kernels.head_sparse import DOT_MIN_BATCH, plan_flag
from kernels.head_sparse import MAX_BATCH as HEAD_SPARSE_MAX_BATCH
from kernels.split_sum import new_sync


class AttentionImpl(str, enum.Enum):
    """How a decode step (one new token per sequence, with a cache) computes attention. XLA: einsums, masked softmax
    and two cache-update kernels; PALLAS: one Pallas launch per layer that writes the new K/V into the cache and
    attends (kernels/decode_attention.py). Prefill is always XLA. The two measure equal (bench/results/NOTES.md), so
    XLA is the default."""

    XLA = "xla"
    PALLAS = "pallas"

    def __str__(self) -> str:
        return self.value


ATTENTION_IMPLS = tuple(a.value for a in AttentionImpl)


def check_attention_impl(attention_impl) -> AttentionImpl:
    try:
        return AttentionImpl(attention_impl)
    except ValueError:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}. Got {attention_impl!r}") from None


def layer_norm(x, scale, bias, eps):
    # One pass (E[x], E[x^2]) in fp32: sibling reductions fuse into one kernel per LayerNorm at decode.
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.maximum(jnp.square(x32).mean(-1, keepdims=True) - jnp.square(mean), 0.0)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the hidden size."""

    config: OPTConfig
    dtype: jnp.dtype

    def setup(self):
        d = self.config.hidden_size
        self.scale = self.param("scale", nn.initializers.ones, (d,), self.dtype)
        self.bias = self.param("bias", nn.initializers.zeros, (d,), self.dtype)

    def __call__(self, x):
        return layer_norm(x, self.scale, self.bias, self.config.layer_norm_eps)

    def affine(self):
        """(scale, bias, eps): for a kernel that applies this LayerNorm itself."""
        return self.scale, self.bias, self.config.layer_norm_eps


def _init(std=0.02):
    return nn.initializers.normal(std)


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: jnp.dtype
    attention_impl: str = "xla"
    mesh: Any = None  # the tp mesh the heads are split on (`parallel.tp_mesh`), None for one device

    def setup(self):
        c = self.config
        H, hd, d = c.num_attention_heads, c.head_dim, c.hidden_size
        self.qkv_w = self.param("qkv_w", _init(), (3, H, hd, d), self.dtype)
        self.qkv_b = self.param("qkv_b", nn.initializers.zeros, (3, H, hd), self.dtype)
        self.out_w = self.param("out_w", _init(), (H, hd, d), self.dtype)
        self.out_b = self.param("out_b", nn.initializers.zeros, (d,), self.dtype)

    def fuses_layernorm(self, x, layer_kv, heads: HeadRows) -> bool:
        """Whether this call may hand the head-sparse decode step the pre-LayerNorm input and the LayerNorm: the
        `qkv_layernorm` knob with every head's K/V, below the kernels' dot batch, no input ring buffer to keep; the
        `window_layernorm` knob with the repair on one device where its window kernel runs
        (`sparse_attention.window_kernel_applies`; the kernel then writes the buffer's row too)."""
        B, T, _ = x.shape
        if not self._sparse_decode(B, T, layer_kv, heads):
            return False
        if heads.head_kv == "repair":
            keys, _, recent = layer_kv
            return (
                bool(plan_flag(heads.knobs, "window_layernorm"))
                and self.mesh is None
                and recent is not None
                and window_kernel_applies(B, recent.shape[1], keys.shape[2], self.config.head_dim, heads.knobs)
            )
        return bool(plan_flag(heads.knobs, "qkv_layernorm")) and B < DOT_MIN_BATCH and layer_kv[2] is None

    def finishes_block(self, x, layer_kv, heads: HeadRows) -> bool:
        """Whether this call's out_proj launch may also add the residual, and with `out_layernorm` apply the MLP's
        LayerNorm (the `out_residual` knob, the head-sparse decode step on one device): see `__call__`'s `finish`."""
        B, T, _ = x.shape
        return (
            self.mesh is None
            and self._sparse_decode(B, T, layer_kv, heads)
            and bool(plan_flag(heads.knobs, "out_residual"))
        )

    @staticmethod
    def _sparse_decode(B: int, T: int, layer_kv, heads: HeadRows) -> bool:
        return (
            layer_kv is not None
            and T == 1
            and heads.kind == "mask"
            and heads.decode_kernels
            and B <= HEAD_SPARSE_MAX_BATCH
        )

    def __call__(
        self, x, allowed, layer_kv=None, cursor=None, heads: HeadRows = HeadRows(), layernorm=None, finish=None
    ):
        """x [B, T, d] (after the LayerNorm; with `layernorm` = (scale, bias, eps), where `fuses_layernorm`, its
        input); allowed [B, T, S] bool: query t may read key slot s.

        layer_kv: (keys, values, recent): keys / values [B, heads, S, head_dim], the chunk is written at slot
        `cursor`; recent [B, R, d] or None, the ring buffer of recent inputs (`KVCache.recent_inputs`). None: S == T
        and the keys are the chunk's own. `heads`: which heads' outputs reach out_proj per token
        (`sparsity.head_rows`). A decode step (T == 1, with a cache) of at most `HEAD_SPARSE_MAX_BATCH` sequences
        with a head mask (and `heads.decode_kernels`) computes only the chosen heads
        (`sparse_attention.head_sparse_decode`; under tp each device its own: `head_sparse_decode_split`); every other
        forward computes every head and masks the outputs.
        K/V stay exact either way.
        Returns (out [B, T, d], new layer_kv or None). `finish` (residual [B, T, d], sync, the MLP's LayerNorm or
        None), only where `finishes_block`: out is the new residual (residual + the block's output) and a third
        element (that LayerNorm of it or None, sync) follows.
        """
        c = self.config
        B, T, _ = x.shape
        if finish is not None and not self.finishes_block(x, layer_kv, heads):
            raise ValueError(
                "only a head-sparse decode step with the out_residual knob finishes the block (finishes_block)"
            )
        if self._sparse_decode(B, T, layer_kv, heads):
            return self._decode_chosen_heads(x, allowed, layer_kv, cursor, heads, layernorm, finish)
        if layernorm is not None:
            raise ValueError("only a head-sparse decode step applies the LayerNorm in its kernel (see fuses_layernorm)")
        recent = None if layer_kv is None or layer_kv[2] is None else write_recent_inputs(layer_kv[2], x, cursor)
        with jax.named_scope("qkv_proj"):
            qkv = jnp.einsum("btd,zhkd->zbhtk", x, self.qkv_w, preferred_element_type=jnp.float32)
            qkv = (qkv + self.qkv_b[:, None, :, None, :].astype(jnp.float32)).astype(x.dtype)
        # HF scales the query after q_proj, bias included.
        q = (qkv[0] * (c.head_dim**-0.5)).astype(x.dtype)  # [B, H, T, hd]
        k_new, v_new = qkv[1], qkv[2]
        if self.attention_impl == AttentionImpl.PALLAS and layer_kv is not None and T == 1:
            with jax.named_scope("attention"):
                heads_out, keys, values = decode_attention_append(
                    q[:, :, 0], k_new[:, :, 0], v_new[:, :, 0], *layer_kv[:2], allowed[:, 0], cursor
                )
            return self._project_out(heads_out[:, None], x.dtype, heads), (keys, values, recent)
        if layer_kv is None:
            keys, values, new_kv = k_new, v_new, None
        else:
            keys = jax.lax.dynamic_update_slice(layer_kv[0], k_new.astype(layer_kv[0].dtype), (0, 0, cursor, 0))
            values = jax.lax.dynamic_update_slice(layer_kv[1], v_new.astype(layer_kv[1].dtype), (0, 0, cursor, 0))
            new_kv = (keys, values, recent)
        with jax.named_scope("attention"):
            scores = jnp.einsum("bhtk,bhsk->bhts", q, keys, preferred_element_type=jnp.float32)
            scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
            heads_out = jnp.einsum("bhts,bhsk->bthk", probs, values, preferred_element_type=jnp.float32)
        return self._project_out(heads_out, x.dtype, heads), new_kv

    def _decode_chosen_heads(self, x, allowed, layer_kv, cursor, heads: HeadRows, layernorm=None, finish=None):
        """The head-sparse decode step: only the chosen heads' weights are read (see `head_sparse_decode`)."""
        keys, values, recent = layer_kv
        repair = heads.head_kv == "repair"
        if repair and recent is not None and recent.shape[1] != heads.window:
            raise ValueError(
                f"the cache keeps {recent.shape[1]} recent inputs but the policy's head_window is {heads.window}: "
                "create the cache with KVCache.create(..., recent_window=policy.recent_window)"
            )
        chosen = heads.mask[:, 0]  # [B, H]
        chosen_idx = None if heads.idx is None else heads.idx[:, 0]  # [B, k]
        self.sow("intermediates", "heads_kept", heads.mask)
        self.sow("intermediates", "head_density", jnp.mean(heads.mask, axis=-1))
        # Under tp, each device computes the chosen heads it holds, then the one all-reduce after out_proj.
        decode = head_sparse_decode if self.mesh is None else functools.partial(head_sparse_decode_split, self.mesh)
        step = decode(
            x[:, 0],
            AttentionWeights(self.qkv_w, self.qkv_b, self.out_w, self.out_b),
            keys,
            values,
            recent if repair else None,
            chosen,
            heads.k,
            cursor,
            allowed[:, 0],
            chosen_idx=chosen_idx,
            head_kv=heads.head_kv,
            attention_impl=str(self.attention_impl),
            knobs=heads.knobs,
            layernorm=layernorm,
            padded=heads.padded,
            **({} if finish is None else {"finish": (finish[0][:, 0], *finish[1:])}),
        )
        if not repair and recent is not None:  # a buffer the policy does not use is still kept current
            recent = write_recent_inputs(recent, x, cursor)
        new_kv = (step.keys, step.values, step.recent if repair else recent)
        if finish is None:
            return step.out[:, None], new_kv
        normed = None if step.normed is None else step.normed[:, None]
        return step.out[:, None], new_kv, (normed, step.sync)

    def _project_out(self, heads_out, dtype, heads: HeadRows = HeadRows()):
        """heads_out [B, T, h, hd] -> out_proj(...) [B, T, d] in dtype, over the heads `heads` keeps per token."""
        norms = jnp.linalg.norm(heads_out.astype(jnp.float32), axis=-1)  # [B, T, h]
        self.sow("intermediates", "head_norm", norms)
        if heads.kind != "all":
            keep = topk_mask(norms, min(heads.k, norms.shape[-1])) if heads.kind == "oracle" else heads.mask
            heads_out = jnp.where(keep[..., None], heads_out, 0)
            self.sow("intermediates", "heads_kept", keep)  # [B, T, h] bool
            self.sow("intermediates", "head_density", jnp.mean(keep, axis=-1))
        with jax.named_scope("out_proj"):
            out = jnp.einsum("bthk,hkd->btd", heads_out.astype(dtype), self.out_w, preferred_element_type=jnp.float32)
            return (out + self.out_b.astype(jnp.float32)).astype(dtype)


class OPTMLP(nn.Module):
    config: OPTConfig
    dtype: jnp.dtype
    mesh: Any = None  # the tp mesh the weights are split on (`parallel.tp_mesh`), None for one device

    def setup(self):
        c = self.config
        self.fc1_w = self.param("fc1_w", _init(), (c.ffn_dim, c.hidden_size), self.dtype)
        self.fc1_b = self.param("fc1_b", nn.initializers.zeros, (c.ffn_dim,), self.dtype)
        self.fc2_w_t = self.param("fc2_w_t", _init(), (c.ffn_dim, c.hidden_size), self.dtype)
        self.fc2_b = self.param("fc2_b", nn.initializers.zeros, (c.hidden_size,), self.dtype)

    def finishes_block(self, x, rows: MLPRows) -> bool:
        """Whether this call's fc2 launch may also add the residual (the `fc2_residual` knob, a decode step on the
        row-masked kernels on one device): see `__call__`'s `finish`."""
        return self.mesh is None and self._decode_rows(x, rows) and fc2_finishes(rows.knobs)

    @staticmethod
    def _decode_rows(x, rows: MLPRows) -> bool:
        """Whether this call is a decode step on the row-masked kernels; otherwise `_whole_sequence` serves it."""
        T = x.shape[1]
        return not (
            rows.kind == "dense" or (rows.kind == "lossless" and T > 1) or (rows.kind == "mask" and rows.mask.ndim == 3)
        )

    def _whole_sequence(self, x, rows: MLPRows, weights):
        """The calls `_decode_rows` turns away: dense, or a whole sequence (lossless, or per-token masks)."""
        if rows.kind == "dense":
            out, hidden = mlp_dense(x, *weights, return_hidden=True)
            self.sow("intermediates", "fc1_active", hidden > 0)  # [B, T, ffn]
            return out
        if rows.kind == "lossless":  # the dense function, reporting fc2's nonzero rows
            out, hidden = mlp_dense(x, *weights, return_hidden=True)
            self.sow("intermediates", "mlp_density", jnp.mean(hidden != 0, axis=-1))
            return out
        out = mlp_per_token_rows(x, *weights, rows.mask)  # per-token masks [B, T, ffn]
        self.sow("intermediates", "mlp_density", jnp.mean(rows.mask, axis=-1))
        return out

    def __call__(self, x, rows: MLPRows = MLPRows(), finish=None):
        """x [B, T, d] (after the LayerNorm) -> [B, T, d]; `rows` says which neurons to compute. `finish` (residual
        [B, T, d], sync), only where `finishes_block`: returns (residual + the MLP's output, sync) instead."""
        B, T, d = x.shape
        weights = (self.fc1_w, self.fc1_b, self.fc2_w_t, self.fc2_b)
        if finish is not None and not self.finishes_block(x, rows):
            raise ValueError("only a decode step with the fc2_residual knob finishes the block (finishes_block)")
        if not self._decode_rows(x, rows):
            return self._whole_sequence(x, rows, weights)
        args = (rows.kind, rows.mask, rows.hidden, rows.predictor, rows.knobs)
        if finish is not None:
            residual, sync = finish
            out, sync = mlp_decode_rows(x.reshape(B * T, d), *weights, *args, finish=(residual.reshape(B * T, d), sync))
            return out.reshape(B, T, d), sync
        # Under tp, each device chooses among and computes its own neurons, then one all-reduce.
        decode_rows = mlp_decode_rows if self.mesh is None else functools.partial(mlp_decode_rows_split, self.mesh)
        return decode_rows(x.reshape(B * T, d), *weights, *args).reshape(B, T, d)


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: jnp.dtype
    attention_impl: str = "xla"
    mesh: Any = None

    def setup(self):
        self.self_attn_layer_norm = LayerNorm(self.config, self.dtype)
        self.self_attn = OPTAttention(self.config, self.dtype, self.attention_impl, self.mesh)
        self.final_layer_norm = LayerNorm(self.config, self.dtype)
        self.mlp = OPTMLP(self.config, self.dtype, self.mesh)

    def __call__(
        self, h, allowed, layer_kv=None, cursor=None, choice: Optional[LayerChoice] = None, heads=HeadRows(), sync=None
    ):
        """`choice` chooses the MLP's neurons (`sparsity.LayerChoice`; None: dense); `heads` the heads whose outputs
        reach out_proj (`sparsity.head_rows`). `sync`: a decode step's counters (kernels/split_sum.py) for the
        kernels that finish a block themselves (the `out_residual` and `fc2_residual` knobs), or None.
        Returns (h, new layer_kv, the next layer's head predictor's first layer or None, sync)."""
        pre_ln = self.config.do_layer_norm_before
        self.sow("intermediates", "attn_input", h)
        attn_input = h
        qkv_normalises = pre_ln and self.self_attn.fuses_layernorm(h, layer_kv, heads)  # the q/k/v kernel's LayerNorm
        x, ahead, head_ahead = None, None, None
        if choice is not None and (not qkv_normalises or choice.carries_head_ahead(h)):
            # Part of the MLP's choice may come first (and write the attention LayerNorm; and the next layer's head
            # predictor's first layer): counted in the MLP block by `bench profile`. Where the q/k/v kernel normalises
            # its input itself, this launch runs only to carry the next layer's head predictor (one launch a layer
            # instead of two), and its LayerNorm output goes unused.
            with jax.named_scope("mlp_block"):
                ln = self.self_attn_layer_norm.affine() if pre_ln else None
                # The counters let that launch also choose the next layer's heads (one device only).
                if self.mesh is None:
                    x, ahead, head_ahead, sync = choice.before_attention_with_heads(h, ln, sync)
                else:
                    x, ahead, head_ahead, _ = choice.before_attention_with_heads(h, ln)
        # The out_proj launch adds the residual, and with `out_layernorm` applies the MLP's LayerNorm (pre-LN layers,
        # see finishes_block).
        finish = None
        if sync is not None and pre_ln and self.self_attn.finishes_block(h, layer_kv, heads):
            mlp_ln = self.final_layer_norm.affine() if plan_flag(heads.knobs, "out_layernorm") else None
            finish = (h, sync, mlp_ln)
        mlp_x = None
        with jax.named_scope("attention_block"):
            if qkv_normalises:
                ln = self.self_attn_layer_norm.affine()
                attended = self.self_attn(h, allowed, layer_kv, cursor, heads, layernorm=ln, finish=finish)
            else:
                if x is None:
                    x = self.self_attn_layer_norm(h) if pre_ln else h
                attended = self.self_attn(x, allowed, layer_kv, cursor, heads, finish=finish)
            if finish is None:
                attn_out, new_kv = attended
                h = h + attn_out
                if not pre_ln:
                    h = self.self_attn_layer_norm(h)
            else:
                h, new_kv, (mlp_x, sync) = attended
        self.sow("intermediates", "mlp_input", h)
        with jax.named_scope("mlp_block"):
            rows = MLPRows() if choice is None else choice.rows(attn_input, h, ahead)
            if mlp_x is None:
                mlp_x = self.final_layer_norm(h) if pre_ln else h
            if sync is not None and pre_ln and self.mlp.finishes_block(mlp_x, rows):
                h, sync = self.mlp(mlp_x, rows, finish=(h, sync))
            else:
                h = h + self.mlp(mlp_x, rows)
                if not pre_ln:
                    h = self.final_layer_norm(h)
        return h, new_kv, head_ahead, sync


def chunk_positions(chunk_mask, next_position):
    """HF's `cumsum(mask) * mask - 1` continued from `next_position`; padding gets -1 (embedding row 1)."""
    chunk_mask = chunk_mask.astype(jnp.int32)
    return (next_position[:, None] + jnp.cumsum(chunk_mask, axis=1)) * chunk_mask - 1


class OPTForCausalLM(nn.Module):
    """`__call__(input_ids [B,T], attention_mask [B,T], cache=None, policy=DENSE, sparse_weights=None)`
    -> (logits, cache).

    With a cache the chunk is appended at `cache.cursor` and attends to everything before it; without one it is
    the whole sequence. `policy` (static) and `sparse_weights` (traced) choose each layer's MLP neurons through
    `sparsity.mlp_rows`: a one-token step with a cache is a decode step (row-masked kernels), anything else chooses
    per token; `policy.heads` keeps per token the heads `sparsity.head_rows` chooses (every head's K/V stays exact;
    a small-batch decode step computes only the chosen heads). `logits_for="last"` computes the LM head for the last
    position only (prefill).
    `attention_impl` (see ATTENTION_IMPLS) picks the decode-step attention; it changes no parameter. `mesh`: the tp
    mesh the parameters are split on (`dejavu_jax.parallel`), which the sparse decode MLP needs to run its kernels
    per device, as do the head-sparse decode steps; None for one device (the dense model needs no mesh: GSPMD
    follows the parameters' shardings).
    """

    config: OPTConfig
    dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"
    mesh: Any = None

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.word_embed_proj_dim, dtype=self.dtype, param_dtype=self.dtype, embedding_init=_init()
        )
        self.embed_positions = nn.Embed(
            c.max_position_embeddings + c.POSITION_OFFSET,
            c.hidden_size,
            dtype=self.dtype,
            param_dtype=self.dtype,
            embedding_init=_init(),
        )
        if c.has_projections:
            self.project_in = nn.Dense(c.hidden_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
            self.project_out = nn.Dense(c.word_embed_proj_dim, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
        if c.has_final_layer_norm:
            self.final_layer_norm = LayerNorm(c, self.dtype)
        check_attention_impl(self.attention_impl)
        self.layers = [
            OPTDecoderLayer(c, self.dtype, self.attention_impl, self.mesh, name=f"layers_{i}")
            for i in range(c.num_hidden_layers)
        ]

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        cache: Optional[KVCache] = None,
        policy: SparsityPolicy = DENSE,
        sparse_weights: Optional[SparseWeights] = None,
        logits_for: str = "all",
    ):
        c = self.config
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        chunk_mask = attention_mask.astype(bool)
        start = jnp.zeros((B,), jnp.int32) if cache is None else cache.next_position
        positions = chunk_positions(chunk_mask, start)

        if cache is None:
            causal = jnp.tril(jnp.ones((T, T), bool))
            allowed = causal[None] & chunk_mask[:, None, :]
        else:
            slot_mask = jax.lax.dynamic_update_slice(cache.slot_mask, chunk_mask, (0, cache.cursor))
            slot = jnp.arange(cache.num_slots)
            query_slot = cache.cursor + jnp.arange(T)
            allowed = (slot[None, :] <= query_slot[:, None])[None] & slot_mask[:, None, :]

        h = self.embed_tokens(input_ids)
        if c.has_projections:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + c.POSITION_OFFSET)

        decode = cache is not None and T == 1

        def choice(i):
            if policy == DENSE and (sparse_weights is None or sparse_weights.fixed_rows is None):
                return None
            return LayerChoice(policy, sparse_weights, i, decode)

        new_keys, new_values, new_recent = [], [], []
        first_slot = 0 if cache is None else cache.cursor
        lookahead = h  # layer l's head predictor reads layer l-1's input (layer 0: its own)
        head_ahead = None  # [B, r]: layer l's head predictor's first layer, where layer l-1's launch computed it
        # A decode step's counters for the kernels that finish their block (kernels/split_sum.py): one zeroed buffer,
        # handed from launch to launch (unused: dropped by XLA).
        sync = new_sync(c.hidden_size) if decode else None
        for i, layer in enumerate(self.layers):
            layer_kv = None
            if cache is not None:
                recent = None if cache.recent_inputs is None else cache.recent_inputs[i]
                layer_kv = (cache.keys[i], cache.values[i], recent)
            with jax.named_scope(f"layer_{i}"):
                with jax.named_scope("attention_block"):  # the head choice is the attention block's cost
                    heads = head_rows(
                        policy, sparse_weights, i, lookahead, c.num_attention_heads, first_slot, hidden=head_ahead
                    )
                lookahead = h
                cursor = None if cache is None else cache.cursor
                h, kv, head_ahead, sync = layer(h, allowed, layer_kv, cursor, choice(i), heads, sync)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
                new_recent.append(kv[2])

        if logits_for == "last":
            h = h[:, -1:]
        if c.has_final_layer_norm:
            h = self.final_layer_norm(h)
        if c.has_projections:
            h = self.project_out(h)
        # Tied LM head, accumulated and returned in fp32.
        logits = jnp.einsum(
            "btp,vp->btv", h.astype(self.dtype), self.embed_tokens.embedding, preferred_element_type=jnp.float32
        )
        if cache is not None:
            recent = None if cache.recent_inputs is None else tuple(new_recent)
            cache = cache.replace(keys=tuple(new_keys), values=tuple(new_values), recent_inputs=recent)
            cache = cache.advance(chunk_mask)
        return logits, cache


def init_params(config: OPTConfig, rng, dtype=jnp.float32):
    """Random parameters of the right shapes (tests, benchmarks)."""
    model = OPTForCausalLM(config, dtype)
    ids = jnp.zeros((1, 1), jnp.int32)
    return model.init(rng, ids)["params"]


def abstract_params(config: OPTConfig, dtype=jnp.float32):
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0), dtype))
