"""Choosing and computing a decode step's MLP neurons, per layer: the row-masked kernels against the index-list path.

    python -m bench kernels --op masked-mlp [--shape opt-6.7b --shape opt-13b] [--batch 1,4] [--density 0.1]

Random fp16 weights of the real shape; each candidate runs over `--layers` weight sets in turn (more bytes than the
L2 cache), chained `--steps` times in one jitted loop (each call's output feeds the next call's input), and the
median time per call is reported. Rows:
- dense: XLA's dense MLP;
- gather (fixed idx): the index-list kernels (`kernels/sparse_mlp.py`) over fixed indices, K = density · ffn;
- masked (fixed mask): `masked_fc1` + `nonzero_fc2` over the same rows as a mask (every chosen row fires, so fc2 reads
  them all, as the gather does);
- predicted, threshold: the predictor's first matmul (XLA) + `threshold_fc1` (scores, selection and fc1 in one
  launch) + `nonzero_fc2`, threshold set so that `density` of the rows pass;
- predicted, top-K: XLA scores + `lax.top_k` + a scattered mask + the masked kernels;
- predicted, compaction: XLA scores + `jnp.nonzero(scores >= t, size=K)` + the gather kernels;
- lossless: XLA dense fc1 + `nonzero_fc2` with fc1 biases set so that `--fire-rate` of the neurons fire;
- predictor parts alone: the first matmul with w1 [d, r] and with w1ᵀ [r, d]; a full-score XLA GEMV.
"""

from __future__ import annotations

import argparse
import itertools
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.common import copy_bandwidth, provenance, time_chained, write_results
from dejavu_jax.config import shape_config
from dejavu_jax.predictors import standardize
from kernels.masked_mlp import masked_fc1, nonzero_fc2, threshold_fc1
from kernels.sparse_mlp import sparse_mlp

FC1_KNOBS = (
    {},
    {"fc1_segment": 64},
    {"fc1_segment": 256},
    {"fc1_block_d": 1024},
    {"fc1_warps": 8},
    {"fc1_block_k": 32, "fc1_block_d": 256},
    {"fc1_block_k": 8, "fc1_block_d": 1024},
)
FC2_KNOBS = (
    {},
    {"fc2_segment": 512},
    {"fc2_segment": 128},
    {"fc2_block_d": 256},
    {"fc2_block_k": 32},
    {"fc2_segment": 512, "fc2_block_d": 256, "fc2_warps": 8},
    {"fc2_segment": 1024, "fc2_block_d": 64},
)


def layer_sets(key, d, ffn, rank, n, dtype=jnp.float16):
    sets = []
    for k in jax.random.split(key, n):
        k1, k2, k3, k4 = jax.random.split(k, 4)
        sets.append(
            {
                "w1": (jax.random.normal(k1, (ffn, d), jnp.float32) * d**-0.5).astype(dtype),
                "w2t": (jax.random.normal(k2, (ffn, d), jnp.float32) * ffn**-0.5).astype(dtype),
                "b2": jnp.zeros((d,), dtype),
                "p1": (jax.random.normal(k3, (d, rank), jnp.float32) * d**-0.5).astype(dtype),
                "p2t": (jax.random.normal(k4, (ffn, rank), jnp.float32) * rank**-0.5).astype(dtype),
            }
        )
        sets[-1]["p1t"] = sets[-1]["p1"].T.copy()
        sets[-1]["p2"] = sets[-1]["p2t"].T.copy()
    return sets


