"""Sparse-MLP kernel benchmark: the Pallas kernel vs dense XLA vs an XLA gather, against the floor.

    python -m bench kernels --op mlp [--quick] [--shapes opt-13b,opt-66b] [--densities 0.05,0.1]
                                     [--batches 1,16] [--variants auto,split1] [--repeats 10]
                                     [--max-minutes 5.5]
    python -m bench kernels --op mlp --interpret     # tiny CPU smoke test (Pallas interpreter)

For each OPT layer shape (d, ffn = 4d), batch and density (K = density * ffn, rounded to 64), in one run:
the Pallas kernel of kernels/sparse_mlp.py (once per --variants knob setting), the dense XLA MLP
(dejavu_jax.sparse_mlp.mlp_dense), and `sparse_mlp_reference` (jnp.take of the active rows + two
matmuls), all on random fp16 weights. The floor is the bytes the op must read (the K active rows of
fc1_w and fc2_w_t, x, both biases' used entries) / the device copy bandwidth measured in the same run
(bench.common.copy_bandwidth).

Timing: one call is a few microseconds, far below host dispatch, so each implementation runs as one
jitted program that chains calls (`bench.common.time_chained`: a `lax.fori_loop` with a static trip
count, each call's output the next call's x) and the median program time over --repeats runs is
divided by the number of calls. Compile time is measured apart. So that the chain does not read its
weights from the 50 MB L2, each loop step cycles through several disjoint random index sets (and, for
small K, two weight copies) until the bytes touched per cycle exceed 2x L2. Before timing, the first
call's output of every Pallas variant is compared with the reference (max per-row relative error,
printed and stored).

Two reference timings per configuration, chained and rotated the same way, say what the floor means
in practice (issue 3 asks a missed target to be explained by evidence):

* "dense_equal_bytes": the dense XLA MLP (mlp_dense) on contiguous weights of K neurons (fc1_w and
  fc2_w_t [K, d]): it reads exactly the floor's bytes with XLA's dense GEMV code, so its time / floor is
  the practical floor of a (two-GEMV) XLA program reading that many bytes. The rotation's index sets become
  disjoint contiguous K-row slices of the same weight copies, so each loop step touches as many bytes.
* "launch_probe": the smallest chained Pallas (Triton) kernel, x [B, d] -> x * 0.5 + 1 (same compiler
  params style as kernels/sparse_mlp.py): the fixed cost per launch in the same chained setting. It does
  not depend on the density, so it is timed once per (shape, batch), like dense.
--no-references skips both.

Budget: the full default grid (4 shapes x 5 densities x 4 batches = 80 configurations; the kernel, take,
and dense, plus the references: one compile per configuration and one per (shape, batch)) is dominated by
compile time, about half a second per timed implementation on an H100; chains are 2 ms, identical plans
are timed once, and --max-minutes (default 5.5) stops starting configurations and still writes the
table. Shapes run 13B and 66B first, so a cut-short run keeps the acceptance shapes.

Per (shape, batch) it reports the crossover: the smallest density at which the best Pallas variant is
no faster than dense, and a linear interpolation of where the speedup crosses 1 - the numbers that
go into dejavu_jax.sparse_mlp.SPARSE_CROSSOVER_DENSITY.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import sys
import time
import traceback
import zlib

# Torch (the copy-bandwidth probe) shares the GPU with JAX in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

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
from dejavu_jax.sparse_mlp import mlp_dense  # noqa: E402
from kernels.block_math import cdiv, prev_pow2  # noqa: E402
from kernels.sparse_mlp import plan_sparse_mlp, sparse_mlp, sparse_mlp_reference  # noqa: E402

# OPT layer shapes: (d, ffn). Run in this order (the acceptance shapes first) so that a run cut short by
# --max-minutes still has them.
SHAPES = {"opt-13b": (5120, 20480), "opt-66b": (9216, 36864), "opt-6.7b": (4096, 16384), "opt-30b": (7168, 28672)}
DENSITIES = (0.025, 0.05, 0.1, 0.25, 0.5)
BATCHES = (1, 4, 16, 64)
QUICK = dict(shapes=("opt-13b", "opt-66b"), densities=(0.05, 0.1, 0.5), batches=(1, 16))
INTERPRET = dict(shapes=("tiny-256x1024",), densities=(0.05, 0.25), batches=(1, 3, 16))

# Pallas variants: name -> sparse_mlp knobs. Two with the same resolved plan are timed once.
PALLAS_VARIANTS = {
    "auto": {},  # the plan sparse_mlp picks (what the model runs)
    "split1": dict(split_d=1, split_k=1),  # exactly two launches, no plain-JAX glue, fewer programs
}
DEFAULT_VARIANTS = ("auto",)
BASELINES = ("dense", "take")
# Timings that do not depend on the density (dense, the launch_probe reference): timed once per
# (shape, batch) and stored in every row of it.
PER_BATCH = ("dense", "launch_probe")
PROBE_MAX_BLOCK_D = 1024

L2_BYTES = 50e6
K_MULTIPLE = 64
MAX_CALLS_PER_STEP = 16
MIN_CALLS_PER_STEP = 8
CORRECT_TOL = 2e-2  # fp16, per-row relative error vs the reference


def parse_shape(name: str) -> tuple[str, int, int]:
    if name in SHAPES:
        return (name, *SHAPES[name])
    if "opt-" + name in SHAPES:
        return ("opt-" + name, *SHAPES["opt-" + name])
    tail = name.split("-")[-1]
    try:
        d, ffn = (int(v) for v in tail.split("x"))
    except ValueError:
        raise ValueError(f"--shapes takes {sorted(SHAPES)} or DxFFN (e.g. 4096x16384). Got {name!r}") from None
    return name, d, ffn


def k_for(density: float, ffn: int) -> int:
    k = int(round(density * ffn / K_MULTIPLE)) * K_MULTIPLE
    return min(ffn, max(K_MULTIPLE if ffn >= K_MULTIPLE else 1, k))


def floor_bytes(batch: int, k: int, d: int, itemsize: int) -> int:
    """Bytes the sparse MLP must read: K rows of each matrix, their fc1 biases, fc2's bias, x."""
    return (2 * k * d + k + d + batch * d) * itemsize


