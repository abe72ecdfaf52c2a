"""The command-line face of `dejavu_jax.sparsity`: the flags every command that runs the model shares, and their
one translation into (policy, sparse weights)."""

from __future__ import annotations

import argparse

from dejavu_jax.sparsity import HeadSparsity, MLPSparsity, Selection, SparsityPolicy, sparse_weights_from_predictors


# The head choices a user can ask for; "fixed" (a random schedule) is a benchmark's stand-in for predictors.
CLI_HEAD_SPARSITY = tuple(h.value for h in HeadSparsity if h != HeadSparsity.FIXED)


def add_sparsity_args(p: argparse.ArgumentParser, decoding: bool = False) -> None:
    """The shared flags; `decoding` (a command that generates) adds those that only decode steps use."""
    p.add_argument(
        "--predictors",
        default=None,
        help="trained, calibrated predictors (from python -m train: a predictors dir, or a model dir "
        "holding predictors/); alone it implies --mlp-sparsity predicted (with --head-sparsity predicted: "
        "heads only, unless --mlp-sparsity predicted is also given)",
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
        help="with predicted neurons or heads: threshold (default) keeps the neurons (heads) whose score reaches "
        "the layer's calibrated threshold (no sort, the count varies per token; heads at most the layer's K, or "
        "--head-k); topk keeps the layer's calibrated K best (heads: K, or --head-k)",
    )
    p.add_argument(
        "--int8-scores",
        action="store_true",
        help="with --mlp-sparsity predicted: keep each MLP predictor's second matrix (the scoring rows a decode "
        "step reads for every neuron, most of the predictor's bytes) as int8 with one fp32 scale per neuron: "
        "about half those bytes (r + 4 a neuron against 2r); the scores move by the weights' rounding and the "
        "calibrated thresholds are used as they are. Head predictors stay in the model's dtype",
    )
    p.add_argument(
        "--head-sparsity",
        default=None,
        choices=CLI_HEAD_SPARSITY,
        help="attention heads whose outputs reach out_proj, per token: none (every head; the default, except with "
        "--predictors whose calibrated head K is below every head in some layer, or with --predictors and "
        "--head-k, where predicted is); predicted: "
        "those the layer's head predictor chooses by --selection (needs --predictors; reads layer l-1's input; "
        "predictors calibrated without head thresholds choose the K best either way); oracle: the K heads "
        "of largest output norm (a study's bound, needs --head-k; every head is still computed). Every head's K/V "
        "stays exact; with predicted, batch-1 decode steps compute only the chosen heads (larger batches compute "
        "every head and zero the unchosen ones' outputs: measured faster)",
    )
    p.add_argument(
        "--head-k",
        type=int,
        default=0,
        help="with --head-sparsity: heads kept per token in every layer (default: each layer's calibrated K); "
        "under threshold selection the most a token keeps",
    )
    if decoding:
        p.add_argument(
            "--head-union",
            action="store_true",
            help="with --head-sparsity predicted and several prompts: every sequence's decode step keeps the union "
            "of the batch's chosen heads (more heads each, no more weight bytes where the step computes the union) "
            "instead of its own K; the prompts' prefill still chooses per token",
        )


def default_head_sparsity(predictors) -> HeadSparsity:
    """--head-sparsity when not given: predicted where the predictors' calibrated head K (their metadata, read
    before the model loads) is below every head in some layer, else none. Unreadable predictors give none here;
    loading them reports why."""
    if not predictors:
        return HeadSparsity.NONE
    from dejavu_jax.predictor_store import PredictorError, predictor_metadata

    try:
        meta = predictor_metadata(predictors)
    except (OSError, PredictorError):
        return HeadSparsity.NONE
    heads, head_k = meta.get("num_heads"), meta.get("head_k") or []
    calibrated = meta.get("heads_calibrated", False)
    below = calibrated and heads is not None and any(0 < int(k) < int(heads) for k in head_k)
    return HeadSparsity.PREDICTED if below else HeadSparsity.NONE


def check_sparsity_args(args) -> SparsityPolicy:
    """The policy the flags ask for; a ValueError (before anything loads) for contradicting flags."""
    head_k = args.head_k
    if args.head_sparsity is not None:
        heads = HeadSparsity(args.head_sparsity)
        default_mlp = "predicted" if args.predictors and heads != HeadSparsity.PREDICTED else "none"
    else:  # heads by the predictors' calibration (or --head-k), beside their MLP choice
        given_k = args.predictors and head_k > 0
        heads = HeadSparsity.PREDICTED if given_k else default_head_sparsity(args.predictors)
        default_mlp = "predicted" if args.predictors else "none"
    mode = MLPSparsity(args.mlp_sparsity or default_mlp)
    needs = mode == MLPSparsity.PREDICTED or heads == HeadSparsity.PREDICTED
    if needs and not args.predictors:
        raise ValueError("predicted sparsity needs --predictors DIR (train them with python -m train)")
    if not needs and args.predictors:
        raise ValueError(
            f"--predictors goes with --mlp-sparsity predicted or --head-sparsity predicted. Got --mlp-sparsity "
            f"{mode.value} and --head-sparsity {heads.value}"
        )
    if mode != MLPSparsity.PREDICTED and heads != HeadSparsity.PREDICTED and args.selection:
        raise ValueError(
            f"--selection applies to --mlp-sparsity predicted or --head-sparsity predicted. Got --mlp-sparsity "
            f"{mode.value} and --head-sparsity {heads.value}"
        )
    if mode != MLPSparsity.PREDICTED and args.int8_scores:
        raise ValueError(f"--int8-scores applies to --mlp-sparsity predicted. Got --mlp-sparsity {mode.value}")
    if head_k < 0 or (head_k and heads == HeadSparsity.NONE):
        raise ValueError(f"--head-k takes a positive count with --head-sparsity predicted|oracle. Got {head_k}")
    if heads == HeadSparsity.ORACLE and not head_k:
        raise ValueError("--head-sparsity oracle needs --head-k N (how many heads each token keeps)")
    union = getattr(args, "head_union", False)
    if union and heads != HeadSparsity.PREDICTED:
        raise ValueError(f"--head-union applies to --head-sparsity predicted. Got --head-sparsity {heads.value}")
    selection = Selection(args.selection or "threshold")
    return SparsityPolicy(mode, selection, heads=heads, head_k=head_k, head_union=union)


def load_sparsity(policy: SparsityPolicy, args, model):
    """The sparse weights `policy` (from `check_sparsity_args`) needs, or None, for a loaded model
    (`checkpoint.LoadedModel`): predictors checked against its config, in its compute dtype."""
    if not policy.needs_weights:
        return None
    from dejavu_jax.predictor_store import load_predictors

    predictors = load_predictors(args.predictors, model.config)
    dtype = model.params["embed_tokens"]["embedding"].dtype
    weights = sparse_weights_from_predictors(
        predictors,
        dtype,
        selection=policy.selection,
        mlp=policy.mlp == MLPSparsity.PREDICTED,
        int8_scores=args.int8_scores,
    )
    for layer, p in enumerate(predictors.heads):
        if policy.head_k > p.num_outputs:
            raise ValueError(f"--head-k {policy.head_k} exceeds layer {layer}'s {p.num_outputs} heads")
    from dejavu_jax.parallel import mesh_of, shard_sparse_weights

    return shard_sparse_weights(weights, mesh_of(model.params))  # split like the neurons they choose
