"""Head-sparse projections benchmark: the attention block's weight reads for the chosen heads only.

    python -m bench kernels --op head-sparse [--shapes opt-6.7b,opt-13b] [--batches 1,8]
                                             [--head-densities 1.0,0.5] [--layers 8] [--repeats 10]
    python -m bench kernels --op head-sparse --interpret     # tiny CPU smoke test (Pallas interpreter)

One call is what a decode step's attention block reads from its weights, without the attention itself: q, k and v
of the chosen heads (h = density · H of them, a random unsorted subset per layer), combined into a stand-in head
output (q + k + v, so every projection is used), then out_proj over those heads. Implementations, in one run:

- `xla_dense`: every head, the model's dense einsums (the baseline the sparse path must beat);
- `xla_gather`: the model's current head seam: `qkv_w[:, head_idx]`, `out_w[head_idx]`, then the same einsums
  (XLA copies the chosen heads' weights first);
- `pallas`: `kernels/head_sparse.py`: `head_qkv` (all three parts) and `head_out_proj`, reading the chosen rows in
  place;
- `pallas_unrolled`: the same with every column block of a program's rows loaded in one step (`UNROLLED_KNOBS`,
  2048-column loads, all in flight at once, as the masked MLP's fc1 does), beside the default's loop over 512-column
  blocks;
- `pallas_q_only`: the exact alternative that needs no K/V repair: k and v of every head by XLA, q of the chosen
  heads and out_proj by the kernels.

The floor is the weight bytes each implementation must read at least (the chosen heads' qkv and out rows; for
`pallas_q_only` also every head's k and v rows) / the copy bandwidth measured in the same run. Timing: each
implementation is one jitted program chaining calls over `--layers` layers of distinct random fp16 weights
(`bench.common.time_chained`; each layer's output, RMS-normalised, is the next one's input), so the weights are not
in L2; the median program time over --repeats runs is divided by the number of calls. The first call of every
implementation is checked against `xla_gather` (max per-row relative error; `!` marks one off by > CORRECT_TOL).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the copy-bandwidth probe runs torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    add_kernel_bench_args,
    card_slug,
    fmt_us,
    kernel_bench_setup,
    log,
    time_chained,
    to_markdown,
    to_text,
    write_results,
)
from dejavu_jax.config import shape_config  # noqa: E402
from kernels.head_sparse import head_out_proj, head_qkv  # noqa: E402

IMPLS = ("xla_dense", "xla_gather", "pallas", "pallas_unrolled", "pallas_q_only")
UNROLLED_KNOBS = (("qkv_block_d", 2048), ("qkv_step_blocks", 0))
CORRECT_TOL = 1e-2
INTERPRET = {"shapes": ["tiny"], "batches": [1], "head_densities": [0.5], "layers": 2}


def _qkv_einsum(x, w, b):
    """x [B, d], w [3, h, hd, d], b [3, h, hd] -> [3, B, h, hd] (the model's numerics)."""
    out = jnp.einsum("bd,zhkd->zbhk", x, w, preferred_element_type=jnp.float32)
    return (out + b[:, None].astype(jnp.float32)).astype(x.dtype)


def _out_einsum(heads_out, w, b):
    out = jnp.einsum("bhk,hkd->bd", heads_out, w, preferred_element_type=jnp.float32)
    return (out + b.astype(jnp.float32)).astype(heads_out.dtype)


def block_fn(impl: str, interpret: bool):
    """(x [B, d], one layer's weights, head_idx [h]) -> [B, d]: the chosen heads' projections."""

    def run(x, layer, idx):
        qkv_w, qkv_b, out_w, out_b = layer
        if impl == "xla_dense":
            qkv = _qkv_einsum(x, qkv_w, qkv_b)
            return _out_einsum(qkv[0] + qkv[1] + qkv[2], out_w, out_b)
        if impl == "xla_gather":
            qkv = _qkv_einsum(x, qkv_w[:, idx], qkv_b[:, idx])
            return _out_einsum(qkv[0] + qkv[1] + qkv[2], out_w[idx], out_b)
        if impl in ("pallas", "pallas_unrolled"):
            knobs = UNROLLED_KNOBS if impl == "pallas_unrolled" else None
            qkv = head_qkv(x, qkv_w, qkv_b, idx, knobs=knobs, interpret=interpret)
            return head_out_proj(qkv[0] + qkv[1] + qkv[2], out_w, out_b, idx, interpret=interpret)
        assert impl == "pallas_q_only", impl
        kv = _qkv_einsum(x, qkv_w[1:], qkv_b[1:])  # every head's k and v: the cache stays exact
        q = head_qkv(x, qkv_w, qkv_b, idx, parts=(0,), interpret=interpret)[0]
        return head_out_proj(q + kv[0][:, idx] + kv[1][:, idx], out_w, out_b, idx, interpret=interpret)

    def chain(x, layers, idxs):
        for layer, idx in zip(layers, idxs):
            y = run(x, layer, idx).astype(jnp.float32)
            x = (y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)
        return x

    return chain


def floor_bytes(impl: str, heads: int, chosen: int, hd: int, d: int, layers: int) -> int:
    rows = 4 * (heads if impl == "xla_dense" else chosen) * hd  # q, k, v and out rows of the computed heads
    if impl == "pallas_q_only":
        rows += 2 * (heads - chosen) * hd  # k and v of the heads that are not chosen
    return rows * d * 2 * layers


def bench_config(shape, batch, density, args, bw) -> dict:
    c = shape_config(shape)
    H, hd, d = c.num_attention_heads, c.head_dim, c.hidden_size
    h = max(1, round(density * H))
    rng = np.random.default_rng(0)
    layers, idxs = [], []
    for i in range(args.layers):
        k = jax.random.split(jax.random.PRNGKey(i), 4)
        layers.append(
            (
                (jax.random.normal(k[0], (3, H, hd, d), jnp.float32) * 0.02).astype(jnp.float16),
                (jax.random.normal(k[1], (3, H, hd), jnp.float32) * 0.02).astype(jnp.float16),
                (jax.random.normal(k[2], (H, hd, d), jnp.float32) * 0.02).astype(jnp.float16),
                (jax.random.normal(k[3], (d,), jnp.float32) * 0.02).astype(jnp.float16),
            )
        )
        idxs.append(jnp.asarray(rng.permutation(H)[:h], jnp.int32))
    layers, idxs = tuple(layers), tuple(idxs)
    x0 = jax.random.normal(jax.random.PRNGKey(99), (batch, d), jnp.float32).astype(jnp.float16)
    row = {"shape": shape, "batch": batch, "heads": h, "of_heads": H, "impls": {}}
    ref = None
    for impl in IMPLS:
        chain = block_fn(impl, args.interpret)
        steps = 1 if args.interpret else max(2, int(args.chain_us // max(1.0, 30.0 * args.layers)))
        try:
            timing = time_chained(
                lambda x, ops: chain(x, *ops),
                x0,
                (layers, idxs),
                steps=steps,
                repeats=args.repeats,
                calls_per_step=args.layers,
                first=lambda x, ops: chain(x, *ops),
            )
        except Exception as e:  # a kernel that fails to compile is a result, not a crash of the whole bench
            row["impls"][impl] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        entry = {"us": timing.seconds * 1e6, "compile_s": timing.compile_s, "calls": timing.calls}
        floor = floor_bytes(impl, H, h, hd, d, 1)
        entry["floor_us"] = floor / bw * 1e6
        entry["of_floor"] = entry["us"] / entry["floor_us"]
        out = np.asarray(timing.first, np.float64)
        if impl == "xla_gather":
            ref = out
        if ref is not None and impl != "xla_dense":
            err = np.linalg.norm(out - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)
            entry["max_rel_err"] = float(err.max())
        row["impls"][impl] = entry
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench kernels --op head-sparse",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csv = lambda cast: lambda s: [cast(v) for v in s.split(",") if v]  # noqa: E731
    p.add_argument("--shapes", type=csv(str), default=None, help="OPT shapes (default opt-6.7b,opt-13b)")
    p.add_argument("--batches", type=csv(int), default=None, help="batch sizes (default 1,8)")
    p.add_argument("--head-densities", type=csv(float), default=None, help="fractions of heads (default 1.0,0.5)")
    p.add_argument("--layers", type=int, default=None, help="layers of distinct weights per chain step (default 8)")
    add_kernel_bench_args(p, "head_sparse")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    preset = INTERPRET if args.interpret else {}
    shapes = args.shapes or preset.get("shapes") or ["opt-6.7b", "opt-13b"]
    batches = args.batches or preset.get("batches") or [1, 8]
    densities = args.head_densities or preset.get("head_densities") or [1.0, 0.5]
    args.layers = args.layers or preset.get("layers") or 8
    if args.repeats < 1 or args.layers < 1:
        raise SystemExit("error: --repeats and --layers must be >= 1")
    if any(not 0.0 < v <= 1.0 for v in densities):
        raise SystemExit(f"error: --head-densities must lie in (0, 1]. Got {densities}")
    for s in shapes:
        try:
            shape_config(s)
        except (KeyError, ValueError):
            raise SystemExit(f"error: unknown shape {s!r}") from None
    meta, bw_probe = kernel_bench_setup("head-sparse", argv, args.interpret)
    bw = bw_probe["floor_bandwidth"]
    start, rows, stopped_early = time.perf_counter(), [], False
    for shape in shapes:
        for batch in batches:
            for density in densities:
                if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
                    log(f"stopping early: --max-minutes {args.max_minutes:g} reached")
                    stopped_early = True
                    break
                row = bench_config(shape, batch, density, args, bw)
                rows.append(row)
                gc.collect()
                log(
                    f"  {shape} b{batch} h{row['heads']}/{row['of_heads']}: "
                    + ", ".join(f"{n} {fmt_us(e, CORRECT_TOL)}" for n, e in row["impls"].items())
                )
    header = ["shape", "batch", "heads", *[f"{i} us (/floor)" for i in IMPLS], "pallas vs xla_dense"]
    body = []
    for r in rows:
        cells = []
        for impl in IMPLS:
            e = r["impls"].get(impl, {})
            cells.append(fmt_us(e, CORRECT_TOL) + (f" ({e['of_floor']:.2f})" if "of_floor" in e else ""))
        dense, sparse = r["impls"].get("xla_dense", {}), r["impls"].get("pallas", {})
        ratio = f"{dense['us'] / sparse['us']:.2f}x" if "us" in dense and "us" in sparse else "-"
        body.append([r["shape"], str(r["batch"]), f"{r['heads']}/{r['of_heads']}", *cells, ratio])
    print()
    print(to_text(header, body))
    data = {**meta, "copy_bandwidth": bw_probe, "interpret": args.interpret, "layers": args.layers, "rows": rows}
    data["stopped_early"] = stopped_early
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    if args.interpret and args.out is None:
        return 0
    md = "\n".join(
        [
            f"# Head-sparse projections vs XLA - {meta['card']}",
            "",
            f"- date: {meta['date']}, commit: {meta['commit']}, jax: {meta['jax']}",
            f"- command: `{meta['command']}`",
            "- copy bandwidth: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in bw_probe.items()),
            f"- per layer: q, k, v of the chosen heads + out_proj over them, fp16, chained over {args.layers} layers "
            f"of distinct weights (median of {args.repeats}); `!`: off `xla_gather` by > {CORRECT_TOL:g}"
            + (" (stopped early by --max-minutes)" if stopped_early else ""),
            "",
            to_markdown(header, body),
            "",
        ]
    )
    stem = f"kernels_head_sparse_{card_slug(meta['card'])}_{meta['date']}"
    path = write_results(stem, md, json.loads(json.dumps(data, default=str)), args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
