"""Every Pallas kernel of a decode program, compiled for an H100 on any host (no GPU): does it compile, and what
does it hold (registers, spills, shared memory, programs an SM can run at once)?

    python -m bench compile-kernels --shape opt-6.7b --attention pallas --mlp-density 0.1 --head-density 0.5
                                    [--heads predicted] [--tuning NAME=VALUE,...] [--batch N] [--lower-only]
                                    [--triton-python PATH] [--keep DIR]

The generation program `bench generate` times (the same flags as `bench profile`; the weights are shapes only,
nothing is allocated) is lowered for CUDA with the kernels compiled (`kernels.platform.compiled_kernels`). Each
Pallas kernel's Triton IR is read from the lowered program (the `__gpu$xla.gpu.triton` custom calls jax <= 0.10
emits, with their warps, stages and grid), and Triton's own compiler turns it into PTX and a cubin for sm_90
(`bench/triton_compile_worker.py`, run by `--triton-python`, default this Python; it needs only `pip install
triton`). A kernel that fails there would fail at its first compile on the GPU; the table says which and why.
Exit status: 0 when every kernel compiled (or with --lower-only), 1 when one failed, 2 for bad flags or a worker or
lowering this tool cannot use.

What it cannot say: the GPU compiles with the Triton that its jaxlib bundles, which may differ from the pip
package's version (the table names the one used); and nothing here runs a kernel. Occupancy is the H100's limits
(65,536 registers and 228 KiB of shared memory an SM, 1 KiB of it reserved per program, 32 programs, 64 warps),
registers allocated per warp in units of 256; waves: programs over 132 SMs times the programs an SM holds. On the GPU
itself, `tools/ptx_report.py` reads what the real compile emitted for the sparse-MLP kernels (PTX, SASS, ncu).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.common import provenance, to_markdown, write_results
from bench.decode_setup import add_decode_args, check_decode_args, decode_setup
from dejavu_jax.generation import generate_tokens
from dejavu_jax.sampling import SamplingConfig
from dejavu_jax.sparsity import for_decode_batch
from kernels.platform import compiled_kernels

TRITON_CALL = "__gpu$xla.gpu.triton"
WORKER = Path(__file__).resolve().parent / "triton_compile_worker.py"

# The H100's per-SM limits (CUDA occupancy rules for compute capability 9.0).
H100_SMS = 132
SM_REGISTERS = 65536
SM_SHARED = 228 * 1024
SHARED_RESERVED_PER_PROGRAM = 1024
SM_MAX_PROGRAMS = 32
SM_MAX_WARPS = 64
REGISTER_UNIT_PER_WARP = 256


@dataclasses.dataclass
class TritonKernel:
    """One Pallas kernel as the lowered program carries it."""

    name: str
    ir: str  # Triton IR, MLIR generic form
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def triton_kernels(lowered) -> list[TritonKernel]:
    """The distinct Triton kernels of a program lowered for CUDA (`jax.stages.Lowered`), in program order."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    module = lowered.compiler_ir("stablehlo")
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        target = ir.StringAttr(child.operation.attributes["call_target_name"]).value
                        if target == TRITON_CALL:
                            calls.append(child.operation)
                        elif "triton" in target:
                            raise ValueError(
                                f"this jaxlib lowers Pallas kernels to {target!r}, not {TRITON_CALL!r}: it compiles "
                                "them with its own Triton while lowering (jax > 0.10), so lowering is that check"
                            )
                    walk(child.operation)

    walk(module.operation)
    context = ir.Context()  # the dialects Pallas' Triton lowering loads
    context.append_dialect_registry(mlir.upstream_dialects)
    tt_dialect.register_dialect(context)
    context.load_all_available_dialects()
    kernels: dict[str, TritonKernel] = {}
    for op in calls:
        config = op.attributes["mhlo.backend_config"]
        with context:
            text = ir.Module.parse(config["ir"].value_bytes).operation.get_asm(print_generic_op_form=True)
        if text in kernels:  # one kernel called by several layers
            continue

        def number(key):
            return ir.IntegerAttr(config[key]).value

        kernels[text] = TritonKernel(
            name=ir.StringAttr(config["name"]).value,
            ir=text,
            num_warps=number("num_warps"),
            num_stages=number("num_stages"),
            grid=(number("grid_x"), number("grid_y"), number("grid_z")),
        )
    return list(kernels.values())


