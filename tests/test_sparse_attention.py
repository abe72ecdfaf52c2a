"""Head-sparse decoding (`dejavu_jax.sparse_attention`): only the chosen heads are computed, and every computed head
attends over exact K/V: against a float64 reference that computes every head's K/V at every step, in the model
against the every-head masked decode, with every head chosen against dense, and inside one compiled decode loop."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixed_heads, primitives_outside_kernels, rel_max_err, small_config
from dejavu_jax.checkpoint import load_model
from dejavu_jax.generation import _generate_tokens, decode_step, prefill
from dejavu_jax.kv_cache import KVCache
from dejavu_jax.model import OPTForCausalLM, init_params
from dejavu_jax import sparse_attention
from dejavu_jax.predictors import Predictors, init_low_rank, predictor_scores
from dejavu_jax.sampling import SamplingConfig
from dejavu_jax.sparse_attention import (
    AttentionWeights,
    forced_heads,
    kv_q_pairs,
    head_sparse_decode,
    window_slots,
    write_recent_inputs,
)
from dejavu_jax.sparsity import (
    DecodeTuning,
    HeadSparsity,
    MLPSparsity,
    SparseWeights,
    SparsityPolicy,
    Selection,
    decode_predictor,
    exactly_k,
    for_decode_batch,
    head_schedule,
    head_scores,
    mask_of,
    scheduled_heads,
    sparse_weights_from_predictors,
    threshold_k,
)
from kernels.head_sparse import head_qkv_pairs


@pytest.mark.parametrize("n_heads, window", [(4, 1), (6, 4), (32, 16), (40, 16), (12, 5)])
def test_forced_rotation_computes_every_head_in_every_window(n_heads, window):
    """Any R consecutive steps force every head at least once (the bound the repair's exactness rests on)."""
    steps = 4 * n_heads + 3 * window
    forced = np.asarray(jax.vmap(lambda c: forced_heads(c, n_heads, window))(jnp.arange(steps)))
    hit = np.zeros((steps, n_heads), bool)
    np.put_along_axis(hit, forced, True, axis=1)
    for start in range(steps - window + 1):
        assert hit[start : start + window].any(axis=0).all(), f"a head went unforced in steps {start}..+{window}"


def test_ring_buffer_rows_hold_the_window_slots():
    """After a prompt of 6 slots and each decode write, buffer row r holds the input of window_slots(c)[r]."""
    window, d = 4, 3
    inputs = np.arange(1, 1 + 12 * d, dtype=np.float32).reshape(1, 12, d)  # slot s holds inputs[0, s]
    recent = write_recent_inputs(jnp.zeros((1, window, d)), jnp.asarray(inputs[:, :6]), 0)
    for c in range(5, 12):
        if c > 5:
            recent = write_recent_inputs(recent, jnp.asarray(inputs[:, c : c + 1]), c)
        slots = np.asarray(window_slots(c, window))
        assert sorted(slots) == list(range(c - window + 1, c + 1))
        np.testing.assert_array_equal(np.asarray(recent)[0], inputs[0, slots])
    early = np.asarray(window_slots(1, window))  # slots before 0 are marked negative (not written)
    assert sorted(early) == [-2, -1, 0, 1]


def random_layer(rng, n_heads, head_dim, d):
    scale = d**-0.5
    return AttentionWeights(
        qkv_w=jnp.asarray(rng.standard_normal((3, n_heads, head_dim, d)) * scale, jnp.float32),
        qkv_b=jnp.asarray(rng.standard_normal((3, n_heads, head_dim)) * 0.1, jnp.float32),
        out_w=jnp.asarray(rng.standard_normal((n_heads, head_dim, d)) * scale, jnp.float32),
        out_b=jnp.asarray(rng.standard_normal(d) * 0.1, jnp.float32),
    )


def reference_step(w64, inputs, slot_mask, chosen, c):
    """float64: every head's K/V of every slot <= c from its input, the chosen heads' attention outputs [B, H, hd]
    (zero where not chosen) and the block's output [B, d]."""
    qkv_w, qkv_b, out_w, out_b = w64
    head_dim = qkv_w.shape[2]
    x = inputs[:, : c + 1]  # [B, c+1, d]
    keys = np.einsum("bsd,hkd->bhsk", x, qkv_w[1]) + qkv_b[1][None, :, None]
    values = np.einsum("bsd,hkd->bhsk", x, qkv_w[2]) + qkv_b[2][None, :, None]
    q = (np.einsum("bd,hkd->bhk", x[:, c], qkv_w[0]) + qkv_b[0]) * head_dim**-0.5
    scores = np.einsum("bhk,bhsk->bhs", q, keys)
    scores = np.where(slot_mask[:, None, : c + 1], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    heads_out = np.einsum("bhs,bhsk->bhk", probs, values) * chosen[..., None]
    return heads_out, np.einsum("bhk,hkd->bd", heads_out, out_w) + out_b


# (head_kv, R, batch, k, H, hd, attention, rows per kernel call): R = 4 and 3 force heads often (and R = 3 with
# H = 4 forces two a step); 12 repair rows in calls of 8 take the path of more than MAX_BATCH rows; R = 16 at batch
# 1 takes `head_window_into_cache` (the window written into the cache by the projection launch; the 5-slot prompt
# makes its first windows reach past the cursor); "all" computes every head's K/V each step.
LAYER_CASES = [
    ("repair", 4, 2, 1, 6, 8, "xla", None),
    ("repair", 3, 3, 2, 4, 16, "pallas", None),
    ("repair", 4, 3, 1, 4, 8, "xla", 8),
    ("repair", 16, 1, 1, 4, 16, "pallas", None),
    ("repair", 16, 1, 2, 6, 32, "xla", None),
    ("all", 0, 2, 2, 4, 8, "xla", None),
]


@pytest.mark.parametrize("head_kv, window, batch, k, n_heads, head_dim, attention, rows_per_call", LAYER_CASES)
def test_every_computed_head_attends_over_exact_kv(
    head_kv, window, batch, k, n_heads, head_dim, attention, rows_per_call, monkeypatch
):
    """A random head schedule over 64 decode steps after a 5-slot prompt (sequence 0 left-padded by 2 slots): each
    step's chosen heads' attention outputs and the block's output equal a float64 reference that computes every
    head's K/V at every step."""
    if rows_per_call:
        monkeypatch.setattr(sparse_attention, "MAX_BATCH", rows_per_call)
    window_launches = []
    window_kernel = sparse_attention.head_window_into_cache
    monkeypatch.setattr(
        sparse_attention,
        "head_window_into_cache",
        lambda *a, **kw: window_launches.append(1) or window_kernel(*a, **kw),
    )
    prompt, steps, d = 5, 64, n_heads * head_dim
    rng = np.random.default_rng(window * 100 + batch * 10 + k)
    weights = random_layer(rng, n_heads, head_dim, d)
    w64 = tuple(np.asarray(a, np.float64) for a in weights)
    slots = prompt + steps
    inputs = rng.standard_normal((batch, slots, d)).astype(np.float32)
    slot_mask = np.ones((batch, slots), bool)
    slot_mask[0, :2] = False
    chosen = np.asarray(exactly_k(jnp.asarray(rng.random((steps, batch, n_heads))), k)[0])

    # The prefill's cache: every head's exact K/V of the prompt, and its last R inputs.
    x_prompt = jnp.asarray(inputs[:, :prompt])
    kv = jnp.einsum("btd,zhkd->zbhtk", x_prompt, weights.qkv_w) + weights.qkv_b[:, None, :, None]
    pad = ((0, 0), (0, 0), (0, steps), (0, 0))
    keys, values = jnp.pad(kv[1], pad), jnp.pad(kv[2], pad)
    recent = write_recent_inputs(jnp.zeros((batch, window, d)), x_prompt, 0) if head_kv == "repair" else None

    def step(carry, per_step):
        keys, values, recent = carry
        x, chosen_now, c = per_step
        allowed = jnp.asarray(slot_mask) & (jnp.arange(slots) <= c)[None]
        out = head_sparse_decode(
            x, weights, keys, values, recent, chosen_now, k, c, allowed, head_kv=head_kv, attention_impl=attention
        )
        return (out.keys, out.values, out.recent), (out.out, out.head_idx, out.head_used, out.heads_out)

    cursors = jnp.arange(prompt, slots, dtype=jnp.int32)
    xs = (jnp.asarray(inputs[:, prompt:].transpose(1, 0, 2)), jnp.asarray(chosen), cursors)
    _, (outs, head_idx, used, heads_out) = jax.jit(lambda carry: jax.lax.scan(step, carry, xs))((keys, values, recent))
    outs, head_idx, used, heads_out = map(np.asarray, (outs, head_idx, used, heads_out))

    worst_head, worst_out = 0.0, 0.0
    for t, c in enumerate(range(prompt, slots)):
        ref_heads, ref_out = reference_step(w64, inputs.astype(np.float64), slot_mask, chosen[t], c)
        for b in range(batch):
            # Each sequence's used entries are exactly the heads it chose, once each.
            assert sorted(head_idx[t][used[t, b]]) == list(np.flatnonzero(chosen[t, b]))
            for j in np.flatnonzero(used[t, b]):
                ref = ref_heads[b, head_idx[t, j]]
                worst_head = max(worst_head, np.linalg.norm(heads_out[t, b, j] - ref) / np.linalg.norm(ref))
            worst_out = max(worst_out, np.linalg.norm(outs[t, b] - ref_out[b]) / np.linalg.norm(ref_out[b]))
    assert worst_head <= 1e-5 and worst_out <= 1e-5, (worst_head, worst_out)
    assert bool(window_launches) == (head_kv == "repair" and batch == 1 and window >= 16)


def decode_layer(weights, inputs, slot_mask, prompt, head_kv, window, k, chosen, chosen_idx, attention="xla"):
    """Prefill a cache (every head's exact K/V of the prompt, its last R inputs), then decode the rest of `inputs`
    [B, S, d] with `head_sparse_decode` in one compiled scan: per step (out, head_idx, head_used, heads_out)."""
    batch, slots, d = inputs.shape
    x_prompt = jnp.asarray(inputs[:, :prompt])
    kv = jnp.einsum("btd,zhkd->zbhtk", x_prompt, weights.qkv_w) + weights.qkv_b[:, None, :, None]
    pad = ((0, 0), (0, 0), (0, slots - prompt), (0, 0))
    keys, values = jnp.pad(kv[1], pad), jnp.pad(kv[2], pad)
    recent = write_recent_inputs(jnp.zeros((batch, window, d)), x_prompt, 0) if head_kv == "repair" else None

    def step(carry, per_step):
        keys, values, recent = carry
        x, chosen_now, idx_now, c = per_step
        allowed = jnp.asarray(slot_mask) & (jnp.arange(slots) <= c)[None]
        out = head_sparse_decode(
            x,
            weights,
            keys,
            values,
            recent,
            chosen_now,
            k,
            c,
            allowed,
            chosen_idx=idx_now,
            head_kv=head_kv,
            attention_impl=attention,
        )
        return (out.keys, out.values, out.recent), (out.out, out.head_idx, out.head_used, out.heads_out)

    cursors = jnp.arange(prompt, slots, dtype=jnp.int32)
    xs = (jnp.asarray(inputs[:, prompt:].transpose(1, 0, 2)), chosen, chosen_idx, cursors)
    _, outs = jax.jit(lambda carry, xs: jax.lax.scan(step, carry, xs))((keys, values, recent), xs)
    return tuple(map(np.asarray, outs))


@pytest.mark.parametrize("head_kv, window", [("repair", 4), ("all", 0)])
def test_batch1_index_lists_and_batch2_union_match_the_reference(head_kv, window):
    """The same random choices decoded two ways, each against the float64 reference: a batch of 2 through the
    union of its masks, and each sequence alone at batch 1 through its top-k index list (unsorted, no mask)."""
    prompt, steps, n_heads, head_dim, k = 5, 64, 6, 8, 2
    d = n_heads * head_dim
    rng = np.random.default_rng(11 + window)
    weights = random_layer(rng, n_heads, head_dim, d)
    w64 = tuple(np.asarray(a, np.float64) for a in weights)
    slots = prompt + steps
    inputs = rng.standard_normal((2, slots, d)).astype(np.float32)
    slot_mask = np.ones((2, slots), bool)
    mask, idx = exactly_k(jnp.asarray(rng.random((steps, 2, n_heads))), k)
    assert (np.sort(np.asarray(idx), -1) != np.asarray(idx)).any()  # the lists reach the kernels unsorted
    union = decode_layer(weights, inputs, slot_mask, prompt, head_kv, window, k, mask, None)
    alone = [
        decode_layer(
            weights, inputs[b : b + 1], slot_mask[b : b + 1], prompt, head_kv, window, k, None, idx[:, b : b + 1]
        )
        for b in range(2)
    ]
    mask = np.asarray(mask)
    worst = 0.0
    for t, c in enumerate(range(prompt, slots)):
        ref_heads, ref_out = reference_step(w64, inputs.astype(np.float64), slot_mask, mask[t], c)
        for b in range(2):
            for (out, head_idx, used, heads_out), row in ((union, b), (alone[b], 0)):
                assert sorted(head_idx[t][used[t, row]]) == list(np.flatnonzero(mask[t, b]))
                for j in np.flatnonzero(used[t, row]):
                    ref = ref_heads[b, head_idx[t, j]]
                    worst = max(worst, np.linalg.norm(heads_out[t, row, j] - ref) / np.linalg.norm(ref))
                worst = max(worst, np.linalg.norm(out[t, row] - ref_out[b]) / np.linalg.norm(ref_out[b]))
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_query_from_the_buffer_row_is_the_query_from_x(dtype):
    """Repair takes the current token's Q from its ring-buffer row: in the model's dtype that row is x bit for bit,
    and a kernel row's projection does not depend on the other rows (below the dot path's 16 rows)."""
    window, d, n_heads, head_dim, cursor = 4, 32, 4, 8, 9
    rng = np.random.default_rng(3)
    weights = AttentionWeights(*(a.astype(dtype) for a in random_layer(rng, n_heads, head_dim, d)))
    recent = jnp.asarray(rng.standard_normal((1, window, d)), dtype)
    x = jnp.asarray(rng.standard_normal((1, d)), dtype)
    recent = write_recent_inputs(recent, x[:, None], cursor)
    row = recent[0, cursor % window]
    np.testing.assert_array_equal(np.asarray(row), np.asarray(x[0]))
    pairs = kv_q_pairs(jnp.asarray([2, 0, 3], jnp.int32), jnp.asarray([3, 1], jnp.int32))
    from_rows = head_qkv_pairs(recent[0], weights.qkv_w, weights.qkv_b, *pairs)
    from_x = head_qkv_pairs(x, weights.qkv_w, weights.qkv_b, *pairs)
    np.testing.assert_array_equal(np.asarray(from_rows[cursor % window]), np.asarray(from_x[0]))


CONFIG = small_config(max_position_embeddings=96)
SCHEDULE = SparseWeights(head_schedule=head_schedule(7, CONFIG.num_hidden_layers, CONFIG.num_attention_heads))


@functools.partial(jax.jit, static_argnames=("policy", "attention_impl", "config"))
def decode_logits(params, weights, ids, mask, continuation, *, policy, attention_impl="xla", config=CONFIG):
    """Prefill the prompt [B, P] (every head), then decode `continuation` [B, N] one token a step in one compiled
    scan: logits [N, B, V]."""
    model = OPTForCausalLM(config, jnp.float32, attention_impl)
    batch, num_slots = ids.shape[0], ids.shape[1] + continuation.shape[1]
    cache = KVCache.create(config, batch, num_slots, jnp.float32, policy.recent_window)
    _, cache = model.apply({"params": params}, ids, mask, cache, logits_for="last")

    def step(cache, token):
        one = jnp.ones((batch, 1), jnp.int32)
        logits, cache = model.apply(
            {"params": params}, token[:, None], one, cache, policy=policy, sparse_weights=weights
        )
        return cache, logits[:, -1]

    return jax.lax.scan(step, cache, continuation.T)[1]


def whole_sequence_logits(params, ids, mask, continuation):
    """Dense logits [N, B, V] of the continuation's tokens, from one forward over prompt + continuation."""
    full = jnp.concatenate([ids, continuation], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones_like(continuation)], axis=1)
    logits, _ = OPTForCausalLM(CONFIG).apply({"params": params}, full, full_mask)
    return np.asarray(logits[:, ids.shape[1] :]).transpose(1, 0, 2)


@pytest.mark.parametrize(
    "policy, attention_impl",
    [
        (fixed_heads(1, head_kv="repair", head_window=4), "xla"),
        (fixed_heads(2, head_kv="all"), "pallas"),
        # the kernels' plan overridden through the tuning: 16-column blocks, all loaded in one step
        (fixed_heads(2, head_qkv_block_d=16, head_qkv_step_blocks=0, head_out_block_d=16), "xla"),
        # the default writes every head's K/V into the cache from the projection kernel, which also applies the
        # attention LayerNorm: each of the two off, and both
        (fixed_heads(2, head_kv="all", head_qkv_cache_write=0), "xla"),
        (fixed_heads(2, head_kv="all", head_qkv_layernorm=0), "xla"),
        (fixed_heads(2, head_kv="all", head_qkv_layernorm=0, head_qkv_cache_write=0), "pallas"),
        # the Pallas attention in one split (it normalises its output itself: no merge after it)
        (fixed_heads(2, head_kv="all", head_attention_split=1), "pallas"),
    ],
)
def test_model_decode_with_chosen_heads_equals_the_every_head_decode(policy, attention_impl):
    """In the model, 64 decode steps of a left-padded batch computing only the chosen heads give the logits of the
    reference decode that computes every head (decode_kernels=False) and masks the skipped heads' outputs."""
    params = init_params(CONFIG, jax.random.PRNGKey(1))
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 3, 64)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    continuation = jax.random.randint(jax.random.PRNGKey(3), (2, 64), 3, 64)
    sparse = decode_logits(params, SCHEDULE, ids, mask, continuation, policy=policy, attention_impl=attention_impl)
    every_head = dataclasses.replace(policy, decode_kernels=False)
    assert rel_max_err(sparse, decode_logits(params, SCHEDULE, ids, mask, continuation, policy=every_head)) <= 1e-5
    # The skipped heads did change something.
    assert rel_max_err(sparse, whole_sequence_logits(params, ids, mask, continuation)) > 1e-3


