"""Per-call latency of the all-reduce tensor-parallel decoding makes twice per layer.

    python -m bench allreduce [--tp 2] [--batch 1] [--dims 4096,7168,9216,12288] [--steps 200]
        [--reductions psum,gather,ring] [--dtypes float16,float32]
        [--variant='NCCL_PROTO=LL' --variant='--xla_gpu_some_flag=true' ...]

One call sums one [batch, d] vector per device over the `tp` mesh axis, inside `shard_map`, as the decode
step's out_proj and fc2 all-reduces do (those sum fp32 partials; `--dtypes` times each element type). `--reductions` picks how (`REDUCTIONS`): "psum" (XLA's all-reduce, what
the model's program makes), "gather" (an all-gather of every device's vector, then each device sums them in device
order), "ring" (tp - 1 collective-permutes pass the vectors around the ring, then the same ordered sum): the last
two are other collectives for the same exact sum, every device adding the same values in the same order. Calls are
chained `--steps` times in one jitted
`lax.fori_loop` (each call's output, scaled by a per-device factor so that it stays finite and is not the same on
every device, is the next call's input), and the program's median time is divided by the calls. The same chain
with the psum left out (the scaling alone) is timed too: its per-call time is the loop's own cost, and the
table's "net" column subtracts it.

Each `--variant` is a set of XLA flags (`--xla_...`) and environment variables (`NAME=VALUE`, e.g. NCCL's) to run
with; they take effect only in a fresh process, so with variants every row, the baseline included, runs in a
child process of its own; without, the baseline runs in this process. Runs on CPU too (with
XLA_FLAGS=--xla_force_host_platform_device_count=N), as a smoke test whose numbers mean nothing for a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from bench.common import log, provenance, time_chained, to_markdown, to_text, write_results

DEFAULT_DIMS = "4096,5120,7168,9216,12288"  # opt-6.7b, 13b, 30b, 66b, 175b


def parse_variant(text: str) -> tuple[list[str], dict[str, str]]:
    """'--xla_a=1 NCCL_PROTO=LL' -> (["--xla_a=1"], {"NCCL_PROTO": "LL"}); a ValueError for anything else."""
    flags, env = [], {}
    for token in shlex.split(text):
        if token.startswith("--"):
            flags.append(token)
        elif "=" in token and token.split("=", 1)[0].isidentifier():
            name, value = token.split("=", 1)
            env[name] = value
        else:
            raise ValueError(
                f"a --variant holds XLA flags (--xla_...=VALUE) and environment variables (NAME=VALUE). Got "
                f"{token!r} in {text!r}"
            )
    if not flags and not env:
        raise ValueError(f"a --variant needs at least one XLA flag or NAME=VALUE. Got {text!r}")
    return flags, env


def _ordered_sum(blocks):
    """[tp, B, d] -> [B, d]: the devices' vectors added in device order, in fp32 (the same on every device)."""
    return jnp.sum(blocks.astype(jnp.float32), axis=0).astype(blocks.dtype)


def _gather_sum(x):
    return _ordered_sum(jax.lax.all_gather(x, "tp"))


def _ring_sum(x):
    """tp - 1 shifts around the ring (device i receives from i - 1), each received vector put at its sender's
    index, then the ordered sum."""
    tp = jax.lax.axis_size("tp")
    me = jax.lax.axis_index("tp")
    blocks = jnp.zeros((tp,) + x.shape, x.dtype).at[me].set(x)
    shift = [(i, (i + 1) % tp) for i in range(tp)]
    for hop in range(1, tp):  # static: tp is the mesh's size
        x = jax.lax.ppermute(x, "tp", shift)
        blocks = blocks.at[(me - hop) % tp].set(x)
    return _ordered_sum(blocks)


REDUCTIONS = {"psum": lambda x: jax.lax.psum(x, "tp"), "gather": _gather_sum, "ring": _ring_sum}


def reduce_step(mesh, reduction: str = "psum"):
    """One call: each device's [B, d] block summed over `tp` by `reduction`, scaled by the device's own factor."""
    total = REDUCTIONS[reduction]

    def step(x, scale):  # x [B, d], scale [1, 1]: this device's blocks
        return (total(x) * scale).astype(x.dtype)

    return jax.shard_map(step, mesh=mesh, in_specs=(P("tp"), P("tp")), out_specs=P("tp"), check_vma=False)


