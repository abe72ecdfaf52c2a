"""The head-sparse q/k/v and out projection kernels against float64 references (gathered heads), and against the
dense projections with every head chosen; compiled on a GPU, in the interpreter on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CompiledKernelCases, lowered_text_for_cuda
from kernels.head_sparse import (
    MAX_BATCH,
    head_out_proj,
    head_out_proj_reference,
    head_qkv,
    head_qkv_into_cache,
    head_qkv_pairs,
    head_qkv_pairs_reference,
    head_qkv_reference,
    head_window_into_cache,
)

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}
SMALL_BLOCKS = (("qkv_block_rows", 32), ("qkv_block_d", 32), ("out_block_rows", 16), ("out_block_d", 32))

# head_qkv's column blocks in steps of 4 of the 10 (-> 5 steps of 2), and all 10 in one step
STEPPED = SMALL_BLOCKS + (("qkv_step_blocks", 4), ("qkv_stages", 3), ("out_stages", 2))
ALL_BLOCKS_AT_ONCE = SMALL_BLOCKS + (("qkv_step_blocks", 0),)

# (batch, H, hd, d, head_idx, dtype, knobs): unsorted subsets, one head, duplicates, every head in order; hd 80 (row
# blocks of 16), 64 and 128; batch 1 and 3 (multiply and sum) and 20 (padded to 32 rows, dots).
CASES = [
    (1, 4, 80, 160, [2, 0], jnp.float32, None),
    (3, 6, 64, 128, [5, 1, 5], jnp.float16, None),
    (1, 4, 128, 256, [3], jnp.bfloat16, None),
    (3, 3, 80, 320, [0, 1, 2], jnp.float32, SMALL_BLOCKS),
    (20, 4, 80, 128, [3, 0, 2], jnp.float32, None),
    (20, 8, 64, 192, [7, 2, 2, 4], jnp.bfloat16, None),
    (20, 4, 128, 128, [0, 1, 2, 3], jnp.float16, None),
    (2, 3, 80, 320, [2, 0], jnp.float16, STEPPED),
    (1, 3, 64, 320, [1], jnp.float32, ALL_BLOCKS_AT_ONCE),
    (1, 3, 80, 320, [2, 0], jnp.float16, STEPPED),  # batch 1: products carried as a tile over 5 steps
    (1, 3, 80, 320, [2, 0], jnp.float16, STEPPED + (("sum_once", 0),)),  # the same, reduced block by block
]
PARTS = [(0, 1, 2), (1, 2), (0,), (0, 1, 2), (1, 2), (0,), (0, 1, 2), (0, 1, 2), (1, 2), (0, 1, 2), (0, 2)]


def assert_same_sums(out, other):
    """Two kernels' results from the same per-row arithmetic: equal to a few roundings of their dtype. Not bit for bit: at
    batch 1 the products are summed elementwise over d, which a compiler may contract into fused multiply-adds
    differently in two programs (seen in the CPU interpreter: 1 ulp)."""
    eps = float(jnp.finfo(out.dtype).eps)  # one rounding of the output dtype
    out, other = np.asarray(out, np.float64), np.asarray(other, np.float64)
    assert np.all(np.abs(out - other) <= 4 * eps * (np.abs(other) + np.abs(other).max()))


def test_qkv_plan_steps_divide_the_column_blocks():
    """One 512-column block a step by default; 0 = all of them in one step; a count that does not divide the
    blocks falls to a divisor."""
    from kernels.head_sparse import HeadSparsePlan

    assert HeadSparsePlan(1, 4096, 128, 16).qkv_blocks_per_step == 1
    plan = HeadSparsePlan(1, 5120, 128, 16, qkv_block_d=2048, qkv_step_blocks=0)
    assert plan.bd_qkv == 1024 and plan.qkv_blocks_per_step == 5
    assert HeadSparsePlan(1, 5120, 128, 16, qkv_block_d=1024, qkv_step_blocks=4).qkv_blocks_per_step == 1
    assert HeadSparsePlan(1, 4096, 128, 16, qkv_step_blocks=6).qkv_blocks_per_step == 4
    with pytest.raises(ValueError, match="qkv_stages must be a positive int"):
        HeadSparsePlan(1, 4096, 128, 16, qkv_stages=0)
    with pytest.raises(ValueError, match="sum_once must be 0 or 1"):
        HeadSparsePlan(1, 4096, 128, 16, sum_once=3)
    with pytest.raises(ValueError, match="qkv_step_blocks must be a non-negative int"):
        HeadSparsePlan(1, 4096, 128, 16, qkv_step_blocks=-1)


def row_err(out, ref):
    """Largest error of an output vector (last axis) relative to that vector's norm."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return (np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max()