# head_dim 16: the repair's window kernel (`head_window_into_cache`) applies at batch 1
WIDE = small_config(hidden_size=64, word_embed_proj_dim=64, max_position_embeddings=96)
WIDE_SCHEDULE = SparseWeights(head_schedule=head_schedule(5, WIDE.num_hidden_layers, WIDE.num_attention_heads))


@pytest.mark.parametrize("window_layernorm", [0, 1])
def test_model_decode_with_the_window_kernel_equals_the_every_head_decode(window_layernorm):
    """At batch 1 the repair's window goes through `head_window_into_cache` (one launch per layer, no XLA scatter);
    with `window_layernorm` the kernel also applies the attention LayerNorm and writes the buffer's row (one rsqrt
    and one buffer write a layer fewer in XLA). 40 decode steps after an 8-token prompt (the first windows reach
    past the cursor) give the logits of the reference decode that computes every head."""
    policy = fixed_heads(1, head_kv="repair", head_window=16, head_window_layernorm=window_layernorm)
    layers = WIDE.num_hidden_layers
    assert _decode_step_primitives(policy, 1, WIDE_SCHEDULE, WIDE).count("pallas_call:head_window_cache") == layers
    params = init_params(WIDE, jax.random.PRNGKey(1))

    def in_xla(policy):  # the decode step's primitives outside its kernels
        cache = KVCache.create(WIDE, 1, 24, jnp.float32, policy.recent_window)
        token = jnp.ones((1,), jnp.int32)
        step = jax.make_jaxpr(lambda c: decode_step(params, c, token, WIDE_SCHEDULE, config=WIDE, policy=policy))
        return primitives_outside_kernels(step(cache).jaxpr)

    assert "scatter" not in in_xla(policy)
    if window_layernorm:
        fused = in_xla(policy)
        unfused = in_xla(fixed_heads(1, head_kv="repair", head_window=16, head_window_layernorm=0))
        assert unfused.count("rsqrt") - fused.count("rsqrt") == layers
        assert unfused.count("dynamic_update_slice") - fused.count("dynamic_update_slice") == layers
    ids = jax.random.randint(jax.random.PRNGKey(2), (1, 8), 3, 64)
    continuation = jax.random.randint(jax.random.PRNGKey(3), (1, 40), 3, 64)
    run = functools.partial(decode_logits, params, WIDE_SCHEDULE, ids, jnp.ones_like(ids), continuation, config=WIDE)
    sparse = run(policy=policy)
    every_head = run(policy=dataclasses.replace(policy, decode_kernels=False))
    assert rel_max_err(sparse, every_head) <= 1e-5


