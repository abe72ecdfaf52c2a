"""CLI: convert a Hugging Face OPT checkpoint into a dejavu-jax model directory (orbax parameters, config.json,
tokenizer files).

    python -m dejavu_jax.convert --hf DIR --out DIR [--dtype float16|bfloat16|float32] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys

from dejavu_jax.checkpoint import convert_to_directory
from dejavu_jax.hf_checkpoint import CheckpointError
from dejavu_jax.hf_convert import DTYPES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dejavu_jax.convert",
        description="Convert a Hugging Face OPT checkpoint directory (safetensors or pytorch_model.bin, sharded "
        "or not) into a dejavu-jax model directory: an orbax checkpoint of the parameters, config.json "
        "and the tokenizer files. Streams tensor by tensor.",
    )
    parser.add_argument("--hf", required=True, help="HF checkpoint directory (config.json + weights)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="parameter dtype (default float16)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    args = parser.parse_args(argv)

    try:
        summary = convert_to_directory(args.hf, args.out, dtype=args.dtype, force=args.force)
    except (CheckpointError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"converted {summary['source']} -> {summary['out']}: {summary['num_params']:,} parameters "
            f"({summary['dtype']}), {summary['seconds']:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
