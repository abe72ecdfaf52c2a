"""Decode attention kernel (kernels/decode_attention.py).

`TestDecodeAttention` runs the kernel compiled for the GPU and skips elsewhere; `TestDecodeAttentionInterpret`
re-runs every case in the Pallas interpreter on CPU. Outputs are compared with a float64 numpy reference by
per-(sequence, head) relative error ||out - ref|| / ||ref||.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lowered_text_for_cuda

from kernels.decode_attention import (
    decode_attention,
    decode_attention_append,
    decode_attention_append_reference,
    decode_attention_reference,
    plan_decode_attention,
)

# Per-row relative error bounds against float64. The kernel computes in fp32; bf16/fp16 round the
# output to 8/11 bits.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


def _key(*parts):
    return jax.random.key(zlib.crc32(repr(parts).encode()))


def _heads(spec, n_heads):
    """head_idx for a spec: None (all heads), "subset" (unsorted, missing some), "single", or a list."""
    if spec is None:
        return None
    if spec == "subset":
        return (
            jnp.asarray([2, 0, 3][: max(1, n_heads - 1)], jnp.int32)
            if n_heads >= 4
            else jnp.asarray([n_heads - 1, 0], jnp.int32)
        )
    if spec == "single":
        return jnp.asarray([n_heads - 1], jnp.int32)
    if spec == "padded":  # negative entries are padding: zeros, nothing read or written
        return jnp.asarray([-1, 2, -1, 0], jnp.int32)
    return jnp.asarray(spec, jnp.int32)


def _random_allowed(key, batch, seq, p=0.6):
    """Random mask with at least one allowed slot per row (a random one forced on)."""
    k1, k2 = jax.random.split(key)
    allowed = jax.random.bernoulli(k1, p, (batch, seq))
    forced = jax.random.randint(k2, (batch,), 0, seq)
    return allowed.at[jnp.arange(batch), forced].set(True)


def _inputs(key, batch, n_heads, seq, hd, heads, dtype, allowed=None):
    ks = jax.random.split(key, 4)
    # Scores of spread ~3 so the softmax is far from uniform and the max subtraction matters.
    q = (3.0 * hd**-0.5) * jax.random.normal(ks[0], (batch, heads, hd), jnp.float32)
    keys = jax.random.normal(ks[1], (batch, n_heads, seq, hd), jnp.float32)
    values = jax.random.normal(ks[2], (batch, n_heads, seq, hd), jnp.float32)
    if allowed is None:
        allowed = _random_allowed(ks[3], batch, seq)
    return q.astype(dtype), keys.astype(dtype), values.astype(dtype), allowed


def _reference_f64(q, keys, values, allowed, head_idx):
    f64 = lambda a: np.asarray(a.astype(jnp.float32)).astype(np.float64)  # noqa: E731
    q, keys, values, allowed = f64(q), f64(keys), f64(values), np.asarray(allowed)
    live = None
    if head_idx is not None:
        idx = np.asarray(head_idx)
        live = idx >= 0
        keys, values = keys[:, np.maximum(idx, 0)], values[:, np.maximum(idx, 0)]
    scores = np.einsum("bhk,bhsk->bhs", q, keys)
    scores = np.where(allowed[:, None], scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(allowed[:, None], np.exp(scores - m), 0.0)
    l = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhs,bhsk->bhk", p, values)
    out = np.where(l > 0, out / np.where(l > 0, l, 1.0), 0.0)
    return out if live is None else np.where(live[None, :, None], out, 0.0)


def _row_rel_err(out, ref):
    """Per-row relative error; a zero reference row (padding) must come back exactly zero (error 0, else inf)."""
    out = np.asarray(out.astype(jnp.float32)).astype(np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    norm = np.linalg.norm(ref, axis=-1)
    diff = np.linalg.norm(out - ref, axis=-1)
    return np.where(norm > 0, diff / np.where(norm > 0, norm, 1.0), np.where(diff > 0, np.inf, 0.0))


# (batch, H, S, hd, heads, split_s): S = 1 / not a block multiple / the model's 24 / 256, hd = 80 (not a
# power of two), head subsets unsorted and single, split_s auto / 1 / > 1.
SHAPES = [
    (1, 4, 1, 64, None, None),
    (1, 4, 24, 80, "subset", None),
    (3, 4, 37, 128, None, 1),
    (3, 4, 37, 80, "single", 3),
    (1, 4, 256, 128, "subset", None),
    (3, 4, 256, 64, None, 1),
    (1, 4, 256, 80, None, 4),
    (2, 4, 37, 64, "padded", None),
    (1, 4, 24, 80, "padded", 1),
]


class TestDecodeAttention:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas GPU kernels need a GPU; the interpret subclass covers CPU")

    def _check(self, batch, n_heads, seq, hd, heads_spec, dtype, allowed=None, **knobs):
        key = _key(batch, n_heads, seq, hd, heads_spec, str(dtype), knobs)
        head_idx = _heads(heads_spec, n_heads)
        heads = n_heads if head_idx is None else head_idx.shape[0]
        q, keys, values, allowed = _inputs(key, batch, n_heads, seq, hd, heads, dtype, allowed)
        out = decode_attention(q, keys, values, allowed, head_idx, interpret=self.INTERPRET, **knobs)
        assert out.shape == (batch, heads, hd) and out.dtype == dtype
        ref = _reference_f64(q, keys, values, allowed, head_idx)
        err = _row_rel_err(out, ref)
        assert err.max() <= TOLERANCE[dtype], (err, plan_decode_attention(batch, heads, seq, hd, **knobs))
        return (q, keys, values, allowed, head_idx), out

    @pytest.mark.parametrize("batch,n_heads,seq,hd,heads,split_s", SHAPES)
    def test_fp32_matches_float64(self, batch, n_heads, seq, hd, heads, split_s):
        self._check(batch, n_heads, seq, hd, heads, jnp.float32, split_s=split_s)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize(
        "batch,n_heads,seq,hd,heads,split_s", [(1, 4, 37, 80, "subset", None), (3, 4, 256, 128, None, 1)]
    )
    def test_half_precision_matches_float64(self, batch, n_heads, seq, hd, heads, split_s, dtype):
        self._check(batch, n_heads, seq, hd, heads, dtype, split_s=split_s)

    def test_reference_twin_agrees(self):
        args, out = self._check(3, 4, 37, 80, "subset", jnp.float32)
        ref = decode_attention_reference(*args)
        assert _row_rel_err(out, np.asarray(ref, np.float64)).max() < 1e-5

    @pytest.mark.parametrize("split_s", [1, 2])
    def test_all_heads_index_equals_none(self, split_s):
        key = _key("all-heads", split_s)
        q, keys, values, allowed = _inputs(key, 2, 4, 24, 64, 4, jnp.float32)
        a = decode_attention(q, keys, values, allowed, None, split_s=split_s, interpret=self.INTERPRET)
        b = decode_attention(
            q, keys, values, allowed, jnp.arange(4, dtype=jnp.int32), split_s=split_s, interpret=self.INTERPRET
        )
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    @pytest.mark.parametrize("split_s", [1, 3])
    def test_only_last_slot_allowed(self, split_s):
        batch, n_heads, seq, hd = 2, 4, 37, 80
        allowed = jnp.zeros((batch, seq), bool).at[:, seq - 1].set(True)
        (q, keys, values, allowed, head_idx), out = self._check(
            batch, n_heads, seq, hd, "subset", jnp.float32, allowed=allowed, split_s=split_s, block_s=8
        )
        np.testing.assert_allclose(np.asarray(out), np.asarray(values[:, head_idx, seq - 1]), rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("split_s", [1, 3])
    def test_fully_masked_row_gives_zeros(self, split_s):
        batch, n_heads, seq, hd = 3, 4, 37, 64
        key = _key("masked", split_s)
        allowed = _random_allowed(key, batch, seq).at[1].set(False)
        q, keys, values, allowed = _inputs(key, batch, n_heads, seq, hd, n_heads, jnp.float32, allowed)
        out = np.asarray(
            decode_attention(q, keys, values, allowed, split_s=split_s, block_s=8, interpret=self.INTERPRET)
        )
        np.testing.assert_array_equal(out[1], np.zeros((n_heads, hd), np.float32))
        ref = _reference_f64(q, keys, values, allowed, None)
        assert _row_rel_err(out[[0, 2]], ref[[0, 2]]).max() <= 1e-5
        np.testing.assert_array_equal(np.asarray(decode_attention_reference(q, keys, values, allowed))[1], 0.0)

    @pytest.mark.parametrize(
        "knobs",
        [
            dict(block_s=8, split_s=2),  # S = 37: ragged last block inside the last split
            dict(block_s=4, split_s=4),  # 10 blocks over 4 splits of 3: the last split owns one
            dict(block_s=16, split_s=100),  # split_s clamped to the block count
            dict(block_s=512),  # block_s clamped to 32 <= S
            dict(block_s=1, split_s=1, num_warps=2, num_stages=1),
        ],
    )
    def test_block_knobs(self, knobs):
        self._check(3, 4, 37, 80, "subset", jnp.float32, **knobs)

    # --- decode_attention_append: the new token's K/V written at `cursor`, then attention. ---

    def _check_append(self, batch, n_heads, seq, hd, heads_spec, dtype, cursor, **knobs):
        key = _key("append", batch, n_heads, seq, hd, heads_spec, str(dtype), cursor, knobs)
        head_idx = _heads(heads_spec, n_heads)
        heads = n_heads if head_idx is None else head_idx.shape[0]
        k1, k2 = jax.random.split(key)
        q, keys, values, allowed = _inputs(k1, batch, n_heads, seq, hd, heads, dtype)
        allowed = allowed.at[:, cursor].set(True)  # the new token reads itself
        k_new, v_new = (
            jax.random.normal(k, (batch, heads, hd), jnp.float32).astype(dtype) for k in jax.random.split(k2)
        )
        # The expected caches, computed before the kernel takes (donates) its inputs.
        heads_np = np.arange(n_heads) if head_idx is None else np.asarray(head_idx)
        live = heads_np >= 0  # padding entries write nothing
        want_keys, want_values = np.array(keys), np.array(values)
        want_keys[:, heads_np[live], cursor] = np.asarray(k_new)[:, live]
        want_values[:, heads_np[live], cursor] = np.asarray(v_new)[:, live]
        ref = _reference_f64(q, jnp.asarray(want_keys), jnp.asarray(want_values), allowed, head_idx)
        out, new_keys, new_values = decode_attention_append(
            q, k_new, v_new, keys, values, allowed, jnp.int32(cursor), head_idx, interpret=self.INTERPRET, **knobs
        )
        assert out.shape == (batch, heads, hd) and out.dtype == dtype
        err = _row_rel_err(out, ref)
        assert err.max() <= TOLERANCE[dtype], (err, plan_decode_attention(batch, heads, seq, hd, **knobs))
        # Only the chosen heads' slot `cursor` changed, to exactly the new K/V.
        np.testing.assert_array_equal(np.asarray(new_keys), want_keys)
        np.testing.assert_array_equal(np.asarray(new_values), want_values)

    @pytest.mark.parametrize(
        "batch,n_heads,seq,hd,heads,split_s,cursor",
        [
            (1, 4, 1, 64, None, None, 0),  # the only slot is the new one
            (1, 4, 24, 80, "subset", None, 23),  # the last slot, hd not a power of two, head subset
            (3, 4, 37, 128, None, 1, 0),  # cursor in the first block, one split
            (3, 4, 37, 80, "single", 3, 36),  # cursor in the ragged last block, several splits
            (1, 4, 256, 64, None, None, 130),  # cursor in a later split than split 0
            (2, 4, 37, 64, "padded", 3, 20),  # padding entries: zeros, no cache write
        ],
    )
    def test_append_fp32_matches_float64(self, batch, n_heads, seq, hd, heads, split_s, cursor):
        self._check_append(batch, n_heads, seq, hd, heads, jnp.float32, cursor, split_s=split_s)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    def test_append_half_precision_matches_float64(self, dtype):
        self._check_append(2, 4, 37, 128, None, dtype, 20, block_s=8, split_s=2)

    def test_append_equals_update_then_attend(self):
        """The fused launch computes what the model's XLA path does: write the cache, then attend."""
        key = _key("append-twin")
        q, keys, values, allowed = _inputs(key, 2, 4, 24, 64, 4, jnp.float32)
        k_new, v_new = q * 2.0, q - 1.0
        want = decode_attention_append_reference(q, k_new, v_new, keys, values, allowed, 5)
        got = decode_attention_append(
            q, k_new, v_new, keys, values, allowed, jnp.int32(5), split_s=2, interpret=self.INTERPRET
        )
        assert _row_rel_err(got[0], np.asarray(want[0], np.float64)).max() < 1e-5
        for a, b in zip(got[1:], want[1:]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class TestDecodeAttentionInterpret(TestDecodeAttention):
    INTERPRET = True


# --- Plan. ---


@pytest.mark.parametrize(
    "batch,heads,seq,hd",
    [(1, 32, 2048, 128), (1, 72, 1024, 128), (8, 40, 256, 128), (1, 32, 1040, 80), (1, 32, 24, 64), (1, 1, 1, 64)],
)
def test_plan_covers_slots_and_fills_the_gpu(batch, heads, seq, hd):
    plan = plan_decode_attention(batch, heads, seq, hd)
    assert plan.block_s & (plan.block_s - 1) == 0 and plan.block_s <= seq
    assert (plan.split_s - 1) * plan.blocks_per_split < plan.n_blocks <= plan.split_s * plan.blocks_per_split
    assert sum(w for _, w in plan.hd_pieces) == hd and all(w & (w - 1) == 0 for _, w in plan.hd_pieces)
    if plan.split_s < plan.n_blocks:  # Not limited by S: enough programs for every SM.
        assert batch * heads * plan.split_s >= 132


@pytest.mark.parametrize(
    "batch,heads,n_heads,seq,hd,dtype,split_s",
    [
        (1, 32, 32, 1040, 128, jnp.float16, None),
        (8, 40, 40, 256, 128, jnp.bfloat16, 1),
        (1, 8, 32, 24, 80, jnp.float16, None),
        (2, 4, 4, 37, 64, jnp.float32, 2),
    ],
)
def test_lowers_for_gpu(batch, heads, n_heads, seq, hd, dtype, split_s):
    """The Pallas -> Triton lowering (not Triton's own compile) runs on any host, for CUDA."""
    args = [
        jax.ShapeDtypeStruct(s, dt)
        for s, dt in (
            ((batch, heads, hd), dtype),
            ((batch, n_heads, seq, hd), dtype),
            ((batch, n_heads, seq, hd), dtype),
            ((batch, seq), jnp.bool_),
        )
    ]
    head_idx = None if heads == n_heads else jax.ShapeDtypeStruct((heads,), jnp.int32)
    text = lowered_text_for_cuda(
        jax.jit(lambda *a: decode_attention(*a, split_s=split_s, interpret=False)), *args, head_idx
    )
    assert "triton" in text.lower()


# --- Bad inputs: rejected at trace time with a message naming the problem. ---


def _good_args(batch=2, n_heads=4, seq=24, hd=64, dtype=jnp.float32):
    q, keys, values, allowed = _inputs(_key("args"), batch, n_heads, seq, hd, n_heads, dtype)
    return [q, keys, values, allowed, None]


def _replace(i, value):
    args = _good_args()
    args[i] = value
    return args


BAD_INPUTS = [
    ("q rank", _replace(0, jnp.zeros((2, 4, 1, 64))), "q must be rank 3"),
    ("q dtype", _replace(0, jnp.zeros((2, 4, 64), jnp.int32)), "q dtype must be"),
    ("keys rank", _replace(1, jnp.zeros((2, 4, 24 * 64))), "keys must be rank 4"),
    ("values shape", _replace(2, jnp.zeros((2, 4, 23, 64))), "values must have the shape of keys"),
    ("keys dtype", _replace(1, jnp.zeros((2, 4, 24, 64), jnp.bfloat16)), "keys must have q's dtype"),
    ("q head_dim", _replace(0, jnp.zeros((2, 4, 32))), "q must be"),
    ("q batch", _replace(0, jnp.zeros((3, 4, 64))), "q must be"),
    ("q heads without head_idx", _replace(0, jnp.zeros((2, 3, 64))), "with head_idx=None"),
    ("head_idx length", _replace(4, jnp.arange(3, dtype=jnp.int32)), "head_idx must be rank 1"),
    ("head_idx rank", _replace(4, jnp.zeros((4, 1), jnp.int32)), "head_idx must be rank 1"),
    ("head_idx dtype", _replace(4, jnp.zeros((4,), jnp.float32)), "head_idx must be an integer"),
    ("allowed shape", _replace(3, jnp.ones((2, 23), bool)), "allowed must be"),
    ("allowed dtype", _replace(3, jnp.ones((2, 24), jnp.int32)), "allowed must be a bool"),
    (
        "no slots",
        [jnp.zeros((2, 4, 64)), jnp.zeros((2, 4, 0, 64)), jnp.zeros((2, 4, 0, 64)), jnp.zeros((2, 0), bool), None],
        "at least one slot",
    ),
]


@pytest.mark.parametrize("name,args,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise(name, args, match):
    with pytest.raises(ValueError, match=match) as info:
        decode_attention(*args, interpret=True)
    assert "Got" in str(info.value)


@pytest.mark.parametrize(
    "knobs,match",
    [
        (dict(block_s=12), "block_s must be a positive power of two"),
        (dict(block_s=0), "block_s must be a positive power of two"),
        (dict(split_s=0), "split_s must be a positive int"),
        (dict(num_warps=-1), "num_warps must be a positive int"),
    ],
)
def test_bad_knobs_raise(knobs, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(*_good_args(), interpret=True, **knobs)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the default is compiled on a GPU")
def test_interpret_none_runs_the_interpreter_off_gpu():
    """Both wrappers default to `interpret=None`: the interpreter here (no GPU), as interpret=True does."""
    args = _good_args()
    np.testing.assert_array_equal(decode_attention(*args), decode_attention(*args, interpret=True))
    q, keys, values, allowed, _ = args
    append_args = (q, q, q, keys, values, allowed, jnp.int32(3))
    got = decode_attention_append(*(jnp.copy(a) for a in append_args))
    want = decode_attention_append(*(jnp.copy(a) for a in append_args), interpret=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="interpret must be True, False or None"):
        decode_attention(*args, interpret=1)


@pytest.mark.parametrize(
    "name,change,match",
    [
        ("k_new shape", dict(k_new=jnp.zeros((2, 4, 32))), "k_new must have q's shape"),
        ("v_new shape", dict(v_new=jnp.zeros((1, 4, 64))), "v_new must have q's shape"),
        ("cursor vector", dict(cursor=jnp.zeros((1,), jnp.int32)), "cursor must be an integer scalar"),
        ("cursor float", dict(cursor=jnp.float32(3)), "cursor must be an integer scalar"),
    ],
)
def test_append_bad_inputs_raise(name, change, match):
    q, keys, values, allowed, _ = _good_args()
    args = dict(q=q, k_new=q, v_new=q, keys=keys, values=values, allowed=allowed, cursor=jnp.int32(3))
    args.update(change)
    with pytest.raises(ValueError, match=match) as info:
        decode_attention_append(**args, interpret=True)
    assert "Got" in str(info.value)


@pytest.mark.parametrize("split_s", [1, None])
def test_append_lowers_for_gpu(split_s):
    """The fused cache-write + attention kernel lowers to Triton for CUDA, its caches aliased in place."""
    batch, heads, seq, hd, dtype = 1, 32, 256, 128, jnp.float16
    vec = jax.ShapeDtypeStruct((batch, heads, hd), dtype)
    cache = jax.ShapeDtypeStruct((batch, heads, seq, hd), dtype)
    fn = jax.jit(
        lambda q, kn, vn, k, v, a, c: decode_attention_append(q, kn, vn, k, v, a, c, split_s=split_s, interpret=False)
    )
    text = lowered_text_for_cuda(
        fn,
        vec,
        vec,
        vec,
        cache,
        cache,
        jax.ShapeDtypeStruct((batch, seq), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    assert "triton" in text.lower() and "output_operand_aliases" in text
