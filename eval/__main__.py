"""python -m eval SUBCOMMAND ...  (see --help)"""

from __future__ import annotations

import argparse
import json
import sys

from dejavu_jax.hf_convert import DTYPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description="Evaluate an OPT model.")
    sub = parser.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser(
        "ppl",
        help="perplexity over non-overlapping windows",
        description="Perplexity over non-overlapping windows of --seq-len tokens. A .txt file is tokenized once "
        '(with BOS); a .jsonl/.jsonl.xz file has each line\'s "text" tokenized with BOS and '
        "concatenated in file order. Each window scores its tokens 2..L; a short final window is "
        "dropped.",
    )
    ppl.add_argument("--model", required=True, help="converted model dir, HF OPT checkpoint dir, or hub id")
    ppl.add_argument("--data", required=True, help=".txt, .jsonl or .jsonl.xz file")
    ppl.add_argument("--seq-len", type=int, default=1024, help="window length in tokens (default 1024)")
    ppl.add_argument("--max-windows", type=int, default=None, help="score at most this many windows")
    ppl.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    ppl.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (default float32)")
    from dejavu_jax.sparsity_args import add_sparsity_args

    add_sparsity_args(ppl)
    from dejavu_jax.parallel_args import add_parallel_args

    add_parallel_args(ppl)
    ppl.add_argument(
        "--json",
        action="store_true",
        help='print {"ppl": ..., "tokens": ..., "tp": ..., "param_bytes_per_device": [...]}; with a sparse MLP also "sparse_ppl", "ppl_change", '
        '"mlp_sparsity", "selection" and "mlp_density" (per layer, the measured mean fraction of '
        "MLP rows computed per token on these windows; lossless: of fc2 rows read); with sparse heads "
        '"head_sparsity", "head_selection" (predicted: threshold or topk, as applied) and "head_density" (per '
        "layer, the measured mean fraction of heads kept)",
    )
    from eval.local_tasks import LOCAL_TASKS

    tasks = sub.add_parser(
        "tasks",
        help="zero-shot downstream tasks (lm-eval) over local splits",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Zero-shot accuracy on lm-eval's downstream tasks (lm-eval's prompts and metrics), with the "
        "datasets read from a local directory laid out as ../shared/data/tasks. With a sparse MLP "
        "(--predictors, --mlp-sparsity) each task runs again with it, side by side.\n\ntasks:\n"
        + "\n".join(f"  {name:15s} {t.source} ({t.documents} documents)" for name, t in LOCAL_TASKS.items()),
    )
    tasks.add_argument("--model", required=True, help="converted model dir, HF OPT checkpoint dir, or hub id")
    tasks.add_argument(
        "--tasks",
        default="piqa,arc_easy,winogrande,copa,lambada_openai",
        help="comma list of tasks (default piqa,arc_easy,winogrande,copa,lambada_openai)",
    )
    tasks.add_argument("--tasks-dir", required=True, help="directory of the local splits (../shared/data/tasks)")
    tasks.add_argument("--limit", type=int, default=None, help="score at most this many documents per task")
    tasks.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    tasks.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype (default float32)")
    add_sparsity_args(tasks)
    add_parallel_args(tasks)
    tasks.add_argument(
        "--out",
        default=None,
        help="JSON results file, rewritten after each task; a rerun with the same settings skips the tasks it holds",
    )
    tasks.add_argument(
        "--json",
        action="store_true",
        help='print the results as one JSON object (with "tp" and "param_bytes_per_device")',
    )
    return parser


def run_ppl(args) -> dict:
    from dejavu_jax.checkpoint import load_model
    from dejavu_jax.corpus import corpus_kind, token_stream
    from dejavu_jax.perplexity import make_windows, perplexity

    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2. Got {args.seq_len}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError(f"--max-windows must be >= 1. Got {args.max_windows}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1. Got {args.batch_size}")
    corpus_kind(args.data)  # a missing, unknown or non-xz corpus fails before the model loads
    from dejavu_jax.sparsity import DENSE, HeadSparsity, MLPSparsity, head_selection_used
    from dejavu_jax.sparsity_args import check_sparsity_args, load_sparsity

    from dejavu_jax.parallel_args import check_parallel_args, placement_report

    policy = check_sparsity_args(args)
    tp = check_parallel_args(args)
    model = load_model(args.model, args.dtype, tp)
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer files")
    sparse_weights = load_sparsity(policy, args, model)
    max_tokens = None if args.max_windows is None else args.max_windows * args.seq_len
    windows = make_windows(token_stream(model.tokenizer, args.data, max_tokens), args.seq_len, args.max_windows)
    result = perplexity(model.params, model.config, windows, args.batch_size, progress=not args.json)
    result.update(placement_report(model.params))
    if policy != DENSE:
        sparse = perplexity(
            model.params,
            model.config,
            windows,
            args.batch_size,
            progress=not args.json,
            policy=policy,
            sparse_weights=sparse_weights,
            desc="sparse perplexity",
        )
        result.update(
            sparse_ppl=sparse["ppl"],
            ppl_change=sparse["ppl"] / result["ppl"] - 1,
            mlp_sparsity=policy.mlp.value,
        )
        if "mlp_density" in sparse:
            result.update(mlp_density=sparse["mlp_density"])
        if policy.mlp == MLPSparsity.PREDICTED:
            result.update(selection=policy.selection.value, mlp_k=[p.k for p in sparse_weights.mlp])
            if args.int8_scores:
                result.update(int8_scores=True)
        if "head_density" in sparse:
            result.update(head_sparsity=policy.heads.value, head_density=sparse["head_density"])
            if policy.heads == HeadSparsity.PREDICTED:
                result.update(head_selection=head_selection_used(policy, sparse_weights))
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from dejavu_jax.corpus import CorpusError
    from dejavu_jax.hf_checkpoint import CheckpointError
    from dejavu_jax.predictor_store import PredictorError

    if args.command == "tasks":
        from eval.tasks import format_table, run_tasks

        try:
            report = run_tasks(args)
        except ImportError as e:
            print(f"error: `eval tasks` needs lm-eval (pip install -e .): {e}", file=sys.stderr)
            return 2
        except (CheckpointError, PredictorError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(report) if args.json else format_table(report))
        return 0
    try:
        result = run_ppl(args)
    except (CheckpointError, CorpusError, PredictorError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        keys = ("ppl", "tokens", "sparse_ppl", "ppl_change", "mlp_sparsity", "selection", "mlp_density", "mlp_k")
        keys += ("head_sparsity", "head_selection", "head_density", "tp", "param_bytes_per_device")
        print(json.dumps({k: result[k] for k in keys if k in result}))
    else:
        print(f"perplexity {result['ppl']:.3f} over {result['tokens']:,} tokens ({result['windows']} windows)")
        if "sparse_ppl" in result:
            parts = []
            if "mlp_density" in result:
                how = result["mlp_sparsity"] + (f", {result['selection']}" if "selection" in result else "")
                density = ", ".join(f"{v:.1%}" for v in result["mlp_density"])
                parts.append(f"MLP {how}, measured density per layer {density}")
            if "head_density" in result:
                heads = ", ".join(f"{v:.1%}" for v in result["head_density"])
                how = result["head_sparsity"] + (f", {result['head_selection']}" if "head_selection" in result else "")
                parts.append(f"heads {how}, kept per layer {heads}")
            print(
                f"sparse ({'; '.join(parts)}): perplexity {result['sparse_ppl']:.3f} "
                f"({result['ppl_change']:+.2%} vs dense)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