@pytest.mark.parametrize("attention_impl, merge, layernorm", [("xla", 0, 1), ("pallas", 0, 0), ("pallas", 1, 1)])
def test_kernels_that_finish_their_blocks_decode_like_the_xla_steps(attention_impl, merge, layernorm):
    """With `head_out_residual` (out_proj's launch adds the residual; with `head_out_layernorm` also applies the
    MLP's LayerNorm) and `fc2_residual` (fc2's launch adds the residual), a batch-1 decode step of fixed heads and
    fixed MLP rows runs no split sum (nor LayerNorm) in XLA, and 40 steps give the logits of the same steps summed
    and normalised by XLA; with `head_out_merge` out_proj also merges the Pallas attention's splits (no exp left in
    XLA)."""
    rng = np.random.default_rng(0)
    rows = tuple(
        jnp.asarray(rng.permutation(WIDE.ffn_dim) < WIDE.ffn_dim // 3, jnp.int32) for _ in range(WIDE.num_hidden_layers)
    )
    weights = dataclasses.replace(WIDE_SCHEDULE, fixed_rows=rows)
    plain = fixed_heads(2, head_kv="repair", head_window=16)
    finished = fixed_heads(
        2,
        head_kv="repair",
        head_window=16,
        head_out_residual=1,
        head_out_layernorm=layernorm,
        fc2_residual=1,
        head_out_merge=merge,
    )
    params = init_params(WIDE, jax.random.PRNGKey(1))

    def in_xla(policy):  # the decode step's primitives outside its kernels
        cache = KVCache.create(WIDE, 1, 24, jnp.float32, policy.recent_window)
        token = jnp.ones((1,), jnp.int32)
        step = jax.make_jaxpr(
            lambda c: decode_step(params, c, token, weights, config=WIDE, policy=policy, attention_impl=attention_impl)
        )
        return primitives_outside_kernels(step(cache).jaxpr)

    layers = WIDE.num_hidden_layers
    # per layer: out_proj's and fc2's sums, and with the LayerNorm its rsqrt and statistics (two sums)
    assert in_xla(plain).count("rsqrt") - in_xla(finished).count("rsqrt") == layernorm * layers
    assert in_xla(plain).count("reduce_sum") - in_xla(finished).count("reduce_sum") >= (2 + 2 * layernorm) * layers
    if attention_impl == "pallas":  # the merge's exp: one a layer in XLA, none with out_proj merging
        assert in_xla(finished).count("exp") == (0 if merge else layers)
    ids = jax.random.randint(jax.random.PRNGKey(2), (1, 8), 3, 64)
    continuation = jax.random.randint(jax.random.PRNGKey(3), (1, 40), 3, 64)
    run = functools.partial(
        decode_logits,
        params,
        weights,
        ids,
        jnp.ones_like(ids),
        continuation,
        config=WIDE,
        attention_impl=attention_impl,
    )
    assert rel_max_err(run(policy=finished), run(policy=plain)) <= 1e-5


@pytest.mark.parametrize("head_kv", ["all", "repair"])
def test_batches_above_head_max_batch_compute_every_head_with_the_kernels_outputs(head_kv):
    """Above `DecodeTuning.head_max_batch` (default 1) a decode step launches no head kernel: it computes every head
    and zeroes the unchosen ones' outputs, which gives the logits of the head kernels' path; at batch 1 the kernels
    run."""
    policy = SparsityPolicy(heads=HeadSparsity.FIXED, head_k=2, tuning=(("head_kv", head_kv), ("head_window", 4)))
    assert policy.tuning.head_max_batch == 1
    assert not [p for p in _decode_step_primitives(policy, 2) if p.startswith("pallas_call:head_")]
    assert "pallas_call:head_out_proj" in _decode_step_primitives(policy, 1)
    params = init_params(CONFIG, jax.random.PRNGKey(1))
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 3, 64)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    continuation = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 3, 64)
    every_head = decode_logits(params, SCHEDULE, ids, mask, continuation, policy=policy)
    kernels = dataclasses.replace(policy, tuning=dataclasses.replace(policy.tuning, head_max_batch=2))
    assert rel_max_err(every_head, decode_logits(params, SCHEDULE, ids, mask, continuation, policy=kernels)) <= 1e-5
    with pytest.raises(ValueError, match="head_max_batch must be a positive int"):
        SparsityPolicy(heads=HeadSparsity.FIXED, head_k=2, tuning=(("head_max_batch", 0),))


