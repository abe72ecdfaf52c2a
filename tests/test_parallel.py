"""Tensor parallelism (`dejavu_jax.parallel`) on simulated CPU devices (conftest forces 4): sharded parameters give
the single-device logits and greedy tokens through the real generation program, the weights are really split,
the compiled program makes two all-reduces per layer, checkpoints restore into their shards, and bad --tp values
fail cleanly on every command that takes the flag."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dejavu_jax import parallel
from dejavu_jax.checkpoint import load_model, write_model_directory
from dejavu_jax.config import OPTConfig, tiny_config
from dejavu_jax.generation import generate_ids, generate_tokens
from dejavu_jax.model import OPTForCausalLM, abstract_params
from dejavu_jax.sparse_attention import window_kernel_applies
from dejavu_jax.sampling import SamplingConfig
from dejavu_jax.sparsity import (
    DENSE,
    HeadSparsity,
    MLPSparsity,
    Selection,
    SparseWeights,
    SparsityPolicy,
    head_schedule,
)

from conftest import REFERENCE_MODEL, fixed_heads, rel_max_err

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (simulated) devices; see conftest.py")

EIGHT_HEADS = tiny_config(num_attention_heads=8, vocab_size=256, max_position_embeddings=64)
# What the Megatron layout splits (the model docstring's parameter layout); everything else is replicated.
SPLIT_LEAVES = {"qkv_w", "qkv_b", "out_w", "fc1_w", "fc1_b", "fc2_w_t"}
HEADS_SECOND = {"qkv_w", "qkv_b"}  # [3, H, ...]: split on their second axis, the others on their first
PROMPTS = [[2, 31, 7, 99, 4], [2, 18, 250, 3, 64, 12, 9]]


def forward_logits(params, config, ids):
    model = OPTForCausalLM(config, params["embed_tokens"]["embedding"].dtype)
    return jax.jit(lambda p, i: model.apply({"params": p}, i)[0])(params, ids)


def scaled_random_params(config, seed: int):
    """Random weights (std 0.2, biases and LayerNorms too), large enough that every block matters and greedy choices
    are far from ties."""
    leaves, tree = jax.tree.flatten(abstract_params(config))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves)])


@pytest.fixture(scope="module")
def eight_heads_params():
    return scaled_random_params(EIGHT_HEADS, 3)


@pytest.fixture(scope="module")
def eight_heads_reference(eight_heads_params):
    """Single-device logits of seeded inputs and greedy tokens."""
    ids = jnp.asarray(np.random.default_rng(1).integers(3, EIGHT_HEADS.vocab_size, (2, 16)), jnp.int32)
    return (
        ids,
        forward_logits(eight_heads_params, EIGHT_HEADS, ids),
        generate_ids(eight_heads_params, EIGHT_HEADS, PROMPTS, 10),
    )


@pytest.fixture(scope="module")
def reference_models():
    return load_model(REFERENCE_MODEL, "float32"), load_model(REFERENCE_MODEL, "float32", tp=2)


def test_reference_model_tp2_gives_single_device_logits_and_tokens(reference_models):
    single, sharded = reference_models
    qkv = sharded.params["layers_0"]["self_attn"]["qkv_w"]
    assert isinstance(qkv.sharding, NamedSharding) and qkv.sharding.spec == P(None, "tp")
    assert parallel.tp_size(sharded.params) == 2 and parallel.tp_size(single.params) == 1
    ids = jnp.asarray(
        np.random.default_rng(0).integers(3, single.config.vocab_size, (2, 24)), jnp.int32
    )  # seeded inputs
    ref = forward_logits(single.params, single.config, ids)
    out = forward_logits(sharded.params, sharded.config, ids)
    assert rel_max_err(out, ref) < 1e-5
    want = generate_ids(single.params, single.config, PROMPTS, 12)
    assert generate_ids(sharded.params, sharded.config, PROMPTS, 12) == want


@pytest.mark.parametrize("vocab_split", [False, True])
def test_random_8_heads_tp4_gives_single_device_logits_and_tokens(
    eight_heads_params, eight_heads_reference, vocab_split
):
    mesh = parallel.tp_mesh(EIGHT_HEADS, 4, vocab_split)
    sharded = parallel.shard_params(eight_heads_params, mesh, vocab_split)
    assert parallel.mesh_of(sharded) is mesh
    ids, ref, want = eight_heads_reference
    assert rel_max_err(forward_logits(sharded, EIGHT_HEADS, ids), ref) < 1e-5
    assert generate_ids(sharded, EIGHT_HEADS, PROMPTS, 10) == want


@pytest.mark.parametrize("vocab_split", [False, True])
def test_parameters_are_really_split(eight_heads_params, vocab_split):
    sharded = parallel.shard_params(eight_heads_params, parallel.tp_mesh(EIGHT_HEADS, 4, vocab_split), vocab_split)
    split_bytes = replicated_bytes = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(eight_heads_params):
        name = parallel._leaf_name(path)
        if name in SPLIT_LEAVES or (vocab_split and name == "embedding" and "embed_tokens" in str(path)):
            split_bytes += leaf.nbytes
        else:
            replicated_bytes += leaf.nbytes
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharded):
        name = parallel._leaf_name(path)
        split = name in SPLIT_LEAVES or (vocab_split and name == "embedding" and "embed_tokens" in str(path))
        want = (P(None, "tp") if name in HEADS_SECOND else P("tp")) if split else P()
        assert leaf.sharding.spec == want, (path, leaf.sharding.spec)
    assert split_bytes > replicated_bytes  # the check below is about most of the model
    assert parallel.param_bytes_per_device(sharded) == [replicated_bytes + split_bytes // 4] * 4
    assert parallel.param_bytes_per_device(eight_heads_params) == [split_bytes + replicated_bytes]


@pytest.mark.parametrize("sparse", [False, True])
def test_generation_program_all_reduces_twice_per_layer(eight_heads_params, sparse):
    """Megatron: one all-reduce after out_proj and one after fc2, in the prefill and in the decode loop; no weight is
    gathered; the decode loop is one program (a while loop). `sparse`: the same with fixed rows and fixed heads, each
    device computing its own neurons and heads (the heads' choice adds no collective)."""
    mesh = parallel.tp_mesh(EIGHT_HEADS, 4)
    sharded = parallel.shard_params(eight_heads_params, mesh)
    ids = jnp.ones((1, 8), jnp.int32)
    policy, weights = (FIXED_HEADS[1], fixed_rows_and_heads(mesh)) if sparse else (DENSE, None)
    hlo = (
        generate_tokens.lower(
            sharded,
            ids,
            ids,
            jnp.int32(4),
            jax.random.PRNGKey(0),
            SamplingConfig().to_device(),
            weights,
            config=EIGHT_HEADS,
            num_slots=24,
            policy=policy,
            mesh=mesh,
        )
        .compile()
        .as_text()
    )
    layers = EIGHT_HEADS.num_hidden_layers
    assert hlo.count("all-reduce(") == 2 * layers * 2
    assert hlo.count("all-gather(") == 0 and " while(" in hlo


def test_checkpoint_restores_straight_into_shards(eight_heads_params, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    directory = write_model_directory(
        tmp_path / "model", EIGHT_HEADS, eight_heads_params.items(), "float32", None, source="test"
    )
    targets = []
    restore = ocp.StandardCheckpointer.restore

    def spy(self, path, target=None, *args, **kwargs):
        targets.append(target)
        return restore(self, path, target, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointer, "restore", spy)
    loaded = load_model(directory, "float32", tp=4)
    want = parallel.param_shardings(eight_heads_params, parallel.tp_mesh(EIGHT_HEADS, 4))
    # orbax was asked for the shards themselves, never for a whole array on one device
    asked = {name: jax.tree.map(lambda s: s.sharding, t) for name, t in zip(eight_heads_params, targets)}
    assert jax.tree.leaves(asked) == jax.tree.leaves(want)
    got = jax.tree.map(lambda x: x.sharding, loaded.params)
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(eight_heads_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tp_values_are_checked():
    assert parallel.parse_tp("2") == 2 and parallel.parse_tp("auto") == "auto" and parallel.parse_tp(3) == 3
    for bad in ("0", "-2", "two", "1.5", ""):
        with pytest.raises(ValueError, match="positive device count or 'auto'"):
            parallel.parse_tp(bad)
    six_heads = OPTConfig(hidden_size=48, num_attention_heads=6, ffn_dim=192, num_hidden_layers=1, vocab_size=64)
    with pytest.raises(ValueError, match=r"--tp 4 must divide the model's 6 attention heads and its ffn width 192"):
        parallel.tp_mesh(six_heads, 4)
    with pytest.raises(ValueError, match=r"--tp 8 needs 8 devices, but JAX sees 4"):
        parallel.tp_mesh(EIGHT_HEADS, 8)
    assert parallel.tp_mesh(EIGHT_HEADS, 1) is None
    assert parallel.tp_mesh(EIGHT_HEADS, "auto").shape["tp"] == 4


def test_fixed_row_sparse_decoding_under_tp4_matches_one_device(eight_heads_params):
    """Each device runs the row-masked kernels over its own neurons, then one psum: the single-device sparse logits
    of a decode step, and its greedy tokens."""
    from dejavu_jax.generation import decode_step, prefill

    rng = np.random.default_rng(4)
    masks = tuple(jnp.asarray(rng.random(EIGHT_HEADS.ffn_dim) < 0.3, jnp.int32) for _ in range(2))
    rows = SparseWeights(fixed_rows=masks)
    mesh = parallel.tp_mesh(EIGHT_HEADS, 4)
    sharded = parallel.shard_params(eight_heads_params, mesh)
    ids = jnp.asarray([[2, 31, 7, 99, 4, 18, 250, 3]], jnp.int32)

    def next_logits(params, on, sparse_weights):
        _, cache = prefill(params, ids, jnp.ones_like(ids), config=EIGHT_HEADS, num_slots=16, mesh=on)
        return decode_step(params, cache, jnp.asarray([5]), sparse_weights, config=EIGHT_HEADS, mesh=on)[0]

    one_device = next_logits(eight_heads_params, None, rows)
    assert rel_max_err(one_device, next_logits(eight_heads_params, None, None)) > 1e-2  # the masks matter
    assert rel_max_err(next_logits(sharded, mesh, rows), one_device) < 1e-5
    prompts = PROMPTS[:1]  # batch 1: the decode steps run the row-masked kernels
    want = generate_ids(eight_heads_params, EIGHT_HEADS, prompts, 6, sparse_weights=rows)
    assert generate_ids(sharded, EIGHT_HEADS, prompts, 6, sparse_weights=rows) == want


def test_oracle_heads_under_tp_are_refused(eight_heads_params):
    sharded = parallel.shard_params(eight_heads_params, parallel.tp_mesh(EIGHT_HEADS, 2))
    policy = SparsityPolicy(heads=HeadSparsity.ORACLE, head_k=2)
    with pytest.raises(ValueError, match="does not run the oracle head selection.*use fixed or predicted heads"):
        generate_ids(sharded, EIGHT_HEADS, PROMPTS[:1], 4, policy=policy)


def test_generate_cli_reports_placement(reference_models, capsys):
    from dejavu_jax.generate import main

    # two short prompts and 12 new tokens: the program the reference test compiled
    argv = ["--model", str(REFERENCE_MODEL), "--prompt", "The history", "--prompt", "In 1990 the city"]
    assert main(argv + ["--max-new-tokens", "12", "--dtype", "float32", "--tp", "2", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 2 and all(r["tp"] == 2 and len(r["param_bytes_per_device"]) == 2 for r in records)


def _one_error_line(err: str, *needles):
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


@pytest.mark.parametrize(
    "tp, needles", [("4", ("--tp 4", "6 attention heads", "1536")), ("8", ("--tp 8", "JAX sees 4")), ("x", ("--tp",))]
)
def test_bad_tp_fails_on_every_command(tp, needles, tmp_path, capsys):
    from dejavu_jax.generate import main as generate
    from eval.__main__ import main as evaluate

    model = str(REFERENCE_MODEL)
    assert generate(["--model", model, "--prompt", "hi", "--tp", tp]) == 2
    _one_error_line(capsys.readouterr().err, *needles)
    text = tmp_path / "corpus.txt"
    text.write_text("some text " * 50)
    assert evaluate(["ppl", "--model", model, "--data", str(text), "--tp", tp]) == 2
    _one_error_line(capsys.readouterr().err, *needles)
    pytest.importorskip("lm_eval")
    assert evaluate(["tasks", "--model", model, "--tasks-dir", str(tmp_path), "--tasks", "copa", "--tp", tp]) == 2
    _one_error_line(capsys.readouterr().err, *needles)


def test_bench_generate_tp(tmp_path, capsys):
    from bench.generate import main

    out = tmp_path / "g.md"
    argv = "--shape tiny --no-hf --attention xla --repeats 1 --new-tokens 3 --prompt-len 8 --tp 2 --lm-head vocab"
    # No lossless row: it has no weights to shard, and the all-reduce test below runs it under tp.
    argv += " --mlp-density 0.25 --fire-rate 0.1 --variants fixed,predicted --predictor-rank 16"
    argv += " --selection topk"  # threshold decoding under tp: the generation tests above
    argv += " --head-density 0.5"  # each device computes the chosen heads it holds
    assert main(argv.split() + ["--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    variants = ["dense", "fixed rows", "predicted, topk"]
    variants += ["fixed heads", "fixed rows + fixed heads", "predicted, topk + predicted heads"]
    assert [r["variant"] for r in rows] == variants
    for row in rows:
        assert row["tp"] == 2 and row["lm_head"] == "vocab" and len(row["param_bytes_per_device"]) == 2
    assert "| tiny | 2 | vocab | nccl | 1 | xla | fixed rows |" in out.read_text()
    for bad, needle in (("3", "must divide"), ("0", "positive device count")):
        with pytest.raises(SystemExit) as e:
            main(["--shape", "tiny", "--tp", bad])
        assert e.value.code == 2
        _one_error_line(capsys.readouterr().err, needle)
    with pytest.raises(SystemExit) as e:
        main(["--shape", "tiny", "--tp", "2", "--all-reduce", "nccl,twice"])
    _one_error_line(capsys.readouterr().err, "--all-reduce takes")


def test_bench_generate_times_each_all_reduce_mode_against_its_own_dense_row(tmp_path):
    """Under tp every row is compiled once per --all-reduce mode and timed in one interleaved group; one device has
    no all-reduce, so its rows come once."""
    from bench.generate import main

    out = tmp_path / "g.md"
    argv = "--shape tiny --no-hf --attention xla --repeats 1 --new-tokens 3 --prompt-len 8 --tp 1,2"
    # lossless: the sparse row test_bench_generate_tp leaves out
    argv += " --all-reduce nccl,one-shot --mlp-density 0.25 --fire-rate 0.1 --variants lossless"
    assert main(argv.split() + ["--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["tp"], r["all_reduce"], r["variant"]) for r in rows] == [
        (1, "-", "dense"),
        (1, "-", "lossless"),
        (2, "nccl", "dense"),
        (2, "nccl", "lossless"),
        (2, "one-shot", "dense"),
        (2, "one-shot", "lossless"),
    ]
    for dense, sparse in (rows[2:4], rows[4:6]):  # each mode's speedup is against its own dense row
        want = dense["jax"]["decode_ms_per_token"] / sparse["jax"]["decode_ms_per_token"]
        assert sparse["speedup_vs_dense"] == pytest.approx(want)


def test_one_shot_all_reduce_program_generates_the_single_device_tokens(eight_heads_params):
    """The one-shot mode is a compiler option of the same program (ignored on CPU, so this checks the plumbing):
    tp = 2 greedy tokens equal one device's; an unknown mode is refused."""
    from dejavu_jax.generation import generate_ids, generation_program

    prompts = [[5, 9, 14, 2, 7], [3, 3, 8]]
    want = generate_ids(eight_heads_params, EIGHT_HEADS, prompts, 5)
    sharded = parallel.shard_params(eight_heads_params, parallel.tp_mesh(EIGHT_HEADS, 2))
    assert generate_ids(sharded, EIGHT_HEADS, prompts, 5, all_reduce="one-shot") == want
    with pytest.raises(ValueError, match="all_reduce must be one of"):
        generation_program("default", "nvshmem")


def test_bench_planted_topk_keeps_every_chosen_row_per_shard():
    """Under tp each shard keeps ceil(K / tp) rows (`sparse_mlp.shard_topk`): the planted predictors' K lets every
    shard keep all of its planted rows, which score above every other row."""
    from bench.generate import planted_predictors, planted_rows
    from dejavu_jax.sparse_mlp import shard_topk

    tp = 4
    rows = planted_rows(EIGHT_HEADS, 0.3, 0.1)
    for (_, chosen), predictor in zip(rows, planted_predictors(EIGHT_HEADS, rows, 16, tp).mlp):
        per_shard = chosen.reshape(tp, -1).sum(axis=1)
        assert shard_topk(predictor.k, tp) == per_shard.max() and per_shard.min() < per_shard.max()


def test_bench_allreduce(tmp_path):
    from bench.allreduce import main, parse_variant

    out = tmp_path / "a.md"
    argv = ["--tp", "4", "--dims", "32,48", "--steps", "4", "--repeats", "1", "--reductions", "psum,gather,ring"]
    assert main(argv + ["--dtypes", "float16,float32", "--out", str(out)]) == 0
    (result,) = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [(r["dtype"], r["d"], r["reduction"]) for r in result["rows"]] == [
        (t, d, reduction) for t in ("float16", "float32") for d in (32, 48) for reduction in ("psum", "gather", "ring")
    ]
    for r in result["rows"]:  # every reduction gives the sum (checked against numpy inside the bench)
        tol = 2e-3 if r["dtype"] == "float16" else 1e-6
        assert r["max_rel_err"] < tol and r["us_per_call"] > 0 and r["tp"] == 4
        assert r["bytes"] == r["d"] * (2 if r["dtype"] == "float16" else 4)
    for bad in (["--reductions", "psum,tree"], ["--dtypes", "bfloat8"]):
        with pytest.raises(SystemExit):
            main(["--tp", "2", *bad])
    assert parse_variant("NCCL_PROTO=LL --xla_flag=1") == (["--xla_flag=1"], {"NCCL_PROTO": "LL"})
    for bad in ("LL", "", "1X=2"):
        with pytest.raises(ValueError):
            parse_variant(bad)


def test_bench_allreduce_variants_run_in_child_processes(tmp_path):
    from bench.allreduce import main

    out = tmp_path / "a.md"
    argv = ["--tp", "2", "--dims", "32", "--steps", "2", "--repeats", "1", "--out", str(out)]
    assert main(argv + ["--variant=DEJAVU_PROBE=1", "--variant=--xla_no_such_flag=1"]) == 0
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["variant"] for r in results] == ["baseline", "DEJAVU_PROBE=1", "--xla_no_such_flag=1"]
    assert results[1]["rows"][0]["max_rel_err"] < 2e-3
    assert "error" in results[2]  # an unknown XLA flag fails its own row, not the run


def test_initialize_hosts_needs_all_three_settings(monkeypatch):
    for name in parallel.HOST_ENV:
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_hosts() is False  # nothing asked: a one-host run
    with pytest.raises(ValueError, match="coordinator address, the number of processes"):
        parallel.initialize_hosts(coordinator="localhost:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="must be integers"):
        parallel.initialize_hosts()
    with pytest.raises(ValueError, match=r"lie in \[0, number of processes\)"):
        parallel.initialize_hosts("localhost:1234", 2, 2)


def test_two_processes_decode_as_one_tp2_program(reference_models):
    """Two hosts simulated by two processes of one CPU device each (jax.distributed, gloo collectives): the same
    `generate --tp 2` command in each gives the single-device greedy tokens."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-m", "dejavu_jax.generate", "--model", str(REFERENCE_MODEL), "--prompt", "Hello"]
    argv += ["--max-new-tokens", "6", "--dtype", "float32", "--tp", "2", "--json"]
    argv += ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [
        subprocess.Popen(argv + ["--process-id", str(i)], env=env, cwd=root, stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    single, _ = reference_models
    prompt = single.tokenizer("Hello")["input_ids"]
    want = generate_ids(single.params, single.config, [prompt], 6)[0]
    for out in outputs:
        record = json.loads(out.strip().splitlines()[-1])
        assert record["tp"] == 2 and record["token_ids"] == want
        assert len(record["param_bytes_per_device"]) == 1  # this process's one device


# ---- sparse MLP decoding under tp: each shard chooses among and computes its own neurons ---------------------------


def random_mlp_predictors(config, threshold: float = 0.0, k: int = 0, seed: int = 6, rank: int = 12):
    """Random rank-`rank` MLP predictors (rank padded to 16 in the decode layout) with output biases N(0, 1), so a
    threshold of 0 chooses about half of each layer's neurons and changes the output."""
    from dejavu_jax.predictors import init_low_rank
    from dejavu_jax.sparsity import decode_predictor

    rng = np.random.default_rng(seed)
    layers = []
    for layer in range(config.num_hidden_layers):
        p = init_low_rank(
            jax.random.PRNGKey(seed + layer),
            config.hidden_size,
            rank,
            config.ffn_dim,
            output_bias=rng.normal(size=config.ffn_dim),
        )
        layers.append(decode_predictor(p.replace(k=k), threshold))
    return SparseWeights(mlp=tuple(layers))


def greedy_steps(params, config, mesh, policy, sparse_weights, prompts, new_tokens):
    """Greedy decoding of a batch through the step-by-step API (`prefill`, then `decode_step` per token) with the
    generation program's padding and cache size: (every decode step's logits [new_tokens - 1, B, V], the greedy
    tokens [B, new_tokens]). One compile of each step, however many tokens."""
    from dejavu_jax.generation import bucket, decode_step, left_pad, prefill

    ids, mask = left_pad(prompts, bucket(max(len(p) for p in prompts), 8), config.pad_token_id)
    num_slots = ids.shape[1] + bucket(new_tokens, 16)
    logits, cache = prefill(
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        config=config,
        num_slots=num_slots,
        recent_window=policy.recent_window,
        mesh=mesh,
    )
    tokens, step_logits = [jnp.argmax(logits, axis=-1)], []
    while len(tokens) < new_tokens:
        logits, cache = decode_step(params, cache, tokens[-1], sparse_weights, config=config, policy=policy, mesh=mesh)
        step_logits.append(np.asarray(logits))
        tokens.append(jnp.argmax(logits, axis=-1))
    return np.stack(step_logits), np.stack([np.asarray(t) for t in tokens], axis=1)


def decode_steps(params, config, mesh, policy, sparse_weights, prompt, new_tokens):
    """`greedy_steps` of one prompt: (the first decode step's logits [V], the greedy tokens)."""
    logits, tokens = greedy_steps(params, config, mesh, policy, sparse_weights, [prompt], new_tokens)
    return logits[0, 0], tokens[0].tolist()


SPARSE_POLICIES = {
    "threshold": SparsityPolicy(MLPSparsity.PREDICTED, Selection.THRESHOLD),
    "lossless": SparsityPolicy(MLPSparsity.LOSSLESS),
}


def check_sparse_tp_matches_one_device(params, config, tp, kind, prompt, new_tokens=5, check_choice_matters=False):
    """Threshold-predicted or lossless decoding over `tp` shards, on predictors split by `shard_sparse_weights`: the
    single-device decode-step logits (fp32), and its greedy tokens through the real generation program.
    `check_choice_matters`: also check that the predictors' choice changes the dense logits."""
    policy = SPARSE_POLICIES[kind]
    weights = random_mlp_predictors(config) if kind == "threshold" else None
    mesh = parallel.tp_mesh(config, tp)
    sharded = parallel.shard_params(params, mesh)
    sharded_weights = parallel.shard_sparse_weights(weights, mesh)
    one_device_logits, want = decode_steps(params, config, None, policy, weights, prompt, new_tokens)
    sharded_logits, _ = decode_steps(sharded, config, mesh, policy, sharded_weights, prompt, 2)
    assert rel_max_err(sharded_logits, one_device_logits) < 1e-5
    got = generate_ids(sharded, config, [prompt], new_tokens, policy=policy, sparse_weights=sharded_weights)
    assert got == [want]
    if check_choice_matters:
        dense_logits, _ = decode_steps(params, config, None, DENSE, None, prompt, 2)
        assert rel_max_err(one_device_logits, dense_logits) > 1e-2


@pytest.mark.parametrize("kind", ["threshold", "lossless"])
def test_sparse_decoding_under_tp4_matches_one_device(eight_heads_params, kind):
    check_sparse_tp_matches_one_device(eight_heads_params, EIGHT_HEADS, 4, kind, PROMPTS[0], 5, kind == "threshold")


@pytest.mark.parametrize("kind", ["threshold"])  # lossless: the TP=4 test covers the same split path
def test_reference_model_sparse_decoding_under_tp2_matches_one_device(reference_models, kind):
    single, _ = reference_models
    prompt = single.tokenizer("The history of the city")["input_ids"]
    check_sparse_tp_matches_one_device(single.params, single.config, 2, kind, prompt)


def test_predictor_weights_are_really_split(eight_heads_params):
    """w2_t, b2 and fixed rows split on ffn (each device holds 1/N of them); w1_t, b1 and thresholds replicated."""
    weights = random_mlp_predictors(EIGHT_HEADS).replace(
        fixed_rows=tuple(jnp.ones((EIGHT_HEADS.ffn_dim,), jnp.int32) for _ in range(EIGHT_HEADS.num_hidden_layers))
    )
    sharded = parallel.shard_sparse_weights(weights, parallel.tp_mesh(EIGHT_HEADS, 4))

    def per_device(leaves):
        return parallel.param_bytes_per_device(leaves)

    for layer, (before, after) in enumerate(zip(weights.mlp, sharded.mlp)):
        for name in ("w2_t", "b2"):
            assert per_device(getattr(after, name)) == [getattr(before, name).nbytes // 4] * 4, (layer, name)
        for name in ("w1_t", "b1", "threshold"):
            assert per_device(getattr(after, name)) == [getattr(before, name).nbytes] * 4, (layer, name)
        np.testing.assert_array_equal(np.asarray(after.w2_t), np.asarray(before.w2_t))
    assert per_device(sharded.fixed_rows) == [weights.fixed_rows[0].nbytes * len(weights.fixed_rows) // 4] * 4
    assert parallel.shard_sparse_weights(weights, None) is weights


def test_topk_under_tp_keeps_each_shards_share(eight_heads_params):
    """Top-K over tp shards: each shard keeps the union over the batch of each row's ceil(K / tp) best scores among
    its own neurons (not the single-device choice): the output of the row-masked MLP over that mask, computed here
    from the scores shard by shard."""
    from dejavu_jax.sparse_mlp import mlp_decode_rows, mlp_decode_rows_split

    tp, k = 4, 20
    mesh = parallel.tp_mesh(EIGHT_HEADS, tp)
    mlp = eight_heads_params["layers_0"]["mlp"]
    weights = (mlp["fc1_w"], mlp["fc1_b"], mlp["fc2_w_t"], mlp["fc2_b"])
    predictor = random_mlp_predictors(EIGHT_HEADS, k=k).mlp[0]
    ffn, shard = EIGHT_HEADS.ffn_dim, EIGHT_HEADS.ffn_dim // tp
    # the global K best all lie in shard 0, so the per-shard choice differs from the single-device one
    predictor = predictor.replace(b2=predictor.b2 + jnp.where(jnp.arange(ffn) < shard, 10.0, 0.0))
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(1, EIGHT_HEADS.hidden_size)), jnp.float32)
    hidden = predictor.hidden(x)  # [1, r]

    scores = np.asarray(hidden, np.float64) @ np.asarray(predictor.w2_t, np.float64).T + np.asarray(predictor.b2)
    per_shard = np.zeros(ffn, np.int32)
    for s in range(tp):
        own = scores[0, s * shard : (s + 1) * shard]
        per_shard[s * shard + np.argsort(-own)[: -(-k // tp)]] = 1
    global_best = np.zeros(ffn, np.int32)
    global_best[np.argsort(-scores[0])[:k]] = 1
    assert (per_shard != global_best).any()

    split = NamedSharding(mesh, P("tp"))  # fc1 and fc2 split on ffn, fc2_b replicated: the Megatron layout
    sharded_weights = tuple(jax.device_put(w, split) for w in weights[:3]) + (weights[3],)
    sharded_predictor = parallel.shard_sparse_weights(SparseWeights(mlp=(predictor,)), mesh).mlp[0]
    got = mlp_decode_rows_split(mesh, x, *sharded_weights, "topk", hidden=hidden, predictor=sharded_predictor)
    want = mlp_decode_rows(x, *weights, "mask", mask=jnp.asarray(per_shard))
    assert rel_max_err(got, want) < 1e-5
    single_choice = mlp_decode_rows(x, *weights, "topk", hidden=hidden, predictor=predictor)
    assert rel_max_err(single_choice, mlp_decode_rows(x, *weights, "mask", mask=jnp.asarray(global_best))) < 1e-5
    assert rel_max_err(got, single_choice) > 1e-3


def test_int8_scores_under_tp_split_with_their_neurons_and_choose_as_one_device(eight_heads_params):
    """int8 scoring rows and their scales split on ffn like w2_t; threshold selection over the shards is the
    single-device choice, so the split MLP equals the one-device kernels' output."""
    from dejavu_jax.predictors import init_low_rank
    from dejavu_jax.sparse_mlp import mlp_decode_rows, mlp_decode_rows_split
    from dejavu_jax.sparsity import decode_predictor

    tp = 4
    mesh = parallel.tp_mesh(EIGHT_HEADS, tp)
    mlp = eight_heads_params["layers_0"]["mlp"]
    weights = (mlp["fc1_w"], mlp["fc1_b"], mlp["fc2_w_t"], mlp["fc2_b"])
    bias = np.random.default_rng(9).normal(size=EIGHT_HEADS.ffn_dim)
    p = init_low_rank(jax.random.PRNGKey(9), EIGHT_HEADS.hidden_size, 12, EIGHT_HEADS.ffn_dim, output_bias=bias)
    predictor = decode_predictor(p, 0.0, int8_scores=True)
    sharded = parallel.shard_sparse_weights(SparseWeights(mlp=(predictor,)), mesh).mlp[0]
    for name in ("w2_t", "w2_scale"):
        assert parallel.param_bytes_per_device(getattr(sharded, name)) == [getattr(predictor, name).nbytes // tp] * tp
    x = jnp.asarray(np.random.default_rng(10).normal(size=(1, EIGHT_HEADS.hidden_size)), jnp.float32)
    hidden = predictor.hidden(x)
    split = NamedSharding(mesh, P("tp"))
    sharded_weights = tuple(jax.device_put(w, split) for w in weights[:3]) + (weights[3],)
    got = mlp_decode_rows_split(mesh, x, *sharded_weights, "threshold", hidden=hidden, predictor=sharded)
    want = mlp_decode_rows(x, *weights, "threshold", hidden=hidden, predictor=predictor)
    assert rel_max_err(got, want) < 1e-5
    assert rel_max_err(want, mlp_decode_rows(x, *weights, "lossless")) > 1e-3  # the choice changed the output


# ---- head-sparse decoding under tp: each shard computes the chosen heads it holds ----------------------------------

SCHEDULE = head_schedule(11, EIGHT_HEADS.num_hidden_layers, EIGHT_HEADS.num_attention_heads)


FIXED_HEADS = {k: fixed_heads(k) for k in (1, 2, 3)}


def fixed_rows_and_heads(mesh=None, config=EIGHT_HEADS, seed=4):
    """Fixed row masks (about 30% of each layer's neurons) and the head schedule, placed on `mesh`."""
    rng = np.random.default_rng(seed)
    masks = tuple(jnp.asarray(rng.random(config.ffn_dim) < 0.3, jnp.int32) for _ in range(config.num_hidden_layers))
    schedule = head_schedule(11, config.num_hidden_layers, config.num_attention_heads)
    return parallel.shard_sparse_weights(SparseWeights(fixed_rows=masks, head_schedule=schedule), mesh)


def random_head_predictors(config, k: int, seed: int = 9, threshold=None) -> SparseWeights:
    """Random rank-8 head predictors keeping `k` heads per token (at most k, by `threshold` where given): their
    choice changes from token to token."""
    from dejavu_jax.predictors import init_low_rank
    from dejavu_jax.sparsity import decode_predictor

    keys = jax.random.split(jax.random.PRNGKey(seed), config.num_hidden_layers)
    heads = tuple(init_low_rank(key, config.hidden_size, 8, config.num_attention_heads).replace(k=k) for key in keys)
    return SparseWeights(heads=tuple(decode_predictor(p, threshold) for p in heads))


def check_heads_tp_match_one_device(params, config, tp, policy, weights, prompts, new_tokens=5):
    """Greedy decoding over `tp` shards gives every decode step's single-device logits (fp32) and greedy tokens.
    Returns the single-device step logits."""
    mesh = parallel.tp_mesh(config, tp)
    sharded = parallel.shard_params(params, mesh)
    want_logits, want = greedy_steps(params, config, None, policy, weights, prompts, new_tokens)
    got_logits, got = greedy_steps(
        sharded, config, mesh, policy, parallel.shard_sparse_weights(weights, mesh), prompts, new_tokens
    )
    assert rel_max_err(got_logits, want_logits) < 1e-5
    np.testing.assert_array_equal(got, want)
    return want_logits


# (policy, sparse weights, prompts) over 4 shards of 2 heads each, batch 1. With k = 1 every token's head lives on one
# shard: the other three hold none of it (their whole list is padding). k = 3 > 2: each shard lists both of its heads.
TP4_HEAD_CASES = {
    "predicted heads k=1": (
        SparsityPolicy(heads=HeadSparsity.PREDICTED, head_k=1),
        random_head_predictors(EIGHT_HEADS, 1),
    ),
    # threshold selection, at most 3: the single-device list carries -1 entries, padding on every shard
    "predicted heads by threshold, at most 3": (
        SparsityPolicy(heads=HeadSparsity.PREDICTED, head_k=3),
        random_head_predictors(EIGHT_HEADS, 3, threshold=0.5),
    ),
    "fixed rows + fixed heads k=3": (FIXED_HEADS[3], fixed_rows_and_heads()),
    # with every head's K/V, each shard's projection kernel writes its heads' K/V into its cache shard and applies
    # the LayerNorm by default: that, and each of the two off
    "fixed heads k=3, every head's K/V": (fixed_heads(3, head_kv="all"), fixed_rows_and_heads()),
    "fixed heads k=3, cache writes after the kernel": (
        fixed_heads(3, head_kv="all", head_qkv_cache_write=0),
        fixed_rows_and_heads(),
    ),
    "fixed heads k=3, layernorm before the kernel": (
        fixed_heads(3, head_kv="all", head_qkv_layernorm=0),
        fixed_rows_and_heads(),
    ),
    "fixed heads k=1, repair": (fixed_heads(1, head_kv="repair", head_window=4), SparseWeights(head_schedule=SCHEDULE)),
}


@pytest.mark.parametrize("case", list(TP4_HEAD_CASES))
def test_head_sparse_decoding_under_tp4_matches_one_device(eight_heads_params, case):
    policy, weights = TP4_HEAD_CASES[case]
    prompts = PROMPTS[:1]
    sparse_logits = check_heads_tp_match_one_device(eight_heads_params, EIGHT_HEADS, 4, policy, weights, prompts, 3)
    dense_logits, _ = greedy_steps(eight_heads_params, EIGHT_HEADS, None, DENSE, None, prompts, 2)
    assert rel_max_err(sparse_logits[:1], dense_logits) > 1e-2  # the heads' choice matters


@pytest.mark.parametrize("k", [1, 3])
def test_repair_window_kernel_under_tp4_matches_one_device(k):
    """head_dim 16 (the repair's window kernel applies at batch 1, R = 16): each shard runs `head_window_into_cache`
    over the chosen and forced heads it holds (padding entries skipped), with the single-device
    logits and greedy tokens."""
    config = tiny_config(num_attention_heads=8, hidden_size=128, vocab_size=256, max_position_embeddings=64)
    params = scaled_random_params(config, 5)
    schedule = head_schedule(11, config.num_hidden_layers, config.num_attention_heads)
    policy = fixed_heads(k, head_kv="repair", head_window=16)
    assert window_kernel_applies(1, 16, 24, config.head_dim, policy.tuning.head_knobs)
    check_heads_tp_match_one_device(params, config, 4, policy, SparseWeights(head_schedule=schedule), PROMPTS[:1], 4)


def test_every_head_chosen_under_tp4_equals_dense(eight_heads_params):
    """Fixed heads with k = H: the head-sparse step over every shard's heads, through the real generation program."""
    mesh = parallel.tp_mesh(EIGHT_HEADS, 4)
    sharded = parallel.shard_params(eight_heads_params, mesh)
    weights = parallel.shard_sparse_weights(SparseWeights(head_schedule=SCHEDULE), mesh)
    policy = fixed_heads(EIGHT_HEADS.num_attention_heads)
    dense_logits, want = greedy_steps(eight_heads_params, EIGHT_HEADS, None, DENSE, None, PROMPTS[:1], 4)
    got_logits, _ = greedy_steps(sharded, EIGHT_HEADS, mesh, policy, weights, PROMPTS[:1], 2)
    assert rel_max_err(got_logits, dense_logits[:1]) < 1e-5
    assert generate_ids(sharded, EIGHT_HEADS, PROMPTS[:1], 4, policy=policy, sparse_weights=weights) == want.tolist()


def test_reference_model_head_sparse_decoding_under_tp2_matches_one_device(reference_models):
    """6 heads over 2 shards of 3, k = 1 at batch 2: each shard computes the union of the batch's chosen heads it
    holds (2 entries of 3, padded where it holds fewer)."""
    single, _ = reference_models
    encoded = [single.tokenizer(t)["input_ids"] for t in ("The history of the city", "In 1990 the")]
    weights = SparseWeights(head_schedule=head_schedule(11, single.config.num_hidden_layers, 6))
    check_heads_tp_match_one_device(single.params, single.config, 2, FIXED_HEADS[1], weights, encoded, 3)


def test_shard_head_list_pads_a_shard_without_chosen_heads():
    """A shard holding none of the chosen heads lists padding only (head 0, unused), on every path."""
    from dejavu_jax.sparse_attention import shard_head_list

    chosen_idx = jnp.asarray([[5, 4]], jnp.int32)  # heads 4 and 5 of 8: both on the shard [4, 8)
    chosen = jnp.any(chosen_idx[..., None] == jnp.arange(8), axis=1)
    for first, local, idx in ((0, 4, chosen_idx), (0, 4, None), (4, 4, chosen_idx), (4, 4, None), (0, 2, None)):
        heads, used = shard_head_list(chosen, idx, first, local, 2)
        want = {first + int(h) for h, u in zip(heads, used[0]) if u}
        assert want == ({4, 5} if first == 4 else set()), (first, local, idx)
        assert np.all((np.asarray(heads) >= 0) & (np.asarray(heads) < local))
