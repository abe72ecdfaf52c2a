"""The command-line face of `dejavu_jax.sparsity`: the flags every command that runs the model shares, and their
one translation into (policy, sparse weights)."""

from __future__ import annotations

import argparse

from dejavu_jax.sparsity import MLPSparsity, Selection, SparsityPolicy, sparse_weights_from_predictors


def add_sparsity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--predictors",
        default=None,
        help="trained, calibrated predictors (from python -m train: a predictors dir, or a model dir "
        "holding predictors/); alone it implies --mlp-sparsity predicted",
    )
    p.add_argument(
        "--mlp-sparsity",
        default=None,
        choices=[m.value for m in MLPSparsity],
        help="none: the dense MLP (default without --predictors); lossless: dense fc1, then fc2 over the "
        "neurons whose ReLU output is nonzero (exact, no predictor); predicted: the neurons the "
        "predictors choose (default with --predictors)",
    )
    p.add_argument(
        "--selection",
        default=None,
        choices=[s.value for s in Selection],
        help="with predicted: threshold (default) keeps the neurons whose score reaches the layer's "
        "calibrated threshold (no sort, the count varies per token); topk keeps the layer's "
        "calibrated K best",
    )


def check_sparsity_args(args) -> SparsityPolicy:
    """The policy the flags ask for; a ValueError (before anything loads) for contradicting flags."""
    mode = MLPSparsity(args.mlp_sparsity or ("predicted" if args.predictors else "none"))
    if mode == MLPSparsity.PREDICTED and not args.predictors:
        raise ValueError("--mlp-sparsity predicted needs --predictors DIR (train them with python -m train)")
    if mode != MLPSparsity.PREDICTED and args.predictors:
        raise ValueError(f"--predictors goes with --mlp-sparsity predicted. Got --mlp-sparsity {mode.value}")
    if mode != MLPSparsity.PREDICTED and args.selection:
        raise ValueError(f"--selection applies to --mlp-sparsity predicted. Got --mlp-sparsity {mode.value}")
    return SparsityPolicy(mode, Selection(args.selection or "threshold"))


def load_sparsity(policy: SparsityPolicy, args, model):
    """The sparse weights `policy` (from `check_sparsity_args`) needs, or None, for a loaded model
    (`checkpoint.LoadedModel`): predictors checked against its config, in its compute dtype."""
    if not policy.needs_weights:
        return None
    from dejavu_jax.predictor_store import load_predictors

    predictors = load_predictors(args.predictors, model.config)
    dtype = model.params["embed_tokens"]["embedding"].dtype
    return sparse_weights_from_predictors(predictors, dtype, selection=policy.selection)