def dense_bytes(batch: int, ffn: int, d: int, itemsize: int) -> int:
    return (2 * ffn * d + ffn + d + batch * d) * itemsize


@dataclasses.dataclass
class Rotation:
    """How one loop step cycles through weights and index sets to defeat L2 reuse."""

    n_weight_sets: int
    n_idx_sets: int
    calls: tuple[tuple[int, int], ...]  # (weight set, index set) per call in one loop step


def plan_rotation(k: int, d: int, ffn: int, itemsize: int, interpret: bool) -> Rotation:
    if interpret:
        return Rotation(1, 1, ((0, 0),))
    active = 2 * k * d * itemsize
    n_idx = max(1, min(ffn // k, math.ceil(2 * L2_BYTES / active), MAX_CALLS_PER_STEP))
    n_w = max(1, min(2, math.ceil(2 * L2_BYTES / (n_idx * active))))
    cycle = [(w, i) for w in range(n_w) for i in range(n_idx)][:MAX_CALLS_PER_STEP]
    calls = list(cycle)
    while len(calls) < MIN_CALLS_PER_STEP:
        calls += cycle
    return Rotation(n_w, n_idx, tuple(calls))


def make_weights(key, d, ffn, dtype, n_sets):
    sets = []
    for i in range(n_sets):
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, i), 4)
        fc1_w = (jax.random.normal(k1, (ffn, d), jnp.float32) / math.sqrt(d)).astype(dtype)
        fc1_b = (0.1 * jax.random.normal(k2, (ffn,), jnp.float32)).astype(dtype)
        fc2_w_t = (jax.random.normal(k3, (ffn, d), jnp.float32) / math.sqrt(ffn)).astype(dtype)
        fc2_b = (0.1 * jax.random.normal(k4, (d,), jnp.float32)).astype(dtype)
        sets.append((fc1_w, fc1_b, fc2_w_t, fc2_b))
    return jax.block_until_ready(sets)


def make_idx_sets(key, ffn, k, n_sets):
    """n_sets disjoint random (unsorted) index sets of k neurons."""
    perm = jax.random.permutation(key, ffn).astype(jnp.int32)
    return [perm[i * k : (i + 1) * k] for i in range(n_sets)]


