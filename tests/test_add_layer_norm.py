"""Residual add + LayerNorm kernel (kernels/add_layer_norm.py).

`TestAddLayerNorm` runs the kernel compiled for the GPU and skips elsewhere; `TestAddLayerNormInterpret` re-runs
every case in the Pallas interpreter on CPU. Both outputs are compared with a float64 numpy reference.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lowered_text_for_cuda

from kernels.add_layer_norm import add_layer_norm, add_layer_norm_reference

# Max error relative to the output's max magnitude. The sum h + delta is rounded to the stream dtype (as the
# model rounds it), so h_new carries one rounding; y two (h_new's and its own).
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}
EPS = 1e-5


def _inputs(rows, d, dtype, delta_dtype, with_bias):
    keys = jax.random.split(jax.random.key(zlib.crc32(repr((rows, d, str(dtype), with_bias)).encode())), 5)
    # An offset in the stream so the mean subtraction matters.
    h = (3.0 + jax.random.normal(keys[0], (rows, d))).astype(dtype)
    delta = jax.random.normal(keys[1], (rows, d)).astype(delta_dtype)
    delta_bias = jax.random.normal(keys[2], (d,)).astype(dtype) if with_bias else None
    scale = (1.0 + 0.3 * jax.random.normal(keys[3], (d,))).astype(dtype)
    bias = (0.3 * jax.random.normal(keys[4], (d,))).astype(dtype)
    return h, delta, delta_bias, scale, bias


def _reference_f64(h, delta, delta_bias, scale, bias):
    f64 = lambda a: np.asarray(a.astype(jnp.float32)).astype(np.float64)  # noqa: E731
    total = f64(delta) + (0.0 if delta_bias is None else f64(delta_bias))
    h_new = f64(h) + total
    mean = h_new.mean(-1, keepdims=True)
    var = h_new.var(-1, keepdims=True)
    return h_new, (h_new - mean) / np.sqrt(var + EPS) * f64(scale) + f64(bias)


def _rel_err(out, ref):
    out = np.asarray(out.astype(jnp.float32)).astype(np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return np.abs(out - ref).max() / np.abs(ref).max()


# d: a power of two, 80 and 320 (two pieces: 64 + 16, 256 + 64), 96; rows 1 (a decode step) and 5.
CASES = [(1, 256), (5, 80), (1, 320), (5, 96)]


class TestAddLayerNorm:
    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas GPU kernels need a GPU; the interpret subclass covers CPU")

    @pytest.mark.parametrize("rows,d", CASES)
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
    @pytest.mark.parametrize("with_bias", [True, False])
    def test_matches_float64(self, rows, d, dtype, with_bias):
        # delta in fp32 with a bias (a product before its bias), in the stream dtype without (a final output).
        inputs = _inputs(rows, d, dtype, jnp.float32 if with_bias else dtype, with_bias)
        h_new, y = add_layer_norm(*inputs, eps=EPS, interpret=self.INTERPRET)
        assert h_new.dtype == y.dtype == dtype and h_new.shape == y.shape == (rows, d)
        ref_h, ref_y = _reference_f64(*inputs)
        assert _rel_err(h_new, ref_h) <= TOLERANCE[dtype]
        assert _rel_err(y, ref_y) <= TOLERANCE[dtype]

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
    def test_equals_the_jnp_twin(self, dtype):
        """The residual sum is rounded exactly as the model's unfused path rounds it."""
        inputs = _inputs(3, 320, dtype, jnp.float32, True)
        got = add_layer_norm(*inputs, eps=EPS, interpret=self.INTERPRET)
        want = add_layer_norm_reference(*inputs, eps=EPS)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32),
                                   rtol=1e-5 if dtype == jnp.float32 else 2e-3, atol=1e-5)

    def test_constant_row_normalises_to_the_bias(self):
        """Zero variance: the clamp keeps the rsqrt finite and y is exactly the LayerNorm bias."""
        h = jnp.full((2, 64), 2.0, jnp.float32)
        delta = jnp.zeros((2, 64), jnp.float32)
        scale, bias = jnp.ones((64,)), jnp.linspace(-1.0, 1.0, 64)
        h_new, y = add_layer_norm(h, delta, None, scale, bias, eps=EPS, interpret=self.INTERPRET)
        np.testing.assert_array_equal(np.asarray(h_new), np.asarray(h))
        np.testing.assert_allclose(np.asarray(y), np.broadcast_to(np.asarray(bias), (2, 64)), atol=1e-6)


class TestAddLayerNormInterpret(TestAddLayerNorm):
    INTERPRET = True


@pytest.mark.parametrize("rows,d,dtype,with_bias", [(1, 4096, jnp.float16, True), (8, 5120, jnp.bfloat16, False),
                                                    (1, 2560, jnp.float16, True), (2, 80, jnp.float32, True)])
def test_lowers_for_gpu(rows, d, dtype, with_bias):
    """The Pallas -> Triton lowering (not Triton's own compile) runs on any host, for CUDA."""
    vec = jax.ShapeDtypeStruct((d,), dtype)
    args = (jax.ShapeDtypeStruct((rows, d), dtype), jax.ShapeDtypeStruct((rows, d), jnp.float32),
            vec if with_bias else None, vec, vec)
    text = lowered_text_for_cuda(jax.jit(lambda *a: add_layer_norm(*a, eps=EPS)), *args)
    assert "triton" in text.lower()


@pytest.mark.parametrize("change,match", [
    (lambda a: (a[0][0],) + a[1:], "h must be rank 2"),
    (lambda a: (a[0].astype(jnp.int32),) + a[1:], "h dtype must be"),
    (lambda a: (a[0], a[1][:, :-1]) + a[2:], "delta must have h's shape"),
    (lambda a: a[:2] + (a[2][:-1],) + a[3:], "delta_bias must be"),
    (lambda a: a[:3] + (a[3][:-1], a[4]), "scale must be"),
    (lambda a: a[:4] + (a[4][None],), "bias must be"),
])
def test_bad_inputs_raise(change, match):
    inputs = _inputs(2, 64, jnp.float32, jnp.float32, True)
    with pytest.raises(ValueError, match=match):
        add_layer_norm(*change(inputs), eps=EPS, interpret=True)
