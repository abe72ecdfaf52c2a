"""Numerics of the Flax OPT against HF `OPTForCausalLM` (torch, fp32), through the real converter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import random_hf_model, rel_max_err, small_config, tiny_hf_config
from dejavu_jax.checkpoint import load_model
from dejavu_jax.config import OPTConfig
from dejavu_jax.hf_convert import convert_hf_params
from dejavu_jax.generation import decode_step, prefill
from dejavu_jax.hf_checkpoint import HFTensorReader
from dejavu_jax.model import OPTForCausalLM, abstract_params, init_params
from dejavu_jax.sparsity import HeadSparsity, SparseWeights, SparsityPolicy, head_schedule

VARIANTS = {
    "pre_ln": {},
    "post_ln_project_in_out": dict(do_layer_norm_before=False, word_embed_proj_dim=24),  # opt-350m
    "head_dim_80": dict(hidden_size=160, num_attention_heads=2, ffn_dim=96),  # opt-2.7b's head_dim
    "head_dim_128": dict(hidden_size=256, num_attention_heads=2, ffn_dim=96),
    "remove_final_layer_norm": dict(_remove_final_layer_norm=True),
    "no_bias_no_ln_affine": dict(enable_bias=False, layer_norm_elementwise_affine=False),
}


def left_padded_batch(rng, vocab, lengths, total):
    ids = rng.integers(3, vocab, size=(len(lengths), total))
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
        ids[row, : total - n] = 1
    return ids, mask


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(variant, save_hf):
    hf_config = tiny_hf_config(**VARIANTS[variant])
    hf = random_hf_model(hf_config)
    config = OPTConfig.from_hf_dict(hf_config.to_dict())
    params = convert_hf_params(HFTensorReader(save_hf(hf)), config, "float32")
    ids, mask = left_padded_batch(np.random.default_rng(1), hf_config.vocab_size, [11, 7, 3], 11)
    logits, _ = OPTForCausalLM(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    real = mask.astype(bool)
    assert rel_max_err(logits, hf_logits(hf, ids, mask), real) <= 1e-4


def test_reference_model_logits_match_hf(reference_model_dir):
    from transformers import OPTForCausalLM as HF

    hf = HF.from_pretrained(reference_model_dir, dtype=torch.float32).eval()
    model = load_model(reference_model_dir, "float32")
    ids, mask = left_padded_batch(np.random.default_rng(2), model.config.vocab_size, [64, 40], 64)
    logits, _ = OPTForCausalLM(model.config).apply({"params": model.params}, jnp.asarray(ids), jnp.asarray(mask))
    assert rel_max_err(logits, hf_logits(hf, ids, mask), mask.astype(bool)) <= 1e-4


@pytest.mark.parametrize("attention_impl", ["xla", "pallas"])
@pytest.mark.parametrize("variant", ["pre_ln", "post_ln_project_in_out"])
def test_cached_decoding_equals_full_forward(variant, attention_impl, save_hf):
    hf_config = tiny_hf_config(**VARIANTS[variant])
    config = OPTConfig.from_hf_dict(hf_config.to_dict())
    params = convert_hf_params(HFTensorReader(save_hf(random_hf_model(hf_config))), config, "float32")
    params = jax.tree.map(jnp.asarray, params)
    rng = np.random.default_rng(3)
    prompt_len, steps = 8, 6
    ids, mask = left_padded_batch(rng, config.vocab_size, [8, 5], prompt_len)
    continuation = rng.integers(3, config.vocab_size, size=(2, steps))

    last, cache = prefill(params, jnp.asarray(ids), jnp.asarray(mask), config=config, num_slots=prompt_len + steps)
    step_logits = [np.asarray(last)]
    for t in range(steps - 1):
        last, cache = decode_step(
            params, cache, jnp.asarray(continuation[:, t]), config=config, attention_impl=attention_impl
        )
        step_logits.append(np.asarray(last))

    full_ids = np.concatenate([ids, continuation], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(continuation)], axis=1)
    full, _ = OPTForCausalLM(config).apply({"params": params}, jnp.asarray(full_ids), jnp.asarray(full_mask))
    expected = np.asarray(full)[:, prompt_len - 1 : prompt_len - 1 + steps]
    assert rel_max_err(np.stack(step_logits, axis=1), expected) <= 1e-5


def test_everything_selected_equals_dense():
    """The sparse seams with every neuron and every head selected compute the dense model."""
    config = small_config()
    params = init_params(config, jax.random.PRNGKey(4))
    ids = jax.random.randint(jax.random.PRNGKey(5), (2, 9), 3, 64)
    model = OPTForCausalLM(config)
    dense, _ = model.apply({"params": params}, ids)
    schedule = head_schedule(6, config.num_hidden_layers, config.num_attention_heads)
    every_row = SparseWeights(fixed_rows=(jnp.ones((48,), jnp.int32),) * 2, head_schedule=schedule)
    every_head = SparsityPolicy(heads=HeadSparsity.FIXED, head_k=4)
    sparse, _ = model.apply({"params": params}, ids, policy=every_head, sparse_weights=every_row)
    assert rel_max_err(sparse, dense) <= 1e-5
    # ... and dropping a head or neurons changes the output: the seams are live.
    half_rows = SparseWeights(fixed_rows=((jnp.arange(48) < 24).astype(jnp.int32),) * 2)
    changed, _ = model.apply({"params": params}, ids, sparse_weights=half_rows)
    assert rel_max_err(changed, dense) > 1e-3
    three_heads = SparsityPolicy(heads=HeadSparsity.FIXED, head_k=3)
    fewer_heads, _ = model.apply({"params": params}, ids, policy=three_heads, sparse_weights=every_row)
    assert rel_max_err(fewer_heads, dense) > 1e-3


def test_unknown_attention_impl_raises():
    config = small_config(num_hidden_layers=1)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        OPTForCausalLM(config, attention_impl="cuda").init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_close_to_fp32(dtype):
    config = OPTConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        max_position_embeddings=32,
        word_embed_proj_dim=64,
    )
    params = init_params(config, jax.random.PRNGKey(6))
    ids = jax.random.randint(jax.random.PRNGKey(7), (2, 12), 3, 64)
    ref, _ = OPTForCausalLM(config).apply({"params": params}, ids)
    half = jax.tree.map(lambda x: x.astype(dtype), params)
    out, _ = OPTForCausalLM(config, dtype).apply({"params": half}, ids)
    assert out.dtype == jnp.float32
    assert rel_max_err(out, ref) <= 3e-2


def test_abstract_params_hash_equal_and_config_static():
    a = OPTConfig.from_hf_dict(tiny_hf_config().to_dict())
    b = OPTConfig.from_hf_dict(tiny_hf_config().to_dict())
    assert a == b and hash(a) == hash(b)
    assert jax.tree.structure(abstract_params(a)) == jax.tree.structure(abstract_params(b))
    assert abstract_params(a) == abstract_params(b)