def random_case(batch, n_heads, hd, d, h, dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, d)), dtype)
    qkv_w = jnp.asarray(rng.standard_normal((3, n_heads, hd, d)) / d**0.5, dtype)
    qkv_b = jnp.asarray(rng.standard_normal((3, n_heads, hd)), dtype)
    heads_out = jnp.asarray(rng.standard_normal((batch, h, hd)), dtype)
    out_w = jnp.asarray(rng.standard_normal((n_heads, hd, d)) / (h * hd) ** 0.5, dtype)
    out_b = jnp.asarray(rng.standard_normal(d), dtype)
    return x, qkv_w, qkv_b, heads_out, out_w, out_b


def f64(*arrays):
    return tuple(np.asarray(a, np.float64) for a in arrays)


class TestHeadSparse(CompiledKernelCases):
    @pytest.mark.parametrize("case, parts", list(zip(CASES, PARTS)))
    def test_qkv_matches_float64(self, case, parts):
        batch, n_heads, hd, d, idx, dtype, knobs = case
        x, qkv_w, qkv_b, *_ = random_case(batch, n_heads, hd, d, len(idx), dtype, seed=batch * 100 + d + hd)
        head_idx = jnp.asarray(idx, jnp.int32)
        out = head_qkv(x, qkv_w, qkv_b, head_idx, parts=parts, knobs=knobs, interpret=self.INTERPRET)
        assert out.shape == (len(parts), batch, len(idx), hd) and out.dtype == jnp.dtype(dtype)
        xs, w, b = f64(x, qkv_w, qkv_b)
        zs = list(parts)
        ref = np.einsum("bd,zhkd->zbhk", xs, w[zs][:, idx]) + b[zs][:, idx][:, None]
        assert row_err(out, ref) <= TOLERANCE[dtype]
        twin = head_qkv_reference(x, qkv_w, qkv_b, head_idx, parts=parts)
        assert row_err(out, twin) <= TOLERANCE[dtype]
        if idx == list(range(n_heads)):  # every head in order: the model's dense projection
            dense = jnp.einsum("bd,zhkd->zbhk", x, qkv_w, preferred_element_type=jnp.float32)
            dense = (dense + qkv_b[:, None].astype(jnp.float32)).astype(dtype)[jnp.asarray(zs)]
            assert row_err(out, dense) <= TOLERANCE[dtype]

    @pytest.mark.parametrize("case", CASES)
    def test_qkv_pairs_match_float64(self, case):
        """Mixed (part, head) lists, as a decode step asks for them: K and V of some heads, Q of others, repeats."""
        batch, n_heads, hd, d, idx, dtype, knobs = case
        x, qkv_w, qkv_b, *_ = random_case(batch, n_heads, hd, d, len(idx), dtype, seed=batch * 7 + d + hd)
        heads = idx + idx + [idx[-1]]
        parts = [1] * len(idx) + [2] * len(idx) + [0]
        part_idx, head_idx = jnp.asarray(parts, jnp.int32), jnp.asarray(heads, jnp.int32)
        out = head_qkv_pairs(x, qkv_w, qkv_b, part_idx, head_idx, knobs=knobs, interpret=self.INTERPRET)
        assert out.shape == (batch, len(heads), hd) and out.dtype == jnp.dtype(dtype)
        xs, w, b = f64(x, qkv_w, qkv_b)
        ref = np.einsum("bd,jkd->bjk", xs, w[parts, heads]) + b[parts, heads][None]
        assert row_err(out, ref) <= TOLERANCE[dtype]
        assert row_err(out, head_qkv_pairs_reference(x, qkv_w, qkv_b, part_idx, head_idx)) <= TOLERANCE[dtype]
        # The same kernel as head_qkv: an entry equals head_qkv's for the same part and head.
        by_part = head_qkv(x, qkv_w, qkv_b, jnp.asarray(idx, jnp.int32), knobs=knobs, interpret=self.INTERPRET)
        assert_same_sums(out[:, : len(idx)], by_part[1])
        assert_same_sums(out[:, -1], by_part[0, :, -1])

    @pytest.mark.parametrize("case", [c for c in CASES if c[0] < 16])
    def test_qkv_into_cache_writes_every_heads_kv_at_the_cursor(self, case):
        """K and V of every head land in the cache at the cursor slot (every other slot untouched) and Q of the
        listed heads comes back, times q_scale: what `head_qkv_pairs` gives for the same entries (`assert_same_sums`;
        a scale of 0.5 rounds like the unscaled sums)."""
        batch, n_heads, hd, d, idx, dtype, knobs = case
        x, qkv_w, qkv_b, *_ = random_case(batch, n_heads, hd, d, len(idx), dtype, seed=batch * 5 + d + hd)
        rng = np.random.default_rng(d)
        keys, values = (jnp.asarray(rng.standard_normal((batch, n_heads, 6, hd)), dtype) for _ in range(2))
        head_idx = jnp.asarray(idx, jnp.int32)
        q, new_keys, new_values = head_qkv_into_cache(
            x, qkv_w, qkv_b, head_idx, keys, values, jnp.int32(4), knobs=knobs, interpret=self.INTERPRET, q_scale=0.5
        )
        every = list(range(n_heads))
        part_idx = jnp.asarray([1] * n_heads + [2] * n_heads + [0] * len(idx), jnp.int32)
        pairs = head_qkv_pairs(
            x,
            qkv_w,
            qkv_b,
            part_idx,
            jnp.asarray(every + every + idx, jnp.int32),
            knobs=knobs,
            interpret=self.INTERPRET,
        )
        assert_same_sums(np.asarray(q), np.asarray(pairs[:, 2 * n_heads :]) * 0.5)
        assert_same_sums(np.asarray(new_keys[:, :, 4]), np.asarray(pairs[:, :n_heads]))
        assert_same_sums(np.asarray(new_values[:, :, 4]), np.asarray(pairs[:, n_heads : 2 * n_heads]))
        others = np.arange(6) != 4
        np.testing.assert_array_equal(np.asarray(new_keys)[:, :, others], np.asarray(keys)[:, :, others])
        np.testing.assert_array_equal(np.asarray(new_values)[:, :, others], np.asarray(values)[:, :, others])
        xs, w, b = f64(x, qkv_w, qkv_b)
        ref_q = np.einsum("bd,jkd->bjk", xs, w[0, idx]) + b[0, idx][None]
        assert row_err(q, ref_q * 0.5) <= TOLERANCE[dtype]

    def test_qkv_into_cache_skips_padding_q_entries(self):
        """A negative Q entry is padding: zeros come back for it, the other entries and every head's K/V as without
        it."""
        x, qkv_w, qkv_b, *_ = random_case(2, 4, 64, 128, 3, jnp.float32, seed=17)
        keys = values = jnp.zeros((2, 4, 6, 64), jnp.float32)
        run = functools.partial(head_qkv_into_cache, x, qkv_w, qkv_b, keys=keys, values=values, cursor=jnp.int32(2))
        q, k, v = run(jnp.asarray([-1, 3, -1], jnp.int32), interpret=self.INTERPRET)
        q_alone, k_alone, v_alone = run(jnp.asarray([3], jnp.int32), interpret=self.INTERPRET)
        np.testing.assert_array_equal(np.asarray(q[:, [0, 2]]), 0)
        np.testing.assert_array_equal(np.asarray(q[:, 1]), np.asarray(q_alone[:, 0]))
        np.testing.assert_array_equal(np.asarray(k), np.asarray(k_alone))
        np.testing.assert_array_equal(np.asarray(v), np.asarray(v_alone))

    @pytest.mark.parametrize("case", [c for c in CASES if c[0] < 16])
    def test_qkv_kernels_apply_the_layernorm_of_their_input(self, case):
        """With ln_scale / ln_bias, x is the LayerNorm's input: both q/k/v kernels normalise it (one pass, fp32
        statistics, rounded to x's dtype), against float64; the cache-writing kernel like the other (`assert_same_sums`)."""
        batch, n_heads, hd, d, idx, dtype, knobs = case
        _, qkv_w, qkv_b, *_ = random_case(batch, n_heads, hd, d, len(idx), dtype, seed=batch * 3 + d + hd)
        rng = np.random.default_rng(hd + d)
        x = jnp.asarray(rng.standard_normal((batch, d)) * 3 + 1, dtype)
        scale, bias = (jnp.asarray(rng.standard_normal(d) * s + m, dtype) for s, m in ((0.2, 1.0), (0.3, 0.0)))
        ln = dict(ln_scale=scale, ln_bias=bias, ln_eps=1e-5)
        every = list(range(n_heads))
        parts, heads = [1] * n_heads + [2] * n_heads + [0] * len(idx), every + every + idx
        part_idx, head_idx = jnp.asarray(parts, jnp.int32), jnp.asarray(heads, jnp.int32)
        out = head_qkv_pairs(x, qkv_w, qkv_b, part_idx, head_idx, knobs=knobs, interpret=self.INTERPRET, **ln)
        x64 = np.asarray(x, np.float64)
        normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
        normed = normed * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
        xs, w, b = f64(jnp.asarray(normed, dtype), qkv_w, qkv_b)
        ref = np.einsum("bd,jkd->bjk", xs, w[parts, heads]) + b[parts, heads][None]
        assert row_err(out, ref) <= TOLERANCE[dtype]
        keys = values = jnp.zeros((batch, n_heads, 3, hd), dtype)
        q, new_keys, new_values = head_qkv_into_cache(
            x,
            qkv_w,
            qkv_b,
            jnp.asarray(idx, jnp.int32),
            keys,
            values,
            jnp.int32(1),
            knobs=knobs,
            interpret=self.INTERPRET,
            **ln,
        )
        assert_same_sums(np.asarray(q), np.asarray(out[:, 2 * n_heads :]))
        assert_same_sums(np.asarray(new_keys[:, :, 1]), np.asarray(out[:, :n_heads]))
        assert_same_sums(np.asarray(new_values[:, :, 1]), np.asarray(out[:, n_heads : 2 * n_heads]))

    @pytest.mark.parametrize("batch", [1, 20])
    def test_out_proj_skips_padding_entries(self, batch):
        """A negative head_idx entry is padding: its heads_out row (nonzero here) adds nothing, as if it were not
        listed (the per-row path and the dots)."""
        idx = [-1, 2, -1, 0]
        *_, heads_out, out_w, out_b = random_case(batch, 4, 64, 128, len(idx), jnp.float32, seed=batch + 7)
        out = head_out_proj(heads_out, out_w, out_b, jnp.asarray(idx, jnp.int32), interpret=self.INTERPRET)
        h, w, b = f64(heads_out, out_w, out_b)
        ref = np.einsum("bhk,hkd->bd", h[:, [1, 3]], w[[2, 0]]) + b
        assert row_err(out, ref) <= TOLERANCE[jnp.float32]
        twin = head_out_proj_reference(heads_out, out_w, out_b, jnp.asarray(idx, jnp.int32))
        assert row_err(out, twin) <= TOLERANCE[jnp.float32]

    @pytest.mark.parametrize("case", CASES)
    def test_out_proj_matches_float64(self, case):
        batch, n_heads, hd, d, idx, dtype, knobs = case
        *_, heads_out, out_w, out_b = random_case(batch, n_heads, hd, d, len(idx), dtype, seed=batch * 10 + d + hd)
        head_idx = jnp.asarray(idx, jnp.int32)
        if knobs is not None:
            knobs = knobs + (("out_groups", 2),)  # groups of 2 and 1 heads
        out = head_out_proj(heads_out, out_w, out_b, head_idx, knobs=knobs, interpret=self.INTERPRET)
        assert out.shape == (batch, d) and out.dtype == jnp.dtype(dtype)
        h, w, b = f64(heads_out, out_w, out_b)
        ref = np.einsum("bhk,hkd->bd", h, w[idx]) + b
        assert row_err(out, ref) <= TOLERANCE[dtype]
        assert row_err(out, head_out_proj_reference(heads_out, out_w, out_b, head_idx)) <= TOLERANCE[dtype]
        if idx == list(range(n_heads)):
            dense = jnp.einsum("bhk,hkd->bd", heads_out, out_w, preferred_element_type=jnp.float32)
            assert row_err(out, (dense + out_b.astype(jnp.float32)).astype(dtype)) <= TOLERANCE[dtype]

    # (R, H, hd, d, chosen heads, forced f, the model's heads, first held head, cursor, dtype, knobs): a window past
    # the cursor (cursor < R-1), one ending at slot R-1, wrapped ones; hd 80 (row blocks of 16); forced heads that
    # are computed, chosen too (skipped), or held elsewhere (a slice of a larger model, as under tensor parallelism).
    WINDOW_CASES = [
        (16, 4, 80, 160, [3, 2], 1, 4, 0, 6, jnp.float32, None),
        (16, 3, 64, 128, [0], 2, 3, 0, 15, jnp.float16, None),
        (32, 4, 128, 256, [1, 0, 2], 2, 8, 0, 47, jnp.bfloat16, SMALL_BLOCKS),
        (16, 4, 64, 128, [2, 1], 2, 8, 4, 47, jnp.float32, None),
        # padding entries (-1), entry 0 among them: no K/V for them, zero Q, the buffer row still written
        (16, 4, 64, 128, [-1, 2, -1, 1], 1, 4, 0, 20, jnp.float32, None),
        # three chosen heads (the list is read masked to four): the forced head chosen too (cursor 7: head 3), or not
        (16, 4, 64, 128, [1, 3, 0], 1, 4, 0, 7, jnp.float16, None),
        (16, 4, 64, 128, [1, 3, 0], 1, 4, 0, 6, jnp.float16, None),
    ]

    @pytest.mark.parametrize("case", WINDOW_CASES)
    @pytest.mark.parametrize("layernorm", [False, True])
    def test_window_into_cache_writes_the_windows_kv(self, case, layernorm):
        """K/V of the chosen heads and of the rotation's forced heads that the call holds, over the slots max(0,
        cursor-R+1) .. cursor, from the ring buffer of inputs, land in the cache (other heads and slots before the
        window untouched), and Q of the chosen heads comes from x (times q_scale: the model's hd**-0.5 in the
        LayerNorm cases, else 1): against float64. With a LayerNorm, x is the
        pre-LayerNorm input: the kernel normalises it, uses it for the cursor's slot in place of the buffer's (stale)
        row and writes it into that row (the other rows untouched)."""
        window, n_heads, hd, d, chosen, forced, total, first_head, cursor, dtype, knobs = case
        rng = np.random.default_rng(window + cursor)
        slots = max(cursor, window) + 8
        raw = rng.standard_normal((slots, d)) * 2 + 0.5
        scale, bias = rng.standard_normal(d) * 0.2 + 1, rng.standard_normal(d) * 0.3
        normed = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, keepdims=True) + 1e-5) * scale + bias
        inputs = normed if layernorm else raw  # the attention inputs the K/V are projected from
        recent = np.zeros((window, d))
        for s in range(cursor + 1):
            recent[s % window] = inputs[s]
        if layernorm:
            recent[cursor % window] = 99.0  # stale: the kernel writes this row
        _, qkv_w, qkv_b, *_ = random_case(1, n_heads, hd, d, 1, dtype, seed=window + d)
        keys, values = (jnp.asarray(rng.standard_normal((1, n_heads, slots, hd)), dtype) for _ in range(2))
        x, recent = jnp.asarray(raw[cursor : cursor + 1], dtype), jnp.asarray(recent, dtype)
        ln = dict(ln_scale=jnp.asarray(scale, dtype), ln_bias=jnp.asarray(bias, dtype)) if layernorm else {}
        q_scale = hd**-0.5 if layernorm else 1.0
        q, new_keys, new_values, new_recent = head_window_into_cache(
            x,
            recent,
            qkv_w,
            qkv_b,
            jnp.asarray(chosen, jnp.int32),
            keys,
            values,
            jnp.int32(cursor),
            forced=forced,
            total_heads=total,
            first_head=jnp.int32(first_head),
            knobs=knobs,
            interpret=self.INTERPRET,
            q_scale=q_scale,
            **ln,
        )
        assert q.shape == (1, len(chosen), hd) and q.dtype == jnp.dtype(dtype)
        xs, w, b = f64(jnp.asarray(inputs, dtype), qkv_w, qkv_b)
        live = [j for j, h in enumerate(chosen) if h >= 0]
        listed = [chosen[j] for j in live]
        ref_q = (np.einsum("d,jkd->jk", xs[cursor], w[0, listed]) + b[0, listed]) * q_scale
        assert row_err(q[0, live], ref_q) <= TOLERANCE[dtype]
        padding = [j for j, h in enumerate(chosen) if h < 0]
        np.testing.assert_array_equal(np.asarray(q[0, padding]), 0)
        rotation = {(cursor * forced + i) % total - first_head for i in range(forced)}
        computed = set(listed) | {h for h in rotation if 0 <= h < n_heads}
        first = max(0, cursor - window + 1)
        for cache, new, part in ((keys, new_keys, 1), (values, new_values, 2)):
            cache, new = np.asarray(cache), np.asarray(new)
            for h in range(n_heads):
                if h in computed:
                    ref = np.einsum("sd,kd->sk", xs[first : cursor + 1], w[part, h]) + b[part, h]
                    assert row_err(new[0, h, first : cursor + 1], ref) <= TOLERANCE[dtype]
                    np.testing.assert_array_equal(new[0, h, :first], cache[0, h, :first])
                else:
                    np.testing.assert_array_equal(new[0, h], cache[0, h])
        others = np.arange(window) != cursor % window
        np.testing.assert_array_equal(np.asarray(new_recent)[others], np.asarray(recent)[others])
        if layernorm:
            assert row_err(new_recent[cursor % window], normed[cursor]) <= TOLERANCE[dtype]
        else:
            np.testing.assert_array_equal(np.asarray(new_recent), np.asarray(recent))

    def test_bad_input(self):
        kw = dict(interpret=self.INTERPRET)
        x, w, b = jnp.zeros((2, 64)), jnp.zeros((3, 4, 16, 64)), jnp.zeros((3, 4, 16))
        idx = jnp.asarray([1, 2], jnp.int32)
        with pytest.raises(ValueError, match="x must be"):
            head_qkv(x[0], w, b, idx, **kw)
        with pytest.raises(ValueError, match="qkv_w must be"):
            head_qkv(x, w[0], b, idx, **kw)
        with pytest.raises(ValueError, match="qkv_b must be"):
            head_qkv(x, w, b[:, :2], idx, **kw)
        with pytest.raises(ValueError, match="at least one head"):
            head_qkv(x, w, b, jnp.zeros((0,), jnp.int32), **kw)
        with pytest.raises(ValueError, match="head_idx must be a rank-1"):
            head_qkv(x, w, b, idx[None], **kw)
        with pytest.raises(ValueError, match="batch must be"):
            head_qkv(jnp.zeros((MAX_BATCH + 1, 64)), w, b, idx, **kw)
        with pytest.raises(ValueError, match="multiple of 16"):
            head_qkv(jnp.zeros((2, 40)), jnp.zeros((3, 4, 16, 40)), b, idx, **kw)
        with pytest.raises(ValueError, match="parts must be"):
            head_qkv(x, w, b, idx, parts=(0, 3), **kw)
        with pytest.raises(ValueError, match="dtype"):
            head_qkv(x.astype(jnp.float16), w, b, idx, **kw)
        with pytest.raises(ValueError, match="power of two"):
            head_qkv(x, w, b, idx, knobs=(("qkv_block_d", 48),), **kw)
        with pytest.raises(ValueError, match="part_idx must be an integer array shaped like head_idx"):
            head_qkv_pairs(x, w, b, idx[:1], idx, **kw)
        with pytest.raises(ValueError, match="qkv_w must be"):
            head_qkv_pairs(x, w[0], b, idx, idx, **kw)
        ho, ow, ob = jnp.zeros((2, 2, 16)), jnp.zeros((4, 16, 64)), jnp.zeros(64)
        with pytest.raises(ValueError, match="heads_out must be"):
            head_out_proj(ho[0], ow, ob, idx, **kw)
        with pytest.raises(ValueError, match="out_w must be"):
            head_out_proj(ho, ow[:, :8], ob, idx, **kw)
        with pytest.raises(ValueError, match="out_b must be"):
            head_out_proj(ho, ow, ob[:32], idx, **kw)
        with pytest.raises(ValueError, match="h = heads_out"):
            head_out_proj(ho, ow, ob, idx[:1], **kw)
        with pytest.raises(ValueError, match="at least one head"):
            head_out_proj(ho[:, :0], ow, ob, jnp.zeros((0,), jnp.int32), **kw)
        with pytest.raises(ValueError, match="batch must be"):
            head_out_proj(jnp.zeros((MAX_BATCH + 1, 2, 16)), ow, ob, idx, **kw)
        with pytest.raises(ValueError, match="multiple of 16"):
            head_out_proj(ho, jnp.zeros((4, 16, 40)), jnp.zeros(40), idx, **kw)
        cache, x1 = jnp.zeros((1, 4, 32, 16)), jnp.zeros((1, 64))
        args = (w, b, idx, cache, cache, 3)
        with pytest.raises(ValueError, match="one sequence"):
            head_window_into_cache(x, jnp.zeros((16, 64)), *args, **kw)
        with pytest.raises(ValueError, match="R >= 16 a power of two"):
            head_window_into_cache(x1, jnp.zeros((8, 64)), *args, **kw)
        with pytest.raises(ValueError, match="R >= 16 a power of two"):
            head_window_into_cache(x1, jnp.zeros((24, 64)), *args, **kw)
        with pytest.raises(ValueError, match="S >= R"):
            head_window_into_cache(x1, jnp.zeros((64, 64)), *args, **kw)
        with pytest.raises(ValueError, match="at least one head"):
            head_window_into_cache(x1, jnp.zeros((16, 64)), w, b, idx[:0], cache, cache, 3, **kw)
        with pytest.raises(ValueError, match="forced <= total_heads"):
            head_window_into_cache(x1, jnp.zeros((16, 64)), *args, forced=5, **kw)