def test_every_head_chosen_decodes_like_dense_on_the_reference_model(reference_model_dir):
    """With every head chosen, the head-sparse decode steps (kernels, K/V repair) give dense logits and greedy
    tokens."""
    model = load_model(reference_model_dir, "float32")
    ids = jnp.asarray([model.tokenizer("Paris is the capital and largest city")["input_ids"]])
    every_head = fixed_heads(model.config.num_attention_heads, head_window=4)
    schedule = SparseWeights(head_schedule=head_schedule(7, model.config.num_hidden_layers, 6))
    steps, results = 8, {}
    for name, policy, weights in (("dense", SparsityPolicy(), None), ("sparse", every_head, schedule)):
        last, cache = prefill(
            model.params,
            ids,
            jnp.ones_like(ids),
            config=model.config,
            num_slots=ids.shape[1] + steps,
            recent_window=policy.recent_window,
        )
        tokens, logits = [], []
        for _ in range(steps):
            token = jnp.argmax(last, axis=-1)
            tokens.append(int(token[0]))
            last, cache = decode_step(model.params, cache, token, weights, config=model.config, policy=policy)
            logits.append(np.asarray(last))
        results[name] = tokens, np.stack(logits)
    assert results["sparse"][0] == results["dense"][0]
    assert rel_max_err(results["sparse"][1], results["dense"][1]) <= 1e-5


