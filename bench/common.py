"""What every benchmark needs: the card, the run's provenance, copy bandwidth, median and chained timers, result
files."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def card_name() -> str:
    device = jax.devices()[0]
    return getattr(device, "device_kind", device.platform)


def card_slug(card: str) -> str:
    """A card name as a file-name part: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "".join(c if c.isalnum() else "-" for c in card.lower()).strip("-")


def git_commit() -> str:
    """The commit under test. The GPU machine's copy of the checkout carries stale git metadata (its `git log`
    shows an older commit), so a caller there passes the commit in DEJAVU_COMMIT."""
    if os.environ.get("DEJAVU_COMMIT"):
        return os.environ["DEJAVU_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Environment variables that change what a timed program compiles to, written before the command when set.
COMMAND_ENV = ("XLA_FLAGS",)


def invoked_command(argv: list[str], environ=None) -> str:
    """The command line as typed: `python -m bench ...` through bench/__main__.py, `python -m bench.NAME ...` when a
    bench module ran directly, else the script path; preceded by the `COMMAND_ENV` variables set in `environ`
    (default: this process's), e.g. `XLA_FLAGS=... python -m bench generate ...`."""
    if not argv:
        return ""
    script = Path(argv[0])
    if script.parent.name == "bench":
        prefix = "python -m bench" if script.stem == "__main__" else f"python -m bench.{script.stem}"
    else:
        prefix = f"python {argv[0]}"
    environ = os.environ if environ is None else environ
    env = [f"{name}={environ[name]}" for name in COMMAND_ENV if environ.get(name)]
    return " ".join([*env, prefix, *argv[1:]])


def provenance() -> dict:
    return {
        "card": card_name(),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "command": invoked_command(sys.argv),
        "jax": jax.__version__,
    }


def median_seconds(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` (which must block until its device work is done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


@dataclasses.dataclass
class ChainTiming:
    """What `time_chained` measured: seconds per call (median program time / calls), apart from compile."""

    seconds: float
    compile_s: float
    calls: int
    first: Any  # the output of the first call (the program's first output), to check against a reference
    last: Any  # the chain's final carry


def time_chained(
    body, carry, operands=(), *, steps: int, repeats: int, calls_per_step: int = 1, first=None
) -> ChainTiming:
    """Times a call far below host dispatch: chained `steps` times in one jitted `lax.fori_loop`, then divided.

    `body(carry, operands) -> carry` is one loop iteration making `calls_per_step` calls, each call's output
    the next one's input (a data dependency, so XLA can neither hoist nor drop a call). With `first(carry,
    operands) -> carry` the program makes one call before the loop and starts the chain from its output,
    which comes back as `.first`. `operands` are arguments of the program (as a model's weights are), not
    constants folded into it. Compile time is measured apart; the time is the median of `repeats` runs.
    """

    def program(carry, operands):
        start = carry if first is None else first(carry, operands)
        return start, lax.fori_loop(0, steps, lambda _, c: body(c, operands), start)

    t0 = time.perf_counter()
    compiled = jax.jit(program).lower(carry, operands).compile()
    compile_s = time.perf_counter() - t0
    out_first, last = jax.block_until_ready(compiled(carry, operands))
    t, _ = median_seconds(lambda: jax.block_until_ready(compiled(carry, operands)), repeats, warmup=0)
    calls = steps * calls_per_step + (first is not None)
    return ChainTiming(seconds=t / calls, compile_s=compile_s, calls=calls, first=out_first, last=last)


def copy_bandwidth(nbytes: int | None = None, repeats: int = 10) -> dict:
    """Device copy bandwidth in bytes/s, counting bytes read plus written (the floor's denominator).

    Measured with torch's device copy where torch sees the GPU (a plain memcpy), else with an XLA copy.
    """
    if nbytes is None:  # large enough to defeat the cache on a GPU; small on a CPU, where it is only a smoke test
        nbytes = (2 << 30) if jax.default_backend() == "gpu" else (8 << 20)
    result = {}
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
            dst = torch.empty_like(src)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for i in range(repeats + 2):
                start.record()
                dst.copy_(src)
                end.record()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(start.elapsed_time(end) / 1e3)
            result["torch_copy"] = 2 * nbytes / float(np.median(times))
            del src, dst
            torch.cuda.empty_cache()
    except ImportError:
        pass
    x = jax.random.normal(jax.random.PRNGKey(0), (nbytes // 2,), jnp.float16)
    copy = jax.jit(lambda a: a * jnp.float16(1.0001))  # an elementwise pass XLA cannot elide
    t, _ = median_seconds(lambda: copy(x).block_until_ready(), repeats, warmup=2)
    result["xla_elementwise"] = 2 * nbytes / t
    result["floor_bandwidth"] = max(result.values())
    return result


def write_results(stem: str, markdown: str, data: dict, out: str | None = None) -> Path:
    """Markdown table + JSON numbers under bench/results/ (or `out`), and a copy under $OUT when set."""
    path = Path(out) if out else RESULTS_DIR / f"{stem}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown)
    path.with_suffix(".json").write_text(json.dumps(data, indent=2))
    if os.environ.get("OUT"):
        for p in (path, path.with_suffix(".json")):
            (Path(os.environ["OUT"]) / p.name).write_text(p.read_text())
    return path


def fmt_us(entry: dict, tolerance: float) -> str:
    """A timing cell: microseconds, '!' when the output was off the reference by more than `tolerance`."""
    if "us" in entry:
        bad = entry.get("max_rel_err", 0.0) > tolerance
        return f"{entry['us']:.1f}{'!' if bad else ''}"
    return "err" if "error" in entry else "-"


def to_text(header, body) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def to_markdown(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, flush=True)


def kernel_bench_setup(op: str, argv, interpret: bool) -> tuple[dict, dict]:
    """What every kernel bench does first: warn off a CPU run, provenance, and the copy-bandwidth probe."""
    if not interpret and jax.default_backend() != "gpu":
        print(
            f"warning: backend is {jax.default_backend()!r}, not gpu; compiled Pallas GPU kernels will fail "
            "(use --interpret for a CPU smoke test)",
            file=sys.stderr,
        )
    meta = provenance()
    meta["command"] = f"python -m bench kernels --op {op} " + " ".join(sys.argv[1:] if argv is None else argv)
    bw_probe = copy_bandwidth(nbytes=(8 << 20) if interpret else (2 << 30))
    log(
        f"{meta['card']}  jax {meta['jax']}  commit {meta['commit']}  copy bandwidth "
        + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in bw_probe.items())
    )
    return meta, bw_probe


def add_kernel_bench_args(parser, op: str) -> None:
    """The timing, stopping and output flags every `python -m bench kernels --op OP` shares."""
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per implementation (median; default 10)")
    parser.add_argument(
        "--chain-us",
        type=float,
        default=2000.0,
        help="target length of one chained program in microseconds (default 2000)",
    )
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="tiny shapes, Pallas interpreter, CPU-friendly: a smoke test, timings meaningless",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=5.5,
        help="stop starting new configurations after this long and write what was measured "
        "(default 5.5, under the GPU machine's 10-minute command limit; 0 = no limit)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="markdown path (JSON beside it); default "
        f"bench/results/kernels_{op}_<card>_<date>.md (interpret: nothing written unless given)",
    )
    parser.add_argument("--json", action="store_true", help="also print all numbers as JSON on stdout")
