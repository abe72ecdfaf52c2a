"""Sparse MLP inside the model: per-token neuron sets, chosen by fixed indices or by trained predictors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_max_err
from dejavu_jax.config import OPTConfig
from dejavu_jax.model import LayerSparsity, OPTForCausalLM, init_params, sparsity_from_predictors
from dejavu_jax.predictors import Predictors, init_low_rank, save_predictors
from dejavu_jax.sparse_mlp import mlp_dense, mlp_sparse_per_token
from eval.__main__ import main as eval_main

CONFIG = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48,
                   max_position_embeddings=32, word_embed_proj_dim=32)


def numpy_per_token_mlp(x, w1, b1, w2t, b2, idx):
    x, w1, b1, w2t, b2 = (np.asarray(a, np.float64) for a in (x, w1, b1, w2t, b2))
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        rows = np.asarray(idx[t])
        h = np.maximum(w1[rows] @ x[t] + b1[rows], 0.0)
        out[t] = h @ w2t[rows] + b2
    return out


@pytest.mark.parametrize("tokens, k, chunk", [(5, 1, 64), (37, 7, 8), (16, 48, 4)])
def test_per_token_mlp_matches_numpy(tokens, k, chunk):
    keys = jax.random.split(jax.random.PRNGKey(tokens * 100 + k), 6)
    d, ffn = 24, 48
    x = jax.random.normal(keys[0], (tokens, d))
    w1, w2t = jax.random.normal(keys[1], (ffn, d)) * 0.3, jax.random.normal(keys[2], (ffn, d)) * 0.3
    b1, b2 = jax.random.normal(keys[3], (ffn,)) * 0.1, jax.random.normal(keys[4], (d,))
    idx = jax.vmap(lambda key: jax.random.permutation(key, ffn)[:k])(jax.random.split(keys[5], tokens))
    out = mlp_sparse_per_token(x, w1, b1, w2t, b2, idx.astype(jnp.int32), chunk=chunk)
    ref = numpy_per_token_mlp(x, w1, b1, w2t, b2, np.asarray(idx))
    per_row = np.linalg.norm(np.asarray(out) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert per_row.max() <= 1e-5
    if k == ffn:
        assert rel_max_err(out, mlp_dense(x, w1, b1, w2t, b2)) <= 1e-5


def test_per_token_indices_with_every_neuron_equal_dense():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 3, 64)
    model = OPTForCausalLM(CONFIG)
    dense, _ = model.apply({"params": params}, ids)
    per_token = jnp.broadcast_to(jnp.arange(48)[::-1], (2, 9, 48))
    sparse, _ = model.apply({"params": params}, ids, sparsity=[LayerSparsity(mlp_active_idx=per_token)] * 2)
    assert rel_max_err(sparse, dense) <= 1e-5


def random_predictors(config, k, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * config.num_hidden_layers)
    d, ffn, heads = config.hidden_size, config.ffn_dim, config.num_attention_heads
    mlp = tuple(init_low_rank(keys[i], d, 8, ffn).replace(k=k) for i in range(config.num_hidden_layers))
    head = tuple(init_low_rank(keys[-1 - i], d, 8, heads) for i in range(config.num_hidden_layers))
    return Predictors(mlp=mlp, heads=head)


def test_predictor_driven_sparsity_keeping_every_neuron_equals_dense_and_fewer_differs():
    params = init_params(CONFIG, jax.random.PRNGKey(2))
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 11), 3, 64)
    model = OPTForCausalLM(CONFIG)
    dense, _ = model.apply({"params": params}, ids)
    everything, _ = model.apply({"params": params}, ids,
                                sparsity=sparsity_from_predictors(random_predictors(CONFIG, k=48)))
    assert rel_max_err(everything, dense) <= 1e-5
    few, _ = model.apply({"params": params}, ids, sparsity=sparsity_from_predictors(random_predictors(CONFIG, k=4)))
    assert rel_max_err(few, dense) > 1e-3


def test_eval_ppl_dense_vs_sparse(reference_model_dir, tmp_path, capsys):
    """Predictors that keep every neuron give the dense perplexity; a random predictor keeping 5% does not."""
    from conftest import SHARED
    from dejavu_jax.checkpoint import load_model
    config = load_model(reference_model_dir, "float32").config
    data = SHARED / "data" / "wikitext-2" / "wiki.test.raw"
    results = {}
    for k in (config.ffn_dim, config.ffn_dim // 20):
        out = tmp_path / f"predictors-{k}"
        save_predictors(random_predictors(config, k=k), out)
        argv = ["ppl", "--model", str(reference_model_dir), "--data", str(data), "--seq-len", "128",
                "--max-windows", "2", "--predictors", str(out), "--json"]
        assert eval_main(argv) == 0
        results[k] = json.loads(capsys.readouterr().out)
    full, few = results[config.ffn_dim], results[config.ffn_dim // 20]
    assert abs(full["sparse_ppl"] - full["ppl"]) / full["ppl"] <= 1e-5
    assert few["ppl"] == full["ppl"] and few["ppl_change"] > 0.01
    assert few["mlp_k"] == [config.ffn_dim // 20] * config.num_hidden_layers


def test_eval_ppl_predictors_for_another_model(reference_model_dir, tmp_path, capsys):
    save_predictors(random_predictors(CONFIG, k=4), tmp_path / "wrong")
    argv = ["ppl", "--model", str(reference_model_dir), "--data", "x.txt", "--predictors", str(tmp_path / "wrong")]
    assert eval_main(argv) == 2
    assert "the model has" in capsys.readouterr().err


def decode_logits(params, prompt, continuation, sparsity):
    from dejavu_jax.generation import decode_step, prefill
    _, cache = prefill(params, prompt, jnp.ones_like(prompt), config=CONFIG, num_slots=16)
    steps = []
    for t in range(continuation.shape[1]):
        logits, cache = decode_step(params, cache, continuation[:, t], sparsity, config=CONFIG, interpret=True)
        steps.append(np.asarray(logits))
    return np.stack(steps, axis=1)


def test_decode_with_the_kernel_on_the_batch_union_equals_per_token_gathers_at_batch_1():
    """At batch 1 the union is the token's own K neurons: the Pallas kernel (interpret mode) inside the compiled
    decode step must give what the per-token gather path gives, and both must differ from dense."""
    params = init_params(CONFIG, jax.random.PRNGKey(4))
    prompt = jax.random.randint(jax.random.PRNGKey(5), (1, 5), 3, 64)
    continuation = jax.random.randint(jax.random.PRNGKey(6), (1, 4), 3, 64)
    predictors = random_predictors(CONFIG, k=8)  # 8 of 48 neurons: below the crossover, so the kernel runs
    union = decode_logits(params, prompt, continuation, sparsity_from_predictors(predictors, "batch_union"))
    per_token = decode_logits(params, prompt, continuation, sparsity_from_predictors(predictors, "per_token"))
    dense = decode_logits(params, prompt, continuation, None)
    assert rel_max_err(union, per_token) <= 1e-5
    assert rel_max_err(union, dense) > 1e-3


def test_sparse_generation_keeping_every_neuron_equals_dense(reference_model_dir, tmp_path, capsys):
    from dejavu_jax.checkpoint import load_model
    from dejavu_jax.generate import main as generate_main
    config = load_model(reference_model_dir, "float32").config
    save_predictors(random_predictors(config, k=config.ffn_dim), tmp_path / "all")
    argv = ["--model", str(reference_model_dir), "--prompt", "The history of", "--prompt", "Paris is the capital",
            "--max-new-tokens", "6", "--dtype", "float32", "--json"]
    assert generate_main(argv) == 0
    dense = capsys.readouterr().out
    assert generate_main(argv + ["--predictors", str(tmp_path / "all")]) == 0
    assert capsys.readouterr().out == dense
