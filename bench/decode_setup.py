"""The decode program `bench profile` and `bench compile-kernels` look at: their shared flags, and the weights and
sparsity they set up (random fp16 weights, planted as `bench generate` plants them)."""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from bench.generate import (
    parse_tuning,
    plant_firing,
    planted_predictors,
    planted_rows,
    random_head_predictors,
    random_params,
)
from dejavu_jax.config import OPT_SHAPES, OPTConfig, shape_config
from dejavu_jax.model import ATTENTION_IMPLS, abstract_params
from dejavu_jax.parallel import TP_AXIS, shard_params, shard_sparse_weights
from dejavu_jax.sparse_attention import HEAD_KV_MODES
from dejavu_jax.sparsity import (
    DENSE,
    HeadSparsity,
    MLPSparsity,
    Selection,
    SparseWeights,
    SparsityPolicy,
    head_schedule,
)


def add_decode_args(p: argparse.ArgumentParser, tp: bool = True) -> None:
    """The shape, attention, sparse-MLP, head and tuning flags (`--tp` too where `tp`)."""
    p.add_argument("--shape", default="opt-6.7b", choices=sorted(OPT_SHAPES))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--attention", default="xla", choices=ATTENTION_IMPLS, help="decode-step attention (default xla)")
    p.add_argument(
        "--mlp-density",
        type=float,
        default=None,
        help="sparse-MLP decoding (as `bench generate` plants it; --mlp-variant says which): this fraction of the "
        "neurons chosen per token",
    )
    p.add_argument(
        "--mlp-variant",
        default="predicted",
        choices=["predicted", "fixed", "lossless"],
        help="with --mlp-density: the planted predictors (default), the fixed row masks they choose (the ceiling), "
        "or the lossless mode (dense fc1, fc2 over the firing neurons; no predictor)",
    )
    p.add_argument(
        "--int8-scores",
        action="store_true",
        help="with --mlp-density (predicted): the predictors' scoring rows in int8 (dejavu_jax.generate --int8-scores)",
    )
    p.add_argument(
        "--tuning",
        default="",
        metavar="NAME=VALUE,...",
        help="decode-kernel overrides (dejavu_jax.sparsity.DecodeTuning, as bench generate --tuning)",
    )
    p.add_argument("--fire-rate", type=float, default=0.05, help="with --mlp-density: the firing fraction")
    p.add_argument("--predictor-rank", type=int, default=256, help="with --mlp-density (default 256)")
    p.add_argument(
        "--selection",
        default="threshold",
        choices=[s.value for s in Selection],
        help="with --mlp-density (predicted): how the predictors choose (default threshold)",
    )
    p.add_argument(
        "--head-density",
        type=float,
        default=None,
        help="head-sparse decoding (as `bench generate` sets it up): this fraction of each layer's heads computed "
        "per token",
    )
    p.add_argument(
        "--heads",
        default="fixed",
        choices=["fixed", "predicted"],
        help="with --head-density: a seeded random schedule (fixed) or random head predictors of --predictor-rank",
    )
    p.add_argument(
        "--head-kv", default="repair", choices=HEAD_KV_MODES, help="with --head-density (default repair, as decoding)"
    )
    if tp:
        p.add_argument(
            "--tp", type=int, default=1, help="tensor parallelism over this many devices (default 1; see above)"
        )


def check_decode_args(p: argparse.ArgumentParser, args) -> tuple:
    """Exits with a usage error on inconsistent flags; returns the parsed `--tuning`."""
    if args.mlp_density is not None and not 0 < args.mlp_density <= 1:
        p.error(f"--mlp-density must be in (0, 1]. Got {args.mlp_density}")
    if args.head_density is not None and not 0 < args.head_density <= 1:
        p.error(f"--head-density must be in (0, 1]. Got {args.head_density}")
    if args.int8_scores and (args.mlp_density is None or args.mlp_variant != "predicted"):
        p.error("--int8-scores needs --mlp-density with the predicted variant")
    if args.mlp_variant != "predicted" and args.mlp_density is None:
        p.error("--mlp-variant needs --mlp-density")
    if args.prompt_len < 1 or args.predictor_rank < 1:
        p.error("--prompt-len and --predictor-rank must be >= 1")
    try:
        return parse_tuning(args.tuning) if args.tuning else ()
    except ValueError as e:
        p.error(str(e))


@dataclasses.dataclass
class DecodeSetup:
    config: OPTConfig  # EOS disabled: a fixed token count
    params: dict
    policy: SparsityPolicy
    sparsity: SparseWeights | None


def decode_setup(args, tuning: tuple, mesh=None, abstract: bool = False) -> DecodeSetup:
    """The weights, policy and sparse weights the flags ask for, on the tp `mesh` (`parallel.tp_mesh`; None: one
    device). `abstract`: every array a ShapeDtypeStruct (nothing allocated; for lowering only), on one device."""
    if abstract and mesh is not None:
        raise ValueError("abstract weights are made for one device (mesh=None)")
    config = dataclasses.replace(shape_config(args.shape), eos_token_id=-1)
    tp = 1 if mesh is None else mesh.shape[TP_AXIS]

    def make(fn):
        return jax.eval_shape(fn) if abstract else fn()

    params = abstract_params(config, jnp.float16) if abstract else random_params(config, jnp.float16, mesh)
    policy, sparsity = DENSE, None
    if args.mlp_density is not None:
        planted = planted_rows(config, args.mlp_density, args.fire_rate)
        if not abstract:  # the planted biases change values only
            params = shard_params(plant_firing(params, planted), mesh)
        if args.mlp_variant == "lossless":
            policy = SparsityPolicy(MLPSparsity.LOSSLESS)
        elif args.mlp_variant == "fixed":
            fixed_rows = tuple(jnp.asarray(c, jnp.int32) for _, c in planted)
            sparsity = shard_sparse_weights(SparseWeights(fixed_rows=fixed_rows), mesh)
        else:
            policy = SparsityPolicy(MLPSparsity.PREDICTED, Selection(args.selection))
            predictors = make(lambda: planted_predictors(config, planted, args.predictor_rank, tp, args.int8_scores))
            sparsity = shard_sparse_weights(predictors, mesh)
    if args.head_density is not None:
        k = max(1, round(args.head_density * config.num_attention_heads))
        heads = HeadSparsity.FIXED if args.heads == "fixed" else HeadSparsity.PREDICTED
        policy = dataclasses.replace(policy, heads=heads, head_k=k, tuning=(("head_kv", args.head_kv), *tuning))
        sparsity = sparsity or SparseWeights()
        if heads == HeadSparsity.FIXED:
            sparsity = sparsity.replace(
                head_schedule=head_schedule(11, config.num_hidden_layers, config.num_attention_heads)
            )
        else:
            sparsity = sparsity.replace(heads=make(lambda: random_head_predictors(config, args.predictor_rank)))
    elif tuning:
        policy = dataclasses.replace(policy, tuning=tuning)
    return DecodeSetup(config, params, policy, sparsity)
