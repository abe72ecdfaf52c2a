"""Per-token head sparsity in the model (`SparsityPolicy.heads`): every head keeps exact K/V, only the kept heads'
outputs reach out_proj. Whole-sequence forwards and token-by-token decoding must be the same function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_max_err, small_config
from dejavu_jax.generation import decode_step
from dejavu_jax.kv_cache import KVCache
from dejavu_jax.model import OPTForCausalLM, init_params
from dejavu_jax.predictors import Predictors, init_low_rank
from dejavu_jax.sparsity import HeadSparsity, MLPSparsity, SparsityPolicy, sparse_weights_from_predictors

CONFIG = small_config(num_hidden_layers=3)
H = CONFIG.num_attention_heads


def head_predictors(k, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * CONFIG.num_hidden_layers)
    d = CONFIG.hidden_size
    mlp = tuple(init_low_rank(keys[i], d, 8, CONFIG.ffn_dim) for i in range(CONFIG.num_hidden_layers))
    heads = tuple(init_low_rank(keys[-1 - i], d, 8, H).replace(k=k) for i in range(CONFIG.num_hidden_layers))
    return Predictors(mlp=mlp, heads=heads)


def forward(params, ids, policy=SparsityPolicy(), weights=None):
    (logits, _), state = OPTForCausalLM(CONFIG).apply(
        {"params": params}, ids, policy=policy, sparse_weights=weights, mutable=["intermediates"]
    )
    return np.asarray(logits), state["intermediates"]


PREDICTED = SparsityPolicy(heads=HeadSparsity.PREDICTED)


def test_keeping_every_head_equals_dense_and_fewer_heads_keep_exactly_k():
    params = init_params(CONFIG, jax.random.PRNGKey(1))
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 3, 64)
    dense, _ = forward(params, ids)
    weights = sparse_weights_from_predictors(head_predictors(H), mlp=False)
    for policy in (PREDICTED, SparsityPolicy(heads=HeadSparsity.ORACLE, head_k=H)):
        assert rel_max_err(forward(params, ids, policy, weights)[0], dense) <= 1e-6
    for policy in (dataclass_k(PREDICTED, 2), SparsityPolicy(heads=HeadSparsity.ORACLE, head_k=2)):
        logits, sown = forward(params, ids, policy, weights)
        assert rel_max_err(logits, dense) > 1e-3
        for i in range(CONFIG.num_hidden_layers):
            np.testing.assert_array_equal(np.asarray(sown[f"layers_{i}"]["self_attn"]["head_density"][0]), 0.5)


def dataclass_k(policy, k):
    import dataclasses

    return dataclasses.replace(policy, head_k=k)


def test_predicted_heads_are_each_tokens_k_best_from_the_previous_layers_input():
    """Layer l keeps the heads its predictor scores highest on layer l-1's attention input (layer 0: its own)."""
    params = init_params(CONFIG, jax.random.PRNGKey(3))
    ids = jax.random.randint(jax.random.PRNGKey(4), (2, 7), 3, 64)
    predictors = head_predictors(2, seed=5)
    weights = sparse_weights_from_predictors(predictors, mlp=False)
    _, sown = forward(params, ids, PREDICTED, weights)
    inputs = [np.asarray(sown[f"layers_{i}"]["attn_input"][0], np.float64) for i in range(CONFIG.num_hidden_layers)]
    for i in range(CONFIG.num_hidden_layers):
        p = predictors.heads[i]
        x = inputs[max(i - 1, 0)]
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        scores = (x @ np.asarray(p.w1, np.float64) + np.asarray(p.b1)) @ np.asarray(p.w2, np.float64) + np.asarray(p.b2)
        best = np.argsort(-scores, axis=-1)[..., :2]
        expected = np.zeros(scores.shape, bool)
        np.put_along_axis(expected, best, True, axis=-1)
        np.testing.assert_array_equal(np.asarray(sown[f"layers_{i}"]["self_attn"]["heads_kept"][0]), expected)