def scale_step(mesh):
    """The same call without the psum: what the loop and the scaling cost alone."""

    def step(x, scale):
        return (x * scale).astype(x.dtype)

    return jax.shard_map(step, mesh=mesh, in_specs=(P("tp"), P("tp")), out_specs=P("tp"))


DTYPES = {"float16": np.float16, "float32": np.float32}


def measure(
    tp: int, batch: int, dims: list[int], steps: int, repeats: int, reductions=("psum",), dtypes=("float16",)
) -> list[dict]:
    """Per-call seconds of each chained reduction (and of the loop alone) for each element type and d, checked
    against numpy."""
    from jax.sharding import Mesh

    devices = jax.devices()
    if tp > len(devices):
        raise ValueError(f"--tp {tp} needs {tp} devices, but JAX sees {len(devices)}")
    mesh = Mesh(np.array(devices[:tp]), ("tp",))
    blocks = NamedSharding(mesh, P("tp"))
    # Per-device factors near 1/tp keep the chained sums finite and differ between devices, so no call's input is
    # provably the same everywhere (XLA could turn an all-reduce of a replicated value into a multiply).
    factors = (1.0 + 0.01 * np.arange(tp)) / tp
    loop_only = scale_step(mesh)
    rows = []
    for dtype_name, d in [(name, d) for name in dtypes for d in dims]:
        dtype = DTYPES[dtype_name]
        scale = jax.device_put(factors.astype(dtype).reshape(tp, 1), blocks)
        host = np.random.default_rng(d).standard_normal((tp * batch, d)).astype(dtype)
        x = jax.device_put(host, blocks)
        bare = time_chained(loop_only, x, scale, steps=steps, repeats=repeats)
        per_device = host.astype(np.float64).reshape(tp, batch, d)
        want = per_device.sum(0)[None] * factors.astype(dtype).astype(np.float64).reshape(tp, 1, 1)
        for reduction in reductions:
            call = reduce_step(mesh, reduction)
            timed = time_chained(call, x, scale, steps=steps, repeats=repeats, first=call)
            got = np.asarray(timed.first, np.float64).reshape(tp, batch, d)
            err = float(np.abs(got - want).max() / np.abs(want).max())
            rows.append(
                {
                    "reduction": reduction,
                    "dtype": dtype_name,
                    "d": d,
                    "batch": batch,
                    "tp": tp,
                    "bytes": batch * d * np.dtype(dtype).itemsize,
                    "us_per_call": timed.seconds * 1e6,
                    "loop_us_per_call": bare.seconds * 1e6,
                    "net_us_per_call": (timed.seconds - bare.seconds) * 1e6,
                    "compile_s": timed.compile_s,
                    "max_rel_err": err,
                }
            )
            log(
                f"tp {tp} {dtype_name} d {d} {reduction}: {timed.seconds * 1e6:.1f} us/call "
                f"({bare.seconds * 1e6:.1f} us the loop alone)"
            )
    return rows