class TestHeadSparseInterpret(TestHeadSparse):
    INTERPRET = True


# opt-6.7b (H 32, hd 128, d 4096) and opt-2.7b (H 32, hd 80, d 2560); batch 1 (multiply and sum) and 32 (dots).
@pytest.mark.parametrize("batch, n_heads, hd, d, h", [(1, 32, 128, 4096, 12), (32, 32, 80, 2560, 32)])
def test_lowers_for_gpu(batch, n_heads, hd, d, h):
    s = jax.ShapeDtypeStruct
    idx = s((h,), jnp.int32)
    text = lowered_text_for_cuda(
        jax.jit(lambda *a: head_qkv(*a, interpret=False)),
        s((batch, d), jnp.float16),
        s((3, n_heads, hd, d), jnp.float16),
        s((3, n_heads, hd), jnp.float16),
        idx,
    )
    assert "head_qkv" in text
    text = lowered_text_for_cuda(
        jax.jit(lambda *a: head_out_proj(*a, interpret=False)),
        s((batch, h, hd), jnp.float16),
        s((n_heads, hd, d), jnp.float16),
        s((d,), jnp.float16),
        idx,
    )
    assert "head_out_proj" in text
    if batch < 16:
        cache = s((batch, n_heads, 256, hd), jnp.float16)
        text = lowered_text_for_cuda(
            jax.jit(lambda *a: head_qkv_into_cache(*a, interpret=False)),
            s((batch, d), jnp.float16),
            s((3, n_heads, hd, d), jnp.float16),
            s((3, n_heads, hd), jnp.float16),
            idx,
            cache,
            cache,
            s((), jnp.int32),
        )
        assert "head_qkv_cache" in text
        text = lowered_text_for_cuda(
            jax.jit(
                lambda x, w, b, i, k, v, c, g, e: head_qkv_into_cache(
                    x, w, b, i, k, v, c, interpret=False, ln_scale=g, ln_bias=e
                )
            ),
            s((batch, d), jnp.float16),
            s((3, n_heads, hd, d), jnp.float16),
            s((3, n_heads, hd), jnp.float16),
            idx,
            cache,
            cache,
            s((), jnp.int32),
            s((d,), jnp.float16),
            s((d,), jnp.float16),
        )
        assert "head_qkv_cache" in text
        if batch == 1:
            one, zero = s((d,), jnp.float16), s((d,), jnp.float16)
            args = (s((1, d), jnp.float16), s((16, d), jnp.float16), s((3, n_heads, hd, d), jnp.float16))
            args = (
                *args,
                s((3, n_heads, hd), jnp.float16),
                idx,
                cache,
                cache,
                s((), jnp.int32),
            )
            plain = jax.jit(lambda *a: head_window_into_cache(*a, forced=2, interpret=False))
            assert "head_window_cache" in lowered_text_for_cuda(plain, *args)
            normalising = jax.jit(
                lambda *a: head_window_into_cache(*a[:-2], forced=2, interpret=False, ln_scale=a[-2], ln_bias=a[-1])
            )
            assert "head_window_cache" in lowered_text_for_cuda(normalising, *args, one, zero)
    else:
        with pytest.raises(ValueError, match="apply a LayerNorm below 16 rows"):
            one = jnp.ones((d,), jnp.float16)
            head_qkv_pairs(
                jnp.ones((batch, d), jnp.float16),
                jnp.ones((3, n_heads, hd, d), jnp.float16),
                jnp.ones((3, n_heads, hd), jnp.float16),
                jnp.zeros((h,), jnp.int32),
                jnp.zeros((h,), jnp.int32),
                ln_scale=one,
                ln_bias=one,
            )