def programs_per_sm(registers: int | None, shared: int, num_warps: int) -> int | None:
    """How many programs of a kernel one H100 SM holds at once (None without the register count)."""
    if registers is None:
        return None
    per_warp = math.ceil(registers * 32 / REGISTER_UNIT_PER_WARP) * REGISTER_UNIT_PER_WARP
    by_registers = (SM_REGISTERS // per_warp) // num_warps if per_warp else SM_MAX_PROGRAMS
    by_shared = SM_SHARED // (shared + SHARED_RESERVED_PER_PROGRAM)
    return min(by_registers, by_shared, SM_MAX_PROGRAMS, SM_MAX_WARPS // num_warps)


def compile_with_triton(kernels: list[TritonKernel], workdir: Path, python: str) -> tuple[str, list[dict]]:
    """(triton version, one result per kernel) from the worker run by `python` over `workdir`."""
    stems = [f"{i:04d}_{k.name}" for i, k in enumerate(kernels)]
    for stem, k in zip(stems, kernels):
        (workdir / f"{stem}.ttir").write_text(k.ir)
        (workdir / f"{stem}.json").write_text(json.dumps({"num_warps": k.num_warps, "num_stages": k.num_stages}))
    try:  # -I: the script's directory (bench/, whose select.py shadows the standard module) not on sys.path
        done = subprocess.run([python, "-I", str(WORKER), str(workdir)], capture_output=True, text=True)
    except OSError as e:
        raise ValueError(f"cannot run --triton-python {python!r}: {e}") from None
    lines = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines or "triton" not in lines[0]:
        why = lines[0].get("error") if lines else (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"the Triton compile worker failed ({why})")
    by_stem = {r["name"]: r for r in lines[1:]}  # the worker names each result by its file
    return lines[0]["triton"], [by_stem.get(stem, {"name": stem, "ok": False, "error": "no result"}) for stem in stems]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench compile-kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_decode_args(p, tp=False)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128, help="sets the cache length with --prompt-len (default 128)")
    p.add_argument("--lower-only", action="store_true", help="list the kernels without compiling them (no triton)")
    p.add_argument("--triton-python", default=sys.executable, help="the Python with triton (default: this one)")
    p.add_argument("--keep", default=None, help="keep each kernel's .ttir, .ptx and .cubin in this directory")
    p.add_argument(
        "--out", default=None, help="markdown path (default bench/results/compile_kernels_<shape>_<date>.md)"
    )
    args = p.parse_args(argv)
    tuning = check_decode_args(p, args)
    if args.batch < 1 or args.new_tokens < 2:
        p.error("need --batch >= 1 and --new-tokens >= 2")

    with compiled_kernels():
        setup = decode_setup(args, tuning, abstract=True)
        policy, sparsity = for_decode_batch(setup.policy, setup.sparsity, args.batch)
        ids = jax.ShapeDtypeStruct((args.batch, args.prompt_len), jnp.int32)
        static = dict(
            config=setup.config,
            num_slots=args.prompt_len + args.new_tokens,
            policy=policy,
            attention_impl=args.attention,
            mesh=None,
        )
        sampling = SamplingConfig().to_device()
        traced = generate_tokens.trace(
            setup.params, ids, ids, jnp.int32(1), jax.random.PRNGKey(2), sampling, sparsity, **static
        )
        try:
            kernels = triton_kernels(traced.lower(lowering_platforms=("cuda",)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not kernels:
        print("the program has no Pallas kernels (dense decoding with --attention xla runs XLA's own)")
        return 0

    info = provenance()
    triton_version, results = "-", [{} for _ in kernels]
    if not args.lower_only:
        keep = Path(args.keep) if args.keep else None
        if keep:
            keep.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                triton_version, results = compile_with_triton(kernels, keep or Path(tmp), args.triton_python)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    rows, failed = [], 0
    for k, r in zip(kernels, results):
        per_sm = programs_per_sm(r.get("registers"), r.get("shared", 0), k.num_warps) if r.get("ok") else None
        waves = math.ceil(k.programs / (H100_SMS * per_sm)) if per_sm else None
        failed += r.get("ok") is False
        status = "-" if not r else ("ok" if r["ok"] else f"FAILED: {r['error'][:160]}")
        compiled = {key: value for key, value in r.items() if key != "name"}  # the worker's name is the file's
        rows.append(
            {
                **dataclasses.asdict(k),
                "ir": None,
                **compiled,
                "programs_per_sm": per_sm,
                "waves": waves,
                "status": status,
            }
        )

    def cell(value):
        return "-" if value is None else str(value)

    body = [
        [
            r["name"],
            "x".join(str(g) for g in r["grid"] if g > 1) or "1",
            str(r["num_warps"]),
            str(r["num_stages"]),
            cell(r.get("registers")),
            cell(r.get("stack")),
            cell(r.get("shared")),
            cell(r["programs_per_sm"]),
            cell(r["waves"]),
            cell(r.get("atomics")),
            r["status"],
        ]
        for r in rows
    ]
    header = [
        "kernel",
        "grid",
        "warps",
        "stages",
        "registers",
        "stack bytes",
        "shared bytes",
        "programs / SM",
        "waves (132 SMs)",
        "atomics",
        "compile",
    ]
    what = f"batch {args.batch}, prompt {args.prompt_len} + {args.new_tokens} new tokens, attention {args.attention}"
    markdown = "\n".join(
        [
            f"# Decode kernels compiled for sm_90 without a GPU, {args.shape}",
            "",
            f"- date {info['date']}, commit `{info['commit']}`, jax {info['jax']}, triton {triton_version}",
            f"- command: `{info['command']}`",
            f"- {what}",
            "",
            to_markdown(header, body),
            "",
        ]
    )
    print(markdown)
    stem = f"compile_kernels_{args.shape}_{info['date']}"
    data = {**info, "triton": triton_version, "setting": what, "kernels": rows}
    path = write_results(stem, markdown, data, args.out)
    print(f"wrote {path}")
    return 1 if failed else 0
