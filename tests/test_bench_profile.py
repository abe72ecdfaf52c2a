"""`python -m bench profile`'s attribution of kernels to blocks (the trace itself needs a GPU)."""

import dataclasses

import jax.numpy as jnp

from bench.generate import random_params
from bench.profile_decode import BLOCKS, block_of_scope, block_times, compile_generation, kernel_blocks
from dejavu_jax.config import shape_config
from dejavu_jax.sampling import SamplingConfig


def test_block_of_scope():
    step = "jit(_generate_tokens)/while/body/decode_step/OPTForCausalLM/layer_3/layers_3"
    assert block_of_scope(f"{step}/attention_block/self_attn/qkv_proj/dot_general") == "attention block"
    assert block_of_scope(f"{step}/mlp_block/mlp/dot_general") == "MLP block"
    assert block_of_scope("jit(_generate_tokens)/while/body/decode_step/OPTForCausalLM/dot_general") == (
        "rest of the decode step"
    )
    prefill = "jit(_generate_tokens)/prefill/OPTForCausalLM/layer_0/layers_0/mlp_block/add"
    assert block_of_scope(prefill) == "prefill"


def test_kernel_blocks_of_a_compiled_decode_program():
    config = dataclasses.replace(shape_config("tiny"), eos_token_id=-1)
    params = random_params(config, jnp.float32)
    ids = jnp.ones((1, 8), jnp.int32)
    compiled = compile_generation(params, ids, SamplingConfig().to_device(), None, dict(config=config, num_slots=16))
    hlo = compiled.as_text()
    blocks = kernel_blocks(hlo)
    assert all("." not in name and "-" not in name for name in blocks)  # kernel names: '.' and '-' made '_'
    assert {"attention block", "MLP block", "prefill"} <= set(blocks.values())
    some_fusion = next(name for name, block in blocks.items() if block == "MLP block")
    times = block_times({some_fusion: [2.0, 3.0], "nvjet_gemm": [7.0]}, blocks)
    assert list(times) == list(BLOCKS) and times["MLP block"] == 5.0 and times["unattributed"] == 7.0
