"""MLP sparsity inside the model: the policy (none / lossless / predicted with threshold or top-K selection), the
per-token path of whole-sequence forwards, and the row-masked kernels of decode steps (interpret mode on CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_max_err, small_config
from dejavu_jax.generation import decode_step, prefill
from dejavu_jax.model import OPTForCausalLM, init_params, layer_norm
from dejavu_jax.predictors import Predictors, init_low_rank
from dejavu_jax.sparse_mlp import mlp_decode_rows, mlp_dense, mlp_per_token_rows
from dejavu_jax.sparsity import (
    MLPSparsity,
    Selection,
    SparseWeights,
    DENSE,
    LayerChoice,
    MLPRows,
    SparsityPolicy,
    attention_layernorm_and_hidden,
    check_sparsity,
    for_decode_batch,
    sparse_weights_from_predictors,
)

CONFIG = small_config()
PREDICTED = SparsityPolicy(MLPSparsity.PREDICTED, Selection.THRESHOLD)
TOPK = SparsityPolicy(MLPSparsity.PREDICTED, Selection.TOPK)
LOSSLESS = SparsityPolicy(MLPSparsity.LOSSLESS)


def random_predictors(config, k, threshold=None, seed=0, rank=8):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * config.num_hidden_layers)
    d, ffn, heads = config.hidden_size, config.ffn_dim, config.num_attention_heads
    mlp = tuple(init_low_rank(keys[i], d, rank, ffn).replace(k=k) for i in range(config.num_hidden_layers))
    head = tuple(init_low_rank(keys[-1 - i], d, rank, heads) for i in range(config.num_hidden_layers))
    thresholds = None if threshold is None else (threshold,) * config.num_hidden_layers
    return Predictors(mlp=mlp, heads=head, mlp_threshold=thresholds)


@pytest.mark.parametrize("tokens, density", [(5, 0.0), (37, 0.2), (16, 1.0)])
def test_per_token_rows_match_a_float64_gather(tokens, density):
    rng = np.random.default_rng(tokens)
    d, ffn = 24, 48
    x, w1, w2t = (
        rng.standard_normal((tokens, d)),
        rng.standard_normal((ffn, d)) * 0.3,
        rng.standard_normal((ffn, d)) * 0.3,
    )
    b1, b2 = rng.standard_normal(ffn) * 0.1, rng.standard_normal(d)
    chosen = rng.random((tokens, ffn)) < density
    out = mlp_per_token_rows(*(jnp.asarray(a, jnp.float32) for a in (x, w1, b1, w2t, b2)), jnp.asarray(chosen))
    ref = np.empty_like(x)
    for t in range(tokens):
        rows = np.flatnonzero(chosen[t])
        ref[t] = np.maximum(w1[rows] @ x[t] + b1[rows], 0.0) @ w2t[rows] + b2
    per_row = np.linalg.norm(np.asarray(out) - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert per_row.max() <= 1e-5
    if density == 1.0:
        assert rel_max_err(out, mlp_dense(*(jnp.asarray(a, jnp.float32) for a in (x, w1, b1, w2t, b2)))) <= 1e-5


def test_whole_sequence_threshold_and_topk_choosing_everything_equal_dense_and_fewer_differ():
    params = init_params(CONFIG, jax.random.PRNGKey(2))
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 11), 3, 64)
    model = OPTForCausalLM(CONFIG)
    dense, _ = model.apply({"params": params}, ids)
    for policy, predictors in (
        (PREDICTED, random_predictors(CONFIG, 48, -np.inf)),
        (TOPK, random_predictors(CONFIG, 48)),
    ):
        weights = sparse_weights_from_predictors(predictors, selection=policy.selection)
        everything, _ = model.apply({"params": params}, ids, policy=policy, sparse_weights=weights)
        assert rel_max_err(everything, dense) <= 1e-5
    for policy, predictors in ((PREDICTED, random_predictors(CONFIG, 48, 1.0)), (TOPK, random_predictors(CONFIG, 4))):
        weights = sparse_weights_from_predictors(predictors, selection=policy.selection)
        (few, _), state = model.apply(
            {"params": params}, ids, policy=policy, sparse_weights=weights, mutable=["intermediates"]
        )
        assert rel_max_err(few, dense) > 1e-3
        density = np.mean(
            [
                np.mean(v["mlp"]["mlp_density"][0])
                for v in state["intermediates"].values()
                if isinstance(v, dict) and "mlp" in v
            ]
        )
        assert 0 < density < 0.6


def decode_logits(params, prompt, continuation, policy, weights):
    _, cache = prefill(params, prompt, jnp.ones_like(prompt), config=CONFIG, num_slots=16)
    steps = []
    for t in range(continuation.shape[1]):
        logits, cache = decode_step(params, cache, continuation[:, t], weights, config=CONFIG, policy=policy)
        steps.append(np.asarray(logits))
    return np.stack(steps, axis=1)


@pytest.mark.parametrize(
    "policy, predictors",
    [
        (PREDICTED, random_predictors(CONFIG, 48, 0.5)),
        (dataclasses.replace(PREDICTED, tuning=(("hidden", "xla"),)), random_predictors(CONFIG, 48, 0.5)),
        (
            dataclasses.replace(PREDICTED, tuning=(("scores", "xla"), ("fc1_segment", 16))),
            random_predictors(CONFIG, 48, 0.5),
        ),
        (
            dataclasses.replace(PREDICTED, tuning=(("hidden_layernorm", 0),)),
            random_predictors(CONFIG, 48, 0.5),
        ),
        (
            dataclasses.replace(PREDICTED, tuning=(("hidden_stream", 1), ("hidden_block_r", 2))),
            random_predictors(CONFIG, 48, 0.5),
        ),
        (
            dataclasses.replace(PREDICTED, tuning=(("hidden_stream", 1), ("scores", "kernel"))),
            random_predictors(CONFIG, 48, 0.5),
        ),
        (TOPK, random_predictors(CONFIG, 8)),
    ],
    ids=[
        "threshold",
        "threshold-xla-hidden",
        "threshold-xla-scores",
        "threshold-layernorm-apart",
        "threshold-side-stream",
        "threshold-choice-on-side-stream",
        "topk",
    ],
)
def test_decode_kernels_equal_the_per_token_path_and_differ_from_dense(policy, predictors):
    """At batch 1 the row-masked kernels (interpret mode) in the compiled decode step give what the per-token
    path gives for the same token, and both differ from dense; so does every `DecodeTuning` of the same policy."""
    params = init_params(CONFIG, jax.random.PRNGKey(4))
    prompt = jax.random.randint(jax.random.PRNGKey(5), (1, 5), 3, 64)
    continuation = jax.random.randint(jax.random.PRNGKey(6), (1, 4), 3, 64)
    weights = sparse_weights_from_predictors(predictors, selection=policy.selection)
    kernels = decode_logits(params, prompt, continuation, policy, weights)
    per_token = decode_logits(params, prompt, continuation, dataclasses.replace(policy, decode_kernels=False), weights)
    dense = decode_logits(params, prompt, continuation, SparsityPolicy(), None)
    assert rel_max_err(kernels, per_token) <= 1e-5
    assert rel_max_err(kernels, dense) > 1e-3


def test_the_attention_layernorm_rides_on_the_predictor_kernel_only_where_it_reads_the_same_input():
    """At a predicted batch-1 decode step whose predictor reads the attention block's input, one `predictor_hidden`
    launch gives the attention LayerNorm and the predictor's first layer, equal to the two computed apart; every
    other step (and the tuning switch off) gets None, so the model runs its own LayerNorm."""
    predictors = random_predictors(CONFIG, 48, 0.5)
    weights = sparse_weights_from_predictors(predictors)
    d = CONFIG.hidden_size
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((1, 1, d)) * 3 + 1, jnp.float32)
    ln = (jnp.asarray(rng.standard_normal(d), jnp.float32), jnp.asarray(rng.standard_normal(d), jnp.float32), 1e-5)
    fused = attention_layernorm_and_hidden(PREDICTED, weights, 1, x, ln, decode=True)
    assert fused is not None
    normed, hidden = fused
    assert normed.shape == (1, 1, d)
    assert rel_max_err(normed, layer_norm(x, *ln)) <= 1e-6
    assert rel_max_err(hidden, weights.mlp[1].hidden(x[:, 0])) <= 1e-5
    apart = dataclasses.replace(PREDICTED, tuning=(("hidden_layernorm", 0),))
    xla_hidden = dataclasses.replace(PREDICTED, tuning=(("hidden", "xla"),))
    fixed = SparseWeights(fixed_rows=(jnp.ones((48,), jnp.int32),) * CONFIG.num_hidden_layers)
    reads_mlp_input = dataclasses.replace(weights, mlp_input="mlp_input")
    for policy, w, inputs, decode in (
        (apart, weights, x, True),
        (xla_hidden, weights, x, True),
        (LOSSLESS, None, x, True),
        (PREDICTED, fixed, x, True),
        (PREDICTED, reads_mlp_input, x, True),
        (PREDICTED, weights, x, False),
        (PREDICTED, weights, jnp.concatenate([x, x]), True),  # batch 2: the dense MLP
        (dataclasses.replace(PREDICTED, decode_kernels=False), weights, x, True),
    ):
        assert attention_layernorm_and_hidden(policy, w, 1, inputs, ln, decode) is None
    # On a side stream the first layer comes before the attention block, without the LayerNorm (the block's own).
    stream = dataclasses.replace(PREDICTED, tuning=(("hidden_stream", 1),))
    normed, early = LayerChoice(stream, weights, 1, decode=True).before_attention(x, ln)
    assert normed is None and rel_max_err(early, hidden) <= 1e-5
    assert LayerChoice(stream, weights, 1, decode=False).before_attention(x, ln) == (None, None)
    assert LayerChoice(PREDICTED, weights, 1, decode=True).before_attention(x, None) == (None, None)  # post-LN
    lowered = jax.jit(lambda x: LayerChoice(stream, weights, 1, True).before_attention(x)[1]).lower(x).as_text()
    assert '_xla_stream_annotation = "1"' in lowered
    for tuning in (stream.tuning, (("hidden_stream", 1), ("hidden", "xla"))):
        choice = LayerChoice(dataclasses.replace(PREDICTED, tuning=tuning), weights, 1, decode=True)
        assert _stream_calls(jax.make_jaxpr(lambda x, c=choice: c.before_attention(x)[1])(x).jaxpr) == [[]]
    # With the scores apart from fc1, the whole choice comes before the block: the row mask the threshold gives.
    for scores in ("kernel", "xla"):
        whole = dataclasses.replace(PREDICTED, tuning=(("hidden_stream", 2), ("scores", scores)))
        choice = LayerChoice(whole, weights, 1, decode=True)
        normed, ahead = choice.before_attention(x, ln)
        assert normed is None and isinstance(ahead, MLPRows) and ahead.kind == "mask"
        want = weights.mlp[1].scores(x[:, 0]) >= weights.mlp[1].threshold
        assert np.array_equal(np.asarray(ahead.mask), np.asarray(want[0], np.int32)) and 0 < want.sum() < 48
        assert choice.rows(x, x, ahead) is ahead
        lowered = jax.jit(lambda x, choice=choice: choice.before_attention(x)[1].mask).lower(x).as_text()
        assert '_xla_stream_annotation = "2"' in lowered
        # One call on the stream, holding no call of its own: XLA refuses an annotated call nested in another.
        assert _stream_calls(jax.make_jaxpr(lambda x, c=choice: c.before_attention(x)[1].mask)(x).jaxpr) == [[]]


def _stream_calls(jaxpr) -> list:
    """For every jitted call in a jaxpr (the one a stream annotation wraps), the jitted calls nested in it."""

    def calls(jaxpr):
        return [eqn.params["jaxpr"].jaxpr for eqn in jaxpr.eqns if eqn.primitive.name in ("jit", "pjit")]

    return [calls(inner) for inner in calls(jaxpr)]


def _pallas_calls(jaxpr) -> list:
    """(kernel name, outputs, grid) of every pallas_call in a jaxpr, nested calls included, in order."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append((eqn.params["name"], len(eqn.outvars), tuple(eqn.params["grid_mapping"].grid)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _pallas_calls(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _pallas_calls(sub)
    return found