def equal_bytes_sets(weight_sets, rotation: Rotation, k: int):
    """Contiguous K-neuron weights for dense_equal_bytes, and the rotation that cycles through them.

    Index set i of weight copy w becomes rows [i*K, (i+1)*K) of copy w (disjoint, since the rotation
    has at most ffn // K index sets), so a loop step touches as many distinct bytes as the sparse chain.
    """
    n = rotation.n_idx_sets
    sets = [
        (*rows, fc2_b)
        for fc1_w, fc1_b, fc2_w_t, fc2_b in weight_sets
        for rows in _row_blocks((fc1_w, fc1_b, fc2_w_t), k, n)
    ]
    calls = tuple((w * n + i, 0) for w, i in rotation.calls)
    return jax.block_until_ready(sets), Rotation(len(sets), 1, calls)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _row_blocks(arrays, k: int, n: int):
    """[(a[0:k] for a in arrays), (a[k:2k] ...), ...] for n blocks: one compile, not one per eager slice."""
    return [tuple(a[i * k : (i + 1) * k] for a in arrays) for i in range(n)]


def launch_probe(x, *, interpret: bool = False):
    """The smallest Pallas kernel a chain can carry: x [B, d] -> x * 0.5 + 1 (a fixed point, no overflow).

    One program per (row, column block). A ragged last block is shifted back to end at d (rewriting a
    few columns with the same values), so every access is an unmasked power-of-two block, as in
    kernels/sparse_mlp.py.
    """
    batch, d = x.shape
    bd = min(PROBE_MAX_BLOCK_D, prev_pow2(d))

    def kernel(x_ref, o_ref):
        row, j = pl.program_id(0), pl.program_id(1)
        cols = pl.ds(jnp.minimum(j * bd, d - bd), bd)
        o_ref[row, cols] = x_ref[row, cols] * 0.5 + 1.0

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(batch, cdiv(d, bd)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="launch_probe",
    )(x)


def step_fn(impl: str, knobs: dict, interpret: bool):
    """(x, weights, idx) -> out, the op under test."""
    if impl in ("dense", "dense_equal_bytes"):
        return lambda x, w, idx: mlp_dense(x, *w)
    if impl == "launch_probe":
        return lambda x, w, idx: launch_probe(x, interpret=interpret)
    if impl == "take":

        def take(x, w, idx):
            # A data dependency XLA cannot prove zero, so the gather is not hoisted out of the loop.
            idx = idx + (x[0, 0] != x[0, 0]).astype(idx.dtype)
            return sparse_mlp_reference(x, *w, idx)

        return take
    return lambda x, w, idx: sparse_mlp(x, *w, idx, interpret=interpret, **knobs)


def time_impl(impl, knobs, x0, weight_sets, idx_sets, rotation, est_us, args) -> dict:
    step = step_fn(impl, knobs, args.interpret)
    calls_per_step = len(rotation.calls)
    n_steps = 1 if args.interpret else int(np.clip(round(args.chain_us / (est_us * calls_per_step)), 2, 4000))

    def first(x, operands):
        weight_sets, idx_sets = operands
        return step(x, weight_sets[0], idx_sets[0])

    def body(x, operands):
        weight_sets, idx_sets = operands
        for w, i in rotation.calls:
            x = step(x, weight_sets[w], idx_sets[i])
        return x

    timing = time_chained(
        body,
        x0,
        (weight_sets, idx_sets),
        steps=n_steps,
        repeats=args.repeats,
        calls_per_step=calls_per_step,
        first=first,
    )
    return {"us": timing.seconds * 1e6, "compile_s": timing.compile_s, "calls": timing.calls, "out0": timing.first}


def row_rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float((np.linalg.norm(out - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-30)).max())


def plan_summary(plan) -> str:
    grids = "+".join("x".join(map(str, g)) for g in (plan.fc1_grid, plan.fc2_grid))
    return (
        f"bk{plan.block_k} bd{plan.block_d} grid {grids} w{plan.num_warps} s{plan.num_stages}"
        f"{' dot' if plan.use_dot else ''}"
    )


