"""Where a decode step's time goes: GPU kernels of the compiled generation program, from a JAX profiler trace.

    python -m bench profile --shape opt-6.7b [--new-tokens 32] [--top 25] [--attention xla|pallas]
                            [--mlp-density D [--mlp-variant predicted|fixed|lossless] [--int8-scores]]
                            [--head-density D [--heads fixed|predicted] [--head-kv repair|all]]
                            [--tuning NAME=VALUE,...] [--tp N] [--hlo FILE] [--trace-dir DIR]

Runs one generation of random fp16 weights under `jax.profiler.trace(create_perfetto_trace=True)`, reads the
perfetto JSON it writes, and prints per kernel name: count per decode step, total and mean time; then kernel time
vs wall time (the gaps are launch and host overhead). `--hlo` also writes the optimized HLO of the program.

It also sums the kernel time by block (`kernel_blocks`): each kernel name is looked up among the compiled program's
instructions (XLA names a fusion's kernel after the instruction, '.' and '-' made '_'; a Pallas kernel keeps its
`name`), whose op_name metadata carries the model's scopes: a decode layer's `attention_block` (its
LayerNorm, projections, attention, the residual add; with head sparsity the head choice too) or `mlp_block` (its
LayerNorm, the predictor, the selection, fc1, fc2; the predictor's first-layer kernel too when it runs ahead of
the attention block and writes the attention LayerNorm, `DecodeTuning.hidden_layernorm`), the rest of a decode step
(embeddings, final LayerNorm, LM head, sampling), and the prefill. What no instruction names (cuBLAS's own kernels,
copies) is "unattributed".

With `--tp N` the weights (and the planted predictors) are made straight into their Megatron shardings over N
devices, as `bench generate --tp` makes them, and the tables are those of the first device (`/device:GPU:0`). The
all-reduces are listed under their kernels' own names (NCCL's, which no HLO instruction carries, so the by-block
table counts them as "unattributed").
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp

from bench.decode_setup import add_decode_args, check_decode_args, decode_setup
from dejavu_jax.config import shape_config
from dejavu_jax.generation import generate_tokens
from dejavu_jax.parallel import TP_AXIS, tp_mesh
from dejavu_jax.sampling import SamplingConfig


def device_kernel_events(trace_dir: str, device: str = "/device:GPU:0") -> list[dict]:
    """The kernel (and copy) events of one GPU, `device` as the trace names its process."""
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name" and e["args"]["name"].split()[0] == device
    }
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids]


BLOCKS = ("attention block", "MLP block", "rest of the decode step", "prefill", "unattributed")
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]+)"')
# A Pallas call's kernel name in its backend config: JSON (`"name": "k"`, escaped or not) or, as jax 0.11.2 emits
# for GPU Triton calls, MLIR attributes after the IR blob (`, name = "k"`).
_PALLAS_NAME = re.compile(r'(?:\\?"name\\?"\s*:\s*\\?"|[,{]\s*name = ")([\w.\-]+)')


def block_of_scope(op_name: str) -> str:
    """The block an op's name-scope path puts it in (`BLOCKS`)."""
    if "prefill" in op_name.split("/"):
        return "prefill"
    if "/attention_block/" in op_name:
        return "attention block"
    if "/mlp_block/" in op_name:
        return "MLP block"
    return "rest of the decode step"