@pytest.mark.parametrize("policy", [dataclass_k(PREDICTED, 2), SparsityPolicy(heads=HeadSparsity.ORACLE, head_k=1)])
def test_token_by_token_decoding_equals_the_whole_sequence(policy):
    """A decode step's head attends over exact K/V whether or not earlier tokens kept it (predicted: only the chosen
    heads are computed, skipped heads' K/V repaired from the recent inputs; oracle: every head is computed), so the
    logits of each step equal the whole sequence's."""
    params = init_params(CONFIG, jax.random.PRNGKey(6))
    ids = jax.random.randint(jax.random.PRNGKey(7), (2, 10), 3, 64)
    weights = sparse_weights_from_predictors(head_predictors(2, seed=8), mlp=False)
    whole, _ = forward(params, ids, policy, weights)
    dense, _ = forward(params, ids)
    cache = KVCache.create(CONFIG, 2, 16, jnp.float32, policy.recent_window)
    steps = []
    for t in range(ids.shape[1]):
        logits, cache = decode_step(params, cache, ids[:, t], weights, config=CONFIG, policy=policy)
        steps.append(np.asarray(logits))
    steps = np.stack(steps, axis=1)
    assert rel_max_err(steps, whole) <= 1e-5
    assert rel_max_err(steps, dense) > 1e-3  # and the heads did change something


def test_heads_compose_with_the_mlp_policy_and_check_their_inputs():
    params = init_params(CONFIG, jax.random.PRNGKey(9))
    ids = jax.random.randint(jax.random.PRNGKey(10), (1, 6), 3, 64)
    lossless_heads = SparsityPolicy(MLPSparsity.LOSSLESS, heads=HeadSparsity.ORACLE, head_k=H)
    assert rel_max_err(forward(params, ids, lossless_heads)[0], forward(params, ids)[0]) <= 1e-6
    with pytest.raises(ValueError, match="needs head_k"):
        SparsityPolicy(heads=HeadSparsity.ORACLE)
    with pytest.raises(ValueError, match="head sparsity .* needs trained predictors"):
        forward(params, ids, PREDICTED, None)
    with pytest.raises(ValueError):
        SparsityPolicy(heads="sometimes")


def test_the_batch_union_gives_every_sequence_the_heads_any_of_them_chose():
    """`head_union`: at a decode step of several sequences every row keeps the OR of the rows' chosen heads (one
    sequence: its own), and the step computing only those heads (the head kernels) equals the one computing every
    head and masking (the reference), and differs from each sequence keeping its own."""
    import dataclasses

    from dejavu_jax.sparsity import head_rows

    weights = sparse_weights_from_predictors(head_predictors(1, seed=11), mlp=False)
    union = dataclasses.replace(PREDICTED, head_k=1, head_union=True)
    x = jax.random.normal(jax.random.PRNGKey(12), (3, 1, CONFIG.hidden_size))
    own = head_rows(dataclasses.replace(union, head_union=False), weights, 1, x, H)
    shared = head_rows(union, weights, 1, x, H)
    want = np.broadcast_to(np.asarray(own.mask).any(axis=0, keepdims=True), own.mask.shape)
    assert np.array_equal(np.asarray(shared.mask), want) and want[0, 0].sum() > 1 and shared.idx is None
    one = head_rows(union, weights, 1, x[:1], H)
    assert np.array_equal(np.asarray(one.mask), np.asarray(own.mask[:1])) and one.idx is not None
    params = init_params(CONFIG, jax.random.PRNGKey(13))
    ids = jax.random.randint(jax.random.PRNGKey(14), (3, 6), 3, 64)

    def decode(policy):
        cache = KVCache.create(CONFIG, 3, 8, jnp.float32, policy.recent_window)
        steps = []
        for t in range(ids.shape[1]):
            logits, cache = decode_step(params, cache, ids[:, t], weights, config=CONFIG, policy=policy)
            steps.append(np.asarray(logits))
        return np.stack(steps, axis=1)

    kernels = decode(dataclasses.replace(union, tuning=(("head_max_batch", 4),)))
    assert rel_max_err(kernels, decode(union)) <= 1e-5
    assert rel_max_err(kernels, decode(dataclasses.replace(union, head_union=False))) > 1e-3
    with pytest.raises(ValueError, match="head_union applies to predicted or fixed heads"):
        SparsityPolicy(heads=HeadSparsity.ORACLE, head_k=1, head_union=True)
