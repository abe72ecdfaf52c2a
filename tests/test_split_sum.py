"""Kernels that finish their split sum themselves (kernels/split_sum.py): `head_out_proj_residual` and
`nonzero_fc2_residual` against float64 references and against the unfinished kernels plus the model's XLA steps;
the counters come back zero and serve the next launch; `head_out_proj` merging the decode attention's splits; both
lowered for CUDA. Compiled on a GPU (where the last program to arrive is a race, run many times), in the
interpreter on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CompiledKernelCases, lowered_text_for_cuda
from dejavu_jax.model import layer_norm
from kernels.decode_attention import decode_attention, decode_attention_unmerged, merge_splits
from kernels.head_sparse import head_out_proj, head_out_proj_residual
from kernels.masked_mlp import nonzero_fc2, nonzero_fc2_residual
from kernels.split_sum import MIN_BLOCK_D, new_sync, sync_slots

TOLERANCE = {jnp.float32: 1e-5, jnp.float16: 3e-3, jnp.bfloat16: 2e-2}


def f64(a):
    return np.asarray(a, np.float64)


def ulps_apart(out, ref, dtype, ulps: int = 2, floor: float = 1e-3):
    """out within `ulps` roundings of dtype of ref (the same arithmetic, another fp32 summation order); `floor`: of
    the largest |ref|, the least magnitude a rounding is counted at (a LayerNorm's statistics shift every value
    alike)."""
    eps = float(jnp.finfo(dtype).eps)
    out, ref = f64(out), f64(ref)
    return np.all(np.abs(out - ref) <= ulps * eps * (np.abs(ref) + floor * np.abs(ref).max()))


def out_proj_case(seed, batch, n_heads, hd, d, idx, dtype):
    rng = np.random.default_rng(seed)
    heads_out = jnp.asarray(rng.standard_normal((batch, len(idx), hd)), dtype)
    out_w = jnp.asarray(rng.standard_normal((n_heads, hd, d)) / (len(idx) * hd) ** 0.5, dtype)
    out_b = jnp.asarray(rng.standard_normal(d), dtype)
    residual = jnp.asarray(rng.standard_normal((batch, d)) * 2, dtype)
    scale = jnp.asarray(1 + 0.3 * rng.standard_normal(d), dtype)
    bias = jnp.asarray(0.3 * rng.standard_normal(d), dtype)
    return heads_out, out_w, out_b, jnp.asarray(idx, jnp.int32), residual, scale, bias


def layer_norm64(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * f64(scale) + f64(bias)


# (batch, H, hd, d, head list, dtype, knobs): several head groups and column blocks, a padding entry, one group,
# the narrowest column blocks, batch 3 (rows summed on the CUDA cores) and 20 (dots, rows padded to 32)
OUT_CASES = [
    (1, 6, 16, 256, [3, -1, 0, 5], jnp.float32, (("out_block_d", 32), ("out_groups", 3))),
    (1, 4, 32, 512, [2, 1], jnp.float16, None),
    (3, 4, 16, 128, [0, 1, 2, 3], jnp.bfloat16, (("out_block_d", MIN_BLOCK_D), ("out_groups", 1))),
    (20, 4, 16, 128, [3, 0, 2], jnp.float32, (("out_groups", 2),)),
]


class TestSplitSum(CompiledKernelCases):
    @pytest.mark.parametrize("case", OUT_CASES)
    @pytest.mark.parametrize("layernorm", [False, True])
    def test_out_proj_residual_matches_float64_and_the_unfinished_kernel(self, case, layernorm):
        batch, n_heads, hd, d, idx, dtype, knobs = case
        heads_out, out_w, out_b, head_idx, residual, scale, bias = out_proj_case(
            batch + d, batch, n_heads, hd, d, idx, dtype
        )
        ln = dict(ln_scale=scale, ln_bias=bias, ln_eps=1e-5) if layernorm else {}
        sync = new_sync(d)
        for repeat in range(1 if self.INTERPRET else 20):  # on a GPU the last program differs from run to run
            new, normed, sync = head_out_proj_residual(
                heads_out, out_w, out_b, head_idx, residual, sync, knobs=knobs, interpret=self.INTERPRET, **ln
            )
            assert not np.any(np.asarray(sync)), "every counter is reset for the next launch"
            # The unfinished kernel, then the model's residual add and LayerNorm in XLA: the same roundings.
            out = head_out_proj(heads_out, out_w, out_b, head_idx, knobs=knobs, interpret=self.INTERPRET)
            expected = (residual.astype(jnp.float32) + out.astype(jnp.float32)).astype(dtype)
            assert new.dtype == jnp.dtype(dtype) and ulps_apart(new, expected, dtype, floor=0.1)
            if layernorm:
                assert normed.dtype == jnp.dtype(dtype)
                assert ulps_apart(normed, layer_norm(new, scale, bias, 1e-5), dtype, ulps=4, floor=1.0)
            else:
                assert normed is None
        live = [i for i, h in enumerate(idx) if h >= 0]
        ref = f64(residual) + np.einsum("bhk,hkd->bd", f64(heads_out)[:, live], f64(out_w)[[idx[i] for i in live]])
        ref = ref + f64(out_b)
        assert np.abs(f64(new) - ref).max() <= TOLERANCE[dtype] * 4 * np.abs(ref).max()
        if layernorm:
            ref_ln = layer_norm64(f64(new), scale, bias, 1e-5)  # the LayerNorm of the rounded new residual
            assert np.abs(f64(normed) - ref_ln).max() <= TOLERANCE[dtype] * 4 * np.abs(ref_ln).max()

    @pytest.mark.parametrize(
        "batch, d, ffn, density, dtype, knobs",
        [
            (1, 256, 1024, 0.1, jnp.float32, (("fc2_segment", 64), ("fc2_block_d", 32))),
            (1, 128, 512, 0.0, jnp.float16, None),  # nothing fires: the residual plus the bias
            (3, 160, 256, 0.3, jnp.bfloat16, (("fc2_block_d", 32),)),
            (2, 128, 256, 1.0, jnp.float32, (("fc2_segment", 256),)),  # one segment
        ],
    )
    def test_fc2_residual_matches_float64_and_the_unfinished_kernel(self, batch, d, ffn, density, dtype, knobs):
        rng = np.random.default_rng(batch * 7 + d)
        fires = rng.random((batch, ffn)) < density
        h = jnp.asarray(np.where(fires, np.abs(rng.standard_normal((batch, ffn))), 0.0), dtype)
        fc2_w_t = jnp.asarray(rng.standard_normal((ffn, d)) / ffn**0.5, dtype)
        fc2_b = jnp.asarray(rng.standard_normal(d), dtype)
        residual = jnp.asarray(rng.standard_normal((batch, d)) * 2, dtype)
        sync = new_sync(d)
        for repeat in range(1 if self.INTERPRET else 20):
            new, sync = nonzero_fc2_residual(h, fc2_w_t, fc2_b, residual, sync, knobs=knobs, interpret=self.INTERPRET)
            assert not np.any(np.asarray(sync))
            out = nonzero_fc2(h, fc2_w_t, fc2_b, knobs=knobs, interpret=self.INTERPRET)
            expected = (residual.astype(jnp.float32) + out.astype(jnp.float32)).astype(dtype)
            assert new.dtype == jnp.dtype(dtype) and ulps_apart(new, expected, dtype, floor=0.1)
        ref = f64(residual) + f64(h) @ f64(fc2_w_t) + f64(fc2_b)
        assert np.abs(f64(new) - ref).max() <= TOLERANCE[dtype] * 4 * np.abs(ref).max()

    @pytest.mark.parametrize("split_s", [1, 3, 5])
    @pytest.mark.parametrize("finish", [False, True])
    def test_out_proj_merges_the_attention_splits(self, split_s, finish):
        """Handed the Pallas decode attention's unmerged splits, out_proj merges them as `merge_splits` does: the
        same output as out_proj after the merged attention (padding entries included: no weight rows read)."""
        rng = np.random.default_rng(split_s)
        batch, n_heads, hd, slots, d, dtype = 1, 4, 16, 80, 128, jnp.float16
        idx = jnp.asarray([2, -1, 0], jnp.int32)
        q = jnp.asarray(rng.standard_normal((batch, 3, hd)) / hd**0.5, dtype)
        keys = jnp.asarray(rng.standard_normal((batch, n_heads, slots, hd)), dtype)
        values = jnp.asarray(rng.standard_normal((batch, n_heads, slots, hd)), dtype)
        allowed = jnp.arange(slots)[None, :] < 61
        heads_out, out_w, out_b, _, residual, *_ = out_proj_case(split_s, batch, n_heads, hd, d, [2, -1, 0], dtype)
        attend = dict(split_s=split_s, block_s=16, interpret=self.INTERPRET)
        splits = decode_attention_unmerged(q, keys, values, allowed, idx, **attend)
        assert isinstance(splits, tuple) == (split_s > 1)
        merged = decode_attention(q, keys, values, allowed, idx, **attend)
        if split_s > 1:
            assert ulps_apart(merge_splits(*splits, dtype), merged, dtype, floor=0.1)
        knobs = (("out_block_d", 32),)
        if finish:
            sync = new_sync(d)
            out, _, sync = head_out_proj_residual(
                splits, out_w, out_b, idx, residual, sync, knobs=knobs, interpret=self.INTERPRET
            )
            ref, _, sync = head_out_proj_residual(
                merged, out_w, out_b, idx, residual, sync, knobs=knobs, interpret=self.INTERPRET
            )
        else:
            out = head_out_proj(splits, out_w, out_b, idx, knobs=knobs, interpret=self.INTERPRET)
            ref = head_out_proj(merged, out_w, out_b, idx, knobs=knobs, interpret=self.INTERPRET)
        assert out.dtype == jnp.dtype(dtype) and ulps_apart(out, ref, dtype, floor=0.1)

    def test_one_buffer_serves_launches_in_turn(self):
        """The counters handed from launch to launch (as a decode step threads them through its layers) finish
        every launch: out_proj, then fc2 on its output, twice."""
        d, dtype = 256, jnp.float32
        heads_out, out_w, out_b, head_idx, residual, scale, bias = out_proj_case(0, 1, 4, 16, d, [1, 3], dtype)
        rng = np.random.default_rng(1)
        h = jnp.asarray(np.maximum(rng.standard_normal((1, 512)), 0), dtype)
        fc2_w_t, fc2_b = (
            jnp.asarray(rng.standard_normal((512, d)) / 30, dtype),
            jnp.asarray(rng.standard_normal(d), dtype),
        )
        knobs = (("out_groups", 2), ("out_block_d", 32))

        @jax.jit
        def two_layers(residual, sync):
            for _ in range(2):
                residual, _, sync = head_out_proj_residual(
                    heads_out, out_w, out_b, head_idx, residual, sync, knobs=knobs, interpret=self.INTERPRET
                )
                residual, sync = nonzero_fc2_residual(h, fc2_w_t, fc2_b, residual, sync, interpret=self.INTERPRET)
            return residual, sync

        out, sync = two_layers(residual, new_sync(d))
        expected = residual
        for _ in range(2):
            expected = expected + head_out_proj(
                heads_out, out_w, out_b, head_idx, knobs=knobs, interpret=self.INTERPRET
            )
            expected = expected + nonzero_fc2(h, fc2_w_t, fc2_b, interpret=self.INTERPRET)
        assert ulps_apart(out, expected, dtype, ulps=8, floor=0.1) and not np.any(np.asarray(sync))


class TestSplitSumInterpret(TestSplitSum):
    INTERPRET = True


# opt-6.7b's widths at batch 1 (CUDA-core sums) and 8; with the attention's splits and the LayerNorm at batch 1.
@pytest.mark.parametrize("batch", [1, 8])
def test_finishing_kernels_lower_for_gpu(batch):
    """Pallas -> Triton from any host: the atomics, barrier and volatile loads are accepted by the lowering."""
    s = jax.ShapeDtypeStruct
    H, hd, d, ffn, h, f16 = 32, 128, 4096, 16384, 16, jnp.float16
    sync, row, vector = s((sync_slots(d),), jnp.int32), s((batch, d), f16), s((d,), f16)
    heads_out = s((batch, h, hd), f16)
    if batch == 1:  # the splits (o, m, l) of the unmerged decode attention
        heads_out = (s((batch, h, 4, hd), jnp.float32), s((batch, h, 4), jnp.float32), s((batch, h, 4), jnp.float32))
    text = lowered_text_for_cuda(
        jax.jit(
            lambda ho, w, b, idx, res, sync, ln_s, ln_b: head_out_proj_residual(
                ho, w, b, idx, res, sync, ln_scale=ln_s, ln_bias=ln_b, ln_eps=1e-5, interpret=False
            )
        ),
        heads_out,
        s((H, hd, d), f16),
        vector,
        s((h,), jnp.int32),
        row,
        sync,
        vector,
        vector,
    )
    assert "head_out_proj" in text
    text = lowered_text_for_cuda(
        jax.jit(lambda *a: nonzero_fc2_residual(*a, interpret=False)),
        s((batch, ffn), f16),
        s((ffn, d), f16),
        vector,
        row,
        sync,
    )
    assert "nonzero_fc2" in text


def test_sync_buffers_are_checked():
    d = 128
    assert sync_slots(d) == d // MIN_BLOCK_D + 1 and new_sync(d).shape == (sync_slots(d),)
    heads_out, out_w, out_b, head_idx, residual, *_ = out_proj_case(0, 1, 4, 16, d, [1], jnp.float32)
    with pytest.raises(ValueError, match="sync must be int32"):
        head_out_proj_residual(heads_out, out_w, out_b, head_idx, residual, new_sync(d + 16), interpret=True)
    with pytest.raises(ValueError, match="column blocks of at least"):
        head_out_proj_residual(
            heads_out, out_w, out_b, head_idx, residual, new_sync(d), knobs=(("out_block_d", 8),), interpret=True
        )
    with pytest.raises(ValueError, match="residual must be"):
        head_out_proj_residual(heads_out, out_w, out_b, head_idx, residual[:, :64], new_sync(d), interpret=True)
    h = jnp.zeros((1, 256), jnp.float32)
    with pytest.raises(ValueError, match="residual must be"):
        nonzero_fc2_residual(h, jnp.zeros((256, d)), jnp.zeros(d), jnp.zeros((2, d)), new_sync(d), interpret=True)