def bench_config(shape, d, ffn, batch, density, weights_all, args, bw, log) -> dict:
    dtype, itemsize = jnp.float16, 2
    k = k_for(density, ffn)
    rotation = plan_rotation(k, d, ffn, itemsize, args.interpret)
    weight_sets = weights_all[: rotation.n_weight_sets]
    key = jax.random.key(zlib.crc32(repr((shape, batch, density)).encode()))
    idx_sets = make_idx_sets(jax.random.fold_in(key, 1), ffn, k, rotation.n_idx_sets)
    x0 = jax.random.normal(jax.random.fold_in(key, 2), (batch, d), jnp.float32).astype(dtype)
    fbytes = floor_bytes(batch, k, d, itemsize)
    row = {
        "shape": shape,
        "d": d,
        "ffn": ffn,
        "batch": batch,
        "density": density,
        "k": k,
        "floor_bytes": fbytes,
        "floor_us": fbytes / bw * 1e6,
        "rotation": dataclasses.asdict(rotation),
        "impls": {},
    }
    est_sparse = max(3.0, fbytes / 2.5e6)
    est = {"dense": max(3.0, dense_bytes(batch, ffn, d, itemsize) / 2.5e6), "take": 3 * est_sparse}

    plans_seen = {}
    ref = None
    for impl in ("take", *args.variants):  # The reference first; dense is timed per (shape, batch).
        knobs = PALLAS_VARIANTS.get(impl, {})
        entry: dict = {}
        try:
            if impl in PALLAS_VARIANTS:
                plan = plan_sparse_mlp(batch, k, d, dtype, **knobs)
                entry["plan"] = plan_summary(plan)
                if plan in plans_seen:
                    entry.update(
                        {
                            kk: v
                            for kk, v in row["impls"][plans_seen[plan]].items()
                            if kk in ("us", "compile_s", "max_rel_err", "error")
                        }
                    )
                    entry["same_as"] = plans_seen[plan]
                    row["impls"][impl] = entry
                    continue
                plans_seen[plan] = impl
            res = time_impl(impl, knobs, x0, weight_sets, idx_sets, rotation, est.get(impl, est_sparse), args)
            out0 = res.pop("out0")
            if impl == "take":
                ref = out0
            elif ref is not None:
                res["max_rel_err"] = row_rel_err(out0, ref)
            entry.update(res)
        except Exception as e:  # noqa: BLE001 - one variant failing must not end the run
            entry.update(failure(f"{shape} b{batch} {density:g} {impl}", e))
        row["impls"][impl] = entry
    if args.references:
        row["impls"]["dense_equal_bytes"] = time_reference(
            "dense_equal_bytes",
            f"{shape} b{batch} {density:g}",
            x0,
            lambda: equal_bytes_sets(weight_sets, rotation, k),
            est_sparse,
            args,
        )
    gc.collect()  # Once per configuration: a full collection costs ~0.1 s in this process.
    if ref is None and not args.interpret:
        log(f"  warning: no reference for {shape} b{batch} {density:g}; Pallas outputs unchecked")
    return row


