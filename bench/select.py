"""What choosing a decode step's neurons costs on the GPU: the predictor's matmuls and the top-K selection.

    python -m bench select [--shape opt-6.7b] [--density 0.1] [--ranks 1000,256,128] [--out FILE]

At batch 1 a sparse-MLP layer first scores all ffn neurons with its low-rank predictor (x [1, d] -> [1, r] ->
[1, ffn]) and then picks K of them. Each candidate runs `--chain` times inside one jitted `lax.fori_loop`, each
iteration feeding the next (so XLA can neither hoist nor drop it; `bench.common.time_chained`); the reported time
is wall time / chain.
Predictor weights are program arguments (as in the model) and rotate over enough sets (at least four, at least
100 MB) that the chain does not run from the 50 MB L2. (The first H100 results, `select_opt-6.7b_*.md` of commits
314921f and 0dcdb03, used four sets closed over as constants: at ranks 256 and 128 those fit in the L2.)

Selections, for scores [1, ffn] fp32 and K = density * ffn:
- `top_k`: `lax.top_k` (what the model uses; exact);
- `approx_max_k`: `lax.approx_max_k`, recall target 0.95 (off TPU an exact sort-and-slice: its indices equalled
  `top_k`'s on the H100, and swapping it into the model changed nothing end to end; bench/results/NOTES.md);
- `threshold_nonzero`: `nonzero(scores > t, size=K)` for a given threshold t (a per-layer calibrated threshold
  would stand in for the exact K-th value; only the mechanism's cost is measured, not its accuracy);
- `two_stage`: top-(2K/blocks) within blocks of 128, then top-K of the candidates (exact unless a block holds more
  of the true top-K than it keeps).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench.common import provenance, time_chained, write_results
from dejavu_jax.config import OPT_SHAPES, shape_config

# Predictor bytes one chained iteration reads: twice an H100's 50 MB L2.
_CHAIN_BYTES = 100 << 20


def _two_stage(scores, k, block=128):
    n = scores.shape[-1]
    blocks = n // block
    keep = min(block, max(1, -(-2 * k // blocks)))
    vals, idx = jax.lax.top_k(scores.reshape(blocks, block), keep)  # [blocks, keep]
    idx = idx + (jnp.arange(blocks) * block)[:, None]
    _, pick = jax.lax.top_k(vals.reshape(-1), k)
    return idx.reshape(-1)[pick]


SELECTIONS = {
    "top_k": lambda s, k, t: jax.lax.top_k(s[0], k)[1],
    "approx_max_k": lambda s, k, t: jax.lax.approx_max_k(s[0], k, recall_target=0.95)[1],
    "threshold_nonzero": lambda s, k, t: jnp.nonzero(s[0] > t, size=k, fill_value=0)[0],
    "two_stage": lambda s, k, t: _two_stage(s[0], k),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench select", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="opt-6.7b", choices=sorted(OPT_SHAPES))
    p.add_argument("--density", type=float, default=0.1, help="fraction of the ffn neurons kept (default 0.1)")
    p.add_argument("--ranks", default="1000,256,128", help="predictor ranks to time (default 1000,256,128)")
    p.add_argument("--chain", type=int, default=200, help="iterations per jitted loop (default 200)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="markdown path (default bench/results/select_<card>_<date>.md)")
    args = p.parse_args(argv)
    if not 0 < args.density < 1:
        p.error(f"--density must be in (0, 1). Got {args.density}")
    try:
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        p.error(f"--ranks must be a comma list of ints. Got {args.ranks!r}")
    if args.chain < 1 or args.repeats < 1 or min(ranks) < 1:
        p.error("--chain, --repeats and every rank must be >= 1")

    c = shape_config(args.shape)
    d, ffn = c.hidden_size, c.ffn_dim
    k = max(1, round(args.density * ffn))
    info = provenance()
    rows = []
    scores = jax.random.normal(jax.random.PRNGKey(0), (1, ffn), jnp.float32)
    threshold = jnp.sort(scores[0])[-k]  # about K scores pass
    for name, select in SELECTIONS.items():

        def step(s, threshold, select=select):
            idx = select(s, k, threshold)
            return s + 1e-30 * idx[0].astype(jnp.float32)  # depends on the result; changes nothing

        us = time_chained(step, scores, threshold, steps=args.chain, repeats=args.repeats).seconds * 1e6
        rows.append({"what": f"select {name}", "k": k, "us": us})
        print(f"select {name:18s} K={k}: {us:7.2f} us", flush=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, d), jnp.float16)
    for rank in ranks:
        nbytes = (d * rank + rank * ffn) * 2
        # Enough layers' predictors that the chain outgrows the L2 (capped: tiny shapes are CPU smoke runs).
        sets = min(64, max(4, -(-_CHAIN_BYTES // nbytes)))
        keys = jax.random.split(jax.random.PRNGKey(rank), 2 * sets)
        weights = tuple(
            (
                jax.random.normal(keys[2 * i], (d, rank), jnp.float16) * 0.02,
                jax.random.normal(keys[2 * i + 1], (rank, ffn), jnp.float16) * 0.02,
            )
            for i in range(sets)
        )

        def step(x, weights):
            for a, b in weights:
                h = jnp.dot(x, a, preferred_element_type=jnp.float32).astype(x.dtype)
                s = jnp.dot(h, b, preferred_element_type=jnp.float32)
                x = x + (1e-30 * s[:, :d]).astype(x.dtype)
            return x

        us = (
            time_chained(
                step, x, weights, steps=max(1, args.chain // sets), repeats=args.repeats, calls_per_step=sets
            ).seconds
            * 1e6
        )
        rows.append({"what": f"predictor rank {rank}", "bytes": nbytes, "us": us})
        print(f"predictor rank {rank:5d} ({nbytes / 1e6:5.1f} MB): {us:7.2f} us", flush=True)

    lines = [
        f"# Neuron selection cost at decode, {info['card']}",
        "",
        f"- date {info['date']}, commit `{info['commit']}`, jax {info['jax']}",
        f"- command: `{info['command']}`",
        f"- {args.shape}: d {d}, ffn {ffn}, K {k} ({args.density:.1%}); batch 1; chained {args.chain} per jit",
        "",
        "| what | us per layer |",
        "|---|---|",
    ]
    lines += [
        f"| {r['what']}" + (f" ({r['bytes'] / 1e6:.1f} MB)" if "bytes" in r else "") + f" | {r['us']:.2f} |"
        for r in rows
    ]
    markdown = "\n".join(lines) + "\n"
    path = write_results(
        f"select_{info['card'].replace(' ', '-')}_{info['date']}",
        markdown,
        {**info, "shape": args.shape, "density": args.density, "rows": rows},
        args.out,
    )
    print(markdown)
    print(f"wrote {path}")
    return 0