def test_the_decode_step_runs_the_tuned_predictor_kernel():
    """The decode step itself takes the fused path: one two-output `predictor_hidden` launch a layer with the
    attention LayerNorm on it (pre-LayerNorm), one-output launches with it apart or for a post-LayerNorm model, and
    `hidden_block_r` sets the kernel's grid (rank 8 padded to 16: 16 programs by default, 8 at two rows each)."""
    weights = sparse_weights_from_predictors(random_predictors(CONFIG, 48, 0.5))
    apart = dataclasses.replace(PREDICTED, tuning=(("hidden_layernorm", 0), ("hidden_block_r", 2)))
    layers = CONFIG.num_hidden_layers
    for config, policy, expected in (
        (CONFIG, PREDICTED, [("predictor_hidden", 2, (16,))] * layers),
        (CONFIG, apart, [("predictor_hidden", 1, (8,))] * layers),
        (dataclasses.replace(CONFIG, do_layer_norm_before=False), PREDICTED, [("predictor_hidden", 1, (16,))] * layers),
    ):
        params = init_params(config, jax.random.PRNGKey(4))
        prompt = jnp.full((1, 5), 7, jnp.int32)
        _, cache = prefill(params, prompt, jnp.ones_like(prompt), config=config, num_slots=16)
        jaxpr = jax.make_jaxpr(
            lambda c, t: decode_step(params, c, t, weights, config=config, policy=policy)  # noqa: B023
        )(cache, prompt[:, 0])
        assert [call for call in _pallas_calls(jaxpr.jaxpr) if call[0] == "predictor_hidden"] == expected


