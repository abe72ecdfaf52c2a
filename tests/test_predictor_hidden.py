"""The predictor's first layer on its Pallas kernel (standardize fused), and the LayerNorm it can write beside it,
against float64 references; compiled on a GPU, in the interpreter on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CompiledKernelCases, lowered_text_for_cuda, rel_max_err
from dejavu_jax.model import layer_norm
from dejavu_jax.sparsity import exactly_k, threshold_k
from kernels.predictor_hidden import HeadChooser, predictor_hidden, predictor_hidden_reference
from kernels.split_sum import new_sync

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}
EPS = 1e-5


def float64_hidden(x, w1_t, b1, normalize):
    x, w, b = (np.asarray(a, np.float64) for a in (x, w1_t, b1))
    if normalize:
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS)
    return x @ w.T + b


def float64_layer_norm(x, scale, bias, eps):
    """The model's LayerNorm formula (one pass: E[x], E[x^2] - E[x]^2) in float64."""
    x, scale, bias = (np.asarray(a, np.float64) for a in (x, scale, bias))
    mean = x.mean(-1, keepdims=True)
    var = np.maximum(np.square(x).mean(-1, keepdims=True) - np.square(mean), 0.0)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def assert_within_one_rounding(out, ref, dtype):
    """|out - ref| within one rounding of `dtype` (fp32: 1e-5 relative), plus fp32 error, which can push a value
    just across a rounding boundary."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    rel = 1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps)
    assert (np.abs(out - ref) <= rel * np.abs(ref) + 1e-5 * np.abs(ref).max()).all()


def choosing(x, w1_t, b1, w1_t2, b1_2, w2_t, b2, sync, *, k, threshold=None, **kw):
    """`predictor_hidden` with the second predictor (w1_t2, b1_2) choosing heads by w2_t, b2."""
    chooser = HeadChooser(w2_t, b2, threshold, sync, k)
    return predictor_hidden(x, w1_t, b1, w1_t_second=w1_t2, b1_second=b1_2, chooser=chooser, **kw)


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

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
    def test_sums_once_or_per_block_alike(self, dtype):
        """d in five column blocks: summed elementwise and reduced once (the default) or reduced block by block, the
        same function to fp32 rounding, the LayerNorm output too."""
        rng = np.random.default_rng(5)
        d, r = 160, 32
        x = jnp.asarray(rng.standard_normal((2, d)) * 4.0 + 2.5, dtype)
        w1_t = jnp.asarray(rng.standard_normal((r, d)) / d**0.5, dtype)
        b1 = jnp.asarray(rng.standard_normal(r), dtype)
        scale, bias = jnp.ones((d,), dtype), jnp.zeros((d,), dtype)
        kw = dict(eps=EPS, block_d=32, ln_scale=scale, ln_bias=bias, interpret=self.INTERPRET)
        once, per_block = (predictor_hidden(x, w1_t, b1, sum_once=flag, **kw) for flag in (True, False))
        ref = float64_hidden(x, w1_t, b1, True)
        for p, ln_x in (once, per_block):
            assert rel_max_err(p, ref) <= TOLERANCE[dtype]
            assert_within_one_rounding(ln_x, float64_layer_norm(x, scale, bias, 1e-5), dtype)
        assert_within_one_rounding(once[0], per_block[0], dtype)

    @pytest.mark.parametrize(
        "batch, d, r, block_r, normalize, dtype",
        [
            (1, 256, 16, 16, True, jnp.float32),  # 1 program, 2 chunks of 128: one program writes both
            (3, 512, 64, 16, True, jnp.float32),  # 4 programs, 4 chunks: one each
            (3, 256, 256, None, True, jnp.float32),  # 64 programs, 2 chunks: most programs write none
            (3, 640, 48, 16, False, jnp.float32),  # 3 programs, 5 chunks: the second slot skips one
            (1, 160, 32, 16, True, jnp.float32),  # d = 32 * 5: 5 chunks of 32 over 2 programs
            (3, 640, 48, 16, True, jnp.float16),  # half precision: rounded as the model rounds
            (3, 512, 64, 16, True, jnp.bfloat16),
            (1, 160, 32, 16, True, jnp.float16),
        ],
    )
    def test_layernorm_output(self, batch, d, r, block_r, normalize, dtype):
        rng = np.random.default_rng(batch * 1000 + d + r)
        x = jnp.asarray(rng.standard_normal((batch, d)) * 4.0 + 2.5, dtype)
        w1_t = jnp.asarray(rng.standard_normal((r, d)) / d**0.5, dtype)
        b1 = jnp.asarray(rng.standard_normal(r), dtype)
        scale = jnp.asarray(1.0 + 0.5 * rng.standard_normal(d), dtype)
        bias = jnp.asarray(rng.standard_normal(d), dtype)
        ln_eps = 1e-5
        kw = dict(normalize=normalize, eps=EPS, block_r=block_r, interpret=self.INTERPRET)
        p, ln_x = predictor_hidden(x, w1_t, b1, ln_scale=scale, ln_bias=bias, ln_eps=ln_eps, **kw)
        assert ln_x.shape == (batch, d) and ln_x.dtype == jnp.dtype(dtype)
        assert_within_one_rounding(ln_x, float64_layer_norm(x, scale, bias, ln_eps), dtype)
        assert_within_one_rounding(ln_x, layer_norm(x, scale, bias, ln_eps), dtype)
        # p is what the call without the LayerNorm gives (to a rounding: a compiler may sum x's blocks in another
        # order once the kernel also keeps their squares), and still matches its reference.
        assert_within_one_rounding(p, predictor_hidden(x, w1_t, b1, **kw), dtype)
        twin = predictor_hidden_reference(x, w1_t, b1, normalize=normalize, eps=EPS)
        assert rel_max_err(p, twin) <= TOLERANCE[dtype]

    @pytest.mark.parametrize("layernorm", [False, True])
    @pytest.mark.parametrize("batch, d, r, r2, dtype", [(1, 256, 64, 32, jnp.float32), (2, 640, 48, 96, jnp.float16)])
    def test_second_predictor_in_the_same_launch(self, batch, d, r, r2, dtype, layernorm):
        """Two predictors reading the same x (the next layer's head predictor beside this layer's MLP predictor):
        one launch gives each p what its own launch gives (to a rounding) and its float64 reference; with a
        LayerNorm also LN(x)."""
        rng = np.random.default_rng(d + r2)
        x = jnp.asarray(rng.standard_normal((batch, d)) * 3.0 + 1.0, dtype)
        w1_t, w2_t = (jnp.asarray(rng.standard_normal((n, d)) / d**0.5, dtype) for n in (r, r2))
        b1, b2 = (jnp.asarray(rng.standard_normal(n), dtype) for n in (r, r2))
        kw = dict(eps=EPS, interpret=self.INTERPRET)
        ln = {}
        if layernorm:
            scale, bias = (
                jnp.asarray(1.0 + 0.3 * rng.standard_normal(d), dtype),
                jnp.asarray(rng.standard_normal(d), dtype),
            )
            ln = dict(ln_scale=scale, ln_bias=bias, ln_eps=1e-5)
        out = predictor_hidden(x, w1_t, b1, w1_t_second=w2_t, b1_second=b2, **kw, **ln)
        assert len(out) == (3 if layernorm else 2)
        for p, w, b in ((out[0], w1_t, b1), (out[1], w2_t, b2)):
            assert p.shape == (batch, w.shape[0]) and p.dtype == jnp.dtype(dtype)
            assert_within_one_rounding(p, predictor_hidden(x, w, b, **kw), dtype)
            assert rel_max_err(p, predictor_hidden_reference(x, w, b, eps=EPS)) <= TOLERANCE[dtype]
        if layernorm:
            assert_within_one_rounding(out[2], float64_layer_norm(x, scale, bias, 1e-5), dtype)
        with pytest.raises(ValueError, match="the second predictor needs"):
            predictor_hidden(x, w1_t, b1, w1_t_second=w2_t[:, :16], b1_second=b2, **kw)
        with pytest.raises(ValueError, match="one dtype"):
            predictor_hidden(x, w1_t, b1, w1_t_second=w2_t.astype(jnp.bfloat16), b1_second=b2, **kw)

    # (batch, H, r2, k, threshold): opt-6.7b's heads and rank; opt-13b's 40 heads, k 20 (neither a power of two) and a
    # rank that is not one either; a threshold under a bound; a threshold with no bound (k >= H); two sequences
    @pytest.mark.parametrize(
        "batch, n_heads, r2, k, threshold",
        [
            (1, 32, 256, 16, None),
            (1, 40, 80, 20, None),
            (3, 40, 1024, 20, 0.2),  # rank 1024: w2 read in column chunks
            (1, 32, 64, 16, 0.3),
            (1, 12, 48, 12, 0.0),
            (1, 12, 48, 12, None),  # every head, ranked
            (2, 6, 32, 3, None),
        ],
    )
    @pytest.mark.parametrize("layernorm", [False, True])
    def test_choosing_heads_in_the_same_launch(self, batch, n_heads, r2, k, threshold, layernorm):
        """The launch that computes the next layer's head predictor's first layer also chooses its heads: the list
        `exactly_k` (or `threshold_k`) makes of the float64 scores of the launch's own p2, and p and LN(x) as
        without choosing; the counters come back zero."""
        d, r, dtype = 256, 64, jnp.float16
        rng = np.random.default_rng(n_heads * 7 + r2 + batch)
        x = jnp.asarray(rng.standard_normal((batch, d)) * 3.0 + 1.0, dtype)
        w1_t, w1_t2 = (jnp.asarray(rng.standard_normal((n, d)) / d**0.5, dtype) for n in (r, r2))
        b1, b1_2 = (jnp.asarray(rng.standard_normal(n), dtype) for n in (r, r2))
        w2_t = jnp.asarray(rng.standard_normal((n_heads, r2)) / r2**0.5, dtype)
        b2 = jnp.asarray(rng.standard_normal(n_heads) * 0.1, jnp.float32)
        ln = {}
        if layernorm:
            ln = dict(ln_scale=jnp.ones(d, dtype), ln_bias=jnp.zeros(d, dtype), ln_eps=1e-5)
        kw = dict(eps=EPS, interpret=self.INTERPRET, **ln)
        plain = predictor_hidden(x, w1_t, b1, w1_t_second=w1_t2, b1_second=b1_2, **kw)
        sync = new_sync(d)
        for repeat in range(1 if self.INTERPRET else 20):  # on a GPU the last program differs from run to run
            out = choosing(x, w1_t, b1, w1_t2, b1_2, w2_t, b2, sync, k=k, threshold=threshold, **kw)
            p, idx, *rest = out
            sync = rest[-1]
            assert not np.any(np.asarray(sync)), "the counter is reset for the next launch"
            assert len(rest) == (2 if layernorm else 1) and idx.shape == (batch, min(k, n_heads))
            assert idx.dtype == jnp.int32 and np.array_equal(p, plain[0])
            if layernorm:
                assert np.array_equal(rest[0], plain[2])
            scores = jnp.asarray(np.asarray(plain[1], np.float64) @ np.asarray(w2_t, np.float64).T + np.asarray(b2))
            if threshold is None:
                expected = exactly_k(scores, k, "rank")[1]
            else:
                expected = threshold_k(scores, threshold, k, "rank")[1]
            assert np.array_equal(idx, expected), (np.asarray(idx), np.asarray(expected))
        if threshold is not None:  # the threshold drops some heads and keeps others
            assert 0 < np.sum(np.asarray(idx) < 0) < idx.size

    def test_choosing_breaks_ties_to_the_lower_head(self):
        """Equal scores (every head's scoring row zero, equal biases in pairs) rank as `exactly_k` ranks them."""
        d, r, n_heads, dtype = 128, 32, 8, jnp.float32
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, d)), dtype)
        w1_t, b1 = jnp.ones((r, d), dtype) / d, jnp.zeros(r, dtype)
        b2 = jnp.asarray([0.0, 1.0, 1.0, 0.5, 0.5, 2.0, 0.0, 1.0], jnp.float32)
        for k in (1, 3, 5, 7):
            _, idx, _ = choosing(
                x, w1_t, b1, w1_t, b1, jnp.zeros((n_heads, r), dtype), b2, new_sync(d), k=k, interpret=self.INTERPRET
            )
            assert np.array_equal(idx, exactly_k(b2[None], k, "rank")[1]), idx

    def test_layernorm_bad_input(self):
        x, w1_t, b1 = jnp.zeros((1, 64)), jnp.zeros((16, 64)), jnp.zeros(16)
        good, bad = jnp.ones(64), jnp.ones(80)
        for scale, bias in [(bad, good), (good, bad), (good, None), (None, good), (good[None], good)]:
            with pytest.raises(ValueError, match="LayerNorm needs scale and bias"):
                predictor_hidden(x, w1_t, b1, ln_scale=scale, ln_bias=bias, interpret=self.INTERPRET)

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
        w, b, sync = jnp.zeros((16, 64), jnp.float16), jnp.zeros(16, jnp.float16), new_sync(64)
        with pytest.raises(ValueError, match="the chooser needs"):
            choosing(x, w, b, w, b, jnp.zeros((4, 32)), jnp.zeros(4), sync, k=2, interpret=True)
        with pytest.raises(ValueError, match="k must be positive"):
            choosing(x, w, b, w, b, jnp.zeros((4, 16)), jnp.zeros(4), sync, k=0, interpret=True)
        with pytest.raises(ValueError, match="needs the second predictor"):
            chooser = HeadChooser(jnp.zeros((4, 16)), jnp.zeros(4), None, sync, 2)
            predictor_hidden(x, w, b, chooser=chooser, interpret=True)
        with pytest.raises(ValueError, match="floating-point w2_t"):
            choosing(x, w, b, w, b, jnp.zeros((4, 16), jnp.int8), jnp.zeros(4), sync, k=2, interpret=True)
        with pytest.raises(ValueError, match="threshold must be a scalar"):
            choosing(x, w, b, w, b, jnp.zeros((4, 16)), jnp.zeros(4), sync, k=2, threshold=jnp.zeros(2), interpret=True)
        with pytest.raises(ValueError, match="sync must be"):
            choosing(x, w, b, w, b, jnp.zeros((4, 16)), jnp.zeros(4), sync[:, None], k=2, interpret=True)