def _walk(jaxpr):
    """Every equation of a jaxpr and of the jaxprs its equations hold (loop bodies, jitted calls, kernels)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    yield from _walk(v.jaxpr)
                elif isinstance(v, jax.extend.core.Jaxpr):
                    yield from _walk(v)


def test_head_sparse_generation_is_one_compiled_decode_loop():
    """The whole generation traces to one while loop (the decode loop) holding the head-sparse kernels, and no host
    callback anywhere."""
    params = init_params(CONFIG, jax.random.PRNGKey(8))
    ids = jnp.ones((1, 8), jnp.int32)
    policy = fixed_heads(2)
    jaxpr = jax.make_jaxpr(
        lambda p, i, m, n, key, s, w: _generate_tokens(
            p, i, m, n, key, s, w, config=CONFIG, num_slots=24, policy=policy
        )
    )(params, ids, jnp.ones_like(ids), jnp.int32(16), jax.random.PRNGKey(0), SamplingConfig().to_device(), SCHEDULE)
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    assert len(loops) == 1
    kernels = " ".join(
        str(e.params) for e in _walk(loops[0].params["body_jaxpr"].jaxpr) if "pallas" in e.primitive.name
    )
    assert "head_qkv" in kernels and "head_out_proj" in kernels
    assert not any("callback" in e.primitive.name for e in _walk(jaxpr.jaxpr))


def _kernel_name(eqn):
    name = eqn.params.get("name")
    return getattr(eqn.params.get("name_and_src_info"), "name", None) if name is None else name


def _decode_step_primitives(policy, batch, weights=SCHEDULE, config=CONFIG):
    """Primitive names (pallas_call as "pallas_call:<kernel>") of one decode step's jaxpr, walked into every
    nested jaxpr."""
    params = init_params(config, jax.random.PRNGKey(4))
    cache = KVCache.create(config, batch, 16, jnp.float32, policy.recent_window)
    tokens = jnp.ones((batch,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, c, t, w: decode_step(p, c, t, w, config=config, policy=policy))(
        params, cache, tokens, weights
    )
    return [
        f"pallas_call:{_kernel_name(e)}" if e.primitive.name == "pallas_call" else e.primitive.name
        for e in _walk(jaxpr.jaxpr)
    ]


@pytest.mark.parametrize("head_kv", ["repair", "all"])
def test_batch1_decode_step_launches_one_projection_per_layer_and_compacts_no_mask(head_kv):
    """A batch-1 decode step computes each layer's K/V and Q in one head_qkv launch and its out_proj in one
    head_out_proj launch, and builds no head list from a mask (jnp.nonzero's cumsum) beyond what dense decoding
    has; batch 2 still builds the union."""
    policy = fixed_heads(2, head_kv=head_kv, head_window=4)
    prims = _decode_step_primitives(policy, 1)
    layers = CONFIG.num_hidden_layers
    # "all" writes the K/V into the cache from the projection launch (the default `qkv_cache_write`)
    projection = "pallas_call:head_qkv_cache" if head_kv == "all" else "pallas_call:head_qkv"
    assert prims.count(projection) == layers
    assert prims.count("pallas_call:head_qkv") + prims.count("pallas_call:head_qkv_cache") == layers
    assert prims.count("pallas_call:head_out_proj") == layers
    dense = _decode_step_primitives(SparsityPolicy(), 1)
    assert prims.count("cumsum") == dense.count("cumsum")
    assert _decode_step_primitives(policy, 2).count("cumsum") > dense.count("cumsum")


@pytest.mark.parametrize("shape, k", [((3, 1, 32), 16), ((2, 5, 40), 1), ((4, 7), 7), ((6, 12), 3)])
def test_exactly_k_by_rank_equals_top_k(shape, k):
    """`exactly_k(method="rank")` (pairwise comparisons, no sort) chooses the entries `lax.top_k` does, in its order:
    on random scores and on scores with many ties (broken towards the lower index)."""
    rng = np.random.default_rng(k)
    for scores in (rng.standard_normal(shape), rng.integers(0, 3, shape)):
        scores = jnp.asarray(scores, jnp.float32)
        top_idx = np.asarray(jax.lax.top_k(scores, k)[1])
        for method in ("sort", "rank"):
            mask, idx = exactly_k(scores, k, method)
            np.testing.assert_array_equal(np.asarray(idx), top_idx)
            np.testing.assert_array_equal(np.asarray(mask), np.asarray(mask_of(jnp.asarray(top_idx), shape[-1])))
    with pytest.raises(ValueError, match="'rank' for at most 256 entries"):
        exactly_k(jnp.zeros((1, 300)), 4, "rank")
    with pytest.raises(ValueError, match="method must be one of"):
        exactly_k(jnp.zeros((1, 30)), 4, "heap")


def test_fixed_schedule_keeps_k_distinct_heads_that_change_with_the_slot_without_a_top_k():
    """The seeded schedule (`sparsity.scheduled_heads`): exactly k distinct heads per token, a function of the
    schedule, layer, slot and row only (a decode step and a whole-sequence chunk starting elsewhere agree), changing
    from slot to slot with every head kept about k/H of the time; a decode step draws no random numbers and sorts
    nothing for it (the per-layer orders are drawn on the host)."""
    n_heads, k = 32, 8
    key = head_schedule(11, 5, n_heads)
    np.testing.assert_array_equal(np.sort(np.asarray(key), axis=1), np.tile(np.arange(n_heads), (5, 1)))
    mask, idx = scheduled_heads(key, 3, jnp.int32(5), 2, 200, n_heads, k)
    mask, idx = np.asarray(mask), np.asarray(idx)
    assert (mask.sum(-1) == k).all() and all(len(set(row)) == k for row in idx.reshape(-1, k).tolist())
    np.testing.assert_array_equal(np.take_along_axis(mask, idx, axis=-1), True)
    later, _ = scheduled_heads(key, 3, jnp.int32(105), 2, 1, n_heads, k)
    np.testing.assert_array_equal(np.asarray(later)[:, 0], mask[:, 100])
    assert (mask[:, 1:] != mask[:, :-1]).any(-1).mean() > 0.9  # a new choice nearly every step
    assert np.abs(mask.mean(axis=(0, 1)) - k / n_heads).max() < 0.15
    assert not (np.asarray(scheduled_heads(key, 4, jnp.int32(5), 2, 200, n_heads, k)[0]) == mask).all()
    assert not {"top_k", "sort", "random_bits", "threefry2x32"} & set(_decode_step_primitives(fixed_heads(2), 1))
    # With every head's K/V, head_qkv_cache_write (the default): the projection kernel writes K/V, no cache writes
    # after it (two per layer with the knob off)
    prims = _decode_step_primitives(fixed_heads(2, head_kv="all"), 1)
    assert not {"top_k", "sort", "random_bits", "threefry2x32"} & set(prims), prims
    unfused = _decode_step_primitives(fixed_heads(2, head_kv="all", head_qkv_cache_write=0), 1)
    layers = CONFIG.num_hidden_layers
    assert unfused.count("dynamic_update_slice") - prims.count("dynamic_update_slice") == 2 * layers
    assert prims.count("pallas_call:head_qkv_cache") == layers
    # head_qkv_layernorm (the default): the attention LayerNorm inside the projection kernel, one rsqrt a layer
    # fewer in XLA
    params = init_params(CONFIG, jax.random.PRNGKey(4))
    cache = KVCache.create(CONFIG, 1, 16, jnp.float32)

    def rsqrt_in_xla(policy):
        token = jnp.ones((1,), jnp.int32)
        step = jax.make_jaxpr(lambda c: decode_step(params, c, token, SCHEDULE, config=CONFIG, policy=policy))
        return primitives_outside_kernels(step(cache).jaxpr).count("rsqrt")

    every_kv = fixed_heads(2, head_kv="all")
    assert rsqrt_in_xla(fixed_heads(2, head_kv="all", head_qkv_layernorm=0)) - rsqrt_in_xla(every_kv) == layers
    with pytest.raises(ValueError, match=r"the head schedule is \(5, 32\), but layer 5 of a model with 32 heads"):
        scheduled_heads(key, 5, jnp.int32(0), 1, 1, n_heads, k)


def test_decode_step_scores_heads_on_the_predictor_kernel():
    """Head predictors in the decode layout (`decode_predictor`, as `sparse_weights_from_predictors` gives them): a
    decode step runs each layer's first predictor layer on the predictor_hidden kernel, with the scores the training
    layout gives; the reference decode (no kernels) and whole sequences are scored by XLA."""
    d, n_layers = CONFIG.hidden_size, CONFIG.num_hidden_layers
    keys = jax.random.split(jax.random.PRNGKey(21), n_layers)
    trained = tuple(init_low_rank(key, d, 8, CONFIG.num_attention_heads) for key in keys)
    decode = tuple(decode_predictor(p, None) for p in trained)
    policy = SparsityPolicy(heads=HeadSparsity.PREDICTED, head_k=2)
    x = jax.random.normal(jax.random.PRNGKey(22), (2, 1, d))
    for p, q in zip(trained, decode):
        assert rel_max_err(head_scores(q, x, policy), predictor_scores(p, x)) <= 1e-5
    kernel = "pallas_call:predictor_hidden"
    assert _decode_step_primitives(policy, 2, SparseWeights(heads=decode)).count(kernel) == n_layers
    reference = dataclasses.replace(policy, decode_kernels=False)
    assert _decode_step_primitives(reference, 2, SparseWeights(heads=decode)).count(kernel) == 0
    whole = jax.random.normal(jax.random.PRNGKey(23), (2, 5, d))
    for p, q in zip(trained, decode):
        assert rel_max_err(head_scores(q, whole, policy), predictor_scores(p, whole)) <= 1e-5


def decode_24_steps(config, params, weights):
    """`decode_logits` of one sequence (an 8-token prompt, 24 steps), given the policy."""
    ids = jax.random.randint(jax.random.PRNGKey(2), (1, 8), 3, 64)
    continuation = jax.random.randint(jax.random.PRNGKey(3), (1, 24), 3, 64)
    return functools.partial(decode_logits, params, weights, ids, jnp.ones_like(ids), continuation, config=config)


@pytest.mark.parametrize("config", [CONFIG, WIDE], ids=["head_dim_8", "window_kernel"])
def test_next_layers_head_predictor_rides_on_the_mlp_predictor_launch(config):
    """`head_hidden_ahead` (the default): layer l's MLP predictor launch (with the attention LayerNorm) also computes
    the first layer of layer l+1's head predictor, which reads the same input: L + 1 `predictor_hidden` launches a
    decode step (layer 0's head predictor apart) instead of 2L, and the decode's logits are those of the predictors
    apart. Also where the repair's window kernel applies the attention LayerNorm itself (head_dim 16): the launch then
    runs ahead of the attention only to carry the head predictor."""
    layers, d = config.num_hidden_layers, config.hidden_size
    keys = jax.random.split(jax.random.PRNGKey(31), 2 * layers)
    mlp = tuple(init_low_rank(keys[i], d, 16, config.ffn_dim) for i in range(layers))
    heads = tuple(init_low_rank(keys[layers + i], d, 16, config.num_attention_heads) for i in range(layers))
    weights = sparse_weights_from_predictors(Predictors(mlp=mlp, heads=heads, mlp_threshold=(0.0,) * layers))
    apart = SparsityPolicy(
        MLPSparsity.PREDICTED, heads=HeadSparsity.PREDICTED, head_k=2, tuning=(("head_hidden_ahead", 0),)
    )
    ahead = dataclasses.replace(apart, tuning=())  # the default
    kernel = "pallas_call:predictor_hidden"
    for policy, launches in ((apart, 2 * layers), (ahead, layers + 1)):
        primitives = _decode_step_primitives(policy, 1, weights, config)
        assert primitives.count(kernel) == launches
        window_kernels = primitives.count("pallas_call:head_window_cache")
        assert window_kernels == (layers if config is WIDE else 0)
    run = decode_24_steps(config, init_params(config, jax.random.PRNGKey(1)), weights)
    assert rel_max_err(run(policy=ahead), run(policy=apart)) <= 1e-5
    with pytest.raises(ValueError, match="head_hidden_ahead must be 0 or 1"):
        DecodeTuning(head_hidden_ahead=2)


@pytest.mark.parametrize("config", [CONFIG, WIDE], ids=["head_dim_8", "window_kernel"])
@pytest.mark.parametrize("by_threshold", [False, True])
def test_next_layers_heads_are_chosen_in_the_predictor_launch(config, by_threshold):
    """`head_choose_ahead`: the launch that carries layer l+1's head predictor also scores and chooses its heads, so
    the step scores and ranks only layer 0's heads in XLA (one head-score matmul instead of L, the ranking's
    comparisons once), and decodes the logits of the choice made in XLA (top-K, and a threshold under a bound)."""
    layers, d, n_heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    keys = jax.random.split(jax.random.PRNGKey(41), 2 * layers)
    mlp = tuple(init_low_rank(keys[i], d, 16, config.ffn_dim) for i in range(layers))
    heads = tuple(init_low_rank(keys[layers + i], d, 16, n_heads) for i in range(layers))
    predictors = Predictors(mlp=mlp, heads=heads, mlp_threshold=(0.0,) * layers)
    if by_threshold:  # about half the heads pass, under a bound of 3
        predictors = predictors.with_threshold((0.0,) * layers, (0.0,) * layers)
    weights = sparse_weights_from_predictors(predictors)
    selection = Selection.THRESHOLD if by_threshold else Selection.TOPK
    in_xla = SparsityPolicy(MLPSparsity.PREDICTED, selection, heads=HeadSparsity.PREDICTED, head_k=3)
    in_kernel = dataclasses.replace(in_xla, tuning=(("head_choose_ahead", 1),))
    assert _decode_step_primitives(in_kernel, 1, weights, config).count("pallas_call:predictor_hidden") == layers + 1
    params = init_params(config, jax.random.PRNGKey(1))
    cache = KVCache.create(config, 1, 16, jnp.float32, in_xla.recent_window)
    token = jnp.ones((1,), jnp.int32)
    steps = {
        policy: primitives_outside_kernels(
            jax.make_jaxpr(lambda c: decode_step(params, c, token, weights, config=config, policy=policy))(c).jaxpr
        )
        for policy, c in ((in_xla, cache), (in_kernel, cache))
    }
    # per layer after the first: the head scores' matmul, and the ranking's comparison of every pair of heads
    for primitive in ("dot_general", "gt"):
        assert steps[in_xla].count(primitive) - steps[in_kernel].count(primitive) == layers - 1, primitive
    run = decode_24_steps(config, params, weights)
    assert rel_max_err(run(policy=in_kernel), run(policy=in_xla)) <= 1e-5
    with pytest.raises(ValueError, match="head_choose_ahead must be 0 or 1"):
        DecodeTuning(head_choose_ahead=2)


def test_tuning_and_cache_errors():
    with pytest.raises(ValueError, match="head_kv must be one of"):
        DecodeTuning(head_kv="some")
    with pytest.raises(ValueError, match="head_window must be a positive int"):
        SparsityPolicy(heads=HeadSparsity.FIXED, head_k=1, tuning=(("head_window", 0),))
    with pytest.raises(ValueError, match="head_window must be a positive int. Got 'many'"):
        SparsityPolicy(heads=HeadSparsity.FIXED, head_k=1, tuning=(("head_window", "many"),))
    with pytest.raises(ValueError, match="fixed head selection needs head_k"):
        SparsityPolicy(heads=HeadSparsity.FIXED)
    assert fixed_heads(1).recent_window == 16 and fixed_heads(1, head_kv="all").recent_window == 0
    # A batch too large for the MLP kernels keeps its head policy, and how the heads' K/V are kept.
    policy, weights = for_decode_batch(fixed_heads(1, head_kv="all", head_window=4), SCHEDULE, 8)
    assert (policy.tuning.head_kv, policy.tuning.head_window, weights) == ("all", 4, SCHEDULE)
    params = init_params(CONFIG, jax.random.PRNGKey(9))
    ids = jnp.full((1, 4), 5, jnp.int32)
    _, cache = prefill(params, ids, jnp.ones_like(ids), config=CONFIG, num_slots=8)  # no recent inputs kept
    with pytest.raises(ValueError, match="needs the cache's recent inputs"):
        decode_step(params, cache, ids[:, 0], SCHEDULE, config=CONFIG, policy=fixed_heads(1, head_kv="repair"))
    _, cache = prefill(params, ids, jnp.ones_like(ids), config=CONFIG, num_slots=8, recent_window=4)
    with pytest.raises(ValueError, match="head_window is 16"):
        decode_step(params, cache, ids[:, 0], SCHEDULE, config=CONFIG, policy=fixed_heads(1, head_kv="repair"))
    with pytest.raises(ValueError, match="needs a schedule"):
        decode_step(params, cache, ids[:, 0], None, config=CONFIG, policy=fixed_heads(1, head_window=4))
    # head_ + a HeadSparsePlan field reaches the kernels' plan (which checks it); an unknown one is refused at once
    with pytest.raises(ValueError, match="qkv_block_d must be a positive power of two"):
        policy = fixed_heads(1, head_window=4, head_qkv_block_d=48)
        decode_step(params, cache, ids[:, 0], SCHEDULE, config=CONFIG, policy=policy)
    with pytest.raises(ValueError, match="unknown tuning 'head_qkv_block_cols'"):
        fixed_heads(1, head_qkv_block_cols=4)
    assert DecodeTuning.parse((("head_out_warps", "8"), ("head_kv", "repair"))).head_knobs == (("out_warps", 8),)


def test_head_sparse_decode_errors():
    weights = random_layer(np.random.default_rng(0), 4, 8, 32)
    x, keys = jnp.zeros((2, 32)), jnp.zeros((2, 4, 8, 8))
    recent, allowed = jnp.zeros((2, 4, 32)), jnp.ones((2, 8), bool)
    chosen = jnp.zeros((2, 4), bool).at[:, 0].set(True)
    with pytest.raises(ValueError, match="needs the cache in the model's dtype"):
        head_sparse_decode(x, weights, keys, keys, recent.astype(jnp.float16), chosen, 1, 5, allowed, head_kv="repair")
    with pytest.raises(ValueError, match=r"chosen_idx must be \[B, k\] = \(2, 1\)"):
        head_sparse_decode(x, weights, keys, keys, recent, chosen, 1, 5, allowed, chosen_idx=jnp.zeros((2, 2), int))
    with pytest.raises(ValueError, match="chosen .* is needed unless B == 1"):
        head_sparse_decode(x, weights, keys, keys, recent, None, 1, 5, allowed, chosen_idx=jnp.zeros((2, 1), int))


@pytest.mark.parametrize("head_kv, attention_impl", [("repair", "pallas"), ("repair", "xla"), ("all", "pallas")])
def test_padding_entries_reach_the_kernels_as_skipped_entries(head_kv, attention_impl, monkeypatch):
    """A head-list entry no sequence uses (another device's head under tensor parallelism) reaches the one-launch
    projection (the repair's window kernel, or every head's K/V with the chosen Q), the Pallas attention and out_proj
    as -1, which they skip (no bytes read): the step equals the one whose list holds only the used heads (batch 1,
    R = 16)."""
    seen = {}
    where = {"head_window_into_cache": 4, "head_qkv_into_cache": 3, "decode_attention": 4, "head_out_proj": 3}
    for name, arg in where.items():
        real = getattr(sparse_attention, name)

        def spy(*args, _real=real, _name=name, _arg=arg, **kwargs):
            seen[_name] = np.asarray(args[_arg]).tolist()
            return _real(*args, **kwargs)

        monkeypatch.setattr(sparse_attention, name, spy)
    n_heads, hd, window = 4, 16, 16
    d = n_heads * hd
    rng = np.random.default_rng(3)
    weights = random_layer(rng, n_heads, hd, d)
    keys, values = (jnp.asarray(rng.standard_normal((1, n_heads, 24, hd)), jnp.float32) for _ in range(2))
    recent = jnp.asarray(rng.standard_normal((1, window, d)), jnp.float32) if head_kv == "repair" else None
    x = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
    allowed = jnp.arange(24)[None] <= 20
    forced = sparse_attention.ForcedRotation(n_heads, window, 0) if head_kv == "repair" else None

    def step(q_heads, used):
        return sparse_attention._decode_heads(
            x,
            weights,
            keys,
            values,
            recent,
            jnp.asarray(q_heads, jnp.int32),
            used,
            forced,
            20,
            allowed,
            head_kv,
            attention_impl,
        )

    padded = step([2, 0], jnp.asarray([[True, False]]))
    projection = "head_window_into_cache" if head_kv == "repair" else "head_qkv_into_cache"
    assert seen[projection] == [2, -1] and seen["head_out_proj"] == [2, -1]
    if attention_impl == "pallas":
        assert seen["decode_attention"] == [2, -1]
    alone = step([2], None)
    assert rel_max_err(padded.out, alone.out) <= 1e-6
    assert rel_max_err(padded.keys, alone.keys) == 0 and rel_max_err(padded.values, alone.values) == 0


def _threshold_k_reference(scores, threshold, k):
    """numpy: per row, the entries scored >= threshold among the k best (descending, ties to the lower index); the
    index list in that order with -1 for the entries below the threshold (k >= n: index order)."""
    scores = np.asarray(scores, np.float64)
    n = scores.shape[-1]
    flat = scores.reshape(-1, n)
    masks, lists = [], []
    for row in flat:
        order = sorted(range(n), key=lambda i: (-row[i], i))[: min(k, n)]
        if k >= n:
            order = list(range(n))
        masks.append([i in order and row[i] >= threshold for i in range(n)])
        lists.append([i if row[i] >= threshold else -1 for i in order])
    return np.array(masks).reshape(scores.shape), np.array(lists).reshape(*scores.shape[:-1], -1)


@pytest.mark.parametrize("shape, k", [((3, 1, 32), 16), ((2, 5, 12), 3), ((4, 6), 6), ((4, 6), 9)])
def test_threshold_k_keeps_the_heads_that_pass_among_the_k_best(shape, k):
    """Threshold selection of heads under the static bound k (`threshold_k`): unsorted random scores and scores with
    ties, thresholds of -inf (exactly the k best), +inf (nothing: every entry -1) and between (counts that vary per
    row, some above k: the k best passing ones kept), by both top-k methods, against a numpy reference."""
    rng = np.random.default_rng(k)
    for scores in (rng.standard_normal(shape), rng.integers(0, 4, shape)):
        scores = jnp.asarray(scores, jnp.float32)
        counts = []
        for threshold in (-np.inf, np.inf, 0.0, 1.0, 2.5):
            want_mask, want_idx = _threshold_k_reference(scores, threshold, k)
            counts.append(want_mask.sum(-1))
            for method in ("sort", "rank"):
                mask, idx = threshold_k(scores, jnp.float32(threshold), k, method)
                np.testing.assert_array_equal(np.asarray(mask), want_mask)
                np.testing.assert_array_equal(np.asarray(idx), want_idx)
        assert (counts[0] == min(k, shape[-1])).all() and (counts[1] == 0).all()
        assert len(np.unique(np.concatenate([c.ravel() for c in counts[2:]]))) > 1  # counts vary


def _threshold_head_weights(config, threshold, seed=41):
    """Random head predictors calibrated with one `threshold` for every layer (MLP dense)."""
    layers, d = config.num_hidden_layers, config.hidden_size
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * layers)
    mlp = tuple(init_low_rank(keys[i], d, 8, config.ffn_dim) for i in range(layers))
    heads = tuple(init_low_rank(keys[layers + i], d, 8, config.num_attention_heads) for i in range(layers))
    predictors = Predictors(mlp=mlp, heads=heads, head_threshold=(threshold,) * layers)
    return sparse_weights_from_predictors(predictors, mlp=False)


@pytest.mark.parametrize(
    "config, attention_impl",
    [(CONFIG, "xla"), (CONFIG, "pallas"), (WIDE, "pallas")],
    ids=["xla_attention", "pallas_attention", "window_kernel"],
)
def test_threshold_heads_decode_at_batch_one_equals_the_every_head_decode(config, attention_impl):
    """Batch 1 with threshold-selected heads (at most k = 3 of 4, the count varying from step to step and layer to
    layer, some steps none): the step's head list carries -1 entries, and the decode computing only the listed heads
    (the kernels skip -1; XLA's attention gets them zeroed) equals the reference decode that computes every head and
    masks, and differs from top-K's."""
    weights = _threshold_head_weights(config, 0.3)
    policy = SparsityPolicy(heads=HeadSparsity.PREDICTED, head_k=3)
    params = init_params(config, jax.random.PRNGKey(42))
    ids = jax.random.randint(jax.random.PRNGKey(43), (1, 8), 3, 64)
    continuation = jax.random.randint(jax.random.PRNGKey(44), (1, 40), 3, 64)
    run = functools.partial(decode_logits, params, weights, ids, jnp.ones_like(ids), continuation, config=config)
    sparse = run(policy=policy, attention_impl=attention_impl)
    every_head = run(policy=dataclasses.replace(policy, decode_kernels=False))
    assert rel_max_err(sparse, every_head) <= 1e-5
    top_k = run(policy=dataclasses.replace(policy, head_selection="topk"), attention_impl=attention_impl)
    assert rel_max_err(sparse, top_k) > 1e-3
    # the counts the steps saw: from the whole sequence's choice of the same heads
    from dejavu_jax.sparsity import head_rows

    x = jax.random.normal(jax.random.PRNGKey(45), (64, 1, config.hidden_size))
    counts = np.asarray(head_rows(policy, weights, 1, x, config.num_attention_heads).mask).sum(-1)
    assert counts.min() == 0 and counts.max() == 3 and len(np.unique(counts)) == 4