def test_int8_scores_choose_alike_in_the_decode_kernel_and_the_per_token_path():
    """With the scoring rows in int8 (one scale per neuron) the fc1 kernel of a decode step and the per-token path
    score with the same codes and scales, so they compute the same MLP; float and int8 scores choose nearly alike."""
    predictors = random_predictors(CONFIG, 48, 0.5, rank=16)
    weights = sparse_weights_from_predictors(predictors, int8_scores=True)
    floats = sparse_weights_from_predictors(predictors)
    assert weights.mlp[0].w2_t.dtype == jnp.int8 and weights.heads[0].w2_scale is None  # heads stay float
    rng = np.random.default_rng(3)
    d, ffn = CONFIG.hidden_size, CONFIG.ffn_dim
    x = jnp.asarray(rng.standard_normal((1, d)), jnp.float32)
    w1, w2t = (jnp.asarray(rng.standard_normal((ffn, d)) * 0.3, jnp.float32) for _ in range(2))
    b1, b2 = jnp.asarray(rng.standard_normal(ffn) * 0.1, jnp.float32), jnp.zeros((d,), jnp.float32)
    p = weights.mlp[0]
    hidden = p.hidden(x)
    chosen = p.scores_from_hidden(hidden) >= p.threshold  # [1, ffn]
    assert 0 < int(chosen.sum()) < ffn
    kernel = mlp_decode_rows(x, w1, b1, w2t, b2, "threshold", hidden=hidden, predictor=p)
    per_token = mlp_per_token_rows(x, w1, b1, w2t, b2, chosen)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(per_token), rtol=1e-5, atol=1e-5)
    float_chosen = floats.mlp[0].scores_from_hidden(hidden) >= p.threshold
    assert np.mean(np.asarray(float_chosen) != np.asarray(chosen)) < 0.05