class TestPredictorHiddenInterpret(TestPredictorHidden):
    INTERPRET = True


@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("batch, d, r", [(1, 4096, 256), (4, 5120, 1024)])
def test_lowers_for_gpu(batch, d, r, layernorm):
    s = jax.ShapeDtypeStruct
    ln_args = (s((d,), jnp.float16), s((d,), jnp.float16)) if layernorm else ()

    def call(x, w1_t, b1, *ln):
        return predictor_hidden(x, w1_t, b1, interpret=False, **dict(zip(("ln_scale", "ln_bias"), ln)))

    text = lowered_text_for_cuda(
        jax.jit(call), s((batch, d), jnp.float16), s((r, d), jnp.float16), s((r,), jnp.float16), *ln_args
    )
    assert "predictor_hidden" in text

    def call_two(x, w1_t, b1, w2_t, b2, *ln):
        ln_kw = dict(zip(("ln_scale", "ln_bias"), ln))
        return predictor_hidden(x, w1_t, b1, w1_t_second=w2_t, b1_second=b2, interpret=False, **ln_kw)

    second = (s((64, d), jnp.float16), s((64,), jnp.float16))
    weights = (s((batch, d), jnp.float16), s((r, d), jnp.float16), s((r,), jnp.float16))
    assert "predictor_hidden" in lowered_text_for_cuda(jax.jit(call_two), *weights, *second, *ln_args)

    # opt-6.7b's 32 heads choosing 16, opt-13b's 40 choosing 20 with a threshold (the ranks' padding to powers of two)
    n_heads, k, threshold = (32, 16, None) if d == 4096 else (40, 20, 0.5)

    def call_choosing(x, w1_t, b1, w1_t2, b1_2, w2_t, b2, sync, *ln):
        ln_kw = dict(zip(("ln_scale", "ln_bias"), ln))
        return choosing(x, w1_t, b1, w1_t2, b1_2, w2_t, b2, sync, k=k, threshold=threshold, interpret=False, **ln_kw)

    chooser = (s((n_heads, 64), jnp.float16), s((n_heads,), jnp.float32), s((d // 16 + 1,), jnp.int32))
    assert "predictor_hidden" in lowered_text_for_cuda(jax.jit(call_choosing), *weights, *second, *chooser, *ln_args)
