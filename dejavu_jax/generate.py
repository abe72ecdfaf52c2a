"""CLI: generate continuations for one or more prompts.

python -m dejavu_jax.generate --model DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N]
    [--greedy | --temperature T --top-k K --top-p P --seed S] [--dtype ...] [--json]
    [--predictors DIR] [--mlp-sparsity none|lossless|predicted] [--selection threshold|topk]
    [--tp N|auto] [--coordinator HOST:PORT --num-processes N --process-id I]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from dejavu_jax.hf_convert import DTYPES
from dejavu_jax.hf_checkpoint import CheckpointError
from dejavu_jax.sampling import SamplingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dejavu_jax.generate",
        description="Generate text with an OPT model. Prefill and decoding run as one compiled XLA program; "
        "prompts of different lengths are left-padded into one batch.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="a converted model directory, an HF OPT checkpoint directory, or a hub id (facebook/opt-1.3b)",
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument(
        "--greedy", action="store_true", help="greedy decoding (the default); an error together with --temperature > 0"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature, finite and >= 0; 0 = greedy (default). --top-k, --top-p and --seed "
        "only apply when sampling: without --temperature > 0 they are an error",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="sampling: keep the k most likely tokens, at most the vocabulary size (default: off)",
    )
    p.add_argument("--top-p", type=float, default=None, help="sampling: nucleus mass in (0, 1] (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling: PRNG seed (default 0)")
    from dejavu_jax.sparsity_args import add_sparsity_args

    add_sparsity_args(p, decoding=True)  # decode steps at batch 1 compute the sparse MLP with the row-masked kernels
    from dejavu_jax.model import ATTENTION_IMPLS

    p.add_argument(
        "--attention",
        default="xla",
        choices=ATTENTION_IMPLS,
        help="decode-step attention: XLA ops (default) or one Pallas kernel per layer that also writes "
        "the KV cache (see bench/results/NOTES.md for the measured difference)",
    )
    from dejavu_jax.generation import AUTOTUNE_MODES

    p.add_argument(
        "--autotune",
        default="default",
        choices=AUTOTUNE_MODES,
        help="XLA GEMM autotuning for the generation program: 'exhaustive' searches every tiling (a "
        "one-time compile of minutes for a multi-billion-parameter model, ~2%% faster decoding on an "
        "H100), cached in $DEJAVU_XLA_AUTOTUNE_CACHE or ~/.cache/dejavu_jax/xla-autotune",
    )
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="compute dtype (default float16)")
    from dejavu_jax.parallel_args import add_parallel_args

    add_parallel_args(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per prompt per line: {"prompt", "text" (continuation), "token_ids", "tp", '
        '"param_bytes_per_device"}',
    )
    return p


def sampling_from_args(args) -> SamplingConfig:
    """The sampling flags, checked before any model loads: the sampling-only flags need --temperature > 0."""
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 and finite (0 = greedy). Got {args.temperature}")
    if args.greedy and args.temperature > 0:
        raise ValueError(
            f"--greedy contradicts --temperature {args.temperature}: drop --greedy to sample, or "
            f"--temperature to decode greedily"
        )
    sampling_only = [
        flag
        for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
        if value is not None
    ]
    if sampling_only and args.temperature == 0:
        raise ValueError(
            f"{', '.join(sampling_only)} only appl{'ies' if len(sampling_only) == 1 else 'y'} when "
            f"sampling; add --temperature T (T > 0, e.g. 1.0)"
        )
    return SamplingConfig(
        greedy=args.temperature == 0,
        temperature=args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dejavu_jax.checkpoint import load_model
    from dejavu_jax.generation import generate_text

    try:
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens: max_new_tokens must be a positive int. Got {args.max_new_tokens}")
        sampling = sampling_from_args(args)
        from dejavu_jax.parallel_args import check_parallel_args, placement_report
        from dejavu_jax.sparsity_args import check_sparsity_args, load_sparsity

        policy = check_sparsity_args(args)
        tp = check_parallel_args(args)
        model = load_model(args.model, args.dtype, tp)
        sampling.check_vocab(model.config.vocab_size)
        sparse_weights = load_sparsity(policy, args, model)
        results = generate_text(
            model,
            args.prompt,
            args.max_new_tokens,
            sampling,
            args.seed or 0,
            policy,
            sparse_weights,
            args.attention,
            args.autotune,
        )
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    placement = placement_report(model.params) if args.json else {}
    for r in results:
        if args.json:
            print(json.dumps({**r, **placement}))
        else:
            print(f"{r['prompt']}\033[1m{r['text']}\033[0m" if sys.stdout.isatty() else r["prompt"] + r["text"])
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
