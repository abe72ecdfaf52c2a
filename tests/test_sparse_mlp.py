"""Sparse MLP kernel (kernels/sparse_mlp.py): the index-list kernels against a float64 reference.

`TestSparseMLP` runs the kernels compiled for the GPU and skips elsewhere; `TestSparseMLPInterpret`
re-runs every case in the Pallas interpreter on CPU. Outputs are compared with a float64 numpy
reference by per-row relative error ||out - ref|| / ||ref||.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lowered_text_for_cuda

from dejavu_jax.sparse_mlp import mlp_dense
from kernels.platform import resolve_interpret
from kernels.sparse_mlp import plan_sparse_mlp, sparse_mlp, sparse_mlp_reference

# Per-row relative error bounds against float64. bf16/fp16 round h and the output to 8/11 bits.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def _key(*parts):
    return jax.random.key(zlib.crc32(repr(parts).encode()))


def _mlp_inputs(key, batch, d, ffn, dtype):
    ks = jax.random.split(key, 5)
    x = jax.random.normal(ks[0], (batch, d), jnp.float32)
    fc1_w = jax.random.normal(ks[1], (ffn, d), jnp.float32) / np.sqrt(d)
    fc1_b = 0.3 * jax.random.normal(ks[2], (ffn,), jnp.float32)
    fc2_w_t = jax.random.normal(ks[3], (ffn, d), jnp.float32) / np.sqrt(ffn / 4)
    fc2_b = 0.3 * jax.random.normal(ks[4], (d,), jnp.float32)
    return tuple(a.astype(dtype) for a in (x, fc1_w, fc1_b, fc2_w_t, fc2_b))


def _random_idx(key, ffn, k):
    """k distinct neurons in random (unsorted) order."""
    return jax.random.permutation(key, ffn)[:k].astype(jnp.int32)


def _reference_f64(x, fc1_w, fc1_b, fc2_w_t, fc2_b, idx):
    f64 = lambda a: np.asarray(a).astype(np.float64)
    idx = np.asarray(idx)
    h = np.maximum(f64(x) @ f64(fc1_w)[idx].T + f64(fc1_b)[idx], 0.0)
    return h @ f64(fc2_w_t)[idx] + f64(fc2_b)


def _row_rel_err(out, ref):
    out = np.asarray(out).astype(np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)


# (batch, d, ffn, k): d not a power of two, K = 1 / odd / not a block multiple / = ffn,
# batch 1, > 1 and >= 16 (the tensor-core path), and d = 100 (ragged last column block).
SHAPES = [
    (1, 384, 512, 1),
    (1, 384, 512, 37),
    (3, 384, 256, 256),
    (16, 384, 512, 48),
    (1, 2560, 256, 100),
    (3, 2560, 256, 17),
    (2, 100, 256, 5),
]


class TestSparseMLP:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas GPU kernels need a GPU; the interpret subclass covers CPU")

    def _check(self, batch, d, ffn, idx_or_k, dtype, **knobs):
        key = _key(batch, d, ffn, idx_or_k if isinstance(idx_or_k, int) else tuple(idx_or_k), str(dtype), knobs)
        params = _mlp_inputs(key, batch, d, ffn, dtype)
        if isinstance(idx_or_k, int):
            idx = _random_idx(jax.random.fold_in(key, 1), ffn, idx_or_k)
        else:
            idx = jnp.asarray(idx_or_k, jnp.int32)
        out = sparse_mlp(*params, idx, interpret=self.INTERPRET, **knobs)
        assert out.shape == (batch, d) and out.dtype == dtype
        err = _row_rel_err(out, _reference_f64(*params, idx))
        assert err.max() < TOLERANCE[dtype], (err, plan_sparse_mlp(batch, idx.shape[0], d, dtype, **knobs))
        return params, idx, out

    @pytest.mark.parametrize("batch,d,ffn,k", SHAPES)
    def test_fp32_matches_float64(self, batch, d, ffn, k):
        self._check(batch, d, ffn, k, jnp.float32)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize("batch,d,ffn,k", [(1, 2560, 256, 100), (3, 384, 512, 37), (16, 384, 512, 48)])
    def test_half_precision_matches_float64(self, batch, d, ffn, k, dtype):
        self._check(batch, d, ffn, k, dtype)

    def test_reference_twin_agrees(self):
        params, idx, out = self._check(3, 384, 512, 37, jnp.float32)
        ref = sparse_mlp_reference(*params, idx)
        assert _row_rel_err(out, np.asarray(ref, np.float64)).max() < 1e-5

    @pytest.mark.parametrize("batch", [1, 3])
    def test_all_neurons_equals_dense(self, batch):
        ffn, d = 256, 384
        key = _key("dense", batch)
        params = _mlp_inputs(key, batch, d, ffn, jnp.float32)
        idx = _random_idx(jax.random.fold_in(key, 1), ffn, ffn)
        out = sparse_mlp(*params, idx, interpret=self.INTERPRET)
        dense = np.asarray(mlp_dense(*params), np.float64)
        assert _row_rel_err(out, dense).max() < 1e-5

    def test_duplicates_count_twice(self):
        batch, d, ffn = 2, 384, 512
        x, fc1_w, fc1_b, fc2_w_t, fc2_b = _mlp_inputs(_key("dup"), batch, d, ffn, jnp.float32)
        fc1_b = fc1_b.at[jnp.array([7, 3])].set(5.0)  # Repeated neurons active in every row.
        params = (x, fc1_w, fc1_b, fc2_w_t, fc2_b)
        idx = jnp.asarray([7, 200, 7, 3, 511, 3, 3], jnp.int32)
        out = sparse_mlp(*params, idx, interpret=self.INTERPRET)
        assert _row_rel_err(out, _reference_f64(*params, idx)).max() < 1e-5
        once = _reference_f64(*params, np.array([7, 200, 3, 511]))
        assert _row_rel_err(out, once).min() > 1e-2  # The repeats really changed every row.

    @pytest.mark.parametrize(
        "batch,knobs",
        [
            (3, dict(block_k=8, block_d=128, split_d=2, split_k=3)),
            (3, dict(block_k=16, block_d=128, split_d=1, split_k=1, use_dot=True)),
            (3, dict(block_k=4, block_d=256, split_d=3, split_k=5, num_warps=4, num_stages=1)),
            (1, dict(block_k=4, block_d=256, split_d=3, split_k=2)),
            (1, dict(block_k=64, block_d=32, split_d=1, split_k=1)),
        ],
    )
    def test_block_knobs(self, batch, knobs):
        # K = 37 is not a multiple of any block; d = 384 is ragged for block_d = 256; split_d > 1 has
        # plain JAX finish h, split_k > 1 sums fc2's partial outputs.
        self._check(batch, 384, 512, 37, jnp.float32, **knobs)

    def test_k_zero_gives_fc2_bias(self):
        params = _mlp_inputs(_key("k0"), 2, 384, 256, jnp.float32)
        out = sparse_mlp(*params, jnp.zeros((0,), jnp.int32), interpret=self.INTERPRET)
        np.testing.assert_array_equal(out, np.broadcast_to(np.asarray(params[4]), (2, 384)))


class TestSparseMLPInterpret(TestSparseMLP):
    INTERPRET = True


@pytest.mark.parametrize(
    "batch,d,ffn,k,dtype",
    [
        (1, 5120, 20480, 1024, jnp.float16),
        (4, 2560, 10240, 999, jnp.bfloat16),
        (16, 384, 512, 48, jnp.float16),
        (64, 9216, 36864, 1856, jnp.float16),
        (3, 100, 256, 5, jnp.float32),
    ],
)
def test_lowers_for_gpu(batch, d, ffn, k, dtype):
    """The Pallas -> Triton lowering (not Triton's own compile) runs on any host, for CUDA."""
    args = [
        jax.ShapeDtypeStruct(s, dt)
        for s, dt in (
            ((batch, d), dtype),
            ((ffn, d), dtype),
            ((ffn,), dtype),
            ((ffn, d), dtype),
            ((d,), dtype),
            ((k,), jnp.int32),
        )
    ]
    text = lowered_text_for_cuda(jax.jit(lambda *a: sparse_mlp(*a, interpret=False)), *args)
    assert "triton" in text.lower()


# --- Bad inputs: rejected at trace time with a message naming the problem. ---


def _good_args(batch=2, d=128, ffn=256, k=8, dtype=jnp.float32):
    params = _mlp_inputs(_key("args"), batch, d, ffn, dtype)
    return list(params) + [jnp.arange(k, dtype=jnp.int32)]


def _replace(i, value):
    args = _good_args()
    args[i] = value
    return args


BAD_INPUTS = [
    ("x rank", _replace(0, jnp.zeros((2, 1, 128))), "x must be rank 2"),
    ("x dtype", _replace(0, jnp.zeros((2, 128), jnp.int32)), "x dtype must be"),
    ("fc1_w d", _replace(1, jnp.zeros((256, 64))), "fc1_w must be"),
    ("fc2_w_t shape", _replace(3, jnp.zeros((128, 256))), "fc2_w_t must be"),
    ("fc1_b shape", _replace(2, jnp.zeros((255,))), "fc1_b must be"),
    ("fc2_b shape", _replace(4, jnp.zeros((256,))), "fc2_b must be"),
    ("weight dtype", _replace(1, jnp.zeros((256, 128), jnp.bfloat16)), "must have x's dtype"),
    ("idx rank", _replace(5, jnp.zeros((2, 4), jnp.int32)), "active_idx must be rank 1"),
    ("idx dtype", _replace(5, jnp.zeros((4,), jnp.float32)), "active_idx must be an integer"),
    ("batch too big", _replace(0, jnp.zeros((1000, 128))), "batch must be in"),
]


@pytest.mark.parametrize("name,args,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise(name, args, match):
    with pytest.raises(ValueError, match=match) as info:
        sparse_mlp(*args, interpret=True)
    assert "Got" in str(info.value)


@pytest.mark.parametrize(
    "knobs,match",
    [
        (dict(block_k=12), "block_k must be a positive power of two"),
        (dict(block_d=0), "block_d must be a positive power of two"),
        (dict(split_k=0), "split_k must be a positive int"),
        (dict(use_dot=True, block_k=8), "use_dot needs block_k >= 16"),
        (dict(interpret="yes"), "interpret must be True, False or None"),
    ],
)
def test_bad_knobs_raise(knobs, match):
    knobs = {"interpret": True, **knobs}
    with pytest.raises(ValueError, match=match) as info:
        sparse_mlp(*_good_args(), **knobs)
    assert "Got" in str(info.value)


def test_interpret_none_follows_the_backend():
    assert resolve_interpret(None) is (jax.default_backend() != "gpu")
    assert resolve_interpret(False) is False and resolve_interpret(True) is True


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the default is compiled on a GPU")
def test_interpret_none_runs_the_interpreter_off_gpu():
    """The default `interpret=None` runs the interpreter here (no GPU): the same output as interpret=True."""
    assert resolve_interpret(None) is True
    args = _good_args(k=37)
    np.testing.assert_array_equal(sparse_mlp(*args), sparse_mlp(*args, interpret=True))


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("k", [1, 37, 300, 1024])
def test_k_is_padded_to_the_next_k_multiple(batch, k):
    plan = plan_sparse_mlp(batch, k, 384, jnp.float16)
    assert plan.k_padded % plan.k_multiple == 0 and k <= plan.k_padded < k + plan.k_multiple
    assert plan.fc1_grid[0] * plan.block_k == plan.k_padded