def test_lossless_and_everything_chosen_decode_equal_dense_and_batches_fall_back():
    params = init_params(CONFIG, jax.random.PRNGKey(7))
    continuation = jax.random.randint(jax.random.PRNGKey(9), (1, 3), 3, 64)
    prompt = jax.random.randint(jax.random.PRNGKey(8), (1, 6), 3, 64)
    dense = decode_logits(params, prompt, continuation, SparsityPolicy(), None)
    assert rel_max_err(decode_logits(params, prompt, continuation, LOSSLESS, None), dense) <= 1e-5
    weights = sparse_weights_from_predictors(random_predictors(CONFIG, 48, -np.inf))
    assert rel_max_err(decode_logits(params, prompt, continuation, PREDICTED, weights), dense) <= 1e-5
    # Batch 2: above SPARSE_DECODE_MAX_BATCH the decode step is dense, whatever the predictors say.
    prompt2 = jax.random.randint(jax.random.PRNGKey(10), (2, 6), 3, 64)
    cont2 = jnp.concatenate([continuation, continuation])
    few = sparse_weights_from_predictors(random_predictors(CONFIG, 48, 5.0))
    assert (
        rel_max_err(
            decode_logits(params, prompt2, cont2, PREDICTED, few),
            decode_logits(params, prompt2, cont2, SparsityPolicy(), None),
        )
        <= 1e-6
    )


