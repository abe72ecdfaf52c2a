"""The predictor's first layer on its Pallas kernel (standardize fused) against a float64 reference; compiled on a
GPU, in the interpreter on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CompiledKernelCases, lowered_text_for_cuda
from kernels.predictor_hidden import predictor_hidden, predictor_hidden_reference

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}
EPS = 1e-5


def float64_hidden(x, w1_t, b1, normalize):
    x, w, b = (np.asarray(a, np.float64) for a in (x, w1_t, b1))
    if normalize:
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS)
    return x @ w.T + b


class TestPredictorHidden(CompiledKernelCases):
    @pytest.mark.parametrize(
        "batch, d, r, normalize, block_r, block_d",
        [
            (1, 256, 64, True, None, 2048),
            (3, 160, 48, True, None, 2048),  # d = 32 * 5: column blocks of 32
            (2, 512, 256, False, 8, 128),
            (1, 80 * 16, 16, True, 1, 256),
        ],
    )
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
    def test_matches_float64(self, batch, d, r, normalize, block_r, block_d, dtype):
        rng = np.random.default_rng(batch * 1000 + d + r)
        # An offset and scale far from standard, so a missing or wrong normalisation fails.
        x = jnp.asarray(rng.standard_normal((batch, d)) * 4.0 + 2.5, dtype)
        w1_t = jnp.asarray(rng.standard_normal((r, d)) / d**0.5, dtype)
        b1 = jnp.asarray(rng.standard_normal(r), dtype)
        out = predictor_hidden(
            x, w1_t, b1, normalize=normalize, eps=EPS, block_r=block_r, block_d=block_d, interpret=self.INTERPRET
        )
        assert out.shape == (batch, r) and out.dtype == jnp.dtype(dtype)
        ref = float64_hidden(x, w1_t, b1, normalize)
        err = np.linalg.norm(np.asarray(out, np.float64) - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert err.max() <= TOLERANCE[dtype]
        # The jnp twin (what the runtime's XLA path computes) agrees to the dtype's rounding.
        twin = predictor_hidden_reference(x, w1_t, b1, normalize=normalize, eps=EPS)
        err = np.linalg.norm(np.asarray(out, np.float64) - np.asarray(twin, np.float64), axis=-1)
        assert (err / np.linalg.norm(ref, axis=-1)).max() <= TOLERANCE[dtype]

    def test_bad_input(self):
        x = jnp.zeros((1, 64), jnp.float16)
        with pytest.raises(ValueError, match="need x"):
            predictor_hidden(x, jnp.zeros((16, 32), jnp.float16), jnp.zeros(16), interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="batch must be"):
            predictor_hidden(jnp.zeros((17, 64)), jnp.zeros((16, 64)), jnp.zeros(16), interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="b1 must be"):
            predictor_hidden(x, jnp.zeros((16, 64), jnp.float16), jnp.zeros(8), interpret=self.INTERPRET)
        with pytest.raises(ValueError, match="multiples of 16"):
            predictor_hidden(x, jnp.zeros((24, 64), jnp.float16), jnp.zeros(24), interpret=self.INTERPRET)


class TestPredictorHiddenInterpret(TestPredictorHidden):
    INTERPRET = True


@pytest.mark.parametrize("batch, d, r", [(1, 4096, 256), (4, 5120, 1024)])
def test_lowers_for_gpu(batch, d, r):
    s = jax.ShapeDtypeStruct
    text = lowered_text_for_cuda(
        jax.jit(lambda *a: predictor_hidden(*a, interpret=False)),
        s((batch, d), jnp.float16),
        s((r, d), jnp.float16),
        s((r,), jnp.float16),
    )
    assert "predictor_hidden" in text