def failure(label: str, e: Exception) -> dict:
    """Log a failed timing with its traceback; the entry recording it (one failure must not end the run)."""
    print(f"[{label}] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def time_reference(impl, label, x0, inputs, est_us, args) -> dict:
    """A timing that takes no index set and is checked against nothing (dense, the references).

    `inputs()` -> (weight_sets, rotation), built inside the guard: making them may fail too (memory).
    """
    try:
        weight_sets, rotation = inputs()
        res = time_impl(impl, {}, x0, weight_sets, [jnp.zeros((1,), jnp.int32)], rotation, est_us, args)
        res.pop("out0")
        return res
    except Exception as e:  # noqa: BLE001
        return failure(f"{label} {impl}", e)


def time_per_batch(impl, shape, d, ffn, batch, weights_all, args) -> dict:
    """dense or launch_probe: independent of the density, so timed once per (shape, batch)."""
    x0 = jax.random.normal(jax.random.key(batch), (batch, d), jnp.float32).astype(jnp.float16)
    if impl == "dense":
        weight_sets, calls, est = weights_all[:1], 4, max(3.0, dense_bytes(batch, ffn, d, 2) / 2.5e6)
    else:  # The probe reads no weights.
        weight_sets, calls, est = [()], MIN_CALLS_PER_STEP, 3.0
    rotation = Rotation(1, 1, ((0, 0),) * (1 if args.interpret else calls))
    return time_reference(impl, f"{shape} b{batch}", x0, lambda: (weight_sets, rotation), est, args)


def pallas_names(args):
    return [v for v in args.variants if v in PALLAS_VARIANTS]


def best_pallas(row, args):
    times = {
        n: row["impls"][n]["us"]
        for n in pallas_names(args)
        if "us" in row["impls"].get(n, {}) and row["impls"][n].get("max_rel_err", 0.0) <= CORRECT_TOL
    }
    if not times:
        return None, None
    name = min(times, key=times.get)
    return name, times[name]


def crossovers(rows, args) -> list[dict]:
    """Per (shape, batch): the smallest density where the best Pallas variant is no faster than dense."""
    out = []
    groups = {}
    for row in rows:
        groups.setdefault((row["shape"], row["batch"]), []).append(row)
    for (shape, batch), group in groups.items():
        points = []
        for row in sorted(group, key=lambda r: r["density"]):
            _, best = best_pallas(row, args)
            dense = row["impls"].get("dense", {}).get("us")
            if best is not None and dense is not None:
                points.append((row["density"], dense / best))
        first_loss = next((dens for dens, s in points if s <= 1.0), None)
        interp = None
        for (d0, s0), (d1, s1) in zip(points, points[1:]):
            if s0 > 1.0 >= s1:
                interp = d0 + (s0 - 1.0) * (d1 - d0) / (s0 - s1)
                break
        if points and interp is None:
            interp = (0.0 if points[0][1] <= 1.0 else None) if first_loss is not None else None
        out.append(
            {
                "shape": shape,
                "batch": batch,
                "first_density_not_faster": first_loss,
                "interpolated_crossover": interp,
                "max_density_measured": points[-1][0] if points else None,
            }
        )
    return out


def suggested_table(cross) -> dict:
    """Per batch, the most conservative (smallest) crossover across shapes, for SPARSE_CROSSOVER_DENSITY."""
    table = {}
    for c in cross:
        value = c["interpolated_crossover"]
        if value is None:  # Sparse faster at every measured density: the largest one is safe.
            value = c["max_density_measured"] if c["first_density_not_faster"] is None else 0.0
        if value is None:
            continue
        table[c["batch"]] = min(table.get(c["batch"], 1.0), round(value, 3))
    return dict(sorted(table.items()))


def acceptance(rows, args) -> list[str]:
    """The issue's targets: b1 10% speedup >= 4x (13B) / 6x (66B); every b1 best time <= 1.5x floor."""
    lines, floor_ok, batch1 = [], True, False
    targets = {"opt-13b": 4.0, "opt-66b": 6.0}
    for row in rows:
        if row["batch"] != 1:
            continue
        batch1 = True
        name, best = best_pallas(row, args)
        if best is None:
            lines.append(f"FAIL {row['shape']} b1 {row['density']:g}: no correct Pallas timing")
            floor_ok = False
            continue
        ratio = best / row["floor_us"]
        if ratio > 1.5:
            lines.append(
                f"FAIL {row['shape']} b1 {row['density']:g}: {name} {best:.1f} us = {ratio:.2f}x floor (> 1.5x)"
            )
            floor_ok = False
        dense = row["impls"].get("dense", {}).get("us")
        if row["shape"] in targets and abs(row["density"] - 0.1) < 1e-9 and dense:
            speedup = dense / best
            verdict = "PASS" if speedup >= targets[row["shape"]] else "FAIL"
            lines.append(
                f"{verdict} {row['shape']} b1 10%: {name} {speedup:.2f}x faster than dense "
                f"(target >= {targets[row['shape']]:g}x)"
            )
    if not batch1:
        lines.append("(no batch-1 rows measured)")
    elif floor_ok:
        lines.append("PASS every batch-1 best Pallas time is within 1.5x its floor")
    return lines


def reference_cells(row) -> list[str]:
    """dense_equal_bytes time and its x floor, launch_probe time."""
    eq = row["impls"].get("dense_equal_bytes", {})
    return [
        fmt_us(eq, CORRECT_TOL),
        f"{eq['us'] / row['floor_us']:.2f}" if "us" in eq else "-",
        fmt_us(row["impls"].get("launch_probe", {}), CORRECT_TOL),
    ]


def table_rows(rows, args):
    impls = pallas_names(args) + list(BASELINES)
    header = (
        ["shape", "B", "density", "K"]
        + [f"{n} us" for n in impls]
        + ["best", "speedup vs dense", "GB/s (best)", "time/floor", "max rel err"]
        + (["eq-bytes dense us", "eq-bytes/floor", "launch probe us"] if args.references else [])
    )
    body = []
    for row in rows:
        name, best = best_pallas(row, args)
        dense = row["impls"].get("dense", {}).get("us")
        errs = [row["impls"].get(n, {}).get("max_rel_err") for n in pallas_names(args)]
        errs = [e for e in errs if e is not None]
        body.append(
            [row["shape"], str(row["batch"]), f"{row['density']:g}", str(row["k"])]
            + [fmt_us(row["impls"].get(n, {}), CORRECT_TOL) for n in impls]
            + [
                name or "-",
                f"{dense / best:.2f}x" if best and dense else "-",
                f"{row['floor_bytes'] / (best * 1e-6) / 1e9:.0f}" if best else "-",
                f"{best / row['floor_us']:.2f}" if best else "-",
                f"{max(errs):.1e}" if errs else "-",
            ]
            + (reference_cells(row) if args.references else [])
        )
    return header, body


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench kernels --op mlp",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    csv = lambda f: lambda s: tuple(f(v) for v in s.split(",") if v)  # noqa: E731
    p.add_argument("--shapes", type=csv(str), default=None, help=f"comma list of {sorted(SHAPES)} or DxFFN")
    p.add_argument("--densities", type=csv(float), default=None, help=f"comma list (default {DENSITIES})")
    p.add_argument("--batches", type=csv(int), default=None, help=f"comma list (default {BATCHES})")
    p.add_argument(
        "--variants",
        type=csv(str),
        default=DEFAULT_VARIANTS,
        help=f"Pallas variants, comma list of {list(PALLAS_VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument("--quick", action="store_true", help=f"a quick subset: {QUICK}")
    p.add_argument(
        "--no-references",
        dest="references",
        action="store_false",
        help="skip the dense_equal_bytes and launch_probe reference timings",
    )
    add_kernel_bench_args(p, "mlp")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    preset = INTERPRET if args.interpret else (QUICK if args.quick else {})
    shapes = [parse_shape(s) for s in (args.shapes or preset.get("shapes") or SHAPES)]
    densities = sorted(args.densities or preset.get("densities") or DENSITIES)
    batches = sorted(args.batches or preset.get("batches") or BATCHES)
    unknown = [v for v in args.variants if v not in PALLAS_VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown --variants {unknown}; choose from {list(PALLAS_VARIANTS)}")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be >= 1. Got {args.repeats}")
    meta, bw_probe = kernel_bench_setup("mlp", argv, args.interpret)
    bw = bw_probe["floor_bandwidth"]

    start = time.perf_counter()
    rows, stopped_early = [], False

    def out_of_time() -> bool:
        if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            log(f"stopping early: --max-minutes {args.max_minutes:g} reached")
            return True
        return False

    for shape, d, ffn in shapes:
        if stopped_early:
            break
        max_k = k_for(min(densities), ffn)
        n_w = max(plan_rotation(max_k, d, ffn, 2, args.interpret).n_weight_sets, 1)
        try:
            weights_all = make_weights(jax.random.key(0), d, ffn, jnp.float16, n_w)
        except Exception as e:  # noqa: BLE001
            print(f"[{shape}] weights FAILED: {e}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            continue
        for batch in batches:
            if stopped_early or out_of_time():
                stopped_early = True
                break
            per_batch = {
                n: time_per_batch(n, shape, d, ffn, batch, weights_all, args)
                for n in PER_BATCH
                if n == "dense" or args.references
            }
            for n, e in per_batch.items():
                log(
                    f"{shape} b{batch} {n}: "
                    + (f"{e['us']:.1f} us (compile {e['compile_s']:.1f} s)" if "us" in e else e["error"])
                )
            for density in densities:
                if out_of_time():
                    stopped_early = True
                    break
                row = bench_config(shape, d, ffn, batch, density, weights_all, args, bw, log)
                row["impls"].update(per_batch)
                rows.append(row)
                parts = [
                    f"{n} {fmt_us(e, CORRECT_TOL)}" + (f" ({e['max_rel_err']:.0e})" if "max_rel_err" in e else "")
                    for n, e in row["impls"].items()
                    if n not in PER_BATCH
                ]
                log(f"  {shape} b{batch} {density:g} K={row['k']} floor {row['floor_us']:.1f} us: " + ", ".join(parts))
        del weights_all
        gc.collect()
    elapsed = time.perf_counter() - start

    header, body = table_rows(rows, args)
    cross = crossovers(rows, args)
    suggestion = suggested_table(cross)
    accept = acceptance(rows, args) if not args.interpret else ["(interpret mode: no acceptance check)"]
    compile_total = sum(
        e.get("compile_s", 0.0)
        for r in rows
        for n, e in r["impls"].items()
        if n not in PER_BATCH and "same_as" not in e
    )
    compile_total += sum(
        {
            (r["shape"], r["batch"], n): e.get("compile_s", 0.0)
            for r in rows
            for n, e in r["impls"].items()
            if n in PER_BATCH
        }.values()
    )

    cross_lines = [
        f"{c['shape']} b{c['batch']}: first density not faster = "
        f"{c['first_density_not_faster'] if c['first_density_not_faster'] is not None else 'none'}"
        f", interpolated crossover = "
        f"{'%.3f' % c['interpolated_crossover'] if c['interpolated_crossover'] is not None else '-'}"
        for c in cross
    ]
    plans = sorted(
        {
            (r["shape"], r["batch"], r["density"], n, e["plan"])
            for r in rows
            for n, e in r["impls"].items()
            if "plan" in e
        }
    )

    print()
    print(to_text(header, body))
    print("\nCrossover (best Pallas variant vs dense):")
    print("\n".join("  " + line for line in cross_lines))
    print(f"\nSuggested SPARSE_CROSSOVER_DENSITY = {suggestion}")
    print("\nAcceptance:")
    print("\n".join("  " + line for line in accept))
    print(
        f"\n{len(rows)} configurations in {elapsed:.0f} s (compile {compile_total:.0f} s)"
        f"{' - stopped early' if stopped_early else ''}"
    )

    data = {
        **meta,
        "copy_bandwidth": bw_probe,
        "interpret": args.interpret,
        "references": args.references,
        "elapsed_s": elapsed,
        "compile_s": compile_total,
        "stopped_early": stopped_early,
        "variants": {n: PALLAS_VARIANTS[n] for n in args.variants},
        "rows": rows,
        "crossovers": cross,
        "suggested_crossover_density": suggestion,
        "acceptance": accept,
    }
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    if args.interpret and args.out is None:
        return 0
    md = "\n".join(
        [
            f"# Sparse MLP kernel vs dense - {meta['card']}",
            "",
            f"- date: {meta['date']}",
            f"- command: `{meta['command']}`",
            f"- commit: {meta['commit']}",
            f"- jax: {meta['jax']}",
            "- copy bandwidth: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in bw_probe.items()),
            f"- fp16 random weights; K = density x ffn rounded to {K_MULTIPLE}; times are per call, from "
            "chained calls in one jitted program (median of "
            f"{args.repeats}); `!` marks an output off the reference by > {CORRECT_TOL:g} (excluded from best)",
            *(
                [
                    "- eq-bytes dense: dense XLA MLP on contiguous fc1_w / fc2_w_t of K neurons (the floor's bytes, "
                    "XLA's GEMV code); eq-bytes/floor is its time / floor. launch probe: the smallest chained Pallas "
                    "kernel (x [B, d] -> x * 0.5 + 1), the fixed cost per launch"
                ]
                if args.references
                else []
            ),
            f"- {len(rows)} configurations in {elapsed:.0f} s, compile {compile_total:.0f} s"
            + (" (stopped early by --max-minutes)" if stopped_early else ""),
            "",
            to_markdown(header, body),
            "",
            "## Crossover (best Pallas variant vs dense)",
            "",
            *[f"- {line}" for line in cross_lines],
            "",
            f"Suggested `SPARSE_CROSSOVER_DENSITY = {suggestion}`",
            "",
            "## Acceptance",
            "",
            *[f"- {line}" for line in accept],
            "",
            "## Launch plans",
            "",
            *[f"- {s} b{b} {dens:g} {n}: {p}" for s, b, dens, n, p in plans],
            "",
        ]
    )
    stem = f"kernels_mlp_{card_slug(meta['card'])}_{meta['date']}"
    path = write_results(stem, md, json.loads(json.dumps(data, default=str)), args.out)
    print(f"wrote {path} and {path.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
