"""`python -m eval tasks`: zero-shot downstream accuracy with lm-eval, dense and with the MLP predictors.

Each task runs through lm-eval's evaluator (its prompts and metrics) on the JAX model (`eval.harness.JaxOPT`),
once dense and, with predictors, once more with each token's MLP computed over the neurons its predictor
picks, on the same documents. With `--out`, the results file is rewritten after every finished task and a
rerun with the same settings skips the tasks already in it, so an interrupted run loses at most one task.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

# Metrics reported per task, in this order, where the task has them.
METRICS = ("acc", "acc_norm", "perplexity")


def _metrics(result: dict) -> dict:
    return {m: float(result[f"{m},none"]) for m in METRICS if f"{m},none" in result}


@contextlib.contextmanager
def _named_request_bar(name: str, progress: bool):
    """lm-eval's progress bar over the documents while it builds their requests has no description: name it
    after the task (and hide it without progress) for the duration of one evaluation."""
    import lm_eval.api.task as task_module

    original = getattr(task_module, "tqdm", None)
    if original is None:  # another lm-eval layout: leave its bar as it is
        yield
        return
    task_module.tqdm = functools.partial(original, desc=f"{name} requests", unit="doc", disable=not progress)
    try:
        yield
    finally:
        task_module.tqdm = original


def evaluate_task(lm, task, limit: int | None) -> dict:
    from lm_eval import evaluator
    from lm_eval.tasks import get_task_dict

    from eval.local_tasks import lm_eval_task_manager

    with _named_request_bar(task.config.task, getattr(lm, "progress", True)):
        out = evaluator.evaluate(
            lm,
            get_task_dict([task], lm_eval_task_manager()),
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            verbosity="ERROR",
        )
    result = out["results"][task.config.task]
    return {"documents": int(result["sample_len"]), **_metrics(result)}


def _load_previous(path: Path | None, settings: dict) -> dict:
    """The finished tasks of an earlier run with the same settings; refuses a file it would overwrite."""
    if path is None:
        return {}
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"--out {path}: not a file in an existing directory")
    if not path.exists():
        return {}
    try:
        previous = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"--out {path} exists and is not an `eval tasks` results file; choose another path") from None
    held = previous.get("settings") if isinstance(previous, dict) else None
    if held != settings:
        raise ValueError(f"--out {path} holds results of other settings ({held}); choose another path or delete it")
    return previous.get("tasks", {})


def run_tasks(args) -> dict:
    import logging

    from dejavu_jax.atomic import write_json_atomic
    from dejavu_jax.checkpoint import load_model
    from eval.harness import JaxOPT
    from eval.local_tasks import TaskDataError, build_task, parse_task_list

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on custom datasets are not for our users
    names = parse_task_list(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1. Got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1. Got {args.batch_size}")
    if not Path(args.tasks_dir).is_dir():
        raise TaskDataError(
            f"--tasks-dir {args.tasks_dir} is not a directory; point it at the local splits (../shared/data/tasks)"
        )
    from dejavu_jax.sparsity import DENSE, HeadSparsity, MLPSparsity
    from dejavu_jax.sparsity_args import check_sparsity_args, load_sparsity

    from dejavu_jax.parallel_args import check_parallel_args, placement_report

    policy = check_sparsity_args(args)
    tp = check_parallel_args(args)
    heads_predicted = policy.heads == HeadSparsity.PREDICTED
    settings = {
        "model": str(args.model),
        "predictors": args.predictors,
        "mlp_sparsity": policy.mlp.value,
        # the MLP's and the predicted heads' selection (one flag): results of another one are not resumed
        "selection": policy.selection.value if policy.mlp == MLPSparsity.PREDICTED or heads_predicted else None,
        "head_sparsity": policy.heads.value,
        "head_k": policy.head_k or None,
        "dtype": args.dtype,
        "limit": args.limit,
        "tasks_dir": str(args.tasks_dir),
        **({"int8_scores": True} if args.int8_scores else {}),  # absent when off: earlier results files still match
    }
    out = Path(args.out) if args.out else None
    results = _load_previous(out, settings)  # checked before the model loads, so a bad --out costs no wait
    model = load_model(args.model, args.dtype, tp)
    sparse_weights = load_sparsity(policy, args, model)
    progress = not args.json
    dense_lm = JaxOPT(model, batch_size=args.batch_size, progress=progress, desc="dense")
    sparse_lm = (
        None if policy == DENSE else JaxOPT(model, policy, sparse_weights, args.batch_size, progress, desc="sparse")
    )
    for name in names:
        if name in results:
            continue
        task = build_task(name, args.tasks_dir)  # lm-eval's task index: lm_eval_task_manager()
        dense_lm.desc = f"{name} dense"  # the progress bar names the task it scores
        entry = {"dense": evaluate_task(dense_lm, task, args.limit)}
        if sparse_lm is not None:
            sparse_lm.desc = f"{name} sparse"
            entry["sparse"] = evaluate_task(sparse_lm, task, args.limit)
        results[name] = entry
        if out is not None:
            write_json_atomic(out, {"settings": settings, "tasks": results})
    report = {"settings": settings, "tasks": {n: results[n] for n in names}, **placement_report(model.params)}
    if sparse_weights is not None and sparse_weights.mlp is not None:
        report["mlp_k"] = [p.k for p in sparse_weights.mlp]
    return report


def format_table(report: dict) -> str:
    sparse = any("sparse" in r for r in report["tasks"].values())
    header = "| task | documents | metric | dense |" + (" sparse MLP | change |" if sparse else "")
    lines = [header, "|---|---|---|---|" + ("---|---|" if sparse else "")]
    for name, r in report["tasks"].items():
        for metric, value in r["dense"].items():
            if metric == "documents":
                continue
            row = f"| {name} | {r['dense']['documents']} | {metric} | {value:.4f} |"
            if sparse:
                s = r["sparse"][metric]
                row += f" {s:.4f} | {s - value:+.4f} |"
            lines.append(row)
    return "\n".join(lines)
