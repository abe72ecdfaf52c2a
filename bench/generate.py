"""Dense decode latency: JAX (one compiled prefill + decode program) vs HF transformers eager, vs the floor.

    python -m bench generate --shape opt-6.7b --shape opt-13b [--batch 1] [--prompt-len 128] [--new-tokens 128]

A random-weight fp16 OPT of the real shape. Decode time per token is (T(N) - T(1)) / (N - 1) where T(n) is the
median time of one full generation call of n tokens: the same compiled program (n is traced), so compile and
prefill cancel; T(1) is reported as the prefill (+ first token). EOS is disabled so every run makes N tokens.
The floor is (weight bytes + mean KV-cache bytes read per decode step) / the device copy bandwidth measured in
the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import copy_bandwidth, median_seconds, provenance, write_results
from dejavu_jax.config import OPT_SHAPES, shape_config
from dejavu_jax.generation import AUTOTUNE_MODES, generation_program, kernels_need_interpret, uses_kernels
from dejavu_jax.model import ATTENTION_IMPLS, OPTForCausalLM, check_attention_impl, sparsity_from_predictors
from dejavu_jax.predictors import Predictors, init_low_rank
from dejavu_jax.sampling import SamplingConfig


def random_params(config, dtype):
    model = OPTForCausalLM(config, dtype)
    return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]


def bytes_read_per_token(config, batch, prompt_len, new_tokens, itemsize=2) -> dict:
    """What one decode step must read: every weight once (one row of the position table), and the KV cache."""
    c = config
    weights = c.num_params - (c.max_position_embeddings + 2 - 1) * c.hidden_size
    kv_per_token = 2 * c.num_hidden_layers * c.hidden_size * itemsize * batch
    mean_context = prompt_len + (new_tokens - 1) / 2
    return {"weights": weights * itemsize, "kv": kv_per_token * mean_context}


def random_mlp_sparsity(config, density: float, rank: int | None = None):
    """Random-weight predictors (default rank min(1000, d/2), DejaVu's) that keep round(density * ffn) neurons per
    token per layer."""
    c = config
    k = max(1, round(density * c.ffn_dim))
    rank = rank or min(1000, c.hidden_size // 2)
    keys = jax.random.split(jax.random.PRNGKey(3), 2 * c.num_hidden_layers)
    mlp = tuple(init_low_rank(keys[i], c.hidden_size, rank, c.ffn_dim, dtype=jnp.float16).replace(k=k)
                for i in range(c.num_hidden_layers))
    heads = tuple(init_low_rank(keys[-1 - i], c.hidden_size, rank, c.num_attention_heads, dtype=jnp.float16)
                  for i in range(c.num_hidden_layers))
    return sparsity_from_predictors(Predictors(mlp=mlp, heads=heads), "batch_union"), k, rank


def time_jax(config, batch, prompt_len, new_tokens, repeats, params=None, sparsity=None,
             attention_impl="xla", autotune="default") -> dict:
    if params is None:
        params = random_params(config, jnp.float16)
    jax.block_until_ready(params)
    no_eos = dataclasses.replace(config, eos_token_id=-1)  # fixed token count
    ids = jax.random.randint(jax.random.PRNGKey(1), (batch, prompt_len), 3, config.vocab_size)
    mask = jnp.ones_like(ids)
    sampling = SamplingConfig().to_device()
    num_slots = prompt_len + new_tokens
    interpret = uses_kernels(sparsity, attention_impl) and kernels_need_interpret()  # CPU smoke runs
    static = dict(config=no_eos, num_slots=num_slots, interpret=interpret, attention_impl=attention_impl)
    program = generation_program(autotune)

    def run(n):
        tokens, counts = program(params, ids, mask, jnp.int32(n), jax.random.PRNGKey(2), sampling, sparsity,
                                 **static)
        tokens.block_until_ready()
        return counts

    start = time.perf_counter()
    program.lower(params, ids, mask, jnp.int32(1), jax.random.PRNGKey(2), sampling, sparsity, **static).compile()
    compile_s = time.perf_counter() - start
    counts = run(new_tokens)
    assert int(np.min(counts)) == new_tokens, f"generated {counts}, wanted {new_tokens}"
    t_full, _ = median_seconds(lambda: run(new_tokens), repeats)
    t_one, _ = median_seconds(lambda: run(1), repeats)
    return {"compile_s": compile_s, "prefill_ms": t_one * 1e3,
            "decode_ms_per_token": (t_full - t_one) / (new_tokens - 1) * 1e3, "total_ms": t_full * 1e3}


def time_hf(config, batch, prompt_len, new_tokens, repeats) -> dict | None:
    try:
        import torch
        from transformers import OPTConfig as HFConfig, OPTForCausalLM as HFModel
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    hf_config = HFConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("model_type", "architectures")})
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = HFModel(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device="cuda")

    def run(n):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=config.pad_token_id)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + n

    hf_repeats = max(3, repeats // 3)
    t_full, _ = median_seconds(lambda: run(new_tokens), hf_repeats)
    t_one, _ = median_seconds(lambda: run(1), hf_repeats)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"prefill_ms": t_one * 1e3, "decode_ms_per_token": (t_full - t_one) / (new_tokens - 1) * 1e3}


def attention_list(text: str) -> list[str]:
    try:
        return [check_attention_impl(name.strip()) for name in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", choices=sorted(OPT_SHAPES), help="OPT shape; repeat for several")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers eager")
    p.add_argument("--mlp-density", type=float, default=None,
                   help="also time sparse-MLP decoding in the same run: random-weight predictors (--predictor-rank) "
                        "keep this fraction of each layer's neurons per token (the kernel computes their union)")
    p.add_argument("--predictor-rank", type=int, default=None,
                   help="rank of the random predictors with --mlp-density (default min(1000, d/2), DejaVu's)")
    p.add_argument("--attention", type=attention_list, default=list(ATTENTION_IMPLS),
                   help=f"comma list of decode attention implementations to time side by side "
                        f"(default {','.join(ATTENTION_IMPLS)})")
    p.add_argument("--autotune", default="default", choices=AUTOTUNE_MODES,
                   help="XLA GEMM autotuning of the JAX program (dejavu_jax.generation.AUTOTUNE_MODES); 'exhaustive' "
                        "compiles for minutes the first time, its results cached (see autotune_cache_dir)")
    p.add_argument("--out", default=None, help="markdown path (default bench/results/generate_<card>_<date>.md)")
    args = p.parse_args(argv)
    shapes = args.shape or ["opt-6.7b", "opt-13b"]
    if args.new_tokens < 2 or args.batch < 1 or args.prompt_len < 1:
        p.error("need --new-tokens >= 2, --batch >= 1, --prompt-len >= 1")
    if args.mlp_density is not None and not 0 < args.mlp_density <= 1:
        p.error(f"--mlp-density must be in (0, 1]. Got {args.mlp_density}")
    if args.predictor_rank is not None and (args.predictor_rank < 1 or args.mlp_density is None):
        p.error(f"--predictor-rank must be >= 1 and goes with --mlp-density. Got {args.predictor_rank}")

    info = provenance()
    bandwidth = copy_bandwidth()
    bw = bandwidth["floor_bandwidth"]
    print(f"{info['card']}: copy bandwidth {bw / 1e12:.2f} TB/s ({bandwidth})", flush=True)
    rows = []
    for name in shapes:
        config = shape_config(name)
        read = bytes_read_per_token(config, args.batch, args.prompt_len, args.new_tokens)
        floor_ms = (read["weights"] + read["kv"]) / bw * 1e3
        hf = None if args.no_hf else time_hf(config, args.batch, args.prompt_len, args.new_tokens, args.repeats)
        params = random_params(config, jnp.float16)
        sparsity = None
        if args.mlp_density is not None:
            sparsity, k, rank = random_mlp_sparsity(config, args.mlp_density, args.predictor_rank)
        for impl in args.attention:
            jx = time_jax(config, args.batch, args.prompt_len, args.new_tokens, args.repeats, params,
                          attention_impl=impl, autotune=args.autotune)
            sparse = None
            if sparsity is not None:
                sparse = time_jax(config, args.batch, args.prompt_len, args.new_tokens, args.repeats, params, sparsity,
                                  attention_impl=impl, autotune=args.autotune)
                sparse.update(k=k, rank=rank, density=args.mlp_density,
                              speedup_vs_dense=jx["decode_ms_per_token"] / sparse["decode_ms_per_token"])
                print(f"{name} [{impl} attention]: sparse MLP (K={k} of {config.ffn_dim} per token, predictor rank "
                      f"{rank}) {sparse['decode_ms_per_token']:.2f} ms/token, {sparse['speedup_vs_dense']:.2f}x "
                      f"dense JAX", flush=True)
            row = {"shape": name, "attention": impl, "batch": args.batch, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "floor_ms": floor_ms, "bytes_per_token": read, "jax": jx, "hf": hf,
                   "jax_sparse_mlp": sparse,
                   "jax_gbs": (read["weights"] + read["kv"]) / jx["decode_ms_per_token"] / 1e6}
            rows.append(row)
            hf_ms = f"{hf['decode_ms_per_token']:.2f}" if hf else "-"
            print(f"{name} [{impl} attention]: JAX {jx['decode_ms_per_token']:.2f} ms/token "
                  f"({jx['decode_ms_per_token'] / floor_ms:.2f}x floor {floor_ms:.2f}), HF eager {hf_ms} ms/token, "
                  f"compile {jx['compile_s']:.1f} s", flush=True)
        del params, sparsity
        gc.collect()

    lines = [f"# Dense decode latency, {info['card']}", "",
             f"- date {info['date']}, commit `{info['commit']}`, jax {info['jax']}",
             f"- command: `{info['command']}`",
             f"- copy bandwidth (read+write) {bw / 1e12:.2f} TB/s; random fp16 weights; greedy; EOS disabled; "
             f"XLA autotuning: {args.autotune}", "",
             "| shape | attention | batch | prompt | new | JAX ms/token | tokens/s | GB/s | floor ms | JAX / floor | "
             "HF eager ms/token | HF / JAX | JAX prefill ms | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        jx, hf = r["jax"], r["hf"]
        ms = jx["decode_ms_per_token"]
        hf_cells = f"{hf['decode_ms_per_token']:.2f} | {hf['decode_ms_per_token'] / ms:.2f}x" if hf else "- | -"
        lines.append(f"| {r['shape']} | {r['attention']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | "
                     f"{ms:.2f} | {1e3 * r['batch'] / ms:.1f} | {r['jax_gbs']:.0f} | {r['floor_ms']:.2f} | "
                     f"{ms / r['floor_ms']:.2f} | {hf_cells} | {jx['prefill_ms']:.1f} | {jx['compile_s']:.1f} |")
    sparse_rows = [r for r in rows if r["jax_sparse_mlp"]]
    if sparse_rows:
        lines += ["", "Sparse-MLP decode (same run, same weights; random-weight predictors, so only the speed is "
                  "meaningful; prefill dense):", "",
                  "| shape | attention | neurons kept per token | predictor rank | JAX sparse ms/token | "
                  "dense JAX ms/token | speedup |", "|---|---|---|---|---|---|---|"]
        for r in sparse_rows:
            sp = r["jax_sparse_mlp"]
            lines.append(f"| {r['shape']} | {r['attention']} | {sp['k']} ({sp['density']:.1%}) | {sp['rank']} | "
                         f"{sp['decode_ms_per_token']:.2f} | {r['jax']['decode_ms_per_token']:.2f} | "
                         f"{sp['speedup_vs_dense']:.2f}x |")
    markdown = "\n".join(lines) + "\n"
    card = info["card"].replace(" ", "-")
    path = write_results(f"generate_{card}_{info['date']}", markdown, {**info, "bandwidth": bandwidth, "rows": rows},
                         args.out)
    print(markdown)
    print(f"wrote {path}")
    return 0
