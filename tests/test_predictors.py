"""dejavu_jax.predictors: scores (training and decode layouts), pytree hygiene, thresholds, save/load."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dejavu_jax.predictor_store import (
    METADATA_FILE,
    PredictorError,
    load_predictors,
    predictor_metadata,
    save_predictors,
)
from dejavu_jax.predictors import Predictors, init_low_rank, predictor_scores
from dejavu_jax.sparsity import decode_predictor, sparse_weights_from_predictors


def _predictors(rng, layers=3, d=16, rank=4, ffn=40, heads=4, mlp_k=None, head_k=None):
    keys = jax.random.split(rng, 2 * layers)
    mlp = tuple(init_low_rank(keys[i], d, rank, ffn, output_bias=np.linspace(-1, 1, ffn)) for i in range(layers))
    hp = tuple(init_low_rank(keys[layers + i], d, rank, heads) for i in range(layers))
    p = Predictors(mlp=mlp, heads=hp, mlp_input="attn_input")
    if mlp_k is not None:
        p = p.with_k(mlp_k, head_k)
    return p


def test_scores_match_numpy_in_float64_in_both_layouts():
    """The training layout (`predictor_scores`) and the decode layout (`MLPPredictor`, transposed, rank padded to a
    power of two) compute the same scores."""
    rng = np.random.default_rng(0)
    p = init_low_rank(jax.random.PRNGKey(1), 24, 5, 33)
    p = p.replace(b1=jnp.asarray(rng.normal(size=5), jnp.float32))
    x = rng.normal(size=(2, 7, 24)) * 3 + 1
    mean = x.mean(-1, keepdims=True)
    xs = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    ref = (xs @ np.asarray(p.w1, np.float64) + np.asarray(p.b1)) @ np.asarray(p.w2, np.float64) + np.asarray(p.b2)
    for fn in (predictor_scores, lambda q, v: decode_predictor(q, 0.0).scores(v)):
        out = np.asarray(jax.jit(fn)(p, jnp.asarray(x, jnp.float32)))
        assert out.shape == (2, 7, 33)
        assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5
    assert decode_predictor(p, 0.0).w2_t.shape == (33, 16)  # rank 5 padded with zeros to 16
    raw = p.replace(normalize_input=False)
    ref_raw = (x @ np.asarray(p.w1, np.float64) + np.asarray(p.b1)) @ np.asarray(p.w2, np.float64) + np.asarray(p.b2)
    out = np.asarray(predictor_scores(raw, jnp.asarray(x, jnp.float32)))
    assert np.abs(out - ref_raw).max() / np.abs(ref_raw).max() < 1e-5
    with pytest.raises(ValueError, match="width 24"):
        predictor_scores(p, jnp.zeros((3, 23)))


def test_abstract_trees_hash_equal():
    """Two predictor sets with the same shapes and K, and any thresholds, are one decode program (no recompiles);
    K is static, so a different K is another program."""
    a = _predictors(jax.random.PRNGKey(0), mlp_k=[8, 16, 40], head_k=[4, 3, 2]).with_threshold([0.1, 0.2, 0.3])
    b = _predictors(jax.random.PRNGKey(1), mlp_k=[8, 16, 40], head_k=[4, 3, 2]).with_threshold([1.0, -2.0, 0.5])
    wa, wb = sparse_weights_from_predictors(a), sparse_weights_from_predictors(b)
    abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), t)
    sa, sb = jax.tree.structure(abstract(wa)), jax.tree.structure(abstract(wb))
    assert sa == sb and hash(sa) == hash(sb)
    c = sparse_weights_from_predictors(
        _predictors(jax.random.PRNGKey(0), mlp_k=[8, 16, 32], head_k=[4, 3, 2]), thresholds=[0.0] * 3
    )
    assert jax.tree.structure(c) != sa
    traces = []

    @jax.jit
    def f(w, x):
        traces.append(1)
        return w.mlp[0].scores(x) >= w.mlp[0].threshold

    x = jnp.ones((2, 16))
    f(wa, x)
    f(wb, x)
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
    assert load_predictors(model_dir).mlp_threshold is None  # uncalibrated thresholds stay absent
    assert load_predictors(model_dir).head_threshold is None
    calibrated = p.with_k([40, 40, 40], [1, 1, 1]).with_threshold([0.25, -1.5, float("-inf")], [0.5, 2.0, -0.25])
    save_predictors(calibrated, model_dir / "predictors", {})
    q = load_predictors(model_dir)
    assert q.mlp_k == (40, 40, 40) and q.mlp_threshold == (0.25, -1.5, float("-inf"))
    assert q.head_threshold == (0.5, 2.0, -0.25)
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