def chained_us(step, x0, sets, steps, repeats=5):
    """Median µs per call of step(x, layer_set), chained over every set, `steps` times, in one jitted loop."""

    def body(x, sets):
        for s in sets:
            x = (x + 0.001 * step(x, s).astype(jnp.float32)).astype(x.dtype)
        return x

    timing = time_chained(body, x0, sets, steps=steps, repeats=repeats, calls_per_step=len(sets))
    return timing.seconds * 1e6, timing.compile_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench kernels --op masked-mlp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", action="append", help="OPT shape (default opt-6.7b and opt-13b)")
    p.add_argument("--batch", default="1,4", help="comma list of batch sizes (default 1,4)")
    p.add_argument("--density", type=float, default=0.1, help="fraction of neurons chosen (default 0.1)")
    p.add_argument("--fire-rate", type=float, default=0.05, help="lossless row: fraction of neurons that fire")
    p.add_argument("--rank", type=int, default=256, help="predictor rank (default 256)")
    p.add_argument("--layers", type=int, default=8, help="weight sets cycled through (default 8)")
    p.add_argument("--steps", type=int, default=20, help="chained passes over the sets (default 20)")
    p.add_argument("--sweep", action="store_true", help="also sweep the masked kernels' block sizes")
    p.add_argument(
        "--sweep-threshold",
        action="store_true",
        help="only the predicted threshold path, over a grid of both kernels' block sizes",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    info = provenance()
    bw = copy_bandwidth()["floor_bandwidth"]
    print(f"{info['card']}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in args.shape or ["opt-6.7b", "opt-13b"]:
        c = shape_config(shape)
        d, ffn, r = c.hidden_size, c.ffn_dim, args.rank
        k = int(round(args.density * ffn / 16)) * 16
        sets = layer_sets(jax.random.PRNGKey(0), d, ffn, r, args.layers)
        rng = np.random.default_rng(0)
        idx = [jnp.asarray(np.sort(rng.choice(ffn, k, replace=False)), jnp.int32) for _ in sets]
        for s, i in zip(sets, idx):
            s["idx"] = i
            s["mask"] = jnp.zeros((ffn,), jnp.int32).at[i].set(1)
            s["b1_fire_all"] = jnp.full((ffn,), 4.0, jnp.float16)  # every chosen row fires: fc2 reads them all
            s["b1_lossless"] = jnp.full((ffn,), -NormalDist().inv_cdf(1 - args.fire_rate), jnp.float16)
            s["pb2"] = jnp.zeros((ffn,), jnp.float32)
        for batch in (int(b) for b in args.batch.split(",")):
            x0 = jax.random.normal(jax.random.PRNGKey(batch), (batch, d), jnp.float32).astype(jnp.float16)
            # Threshold giving `density` of the rows for the batch (max over its rows), from the first set's scores.
            s0 = sets[0]
            h0 = jnp.einsum(
                "bd,rd->br", standardize(x0).astype(jnp.float16), s0["p1t"], preferred_element_type=jnp.float32
            ).astype(jnp.float16)
            sc = jnp.einsum("br,nr->bn", h0, s0["p2t"], preferred_element_type=jnp.float32).max(0)
            thr = float(jnp.quantile(sc, 1 - args.density))

            def hidden_rd(x, s):
                return jnp.einsum(
                    "bd,rd->br", standardize(x).astype(jnp.float16), s["p1t"], preferred_element_type=jnp.float32
                ).astype(jnp.float16)

            def hidden_dr(x, s):
                return jnp.einsum(
                    "bd,dr->br", standardize(x).astype(jnp.float16), s["p1"], preferred_element_type=jnp.float32
                ).astype(jnp.float16)

            def scores(x, s):
                return jnp.einsum("br,rn->bn", hidden_rd(x, s), s["p2"], preferred_element_type=jnp.float32)

            def dense(x, s):
                pre = jnp.einsum("bd,nd->bn", x, s["w1"], preferred_element_type=jnp.float32)
                h = jnp.maximum(pre + s["b1_fire_all"].astype(jnp.float32), 0).astype(x.dtype)
                return jnp.einsum("bn,nd->bd", h, s["w2t"], preferred_element_type=jnp.float32).astype(x.dtype)

            def masked(knobs1=(), knobs2=()):
                def f(x, s):
                    h = masked_fc1(x, s["w1"], s["b1_fire_all"], s["mask"], knobs=knobs1 or None)
                    return nonzero_fc2(h, s["w2t"], s["b2"], knobs=knobs2 or None)

                return f

            def predicted_threshold(knobs1=(), knobs2=()):
                def f(x, s):
                    h = threshold_fc1(
                        x, s["w1"], s["b1_fire_all"], hidden_rd(x, s), s["p2t"], s["pb2"], thr, knobs=knobs1 or None
                    )
                    return nonzero_fc2(h, s["w2t"], s["b2"], knobs=knobs2 or None)

                return f

            def predicted_topk(x, s):
                sc = scores(x, s)
                _, top = lax.top_k(sc, k)
                mask = jnp.zeros((ffn,), jnp.int32).at[top.reshape(-1)].set(1)
                h = masked_fc1(x, s["w1"], s["b1_fire_all"], mask)
                return nonzero_fc2(h, s["w2t"], s["b2"])

            def predicted_compaction(x, s):
                chosen = scores(x, s).max(0) >= thr
                (i,) = jnp.nonzero(chosen, size=k, fill_value=0)
                return sparse_mlp(x, s["w1"], s["b1_fire_all"], s["w2t"], s["b2"], i.astype(jnp.int32))

            def lossless(x, s):
                pre = jnp.einsum("bd,nd->bn", x, s["w1"], preferred_element_type=jnp.float32)
                h = jnp.maximum(pre + s["b1_lossless"].astype(jnp.float32), 0).astype(x.dtype)
                return nonzero_fc2(h, s["w2t"], s["b2"])

            def as_block(f):  # the predictor parts return [B, r] or [B, ffn]: pad/cut to [B, d] for the chain
                def g(x, s):
                    y = f(x, s).astype(jnp.float32)
                    return jnp.pad(y, ((0, 0), (0, max(0, d - y.shape[1]))))[:, :d]

                return g

            cands = [
                ("dense (XLA)", dense),
                (
                    "gather, fixed idx",
                    lambda x, s: sparse_mlp(x, s["w1"], s["b1_fire_all"], s["w2t"], s["b2"], s["idx"]),
                ),
                ("masked, fixed mask", masked()),
                ("predicted, threshold", predicted_threshold()),
                ("predicted, top-K mask", predicted_topk),
                ("predicted, compaction + gather", predicted_compaction),
                (f"lossless (fire {args.fire_rate:.0%})", lossless),
                ("predictor hidden, w1 [d,r]", as_block(hidden_dr)),
                ("predictor hidden, w1t [r,d]", as_block(hidden_rd)),
                ("predictor scores (XLA, both matmuls)", as_block(scores)),
            ]
            if args.sweep_threshold:
                cands = [("dense (XLA)", dense), ("gather, fixed idx", cands[1][1])]
                fc1_grid = [
                    dict(fc1_segment=sg, fc1_block_k=bk, fc1_block_d=bd, fc1_warps=w)
                    for sg, bk, bd, w in itertools.product((32, 64, 128), (8, 16), (1024, 2048), (4, 8))
                ]
                fc2_grid = [
                    dict(fc2_segment=sg, fc2_block_k=bk, fc2_block_d=bd, fc2_warps=w)
                    for sg, bk, bd, w in itertools.product((64, 128, 256), (16, 32), (256, 512), (4,))
                ]
                for kn in fc1_grid:
                    cands.append((f"threshold fc1 {kn}", predicted_threshold(tuple(kn.items()))))
                for kn in fc2_grid:
                    cands.append((f"threshold fc2 {kn}", predicted_threshold((), tuple(kn.items()))))
            if args.sweep:
                for kn in FC1_KNOBS[1:]:
                    cands.append((f"masked fixed fc1 {kn}", masked(tuple(kn.items()))))
                for kn in FC2_KNOBS[1:]:
                    cands.append((f"masked fixed fc2 {kn}", masked((), tuple(kn.items()))))
                for kn1, kn2 in itertools.product(FC1_KNOBS[:2], FC2_KNOBS[:2]):
                    cands.append(
                        (f"threshold fc1 {kn1} fc2 {kn2}", predicted_threshold(tuple(kn1.items()), tuple(kn2.items())))
                    )
            floor_us = 2 * k * d * 2 / bw * 1e6
            for name, fn in cands:
                try:
                    us, comp = chained_us(fn, x0, sets, args.steps)
                except Exception as e:  # report and go on: one failing candidate must not lose the others
                    print(f"{shape} b{batch} {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    rows.append({"shape": shape, "batch": batch, "name": name, "error": str(e)[:300]})
                    continue
                rows.append(
                    {
                        "shape": shape,
                        "batch": batch,
                        "name": name,
                        "us": us,
                        "compile_s": comp,
                        "k": k,
                        "floor_us": floor_us,
                    }
                )
                print(f"{shape} b{batch} {name}: {us:.1f} us (compile {comp:.1f} s)", flush=True)
            # Correctness on the GPU: masked kernels vs the dense reference over the same rows.
            s = sets[-1]
            hm = masked_fc1(x0, s["w1"], s["b1_fire_all"], s["mask"])
            ref = jnp.where(
                s["mask"] != 0,
                jnp.maximum(jnp.einsum("bd,nd->bn", x0.astype(jnp.float32), s["w1"].astype(jnp.float32)) + 4.0, 0),
                0,
            )
            out = nonzero_fc2(hm, s["w2t"], s["b2"]).astype(jnp.float32)
            ref_out = ref.astype(jnp.float16).astype(jnp.float32) @ s["w2t"].astype(jnp.float32)
            err1 = float(jnp.max(jnp.abs(hm.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            err2 = float(jnp.max(jnp.abs(out - ref_out)) / jnp.max(jnp.abs(ref_out)))
            print(f"{shape} b{batch} check: fc1 rel err {err1:.2e}, fc2 rel err {err2:.2e}", flush=True)
            rows.append({"shape": shape, "batch": batch, "name": "check", "fc1_rel_err": err1, "fc2_rel_err": err2})
    lines = [
        f"# Masked-MLP kernels vs the index-list path, {info['card']}",
        "",
        f"- date {info['date']}, commit `{info['commit']}`, jax {info['jax']}",
        f"- command: `{info['command']}`",
        f"- fp16, density {args.density}, predictor rank {args.rank}, {args.layers} weight sets x {args.steps} "
        f"chained passes; µs per call (one layer's MLP)",
        "",
        "| shape | batch | candidate | µs | floor µs (2·K·d·2 B) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "us" in row:
            lines.append(
                f"| {row['shape']} | {row['batch']} | {row['name']} | {row['us']:.1f} | {row['floor_us']:.1f} |"
            )
    markdown = "\n".join(lines) + "\n"
    path = write_results(
        f"kernels_masked_mlp_{info['card'].replace(' ', '-')}_{info['date']}",
        markdown,
        {**info, "rows": rows},
        args.out,
    )
    print(markdown)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