def run_child(argv: list[str], flags: list[str], env_vars: dict[str, str]) -> dict:
    """The measurement in a fresh process with `flags` appended to XLA_FLAGS and `env_vars` set."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), *flags]).strip()
    env.update(env_vars)
    cmd = [sys.executable, "-m", "bench.allreduce", *argv, "--child"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {out.returncode}: {last}"}
    return json.loads(lines[-1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench allreduce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tp", default="auto", help="devices the psum spans: a count or 'auto' (every device; default)")
    p.add_argument("--batch", type=int, default=1, help="rows of the reduced vector (default 1)")
    p.add_argument("--dims", default=DEFAULT_DIMS, help=f"comma list of widths d (default {DEFAULT_DIMS})")
    p.add_argument("--steps", type=int, default=200, help="chained calls per program (default 200)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs of each program (median; default 10)")
    p.add_argument(
        "--reductions",
        default="psum",
        help=f"comma list of how a call sums the vectors: {', '.join(REDUCTIONS)} (default psum; see above)",
    )
    p.add_argument(
        "--dtypes",
        default="float16",
        help=f"comma list of element types of the summed vectors: {', '.join(DTYPES)} (default float16)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="XLA flags and NAME=VALUE environment variables to time beside the baseline, e.g. "
        "--variant='NCCL_PROTO=LL' (note the '='); repeat for several",
    )
    p.add_argument("--out", default=None, help="markdown path (default bench/results/allreduce_<card>_<date>.md)")
    p.add_argument("--json", action="store_true", help="also print all numbers as JSON on stdout")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one variant's measurement, as JSON
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    try:
        from dejavu_jax.parallel import parse_tp

        tp = parse_tp(args.tp)
        dims = [int(v) for v in args.dims.split(",")]
        if min(dims) < 1 or args.batch < 1 or args.steps < 1 or args.repeats < 1:
            raise ValueError(
                f"--dims, --batch, --steps and --repeats must be positive. Got {args.dims}, {args.batch}, "
                f"{args.steps} and {args.repeats}"
            )
        variants = [(text, *parse_variant(text)) for text in args.variant]
        reductions = [r.strip() for r in args.reductions.split(",") if r.strip()]
        if not reductions or not set(reductions) <= set(REDUCTIONS):
            raise ValueError(f"--reductions takes {','.join(REDUCTIONS)}. Got {args.reductions!r}")
        dtypes = [t.strip() for t in args.dtypes.split(",") if t.strip()]
        if not dtypes or not set(dtypes) <= set(DTYPES):
            raise ValueError(f"--dtypes takes {','.join(DTYPES)}. Got {args.dtypes!r}")
    except ValueError as e:
        p.error(str(e))
    tp = len(jax.devices()) if tp == "auto" else tp
    if tp < 2 or tp > len(jax.devices()):
        p.error(f"--tp must lie in [2, {len(jax.devices())}] (the devices JAX sees). Got {tp}")
    if args.child:
        print(json.dumps({"rows": measure(tp, args.batch, dims, args.steps, args.repeats, reductions, dtypes)}))
        return 0

    info = provenance()
    log(f"{info['card']} x{tp}  jax {info['jax']}  commit {info['commit']}")
    child_argv = _drop_values([a for a in argv if a != "--json"], ("--variant", "--out"))
    results = []
    if not variants:
        rows = measure(tp, args.batch, dims, args.steps, args.repeats, reductions, dtypes)
        results.append({"variant": "baseline", "rows": rows})
    else:
        for label, flags, env_vars in [("baseline", [], {}), *variants]:
            log(f"variant: {label}")
            results.append({"variant": label, **run_child(child_argv, flags, env_vars)})

    header = ["variant", "reduction", "dtype", "d", "bytes", "us/call", "loop us/call", "net us/call", "max rel err"]
    body = []
    for r in results:
        if "error" in r:
            body.append([r["variant"], "-", "-", "-", "-", "err", "-", "-", r["error"][:100]])
            continue
        for row in r["rows"]:
            body.append(
                [
                    r["variant"],
                    row["reduction"],
                    row["dtype"],
                    str(row["d"]),
                    str(row["bytes"]),
                    f"{row['us_per_call']:.1f}",
                    f"{row['loop_us_per_call']:.1f}",
                    f"{row['net_us_per_call']:.1f}",
                    f"{row['max_rel_err']:.1e}",
                ]
            )
    print(to_text(header, body))
    data = {**info, "tp": tp, "batch": args.batch, "steps": args.steps, "results": results}
    markdown = "\n".join(
        [
            f"# All-reduce latency, {info['card']} x{tp}",
            "",
            f"- date {info['date']}, commit `{info['commit']}`, jax {info['jax']}",
            f"- command: `{info['command']}`",
            f"- the sum over devices of one [{args.batch}, d] block per device under shard_map (psum: XLA's "
            "all-reduce; gather: all-gather, then an ordered sum; ring: tp - 1 collective-permutes, then an ordered "
            f"sum), chained {args.steps}x in a fori_loop; 'loop' is the same chain without the reduction; "
            "net = us/call - loop",
            "",
            to_markdown(header, body),
            "",
        ]
    )
    card = info["card"].replace(" ", "-")
    path = write_results(f"allreduce_{card}_x{tp}_{info['date']}", markdown, data, args.out)
    log(f"wrote {path}")
    if args.json:
        print(json.dumps(data))
    return 0


def _drop_values(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` without `flags` and the value after each (the `--flag=value` forms too)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
