"""Decode-attention kernel benchmark: the Pallas kernel vs XLA, against the floor.

    python -m bench kernels --op attention [--shapes opt-6.7b,opt-13b,opt-66b] [--seqs 256,1024,2048]
                                           [--batches 1,8] [--head-densities 1.0,0.5]
                                           [--variants auto,split1,bs64] [--repeats 10] [--max-minutes 5.5]
    python -m bench.kernels_attention ...                  # the same, before `--op attention` is wired
    python -m bench kernels --op attention --interpret     # tiny CPU smoke test (Pallas interpreter)

For each OPT decode shape (H heads of hd = 128), cache size S, batch B and head density (h = density * H
heads, a random unsorted subset, read through head_idx; 1.0 = all heads, head_idx None), in one run:
Pallas variants of kernels/decode_attention.py, `decode_attention_reference` (fp32 jnp twin) under XLA, and
"xla_model" - the model's dense decode path (dejavu_jax/model.py: fp16 einsum with fp32 accumulation,
where, softmax, probs cast to fp16, einsum; a head subset gathered with `keys[:, head_idx]` first). fp16
random cache, every slot allowed (a full cache: the worst case a decode step sees). The floor is the bytes
the op must read and write (K and V of the allowed slots of the h computed heads, q, out, the mask) / the
device copy bandwidth measured in the same run (bench.common.copy_bandwidth).

Timing: one call is microseconds, far below host dispatch, so each implementation runs as one jitted
program that chains calls (`bench.common.time_chained`: a `lax.fori_loop`, each call's output [B, h, hd] the
next call's q) and the median program time over --repeats runs is divided by the number of calls; compile
time is measured apart. So that the chain does not read the cache from the 50 MB L2, each loop step cycles
through several random caches until the bytes touched per cycle exceed 2x L2. Before timing, the first
call's output of every implementation is compared with the fp32 reference (max per-row relative error,
printed, stored; a Pallas time off by more than CORRECT_TOL is marked `!` and not counted as best).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback

# Torch (the copy-bandwidth probe) shares the GPU with JAX in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import (
    add_kernel_bench_args,
    card_slug,
    fmt_us,
    kernel_bench_setup,
    log,  # noqa: E402
    time_chained,
    to_markdown,
    to_text,
    write_results,
)
from kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,  # noqa: E402
    plan_decode_attention,
)

# OPT decode attention shapes: (heads, head_dim).
SHAPES = {"opt-6.7b": (32, 128), "opt-13b": (40, 128), "opt-66b": (72, 128)}
SEQS = (256, 1024, 2048)
BATCHES = (1, 8)
HEAD_DENSITIES = (1.0,)
INTERPRET = dict(shapes=("tiny-4x80",), seqs=(24, 37), batches=(1, 3), head_densities=(1.0, 0.5))

# Pallas variants: name -> decode_attention knobs. Two with the same resolved plan are timed once.
PALLAS_VARIANTS = {
    "auto": {},
    "split1": dict(split_s=1),  # no split over S: B*h programs, no merge
    "bs64": dict(block_s=64),  # larger K/V tiles (16 KiB each in fp16)
    "bs16": dict(block_s=16),
    "split_x2": dict(split_s="x2"),  # twice the plan's split (resolved per shape)
}
DEFAULT_VARIANTS = ("auto", "split1", "bs64")
BASELINES = ("xla_model", "reference")

L2_BYTES = 50e6
MAX_CACHE_SETS = 16
MIN_CALLS_PER_STEP = 4
CORRECT_TOL = 2e-2  # fp16, per-row relative error vs the fp32 reference


def parse_shape(name: str) -> tuple[str, int, int]:
    if name in SHAPES:
        return (name, *SHAPES[name])
    if "opt-" + name in SHAPES:
        return ("opt-" + name, *SHAPES["opt-" + name])
    tail = name.split("-")[-1]
    try:
        heads, hd = (int(v) for v in tail.split("x"))
    except ValueError:
        raise ValueError(f"--shapes takes {sorted(SHAPES)} or HxHD (e.g. 32x128). Got {name!r}") from None
    return name, heads, hd


def floor_bytes(batch: int, heads: int, seq_allowed: int, seq: int, hd: int, itemsize: int) -> int:
    """K and V of the allowed slots of the computed heads, q in, out, and the [B, S] mask."""
    return 2 * batch * heads * seq_allowed * hd * itemsize + 2 * batch * heads * hd * itemsize + batch * seq


def resolve_knobs(name: str, batch: int, heads: int, seq: int, hd: int) -> dict:
    knobs = dict(PALLAS_VARIANTS[name])
    if knobs.get("split_s") == "x2":
        knobs["split_s"] = 2 * plan_decode_attention(batch, heads, seq, hd).split_s
    return knobs


def xla_model_attention(q, keys, values, allowed, head_idx):
    """The model's dense decode attention (dejavu_jax/model.py), one query token: [B, h, hd]."""
    if head_idx is not None:
        keys, values = keys[:, head_idx], values[:, head_idx]
    scores = jnp.einsum("bhk,bhsk->bhs", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bhs,bhsk->bhk", probs, values, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def step_fn(impl: str, knobs: dict, interpret: bool):
    """(q, (keys, values), allowed, head_idx) -> out [B, h, hd], the op under test."""
    if impl == "xla_model":
        return lambda q, kv, allowed, hidx: xla_model_attention(q, *kv, allowed, hidx)
    if impl == "reference":
        return lambda q, kv, allowed, hidx: decode_attention_reference(q, *kv, allowed, hidx)
    return lambda q, kv, allowed, hidx: decode_attention(q, *kv, allowed, hidx, interpret=interpret, **knobs)


def time_impl(impl, knobs, q0, cache_sets, allowed, head_idx, est_us, args) -> dict:
    step = step_fn(impl, knobs, args.interpret)
    n_sets = len(cache_sets)
    calls_per_step = max(n_sets, 1 if args.interpret else MIN_CALLS_PER_STEP)
    n_steps = 1 if args.interpret else int(np.clip(round(args.chain_us / (est_us * calls_per_step)), 2, 4000))

    def first(q, operands):
        cache_sets, allowed, head_idx = operands
        return step(q, cache_sets[0], allowed, head_idx)

    def body(q, operands):
        cache_sets, allowed, head_idx = operands
        for c in range(calls_per_step):
            q = step(q, cache_sets[c % n_sets], allowed, head_idx)
        return q

    timing = time_chained(
        body,
        q0,
        (cache_sets, allowed, head_idx),
        steps=n_steps,
        repeats=args.repeats,
        calls_per_step=calls_per_step,
        first=first,
    )
    if not bool(jnp.all(jnp.isfinite(timing.last.astype(jnp.float32)))):
        raise FloatingPointError("the chained output is not finite")
    return {"us": timing.seconds * 1e6, "compile_s": timing.compile_s, "calls": timing.calls, "out0": timing.first}


def row_rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float((np.linalg.norm(out - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)).max())


def bench_config(shape, n_heads, hd, seq, batch, density, args, bw, log) -> dict:
    dtype = jnp.float16
    heads = max(1, int(round(density * n_heads)))
    kv_bytes = 2 * batch * n_heads * seq * hd * 2
    read_bytes = 2 * batch * heads * seq * hd * 2
    n_sets = 1 if args.interpret else max(1, min(MAX_CACHE_SETS, math.ceil(2 * L2_BYTES / read_bytes)))
    key = jax.random.key(seq * 1000 + batch)
    ks = jax.random.split(key, 2 * n_sets + 2)
    cache_sets = [
        tuple(jax.random.normal(ks[2 * i + c], (batch, n_heads, seq, hd), jnp.float32).astype(dtype) for c in range(2))
        for i in range(n_sets)
    ]
    q0 = ((3.0 * hd**-0.5) * jax.random.normal(ks[-2], (batch, heads, hd), jnp.float32)).astype(dtype)
    allowed = jnp.ones((batch, seq), bool)
    head_idx = None if heads == n_heads else jax.random.permutation(ks[-1], n_heads)[:heads].astype(jnp.int32)
    jax.block_until_ready((cache_sets, q0))
    fb = floor_bytes(batch, heads, seq, seq, hd, 2)
    row = {
        "shape": shape,
        "batch": batch,
        "seq": seq,
        "heads": heads,
        "n_heads": n_heads,
        "head_dim": hd,
        "head_density": density,
        "floor_bytes": fb,
        "floor_us": fb / bw * 1e6,
        "cache_sets": n_sets,
        "kv_bytes": kv_bytes,
        "impls": {},
    }
    ref = np.asarray(decode_attention_reference(q0, *cache_sets[0], allowed, head_idx).astype(jnp.float32))
    est = max(2.0, row["floor_us"])
    seen_plans = {}
    impls = [(n, "pallas") for n in args.variants] + [(n, "xla") for n in BASELINES]
    for name, kind in impls:
        entry = {}
        try:
            knobs = resolve_knobs(name, batch, heads, seq, hd) if kind == "pallas" else {}
            if kind == "pallas":
                plan = plan_decode_attention(batch, heads, seq, hd, **knobs)
                entry["plan"] = (
                    f"block_s={plan.block_s} split_s={plan.split_s} warps={plan.num_warps} "
                    f"stages={plan.num_stages} programs={batch * heads * plan.split_s}"
                )
                if plan in seen_plans:
                    row["impls"][name] = {**row["impls"][seen_plans[plan]], "same_as": seen_plans[plan]}
                    continue
                seen_plans[plan] = name
            res = time_impl(name if kind == "xla" else "pallas", knobs, q0, cache_sets, allowed, head_idx, est, args)
            entry["max_rel_err"] = row_rel_err(np.asarray(res.pop("out0").astype(jnp.float32)), ref)
            entry.update(res)
        except Exception as e:  # noqa: BLE001
            print(f"[{shape} b{batch} S{seq} h{heads} {name}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["impls"][name] = entry
    del cache_sets
    return row


def best_pallas(row, args):
    times = {
        n: row["impls"][n]["us"]
        for n in args.variants
        if "us" in row["impls"].get(n, {}) and row["impls"][n].get("max_rel_err", 0.0) <= CORRECT_TOL
    }
    if not times:
        return None, None
    name = min(times, key=times.get)
    return name, times[name]


def table_rows(rows, args):
    impls = list(args.variants) + list(BASELINES)
    header = (
        ["shape", "B", "S", "h", "floor us"]
        + [f"{n} us" for n in impls]
        + ["best", "speedup vs xla_model", "GB/s (best)", "time/floor", "max rel err"]
    )
    body = []
    for row in rows:
        name, best = best_pallas(row, args)
        xla = row["impls"].get("xla_model", {}).get("us")
        errs = [row["impls"].get(n, {}).get("max_rel_err") for n in args.variants]
        errs = [e for e in errs if e is not None]
        body.append(
            [row["shape"], str(row["batch"]), str(row["seq"]), str(row["heads"]), f"{row['floor_us']:.1f}"]
            + [fmt_us(row["impls"].get(n, {}), CORRECT_TOL) for n in impls]
            + [
                name or "-",
                f"{xla / best:.2f}x" if best and xla else "-",
                f"{row['floor_bytes'] / (best * 1e-6) / 1e9:.0f}" if best else "-",
                f"{best / row['floor_us']:.2f}" if best else "-",
                f"{max(errs):.1e}" if errs else "-",
            ]
        )
    return header, body


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench kernels --op attention",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csv = lambda f: lambda s: tuple(f(v) for v in s.split(",") if v)  # noqa: E731
    p.add_argument("--shapes", type=csv(str), default=None, help=f"comma list of {sorted(SHAPES)} or HxHD")
    p.add_argument("--seqs", type=csv(int), default=None, help=f"cache sizes S (default {SEQS})")
    p.add_argument("--batches", type=csv(int), default=None, help=f"comma list (default {BATCHES})")
    p.add_argument(
        "--head-densities",
        type=csv(float),
        default=None,
        help=f"fractions of heads computed through head_idx (default {HEAD_DENSITIES})",
    )
    p.add_argument(
        "--variants",
        type=csv(str),
        default=DEFAULT_VARIANTS,
        help=f"Pallas variants, comma list of {list(PALLAS_VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})",
    )
    add_kernel_bench_args(p, "attention")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    preset = INTERPRET if args.interpret else {}
    shapes = [parse_shape(s) for s in (args.shapes or preset.get("shapes") or SHAPES)]
    seqs = sorted(args.seqs or preset.get("seqs") or SEQS)
    batches = sorted(args.batches or preset.get("batches") or BATCHES)
    densities = sorted(args.head_densities or preset.get("head_densities") or HEAD_DENSITIES, reverse=True)
    unknown = [v for v in args.variants if v not in PALLAS_VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown --variants {unknown}; choose from {list(PALLAS_VARIANTS)}")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1. Got {args.repeats}")
    if any(not 0.0 < d <= 1.0 for d in densities):
        raise SystemExit(f"error: --head-densities must lie in (0, 1]. Got {densities}")
    meta, bw_probe = kernel_bench_setup("attention", argv, args.interpret)
    bw = bw_probe["floor_bandwidth"]

    start = time.perf_counter()
    rows, stopped_early = [], False
    configs = [(s, b, seq, dens) for s in shapes for b in batches for seq in seqs for dens in densities]
    for (shape, n_heads, hd), batch, seq, density in configs:
        if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            log(f"stopping early: --max-minutes {args.max_minutes:g} reached")
            stopped_early = True
            break
        row = bench_config(shape, n_heads, hd, seq, batch, density, args, bw, log)
        rows.append(row)
        gc.collect()
        parts = [
            f"{n} {fmt_us(e, CORRECT_TOL)}" + (f" ({e['max_rel_err']:.0e})" if "max_rel_err" in e else "")
            for n, e in row["impls"].items()
        ]
        log(f"  {shape} b{batch} S{seq} h{row['heads']} floor {row['floor_us']:.1f} us: " + ", ".join(parts))
    elapsed = time.perf_counter() - start

    header, body = table_rows(rows, args)
    compile_total = sum(e.get("compile_s", 0.0) for r in rows for e in r["impls"].values() if "same_as" not in e)
    plans = sorted(
        {
            (r["shape"], r["batch"], r["seq"], r["heads"], n, e["plan"])
            for r in rows
            for n, e in r["impls"].items()
            if "plan" in e
        }
    )
    print()
    print(to_text(header, body))
    print(
        f"\n{len(rows)} configurations in {elapsed:.0f} s (compile {compile_total:.0f} s)"
        f"{' - stopped early' if stopped_early else ''}"
    )

    data = {
        **meta,
        "copy_bandwidth": bw_probe,
        "interpret": args.interpret,
        "elapsed_s": elapsed,
        "compile_s": compile_total,
        "stopped_early": stopped_early,
        "variants": {n: PALLAS_VARIANTS[n] for n in args.variants},
        "rows": rows,
    }
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    if args.interpret and args.out is None:
        return 0
    md = "\n".join(
        [
            f"# Decode attention kernel vs XLA - {meta['card']}",
            "",
            f"- date: {meta['date']}",
            f"- command: `{meta['command']}`",
            f"- commit: {meta['commit']}",
            f"- jax: {meta['jax']}",
            "- copy bandwidth: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in bw_probe.items()),
            "- fp16 random cache, every slot allowed; times are per call, from chained calls in one jitted "
            f"program (median of {args.repeats}); floor = (K+V of allowed slots of the computed heads + q + out "
            f"+ mask) / copy bandwidth; `!` marks an output off the fp32 reference by > {CORRECT_TOL:g} "
            "(excluded from best)",
            f"- {len(rows)} configurations in {elapsed:.0f} s, compile {compile_total:.0f} s"
            + (" (stopped early by --max-minutes)" if stopped_early else ""),
            "",
            to_markdown(header, body),
            "",
            "## Launch plans",
            "",
            *[f"- {s} b{b} S{seq} h{h} {n}: {p}" for s, b, seq, h, n, p in plans],
            "",
        ]
    )
    stem = f"kernels_attention_{card_slug(meta['card'])}_{meta['date']}"
    path = write_results(stem, md, json.loads(json.dumps(data, default=str)), args.out)
    print(f"wrote {path} and {path.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
