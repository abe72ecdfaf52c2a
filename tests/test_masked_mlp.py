"""Row-masked MLP kernels against float64 references: row masks (unsorted, none, all), threshold selection from a
predictor (batch union; in the fc1 kernel or as a row mask of its own), nonzero-only fc2, block sizes; compiled on a
GPU, in the interpreter on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CompiledKernelCases, lowered_text_for_cuda
from dejavu_jax.sparsity import int8_rows
from kernels.masked_mlp import (
    FC1_STEP_ELEMENTS,
    MaskedMLPPlan,
    masked_fc1,
    nonzero_fc2,
    threshold_fc1,
    threshold_mask,
    threshold_rows_reference,
)

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}


def data(seed, batch, d, ffn, rank, dtype, density=0.3):
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.standard_normal((batch, d)),
        "w1": rng.standard_normal((ffn, d)) / d**0.5,
        "b1": rng.standard_normal(ffn) * 0.3,
        "w2t": rng.standard_normal((ffn, d)) / ffn**0.5,
        "b2": rng.standard_normal(d),
        "p": rng.standard_normal((batch, rank)),
        "pw": rng.standard_normal((ffn, rank)) / rank**0.5,
        "pb": rng.standard_normal(ffn),
    }
    cast = {k: jnp.asarray(v, dtype) for k, v in arrays.items()}
    cast["pb"] = jnp.asarray(arrays["pb"], jnp.float32)
    # The float64 reference sees exactly the inputs the kernel sees.
    ref = {k: np.asarray(v, np.float64) for k, v in cast.items()}
    mask = rng.permutation(ffn) < int(density * ffn)  # unsorted, arbitrary rows
    return cast, ref, mask


def ref_fc1(ref, chosen):
    return np.where(chosen[None, :], np.maximum(ref["x"] @ ref["w1"].T + ref["b1"], 0.0), 0.0)


def row_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return (np.linalg.norm(out - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)).max()


class TestMaskedMLP(CompiledKernelCases):
    @pytest.mark.parametrize(
        "batch, d, ffn, density, knobs",
        [
            (1, 384, 1536, 0.1, None),
            (1, 128, 256, 0.0, None),
            (1, 128, 256, 1.0, None),
            (3, 160, 96, 0.4, None),
            (2, 256, 512, 0.2, (("fc1_segment", 32), ("fc1_block_k", 8), ("fc1_block_d", 64))),
            (1, 80 * 4, 640, 0.3, (("fc1_segment", 128), ("fc1_block_k", 32))),
            (1, 160, 256, 0.3, (("fc1_block_d", 32), ("sum_once", 0))),  # five column blocks, reduced one by one
            (2, 160, 256, 0.3, (("fc1_block_d", 32),)),  # five column blocks, added up and reduced once
        ],
    )
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
    def test_masked_fc1_and_nonzero_fc2(self, batch, d, ffn, density, knobs, dtype):
        cast, ref, mask = data(batch * 7 + d, batch, d, ffn, 16, dtype, density)
        h = masked_fc1(
            cast["x"], cast["w1"], cast["b1"], jnp.asarray(mask, jnp.int32), knobs=knobs, interpret=self.INTERPRET
        )
        h_ref = ref_fc1(ref, mask)
        assert np.all(np.asarray(h)[:, ~mask] == 0)  # unchosen rows are exact zeros
        if density > 0:
            assert row_err(h, h_ref) <= TOLERANCE[dtype]
        out = nonzero_fc2(h, cast["w2t"], cast["b2"], knobs=knobs, interpret=self.INTERPRET)
        out_ref = np.asarray(h, np.float64) @ ref["w2t"] + ref["b2"]
        assert row_err(out, out_ref) <= TOLERANCE[dtype]

    @pytest.mark.parametrize(
        "batch, threshold, knobs",
        [
            (1, 0.5, None),
            (4, 1.0, None),
            (1, -np.inf, None),
            (2, np.inf, None),
            # scores over r = 32 in blocks of 8 (segment 1024 / 8192 elements), fc1 over d in blocks of 32
            (1, 0.5, (("fc1_segment", 1024), ("fc1_block_d", 32))),
            (2, 0.5, (("fc1_segment", 1024), ("fc1_block_d", 32), ("sum_once", 0))),
        ],
    )
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_threshold_fc1_chooses_the_batch_union(self, batch, threshold, knobs, dtype):
        d, ffn, rank = 128, 2048, 32
        cast, ref, _ = data(batch + 11, batch, d, ffn, rank, dtype)
        h = threshold_fc1(
            cast["x"],
            cast["w1"],
            cast["b1"],
            cast["p"],
            cast["pw"],
            cast["pb"],
            threshold,
            knobs=knobs,
            interpret=self.INTERPRET,
        )
        scores = ref["p"] @ ref["pw"].T + ref["pb"]
        chosen = (scores >= threshold).any(axis=0)
        # Scores within rounding of the threshold may fall either way: compare only the clear rows.
        clear = np.abs(scores.max(axis=0) - threshold) > 1e-2 if np.isfinite(threshold) else np.ones(ffn, bool)
        h = np.asarray(h, np.float64)
        assert np.all(h[:, clear & ~chosen] == 0)
        expected = ref_fc1(ref, chosen)
        if chosen.any():
            assert row_err(h[:, clear], expected[:, clear]) <= TOLERANCE[dtype]
        else:
            assert not h.any()

    @pytest.mark.parametrize("batch, threshold", [(1, 0.5), (3, 1.0), (1, -np.inf)])
    def test_threshold_fc1_with_int8_scores(self, batch, threshold):
        """int8 codes with a scale per row: the rows whose scaled fp32 dot reaches the threshold (float64
        reference over the same codes and scales), the same fc1 outputs on them."""
        d, ffn, rank = 128, 384, 32
        cast, ref, _ = data(batch + 23, batch, d, ffn, rank, jnp.float16)
        codes, scale = int8_rows(cast["pw"])
        h = threshold_fc1(
            cast["x"],
            cast["w1"],
            cast["b1"],
            cast["p"],
            codes,
            cast["pb"],
            threshold,
            w2_scale=scale,
            interpret=self.INTERPRET,
        )
        scores = (ref["p"] @ np.asarray(codes, np.float64).T) * np.asarray(scale, np.float64) + ref["pb"]
        chosen = (scores >= threshold).any(axis=0)
        clear = np.abs(scores.max(axis=0) - threshold) > 1e-3 if np.isfinite(threshold) else np.ones(ffn, bool)
        assert chosen.any() and chosen.all() == (threshold == -np.inf)  # both kinds of row occur unless -inf
        h = np.asarray(h, np.float64)
        assert np.all(h[:, clear & ~chosen] == 0)
        assert row_err(h[:, clear], ref_fc1(ref, chosen)[:, clear]) <= TOLERANCE[jnp.float16]
        ref_rows = threshold_rows_reference(cast["p"], codes, cast["pb"], threshold, w2_scale=scale)
        assert np.array_equal(np.asarray(ref_rows)[clear], chosen[clear])

    @pytest.mark.parametrize(
        "batch, threshold, dtype, int8",
        [
            (1, 0.5, jnp.float32, False),
            (3, 1.0, jnp.bfloat16, False),
            (2, 0.5, jnp.float16, True),
            (1, -np.inf, jnp.float32, False),
            (2, np.inf, jnp.float32, False),
        ],
    )
    def test_threshold_mask_marks_the_rows_threshold_fc1_chooses(self, batch, threshold, dtype, int8):
        """The mask kernel's rows against a float64 reference (clear rows), and masked_fc1 over that mask gives
        exactly what threshold_fc1 gives (the same scoring arithmetic), float or int8 scoring rows."""
        d, ffn, rank = 128, 384, 32
        cast, ref, _ = data(batch + 31, batch, d, ffn, rank, dtype)
        codes, scale = int8_rows(cast["pw"]) if int8 else (cast["pw"], None)
        mask = threshold_mask(cast["p"], codes, cast["pb"], threshold, w2_scale=scale, interpret=self.INTERPRET)
        assert mask.shape == (ffn,) and mask.dtype == jnp.int32
        mask = np.asarray(mask)
        w = np.asarray(codes, np.float64) * (1.0 if scale is None else np.asarray(scale, np.float64)[:, None])
        scores = ref["p"] @ w.T + ref["pb"]
        chosen = (scores >= threshold).any(axis=0)
        clear = np.abs(scores.max(axis=0) - threshold) > 1e-2 if np.isfinite(threshold) else np.ones(ffn, bool)
        assert set(np.unique(mask)) <= {0, 1}
        assert np.array_equal(mask[clear] == 1, chosen[clear])
        if np.isfinite(threshold):
            assert 0 < chosen.sum() < ffn  # both kinds of row occur
        args = (cast["x"], cast["w1"], cast["b1"])
        fused = threshold_fc1(*args, cast["p"], codes, cast["pb"], threshold, w2_scale=scale, interpret=self.INTERPRET)
        apart = masked_fc1(*args, jnp.asarray(mask), interpret=self.INTERPRET)
        np.testing.assert_array_equal(np.asarray(apart), np.asarray(fused))

    def test_threshold_mask_refuses_bad_shapes(self):
        p, w2_t, b2 = jnp.zeros((1, 32)), jnp.zeros((384, 32)), jnp.zeros(384)
        for bad, message in (
            (dict(p=jnp.zeros((1, 16))), "need w2_t"),
            (dict(w2_t=jnp.zeros((384, 24)), p=jnp.zeros((1, 24))), "power of two"),
            (dict(b2=jnp.zeros(100)), "b2 must be"),
            (dict(p=jnp.zeros(32)), "p must be"),
            (dict(w2_scale=jnp.ones(384)), "int8 codes"),
        ):
            kwargs = {"p": p, "w2_t": w2_t, "b2": b2, **bad}
            with pytest.raises(ValueError, match=message):
                threshold_mask(threshold=0.0, interpret=self.INTERPRET, **kwargs)


class TestMaskedMLPInterpret(TestMaskedMLP):
    INTERPRET = True


def test_int8_rows_round_each_row_within_half_its_scale():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((50, 24)) * rng.uniform(0.01, 10, (50, 1))
    w[7] = 0.0  # an all-zero row keeps zero codes
    codes, scale = int8_rows(jnp.asarray(w, jnp.float32))
    assert codes.dtype == jnp.int8 and scale.shape == (50,)
    back = np.asarray(codes, np.float64) * np.asarray(scale, np.float64)[:, None]
    assert np.all(np.abs(back - w) <= np.asarray(scale, np.float64)[:, None] / 2 + 1e-6 * np.abs(w))
    assert np.abs(np.asarray(codes)).max() == 127 and not np.asarray(codes)[7].any()


@pytest.mark.parametrize("batch, d, ffn, rank", [(1, 4096, 16384, 256), (4, 5120, 20480, 1024)])
def test_lowers_for_gpu(batch, d, ffn, rank):
    s = jax.ShapeDtypeStruct
    f16 = jnp.float16
    fc1_args = (s((batch, d), f16), s((ffn, d), f16), s((ffn,), f16), s((batch, rank), f16))
    text = lowered_text_for_cuda(
        jax.jit(lambda *a: threshold_fc1(*a, interpret=False)),
        *fc1_args,
        s((ffn, rank), f16),
        s((ffn,), jnp.float32),
        s((), jnp.float32),
    )
    assert "select_fc1_threshold" in text
    text = lowered_text_for_cuda(  # int8 scoring rows with their scales
        jax.jit(lambda *a: threshold_fc1(*a[:-1], w2_scale=a[-1], interpret=False)),
        *fc1_args,
        s((ffn, rank), jnp.int8),
        s((ffn,), jnp.float32),
        s((), jnp.float32),
        s((ffn,), jnp.float32),
    )
    assert "select_fc1_threshold" in text
    text = lowered_text_for_cuda(
        jax.jit(lambda *a: nonzero_fc2(*a, interpret=False)), s((batch, ffn), f16), s((ffn, d), f16), s((d,), f16)
    )
    assert "nonzero_fc2" in text


@pytest.mark.parametrize(
    "call, args, match",
    [
        ("fc1", dict(x=jnp.zeros((17, 32))), "batch must be in"),
        ("fc1", dict(row_mask=jnp.zeros((8,), jnp.int32)), "row_mask must be"),
        ("fc1", dict(w=jnp.zeros((64, 16))), "must be \\[ffn, d\\]"),
        ("thr", dict(p=jnp.zeros((1, 24))), "need w2_t"),
        ("thr", dict(pw=jnp.zeros((64, 24)), p=jnp.zeros((1, 24))), "power of two"),
        ("fc2", dict(b2=jnp.zeros((3,))), "fc2_b must be"),
        ("thr", dict(scale=jnp.ones((64,))), "goes with int8 codes"),
        ("thr", dict(pw=jnp.zeros((64, 16), jnp.int8), scale=jnp.ones((8,))), "w2_scale must be"),
        ("thr", dict(pw=jnp.zeros((64, 16), jnp.int8)), "need their w2_scale"),
    ],
)
def test_bad_inputs_raise(call, args, match):
    a = dict(
        x=jnp.zeros((1, 32)),
        w=jnp.zeros((64, 32)),
        b=jnp.zeros((64,)),
        row_mask=jnp.zeros((64,), jnp.int32),
        p=jnp.zeros((1, 16)),
        pw=jnp.zeros((64, 16)),
        pb=jnp.zeros((64,)),
        b2=jnp.zeros((32,)),
    )
    a.update(args)
    with pytest.raises(ValueError, match=match):
        if call == "fc1":
            masked_fc1(a["x"], a["w"], a["b"], a["row_mask"])
        elif call == "thr":
            threshold_fc1(a["x"], a["w"], a["b"], a["p"], a["pw"], a["pb"], 0.0, w2_scale=a.get("scale"))
        else:
            nonzero_fc2(jnp.zeros((1, 64)), a["w"], a["b2"])


def test_plan_rejects_bad_blocks():
    with pytest.raises(ValueError, match="power of two"):
        MaskedMLPPlan(batch=1, d=64, ffn=64, fc1_segment=48)
    with pytest.raises(ValueError, match="power of two"):
        MaskedMLPPlan(batch=1, d=64, ffn=64, fc1_block_k=12)
    with pytest.raises(ValueError, match="sum_once must be 0 or 1"):
        MaskedMLPPlan(batch=1, d=64, ffn=64, sum_once=2)


@pytest.mark.parametrize("d", [256, 768, 2048, 4096, 5120, 7168, 9216, 12288, 1 << 17])
def test_default_fc1_step_fits_the_element_budget(d):
    """Unset, fc1_block_k is the largest power of two <= 16 whose step tile [block_k, d] fits FC1_STEP_ELEMENTS
    (at least one row); set, it is used as given."""
    bk = MaskedMLPPlan(batch=1, d=d, ffn=4 * d).bk1
    assert bk & (bk - 1) == 0 and 1 <= bk <= 16
    assert bk == 1 or bk * d <= FC1_STEP_ELEMENTS
    assert bk == 16 or 2 * bk * d > FC1_STEP_ELEMENTS
    assert MaskedMLPPlan(batch=1, d=d, ffn=4 * d, fc1_block_k=32).bk1 == 32
