"""Peak host memory of `python -m dejavu_jax.convert` on a random-weight OPT checkpoint of a real shape.

    python -m bench convert-memory --shape opt-1.3b [--dtype float16] [--workdir DIR]

Writes a random fp16 HF checkpoint (sharded safetensors, as the hub ships them), converts it in a child process
and reports the child's peak resident memory (ru_maxrss) next to the checkpoint's size.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import provenance, write_results
from dejavu_jax.config import OPT_SHAPES, shape_config


def write_random_checkpoint(name: str, directory: Path) -> int:
    import torch
    from transformers import OPTConfig as HFConfig, OPTForCausalLM

    config = shape_config(name)
    hf_config = HFConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("model_type", "architectures")})
    torch.set_default_dtype(torch.float16)
    with torch.device("meta"):
        model = OPTForCausalLM(hf_config)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the tied head its own storage
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(directory, max_shard_size="1GB")
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench convert-memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="opt-1.3b", choices=sorted(OPT_SHAPES))
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: system temp)")
    p.add_argument("--out", default=None, help="markdown path (default bench/results/convert_memory_<shape>.md)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        hf_dir, out_dir = Path(tmp) / "hf", Path(tmp) / "converted"
        checkpoint_bytes = write_random_checkpoint(args.shape, hf_dir)
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dejavu_jax.convert",
                "--hf",
                str(hf_dir),
                "--out",
                str(out_dir),
                "--dtype",
                args.dtype,
            ],
            check=True,
            env={"JAX_PLATFORMS": "cpu", **__import__("os").environ},
        )
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    info = provenance()
    info["card"] = "host CPU"
    row = {
        "shape": args.shape,
        "dtype": args.dtype,
        "checkpoint_bytes": checkpoint_bytes,
        "peak_rss_bytes": peak,
        "seconds": seconds,
    }
    md = (
        f"# Conversion peak memory, {args.shape}\n\n- date {info['date']}, commit `{info['commit']}`\n"
        f"- command: `{info['command']}`\n\n| shape | dtype | checkpoint GB | peak RSS GB | peak / checkpoint | "
        f"seconds |\n|---|---|---|---|---|---|\n| {args.shape} | {args.dtype} | {checkpoint_bytes / 1e9:.2f} | "
        f"{peak / 1e9:.2f} | {peak / checkpoint_bytes:.2f} | {seconds:.0f} |\n"
    )
    path = write_results(f"convert_memory_{args.shape}", md, {**info, **row}, args.out)
    print(md)
    print(f"wrote {path}")
    return 0
