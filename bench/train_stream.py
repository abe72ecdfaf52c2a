"""Streaming predictor training (`python -m train --store stream`) on a random-weight OPT of a real shape.

    python -m bench train-stream --shape opt-6.7b --data CORPUS --tokenizer TOKENIZER_DIR [--ranks 256,default]

Writes a random fp16 converted model of the shape (`dejavu_jax.checkpoint.write_model_directory`, loadable by
`--model`; kept in --workdir for the next run), then, per rank, runs `python -m train all --store stream` on it in
a child process (the bench process never touches the accelerator while it runs) and records what the child
reports: tokens/s after the first compiled batch, compile and wall time, peak device memory (n/a where the backend
does not say, as on a CPU), peak host RSS, the layer groups chosen for the disk budget and the peak disk use the
child estimated beside the peak this process sampled under its work dir, and what disk mode would have stored.

The results are written after each rank. A run that fails, or that is stopped by SIGTERM (e.g. `timeout`, which
then stops the child too), is written as a row that says so, with how long it ran and the child's last log lines,
so a time limit leaves a record of how far it got.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import card_slug, git_commit, write_results
from dejavu_jax.config import OPT_SHAPES, shape_config

# Normal values the random weights are cut from (see `random_groups`).
POOL_SIZE = (1 << 24) + 7


def random_groups(config, dtype: str, seed: int = 0):
    """(group name, parameter subtree) in the model's layout: LayerNorm scales 1, biases 0, weights N(0, 0.02),
    made on the host one group at a time (the bench process never starts the accelerator).

    The weights are windows at random offsets into one pool of `POOL_SIZE` normal values, so making a
    multi-billion-parameter model costs memory copies, not billions of random draws: this bench times the pipeline's
    speed and memory, for which repeated weight values are as good as fresh ones."""
    import jax

    from dejavu_jax.model import abstract_params

    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(POOL_SIZE, dtype=np.float32) * 0.02).astype(dtype)

    def leaf(path, spec):
        name = str(path[-1].key)
        if name == "scale":
            return np.ones(spec.shape, dtype)
        if name == "bias" or name.endswith("_b"):
            return np.zeros(spec.shape, dtype)
        size, offset = int(np.prod(spec.shape)), int(rng.integers(POOL_SIZE))
        copies = -(-(offset + size) // POOL_SIZE)
        return np.concatenate([pool] * copies)[offset : offset + size].reshape(spec.shape)

    for name, group in abstract_params(config).items():
        yield name, jax.tree_util.tree_map_with_path(leaf, group)


def random_model(shape: str, tokenizer_dir: Path, out: Path) -> tuple[Path, dict]:
    """A converted random fp16 model of `shape` at `out` (reused when present); (path, its config as HF dict)."""
    from dejavu_jax.checkpoint import is_converted_model, write_model_directory
    from dejavu_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    config = shape_config(shape)
    if config.vocab_size < len(tokenizer):  # the tiny smoke shape: room for every token id
        config = dataclasses.replace(config, vocab_size=len(tokenizer))
    if not is_converted_model(out):
        write_model_directory(out, config, random_groups(config, "float16"), "float16", tokenizer, f"random {shape}")
    return out, config.to_hf_dict()


def dir_bytes(path: Path) -> int:
    total = 0
    for p in Path(path).rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except FileNotFoundError:  # a temp file renamed or removed while we walk
            pass
    return total


class Stopped(Exception):
    """SIGTERM reached the bench while a child ran."""


def _raise_stopped(signum, frame):
    raise Stopped()


def run_watching_disk(cmd: list[str], work: Path, every_s: float = 0.5, log_tail_chars: int = 1500):
    """Run `cmd`, sampling the bytes under `work` every `every_s` seconds: (the finished child, the peak seen, the
    last `log_tail_chars` of its stderr, which is echoed as it comes). A sample can miss a peak shorter than the
    interval (e.g. a checkpoint's temp file and its predecessor). On `Stopped` the child is terminated and the
    exception carries (peak, tail) in its args."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, out, tail = 0, [], [""]

    def echo_stderr():
        for chunk in iter(lambda: child.stderr.read(256), ""):
            sys.stderr.write(chunk)
            tail[0] = (tail[0] + chunk)[-log_tail_chars:]

    readers = [
        threading.Thread(target=lambda: out.append(child.stdout.read()), daemon=True),
        threading.Thread(target=echo_stderr, daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        while child.poll() is None:
            peak = max(peak, dir_bytes(work) if work.exists() else 0)
            time.sleep(every_s)
    except Stopped:
        child.terminate()
        child.wait()
        for reader in readers:
            reader.join(timeout=5)
        raise Stopped(peak, tail[0])
    for reader in readers:
        reader.join()
    peak = max(peak, dir_bytes(work) if work.exists() else 0)
    return subprocess.CompletedProcess(cmd, child.returncode, "".join(out)), peak, tail[0]


def _last_lines(text: str, count: int = 3) -> list[str]:
    """The last `count` non-empty lines of a log (progress bars redraw with carriage returns: the last state)."""
    lines = [line.split("\r")[-1].strip() for line in text.splitlines()]
    return [line for line in lines if line][-count:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench train-stream", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="opt-6.7b", choices=sorted(OPT_SHAPES))
    p.add_argument("--data", required=True, help="corpus (.jsonl / .jsonl.xz / .txt)")
    p.add_argument("--tokenizer", required=True, type=Path, help="directory with OPT's tokenizer files")
    p.add_argument(
        "--ranks", default="256", help="comma-separated predictor ranks; 'default' = train's default (default 256)"
    )
    p.add_argument("--max-tokens", type=int, default=400_000, help="token budget (default 400000, train's default)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument(
        "--layer-groups", type=int, default=None, help="default: the fewest that fit --stream-disk-budget-gb"
    )
    p.add_argument(
        "--stream-disk-budget-gb",
        type=float,
        default=None,
        help="peak disk budget of each training run (default: train's, 2 GB)",
    )
    p.add_argument("--dtype", default="float16", help="compute dtype of the dense model (default float16)")
    p.add_argument("--workdir", default=None, help="where the random model and runs go (kept; default: a temp dir)")
    p.add_argument("--out", default=None, help="markdown path (default bench/results/train_stream_<card>_<shape>.md)")
    args = p.parse_args(argv)
    ranks = [r.strip() for r in args.ranks.split(",") if r.strip()]
    for r in ranks:
        if r != "default" and not (r.isdigit() and int(r) > 0):
            print(f"error: --ranks takes positive integers or 'default'. Got {r!r}", file=sys.stderr)
            return 2

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="train-stream-"))
    start = time.perf_counter()
    model_dir, config = random_model(args.shape, args.tokenizer, root / f"model-{args.shape}")
    model_s = time.perf_counter() - start
    print(f"random {args.shape} model: {model_dir} ({dir_bytes(model_dir) / 1e9:.2f} GB, {model_s:.0f} s)", flush=True)
    rows = []

    def write(rows):
        return _write_results(args, argv, model_s, config, rows)

    for rank in ranks:
        work = root / f"run-{args.shape}-rank-{rank}"
        if work.exists():
            shutil.rmtree(work)  # a fresh run each time: resuming would time nothing
        cmd = [sys.executable, "-m", "train", "all", "--model", str(model_dir), "--data", args.data]
        cmd += ["--work-dir", str(work), "--store", "stream", "--max-tokens", str(args.max_tokens)]
        cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
        # No --quiet: the child's progress and logs reach stderr, so a run cut off by a time limit shows how far it got.
        cmd += ["--dtype", args.dtype, "--json"]
        cmd += [] if args.layer_groups is None else ["--layer-groups", str(args.layer_groups)]
        cmd += (
            [] if args.stream_disk_budget_gb is None else ["--stream-disk-budget-gb", str(args.stream_disk_budget_gb)]
        )
        cmd += [] if rank == "default" else ["--rank", rank]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
        try:
            child, peak_disk, log_tail = run_watching_disk(cmd, work)
        except Stopped as stopped:
            peak_disk, log_tail = stopped.args
            rows.append(_unfinished_row(rank, "stopped (SIGTERM)", time.perf_counter() - t0, peak_disk, log_tail))
            write(rows)
            return 124
        finally:
            signal.signal(signal.SIGTERM, previous)
        wall = time.perf_counter() - t0
        if child.returncode != 0:
            print(f"error: the training run for rank {rank} failed (exit {child.returncode})", file=sys.stderr)
            rows.append(_unfinished_row(rank, f"failed (exit {child.returncode})", wall, peak_disk, log_tail))
            write(rows)
            return 1
        summary = json.loads(child.stdout)
        s = summary["stream"]
        rows.append(
            {
                "rank": s["rank"],
                "device": s["device"],
                "training_tokens": s["training_tokens"],
                "held_out_tokens": s["held_out_tokens"],
                "epochs": s["epochs"],
                "tokens_per_s": s["tokens_per_s"],
                "compile_s": s["compile_s"],
                "train_s_after_compile": s["train_s_after_compile"],
                "train_s": s["seconds"],
                "calibration_s": summary["calibrate"]["seconds"],
                "wall_s": wall,
                "peak_device_bytes": s["peak_device_bytes"],
                "peak_host_rss_bytes": s["peak_host_rss_bytes"],
                "work_dir_bytes": dir_bytes(work),
                "peak_work_dir_bytes": peak_disk,
                "layer_groups": s["layer_groups"],
                "estimated_peak_disk_bytes": s["disk_plan"]["estimated_peak_bytes"],
                "disk_budget_bytes": s["disk_plan"]["budget_bytes"],
                "disk_mode_activation_bytes": s["disk_mode_activation_bytes"],
                "mean_mlp_density_layers_1_plus": summary["calibrate"]["mean_mlp_density_layers_1_plus"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        write(rows)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _unfinished_row(rank: str, status: str, wall: float, peak_disk: int, log_tail: str) -> dict:
    return {
        "rank": rank,
        "status": status,
        "wall_s": wall,
        "peak_work_dir_bytes": peak_disk,
        "last_log": _last_lines(log_tail),
    }


def _write_results(args, argv, model_s: float, config, rows: list[dict]) -> Path:
    import jax  # the version only: the bench process never starts the accelerator (the children use it)

    finished = [r for r in rows if "status" not in r]
    card = finished[0]["device"] if finished else "unknown (no run finished)"
    info = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "jax": jax.__version__}
    info["command"] = "python -m bench train-stream " + " ".join(sys.argv[1:] if argv is None else argv)

    def gb(v):
        return "n/a" if v is None else f"{v / 1e9:.2f}"

    md = [
        f"# Streaming predictor training, random-weight {args.shape}",
        "",
        f"- card: {card}; date {info['date']}; commit `{info['commit']}`; jax {info['jax']}",
        f"- command: `{info['command']}`",
        f"- corpus `{args.data}`, {args.max_tokens:,} tokens ({args.seq_len}-token windows, {args.batch_size} a "
        f"batch), {args.epochs} epochs, dense model in {args.dtype}; writing the random model took {model_s:.0f} s "
        "(not counted below)",
        "- tokens/s: training tokens (every epoch) per second after the first batch, whose compilation is apart",
        "",
        "- peak disk: the child's estimate (`train/disk_budget.py`) beside the work dir's size sampled every "
        "0.5 s (a sample can miss a peak shorter than that)",
        "",
        "| rank | layer groups | tokens/s | compile + first batch s | training s | calibration s | child wall s "
        "| peak device GB | peak host RSS GB | work dir GB at the end | peak disk GB: estimated / sampled (budget) "
        "| disk mode would store GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in finished:
        md.append(
            f"| {r['rank']} | {r['layer_groups']} | {r['tokens_per_s']:,.0f} | {r['compile_s']:.1f} "
            f"| {r['train_s']:.0f} | {r['calibration_s']:.0f} | {r['wall_s']:.0f} | {gb(r['peak_device_bytes'])} "
            f"| {gb(r['peak_host_rss_bytes'])} | {gb(r['work_dir_bytes'])} "
            f"| {gb(r['estimated_peak_disk_bytes'])} / {gb(r['peak_work_dir_bytes'])} ({gb(r['disk_budget_bytes'])}) "
            f"| {gb(r['disk_mode_activation_bytes'])} |"
        )
    for r in rows:
        if "status" in r:
            md += [
                "",
                f"Rank {r['rank']}: **{r['status']}** after {r['wall_s']:.0f} s (peak disk sampled "
                f"{gb(r['peak_work_dir_bytes'])} GB); the child's last log lines:",
                "",
                "```",
            ]
            md += r["last_log"] + ["```"]
    text = "\n".join(md) + "\n"
    data = {**info, "card": card, "shape": args.shape, "config": config, "model_write_s": model_s, "runs": rows}
    path = write_results(f"train_stream_{card_slug(card)}_{args.shape}", text, data, args.out)
    print(text)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    sys.exit(main())
