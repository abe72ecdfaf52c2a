"""`python -m bench profile`'s attribution of kernels to blocks (the trace itself needs a GPU)."""

import pytest

from bench.profile_decode import BLOCKS, block_of_scope, block_times, kernel_blocks


def test_block_of_scope():
    step = "jit(_generate_tokens)/while/body/decode_step/OPTForCausalLM/layer_3/layers_3"
    assert block_of_scope(f"{step}/attention_block/self_attn/qkv_proj/dot_general") == "attention block"
    assert block_of_scope(f"{step}/mlp_block/mlp/dot_general") == "MLP block"
    assert block_of_scope("jit(_generate_tokens)/while/body/decode_step/OPTForCausalLM/dot_general") == (
        "rest of the decode step"
    )
    prefill = "jit(_generate_tokens)/prefill/OPTForCausalLM/layer_0/layers_0/mlp_block/add"
    assert block_of_scope(prefill) == "prefill"


# Lines in the syntax of a GPU program's optimized HLO (jax 0.11.2, H100; the Triton IR blob and operands cut): a
# Pallas call names its kernel in MLIR attributes after the IR, and an unfused sort's kernel is named after the sort.
_STEP = "jit(_generate_tokens)/while/body/decode_step/OPTForCausalLM/layer_0/layers_0"
GPU_HLO_LINES = f"""
  %pallas_call.302 = f16[1,256]{{1,0}} custom-call(%get-tuple-element.3570), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI, metadata={{op_name="{_STEP}/mlp_block/jit(predictor_hidden)/predictor_hidden/pallas_call" scheduling_name="pallas_call.302"}}, backend_config={{debug = false, grid_x = 64 : i32, ir = "ML\\EFR\\0DMLIR\\22name\\22", name = "predictor_hidden", num_stages = 1 : i32}}
  ROOT %sort.72.1 = (f32[1,12]{{1,0}}, s32[1,12]{{1,0}}) sort(%param_0.4, %iota.166.1), dimensions={{1}}, metadata={{op_name="{_STEP}/attention_block/top_k" scheduling_name="sort.72.1"}}
  %custom-call.14 = (u32[1,50272]{{1,0}}) custom-call(%get-tuple-element.3479), custom_call_target="xla.gpu.ext.cub_sort_pairs", metadata={{op_name="jit(_generate_tokens)/while/body/cond/branch_1_fun/jit(sort)/sort"}}
"""


def test_kernel_blocks_read_gpu_pallas_calls_and_unfused_ops():
    blocks = kernel_blocks(GPU_HLO_LINES)
    assert blocks["predictor_hidden"] == "MLP block"
    assert blocks["sort_72_1"] == "attention block"
    assert blocks["custom_call_14"] == "rest of the decode step"  # a library call keeps its instruction name


def test_profile_builds_and_runs_a_tensor_parallel_program(capsys):
    """`--tp 2`: sharded weights, planted predictors and heads compile and run as one program (a CPU trace has no
    GPU kernels to report); a --tp the devices or the heads do not allow is one error line."""
    from bench.profile_decode import main

    argv = "--shape tiny --tp 2 --mlp-density 0.25 --head-density 0.5 --new-tokens 4 --prompt-len 8".split()
    assert main(argv) == 1
    assert "no device kernel events" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--shape", "tiny", "--tp", "3"])
    assert e.value.code == 2 and "must divide" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [
        "--mlp-variant fixed",
        "--mlp-variant lossless",
        "--int8-scores --tuning hidden_layernorm=0,hidden_block_r=2",
    ],
)
def test_profile_builds_and_runs_fixed_rows_and_int8_predictors(extra, capsys, tmp_path):
    """Each program compiles and runs; `kernel_blocks` attributes the kernels of the compiled program (the HLO
    `--hlo` writes: the program the tool times) to its blocks."""
    from bench.profile_decode import main

    hlo = tmp_path / "program.hlo"
    argv = f"--shape tiny --mlp-density 0.25 --new-tokens 3 --prompt-len 8 {extra} --hlo {hlo}".split()
    assert main(argv) == 1  # runs; a CPU trace has no GPU kernels
    assert "no device kernel events" in capsys.readouterr().out
    blocks = kernel_blocks(hlo.read_text())
    assert all("." not in name and "-" not in name for name in blocks)  # kernel names: '.' and '-' made '_'
    assert {"attention block", "MLP block", "prefill"} <= set(blocks.values())
    if "lossless" in extra:  # fc2 over the firing rows, no predictor
        program = hlo.read_text()
        assert "nonzero_fc2" in program and "predictor_hidden" not in program
    some_fusion = next(name for name, block in blocks.items() if block == "MLP block")
    times = block_times({some_fusion: [2.0, 3.0], "nvjet_gemm": [7.0]}, blocks)
    assert list(times) == list(BLOCKS) and times["MLP block"] == 5.0 and times["unattributed"] == 7.0


@pytest.mark.parametrize(
    "argv, message",
    [
        ("--int8-scores", "--int8-scores needs --mlp-density"),
        ("--mlp-density 0.1 --mlp-variant fixed --int8-scores", "--int8-scores needs --mlp-density"),
        ("--tuning hidden_block_r=100", "hidden_block_r must be an int in"),
        ("--tuning fc3=1", "unknown tuning"),
        ("--mlp-variant fixed", "--mlp-variant needs --mlp-density"),
    ],
)
def test_profile_flag_errors(argv, message, capsys):
    from bench.profile_decode import main

    with pytest.raises(SystemExit) as e:
        main(["--shape", "tiny", *argv.split()])
    assert e.value.code == 2 and message in capsys.readouterr().err