def kernel_blocks(hlo_text: str) -> dict[str, str]:
    """Kernel name -> block, from a compiled program's HLO text: an instruction by its name ('.' and '-' as '_'; a
    fusion's kernel, or an unfused op's such as a sort's, is named after it), a Pallas call by the `name` in its
    backend config. A name several instructions share (one kernel reused for identical fusions) takes the first
    one's block."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, op_name = m.groups()
        if "custom-call(" in line:
            pallas = _PALLAS_NAME.search(line)
            if pallas:
                name = pallas.group(1)
        out.setdefault(re.sub(r"[.\-]", "_", name), block_of_scope(op_name))
    return out


def block_times(by_name: dict[str, list[float]], blocks: dict[str, str]) -> dict[str, float]:
    """Total kernel time per block (`BLOCKS`, in that order) from per-name durations."""
    out = dict.fromkeys(BLOCKS, 0.0)
    for name, durs in by_name.items():
        out[blocks.get(name, "unattributed")] += sum(durs)
    return out


def compile_generation(params, ids, sampling, sparsity, static: dict):
    """The generation program this bench times, compiled once: it runs as `compiled(params, ids, mask, n, rng,
    sampling, sparsity)`, and its HLO (`as_text()`) is what `kernel_blocks` reads, so the kernels named are the
    kernels timed. `static`: `generate_tokens`' keyword arguments (config, num_slots, policy, ...)."""
    return generate_tokens.lower(
        params, ids, jnp.ones_like(ids), jnp.int32(1), jax.random.PRNGKey(2), sampling, sparsity, **static
    ).compile()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_decode_args(p)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hlo", default=None, help="write the optimized HLO text here")
    p.add_argument("--trace-dir", default=None, help="keep the profiler trace in this directory (default: a temp dir)")
    args = p.parse_args(argv)
    tuning = check_decode_args(p, args)
    try:
        mesh = tp_mesh(shape_config(args.shape), args.tp)
    except ValueError as e:
        p.error(str(e))
    setup = decode_setup(args, tuning, mesh)
    config, params, policy, sparsity = setup.config, setup.params, setup.policy, setup.sparsity
    tp = 1 if mesh is None else mesh.shape[TP_AXIS]
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, args.prompt_len), 3, config.vocab_size)
    sampling = SamplingConfig().to_device()
    static = dict(
        config=config,
        num_slots=args.prompt_len + args.new_tokens,
        attention_impl=args.attention,
        policy=policy,
        mesh=mesh,
    )

    compiled = compile_generation(params, ids, sampling, sparsity, static)
    hlo_text = compiled.as_text()

    def run(n):
        jax.block_until_ready(
            compiled(params, ids, jnp.ones_like(ids), jnp.int32(n), jax.random.PRNGKey(2), sampling, sparsity)
        )

    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo_text)
    run(args.new_tokens)
    run(args.new_tokens)
    keep = contextlib.nullcontext(args.trace_dir) if args.trace_dir else tempfile.TemporaryDirectory()
    with keep as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            run(args.new_tokens)
            wall = time.perf_counter() - start
        kernels = device_kernel_events(trace_dir)
    if not kernels:
        print("no device kernel events in the trace")
        return 1
    steps = args.new_tokens - 1
    by_name = collections.defaultdict(list)
    for e in kernels:
        by_name[e["name"]].append(float(e["dur"]))
    busy = sum(sum(v) for v in by_name.values())
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    where = "" if mesh is None else f" tp{tp}, device 0"
    print(
        f"{args.shape}{where}: {len(kernels)} kernel events, {len(kernels) / steps:.0f} per decode step (approx.); "
        f"kernel time {busy / 1e3:.2f} ms, device span {span / 1e3:.2f} ms, host wall {wall * 1e3:.2f} ms "
        f"for {args.new_tokens} tokens + prefill"
    )
    per_stream = collections.Counter(e["tid"] for e in kernels)
    # a side stream (`DecodeTuning.hidden_stream`) shows as a second thread of kernel events
    print("events per GPU stream (trace thread id): " + ", ".join(f"{t}: {n}" for t, n in sorted(per_stream.items())))
    print(f"{'total us':>10} {'share':>6} {'count':>6} {'mean us':>8}  kernel")
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[: args.top]:
        print(f"{sum(durs):10.0f} {sum(durs) / busy:6.1%} {len(durs):6d} {sum(durs) / len(durs):8.1f}  {name[:110]}")
    print("\nby block (kernel names mapped to the compiled program's scopes; see the module docstring):")
    print(f"{'total us':>10} {'share':>6} {'us/step':>8}  block")
    for block, total in block_times(by_name, kernel_blocks(hlo_text)).items():
        per_step = f"{total / steps:8.1f}" if block not in ("prefill", "unattributed") else f"{'-':>8}"
        print(f"{total:10.0f} {total / busy:6.1%} {per_step}  {block}")
    return 0