def test_fixed_rows_and_policy_errors():
    params = init_params(CONFIG, jax.random.PRNGKey(11))
    prompt = jax.random.randint(jax.random.PRNGKey(12), (1, 4), 3, 64)
    continuation = jax.random.randint(jax.random.PRNGKey(13), (1, 2), 3, 64)
    all_rows = SparseWeights(fixed_rows=(jnp.ones((48,), jnp.int32),) * 2)
    dense = decode_logits(params, prompt, continuation, SparsityPolicy(), None)
    assert rel_max_err(decode_logits(params, prompt, continuation, SparsityPolicy(), all_rows), dense) <= 1e-5
    with pytest.raises(ValueError, match="needs trained predictors"):
        check_sparsity(PREDICTED, None)
    with pytest.raises(ValueError, match="no calibrated thresholds"):
        sparse_weights_from_predictors(random_predictors(CONFIG, 8))
    with pytest.raises(ValueError):
        SparsityPolicy("sometimes")


def test_eval_ppl_json_dense_vs_sparse(reference_model_dir, tmp_path, capsys):
    """Everything chosen gives the dense perplexity at density 1; a random predictor at a high threshold does not;
    lossless equals dense and reports the fraction of fc2 rows it reads."""
    import json
    from conftest import SHARED
    from dejavu_jax.checkpoint import load_model
    from dejavu_jax.predictor_store import save_predictors
    from eval.__main__ import main as eval_main

    config = load_model(reference_model_dir, "float32").config
    data = SHARED / "data" / "wikitext-2" / "wiki.test.raw"
    base = [
        "ppl",
        "--model",
        str(reference_model_dir),
        "--data",
        str(data),
        "--seq-len",
        "128",
        "--max-windows",
        "2",
        "--json",
    ]
    results = {}
    for name, threshold in (("all", -np.inf), ("few", 2.0)):
        save_predictors(random_predictors(config, k=config.ffn_dim, threshold=threshold), tmp_path / name)
        assert eval_main(base + ["--predictors", str(tmp_path / name)]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    full, few = results["all"], results["few"]
    assert abs(full["sparse_ppl"] - full["ppl"]) / full["ppl"] <= 1e-5
    assert full["mlp_density"] == [1.0] * config.num_hidden_layers and full["selection"] == "threshold"
    assert few["ppl"] == full["ppl"] and few["ppl_change"] > 0.01 and max(few["mlp_density"]) < 0.5
    assert eval_main(base + ["--mlp-sparsity", "lossless"]) == 0
    lossless = json.loads(capsys.readouterr().out)
    assert abs(lossless["sparse_ppl"] - lossless["ppl"]) / lossless["ppl"] <= 1e-5
    assert 0 < min(lossless["mlp_density"]) and max(lossless["mlp_density"]) < 0.6  # ReLU zeros skipped
    # Heads by threshold: a -inf head threshold keeps every head (dense perplexity), a high one fewer; predictors
    # without head thresholds choose top-K (and say so).
    heads = {}
    for name, head_threshold, head_k in (
        ("heads_all", -np.inf, 6),
        ("heads_few", 1.0, 6),
        ("heads_uncalibrated", None, 5),
    ):
        p = random_predictors(config, k=config.ffn_dim, threshold=-np.inf).with_k(
            [config.ffn_dim] * config.num_hidden_layers, [config.num_attention_heads - 1] * config.num_hidden_layers
        )
        if head_threshold is not None:
            p = p.with_threshold(p.mlp_threshold, [head_threshold] * config.num_hidden_layers)
        save_predictors(p, tmp_path / name)
        flags = ["--predictors", str(tmp_path / name), "--head-sparsity", "predicted", "--head-k", str(head_k)]
        assert eval_main(base + flags) == 0
        heads[name] = json.loads(capsys.readouterr().out)
    assert abs(heads["heads_all"]["sparse_ppl"] - full["ppl"]) / full["ppl"] <= 1e-5
    assert heads["heads_all"]["head_density"] == [1.0] * config.num_hidden_layers
    few = heads["heads_few"]
    assert few["head_selection"] == "threshold" and few["ppl_change"] > 0.01 and max(few["head_density"]) < 0.9
    uncalibrated = heads["heads_uncalibrated"]
    assert uncalibrated["head_selection"] == "topk" and np.allclose(uncalibrated["head_density"], 5 / 6, rtol=1e-5)
    assert heads["heads_all"]["head_selection"] == "threshold"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--mlp-sparsity", "predicted"], "needs --predictors"),
        (["--mlp-sparsity", "lossless", "--predictors", "x"], "goes with --mlp-sparsity predicted"),
        (["--head-sparsity", "oracle"], "needs --head-k"),
        (["--head-k", "3"], "--head-k takes a positive count"),
        (["--head-sparsity", "predicted"], "needs --predictors"),
        (["--selection", "topk"], "applies to --mlp-sparsity predicted"),
        (["--mlp-sparsity", "lossless", "--int8-scores"], "--int8-scores applies to --mlp-sparsity predicted"),
        (["--head-union"], "--head-union applies to --head-sparsity predicted"),
    ],
)
def test_sparsity_flag_errors_before_loading(flags, message, reference_model_dir, capsys):
    from dejavu_jax.generate import main as generate_main

    assert generate_main(["--model", "/nonexistent", "--prompt", "x"] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_sparse_generation_choosing_everything_equals_dense(reference_model_dir, tmp_path, capsys):
    from dejavu_jax.checkpoint import load_model
    from dejavu_jax.generate import main as generate_main
    from dejavu_jax.predictor_store import save_predictors

    config = load_model(reference_model_dir, "float32").config
    everything = random_predictors(config, k=config.ffn_dim, threshold=-np.inf)
    save_predictors(everything, tmp_path / "all")
    # heads by threshold too, -inf: every head chosen, through the head-sparse decode step
    layers = config.num_hidden_layers
    save_predictors(everything.with_threshold(everything.mlp_threshold, [-np.inf] * layers), tmp_path / "heads")
    argv = [
        "--model",
        str(reference_model_dir),
        "--prompt",
        "The history of",
        "--max-new-tokens",
        "6",
        "--dtype",
        "float32",
        "--json",
    ]
    assert generate_main(argv) == 0
    dense = capsys.readouterr().out
    for extra in (
        ["--predictors", str(tmp_path / "all")],
        ["--predictors", str(tmp_path / "all"), "--selection", "topk"],
        ["--mlp-sparsity", "lossless"],
        ["--predictors", str(tmp_path / "heads"), "--mlp-sparsity", "predicted", "--head-sparsity", "predicted"],
    ):
        assert generate_main(argv + extra) == 0
        assert capsys.readouterr().out == dense, extra


def test_decode_tuning_is_checked_and_batches_above_the_kernels_get_the_dense_program():
    with pytest.raises(ValueError, match="hidden must be one of"):
        SparsityPolicy(MLPSparsity.PREDICTED, tuning=(("hidden", "cuda"),))
    with pytest.raises(ValueError, match="unknown tuning 'fc3_segment'"):
        SparsityPolicy(tuning=(("fc3_segment", 64),))
    for bad in ("2", "yes"):
        with pytest.raises(ValueError, match="hidden_layernorm must be 0 or 1"):
            SparsityPolicy(MLPSparsity.PREDICTED, tuning=(("hidden_layernorm", bad),))
    weights = sparse_weights_from_predictors(random_predictors(CONFIG, 48, 0.5))
    assert for_decode_batch(PREDICTED, weights, 1) == (PREDICTED, weights)
    assert for_decode_batch(PREDICTED, weights, 2) == (DENSE, None)
    assert for_decode_batch(LOSSLESS, None, 4) == (DENSE, None)
    fixed = SparseWeights(fixed_rows=(jnp.ones((48,), jnp.int32),) * 2)
    assert for_decode_batch(DENSE, fixed, 4) == (DENSE, fixed)  # the benchmarks' ceiling stays as given


def test_predictors_with_a_calibrated_head_k_below_every_head_default_to_predicted_heads(tmp_path):
    """Without --head-sparsity, --predictors whose calibrated head K is below every head in some layer make the
    heads predicted (beside the predicted MLP); K = every head (or uncalibrated heads) keeps them dense; --head-k
    with --predictors asks for predicted heads; an explicit --head-sparsity wins."""
    import argparse

    from dejavu_jax.predictor_store import save_predictors
    from dejavu_jax.sparsity import HeadSparsity
    from dejavu_jax.sparsity_args import add_sparsity_args, check_sparsity_args

    parser = argparse.ArgumentParser()
    add_sparsity_args(parser, decoding=True)
    layers, heads = CONFIG.num_hidden_layers, CONFIG.num_attention_heads
    base = random_predictors(CONFIG, k=CONFIG.ffn_dim, threshold=0.0)
    for name, head_k in (("below", [heads - 1] + [heads] * (layers - 1)), ("all", [heads] * layers)):
        save_predictors(base.with_k([CONFIG.ffn_dim] * layers, head_k), tmp_path / name)
    save_predictors(base, tmp_path / "uncalibrated")

    def policy(*argv):
        return check_sparsity_args(parser.parse_args(list(argv)))

    below = policy("--predictors", str(tmp_path / "below"))
    assert below.heads == HeadSparsity.PREDICTED and below.mlp == MLPSparsity.PREDICTED
    for name in ("all", "uncalibrated"):
        p = policy("--predictors", str(tmp_path / name))
        assert p.heads == HeadSparsity.NONE and p.mlp == MLPSparsity.PREDICTED
    with_k = policy("--predictors", str(tmp_path / "all"), "--head-k", "2")
    assert with_k.heads == HeadSparsity.PREDICTED and with_k.head_k == 2 and with_k.mlp == MLPSparsity.PREDICTED
    assert policy("--predictors", str(tmp_path / "below"), "--head-sparsity", "none").heads == HeadSparsity.NONE
    heads_only = policy("--predictors", str(tmp_path / "below"), "--head-sparsity", "predicted")
    assert heads_only.mlp == MLPSparsity.NONE  # as before: explicit predicted heads alone
    lossless = policy("--predictors", str(tmp_path / "below"), "--mlp-sparsity", "lossless")
    assert lossless.mlp == MLPSparsity.LOSSLESS and lossless.heads == HeadSparsity.PREDICTED
    assert policy("--predictors", str(tmp_path / "missing")).heads == HeadSparsity.NONE  # loading says why
