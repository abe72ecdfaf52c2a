"""dejavu_jax.predictors: scores, top-K selection, pytree hygiene, save/load."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.predictors import (METADATA_FILE, PredictorError, Predictors, head_scores,
                                   init_low_rank, load_predictors, mlp_scores, predictor_metadata, save_predictors,
                                   select_top_k)


def _predictors(rng, layers=3, d=16, rank=4, ffn=40, heads=4, mlp_k=None, head_k=None):
    keys = jax.random.split(rng, 2 * layers)
    mlp = tuple(init_low_rank(keys[i], d, rank, ffn, output_bias=np.linspace(-1, 1, ffn)) for i in range(layers))
    hp = tuple(init_low_rank(keys[layers + i], d, rank, heads) for i in range(layers))
    p = Predictors(mlp=mlp, heads=hp, mlp_input="attn_input")
    if mlp_k is not None:
        p = p.with_k(mlp_k, head_k)
    return p


def test_scores_match_numpy_in_float64():
    rng = np.random.default_rng()
    p = init_low_rank(jax.random.PRNGKey(int(rng.integers(1 << 30))), 24, 5, 33)
    p = p.replace(b1=jnp.asarray(rng.normal(size=5), jnp.float32))
    x = rng.normal(size=(2, 7, 24)) * 3 + 1
    mean = x.mean(-1, keepdims=True)
    xs = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    ref = (xs @ np.asarray(p.w1, np.float64) + np.asarray(p.b1)) @ np.asarray(p.w2, np.float64) + np.asarray(p.b2)
    for fn in (mlp_scores, head_scores):
        out = np.asarray(jax.jit(fn)(p, jnp.asarray(x, jnp.float32)))
        assert out.shape == (2, 7, 33)
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    raw = p.replace(normalize_input=False)
    ref_raw = (x @ np.asarray(p.w1, np.float64) + np.asarray(p.b1)) @ np.asarray(p.w2, np.float64) + np.asarray(p.b2)
    out = np.asarray(mlp_scores(raw, jnp.asarray(x, jnp.float32)))
    assert np.abs(out - ref_raw).max() / np.abs(ref_raw).max() < 1e-5
    with pytest.raises(ValueError, match="width 24"):
        mlp_scores(p, jnp.zeros((3, 23)))


@pytest.mark.parametrize("batch,out,k", [(1, 10, 3), (4, 37, 5), (3, 8, 8), (5, 6, 1)])
def test_select_top_k(batch, out, k):
    rng = np.random.default_rng()
    scores = rng.permutation(batch * out).reshape(batch, out).astype(np.float32)  # distinct: one right answer
    top = jax.jit(select_top_k, static_argnums=1)(jnp.asarray(scores), k)
    want = np.sort(np.argsort(-scores, axis=1)[:, :k], axis=1)
    assert top.indices.dtype == jnp.int32 and top.indices.shape == (batch, k)
    np.testing.assert_array_equal(np.asarray(top.indices), want)
    chosen = set(want.ravel().tolist())
    union = np.asarray(top.union)
    assert union.dtype == np.int32 and len(union) == min(batch * k, out)
    assert list(union) == sorted(set(union.tolist())), "union must be sorted and duplicate-free"
    assert chosen <= set(union.tolist())
    assert int(top.union_size) == len(chosen)
    # Padding: the unchosen outputs with the highest batch-max score.
    others = [i for i in np.argsort(-scores.max(0)) if i not in chosen][:len(union) - len(chosen)]
    assert set(union.tolist()) == chosen | set(others)


def test_select_top_k_edges():
    scores = jnp.asarray(np.random.default_rng().normal(size=(2, 9)), jnp.float32)
    empty = select_top_k(scores, 0)
    assert empty.indices.shape == (2, 0) and empty.union.shape == (0,)
    with pytest.raises(ValueError, match="k must be in"):
        select_top_k(scores, 10)
    with pytest.raises(ValueError, match="batch, outputs"):
        select_top_k(scores[0], 2)


def test_abstract_trees_hash_equal():
    """Two predictor sets with the same shapes and K are the same jit signature (no recompiles)."""
    a = _predictors(jax.random.PRNGKey(0), mlp_k=[8, 16, 40], head_k=[4, 3, 2])
    b = _predictors(jax.random.PRNGKey(1), mlp_k=[8, 16, 40], head_k=[4, 3, 2])
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    sa, sb = jax.tree.structure(abstract(a)), jax.tree.structure(abstract(b))
    assert sa == sb and hash(sa) == hash(sb)
    c = _predictors(jax.random.PRNGKey(0), mlp_k=[8, 16, 32], head_k=[4, 3, 2])
    assert jax.tree.structure(c) != sa, "K is static metadata: a different K is a different program"
    traces = []

    @jax.jit
    def f(p, x):
        traces.append(1)
        return select_top_k(mlp_scores(p.mlp[0], x), p.mlp[0].keep).indices
    x = jnp.ones((2, 16))
    f(a, x)
    f(b, x)
    assert len(traces) == 1


def test_with_k_checks_range():
    p = _predictors(jax.random.PRNGKey(0))
    assert p.mlp_k == (40, 40, 40) and p.head_k == (4, 4, 4)  # uncalibrated: keep everything
    with pytest.raises(ValueError, match="K must be in"):
        p.with_k([0, 8, 8], [1, 1, 1])
    with pytest.raises(ValueError, match="one K per layer"):
        p.with_k([8, 8], [1, 1, 1])


def test_save_load_roundtrip_into_model_dir(tmp_path):
    p = _predictors(jax.random.PRNGKey(3), mlp_k=[8, 16, 24], head_k=[4, 2, 3])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_predictors(p, model_dir / "predictors", {"recall_target": 0.99, "training_tokens": 123})
    assert not [e for e in model_dir.iterdir() if e.name.startswith(".")], "temp dirs left behind"
    for where in (model_dir, model_dir / "predictors"):
        q = load_predictors(where)
        assert q.mlp_k == (8, 16, 24) and q.head_k == (4, 2, 3) and q.mlp_input == "attn_input"
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = predictor_metadata(model_dir)
    assert meta["recall_target"] == 0.99 and meta["training_tokens"] == 123 and meta["rank"] == 4
    # Replacing is atomic too: the old contents are gone, nothing else is left.
    save_predictors(p.with_k([40, 40, 40], [1, 1, 1]), model_dir / "predictors", {})
    assert load_predictors(model_dir).mlp_k == (40, 40, 40)
    assert sorted(e.name for e in model_dir.iterdir()) == ["predictors"]


def test_load_errors(tmp_path):
    with pytest.raises(PredictorError, match="no predictors"):
        load_predictors(tmp_path)
    p = _predictors(jax.random.PRNGKey(0))
    save_predictors(p, tmp_path / "predictors")
    from dejavu_jax.config import OPTConfig
    other = OPTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_dim=40, word_embed_proj_dim=16)
    with pytest.raises(PredictorError, match="the model has"):
        load_predictors(tmp_path, other)
    meta = json.loads((tmp_path / "predictors" / METADATA_FILE).read_text())
    meta["format"] = 99
    (tmp_path / "predictors" / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(PredictorError, match="format"):
        load_predictors(tmp_path)


def test_save_rejects_bad_metadata_before_writing(tmp_path):
    p = _predictors(jax.random.PRNGKey(0))
    with pytest.raises(TypeError):
        save_predictors(p, tmp_path / "predictors", {"bad": object()})
    assert list(tmp_path.iterdir()) == []
