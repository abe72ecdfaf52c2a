"""python -m train [collect|fit|calibrate|all] ...  (see --help; no subcommand means `all`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SUBCOMMANDS = ("collect", "fit", "calibrate", "all")
SHARD_TOKENS = 16384  # --shard-tokens' default

DESCRIPTION = """\
Train DejaVu predictors for an OPT model.

  collect    run the dense model under jit over a corpus; store per layer and token the attention input, the MLP
             input (residuals before their LayerNorms, float16), the MLP labels (fc1 > 0 after ReLU, packed bits)
             and each head's output norm, in shards under WORK_DIR/activations/ (resumable)
  fit        train per layer a low-rank MLP predictor (d -> r -> ffn) and head predictor (d -> r -> heads) with
             optax; save them (uncalibrated) to WORK_DIR/predictors/
  calibrate  choose K and a score threshold per layer on held-out tokens for a recall target; store them with
             the predictors; write WORK_DIR/report.{json,md,png}
  all        collect, fit, calibrate (the default when no subcommand is given); with --store stream, collect and
             fit are one pass over the corpus on the accelerator and no activations are written (see below)

Storage (all): disk mode stores about 2*d*2 bytes per token and layer (plus labels and head norms) under
WORK_DIR/activations/: ~5.6 GB for the reference model at the default 400k tokens, ~237 GB for opt-6.7b. Stream
mode stores none: each batch of windows runs the dense model under jit and the same compiled step updates every
layer's predictors (the same loss, init, optimizer and epochs as fit); calibration and the report use a held-out
sample kept in host memory. --store auto (the default) streams when the activations would exceed
--disk-budget-gb (default 20), and says which mode it chose and why. A stream run keeps its peak disk use
(resume state, float16 predictors, report) within --stream-disk-budget-gb (default 2) by training the layers in
as few groups as fit it; it prints the plan (groups, estimated peak) at the start.

Example (the reference model):
  python -m train --model ../shared/models/opt-21m-wiki --data ../shared/data/wiki2015/train-00-of-08.jsonl.xz
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where activations, predictors and reports go (default: runs/<model directory name>)",
    )
    g.add_argument(
        "--predictors",
        type=Path,
        default=None,
        help="predictor directory that fit writes and calibrate reads and rewrites (default: WORK_DIR/predictors)",
    )
    g.add_argument("--json", action="store_true", help="print a JSON summary on stdout (logs go to stderr)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or per-layer logs")


def _collect_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("collect")
    g.add_argument(
        "--model",
        required=required,
        help="converted model dir, Hugging Face OPT checkpoint dir, or hub id"
        + ("" if required else " (only names the default --work-dir here)"),
    )
    if not required:
        return
    g.add_argument(
        "--data",
        required=True,
        help='corpus: .jsonl / .jsonl.xz (a "text" field per line), .txt, or a datasets.save_to_disk dir; '
        "documents without text are skipped",
    )
    g.add_argument(
        "--max-tokens",
        type=int,
        default=400_000,
        help="token budget: rows to collect, padding excluded (default 400000); raising it later "
        "continues a finished collection",
    )
    g.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="window length: the token stream (documents with BOS, concatenated) is cut into windows "
        "of this many tokens (default 512)",
    )
    g.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    g.add_argument(
        "--shard-tokens",
        type=int,
        default=None,
        help=f"rows per shard file; each shard is written atomically (default {SHARD_TOKENS}; disk mode only)",
    )
    g.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype of the dense model (default: float32 for the disk store, whose activations are stored "
        "float16; when streaming, float16 on a GPU (OPT's own dtype: a real-size model in float32 would take "
        "twice the memory and run full-precision float32 matmuls), float32 elsewhere)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="discard activations in WORK_DIR/activations (stream mode: the training checkpoint in "
        "WORK_DIR/stream-state) instead of resuming them",
    )


def _stream_args(p: argparse.ArgumentParser) -> None:
    from dejavu_jax.config import shape_config
    from train.stream import held_out_token_cap

    g = p.add_argument_group("storage (disk or stream)")
    g.add_argument(
        "--store",
        default="auto",
        metavar="{auto,disk,stream}",
        help="auto (default): stream when the activations of --max-tokens would exceed --disk-budget-gb, else "
        "disk; disk: collect to WORK_DIR/activations, then fit; stream: collect and fit in one pass over the "
        "corpus on the accelerator, writing no activations",
    )
    g.add_argument(
        "--disk-budget-gb",
        type=float,
        default=20.0,
        help="--store auto streams above this many GB of activations (default 20)",
    )
    g.add_argument(
        "--stream-disk-budget-gb",
        type=float,
        default=2.0,
        help="stream: the most disk the run may use under WORK_DIR: the resume state of the layer group in "
        "training (float32 predictors and Adam moments, twice while a checkpoint replaces the last one), the "
        "finished groups' float16 predictors, the predictors directory (twice while calibration rewrites it) and "
        "the report (default 2). The layer groups are chosen to fit it; a budget that no grouping meets is refused "
        "at the start with the size needed. --save-to writes outside WORK_DIR and is not counted",
    )
    g.add_argument(
        "--layer-groups",
        type=int,
        default=None,
        help="stream: train the layers in this many passes over the corpus, each holding only its layers' "
        "predictors and optimizer state on the device and on disk (default: the fewest that fit "
        "--stream-disk-budget-gb). Every extra group runs the dense model over the training tokens once more "
        "(each epoch), which is cheap next to the optimizer steps but not free",
    )
    g.add_argument(
        "--mix-tokens",
        type=int,
        default=16384,
        help="stream: pool the layer inputs and labels of this many tokens' forward batches (whole batches, at "
        "least one) on the device before the optimizer steps over them, so that each step's rows come from "
        "that many tokens' windows (default 16384: 4 batches of 8 windows of 512; with one batch of 8 the "
        "reference model's predictors needed 1.6 points more MLP density for the same recall than disk mode's). "
        "The pool takes per token and trained layer 4*d + ffn/8 + 4*heads bytes (~9.7 GB at 16384 tokens for "
        "all 32 layers of opt-6.7b; --layer-groups divides it)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="stream: save the training state every this many forward batches (and at the end); a rerun with "
        "the same arguments resumes from it (default 100)",
    )
    cap = held_out_token_cap(shape_config("opt-13b"), "attn_input", 2.0, 8 * 512)  # the default batch of windows
    g.add_argument(
        "--holdout-memory-gb",
        type=float,
        default=2.0,
        help="stream: host memory for the held-out sample that calibration and the report use: the first "
        "held-out tokens (of the --holdout share) whose per-layer inputs, labels and head norms fit in it, beside "
        "one layer of one forward batch on its way to the sample "
        f"(default 2: {cap:,} tokens at opt-13b; every held-out token of the reference model); the count is logged",
    )


def _fit_args(p: argparse.ArgumentParser) -> None:
    from train.fit import LOSSES
    from dejavu_jax.predictors import MLP_INPUTS

    g = p.add_argument_group("fit")
    g.add_argument("--rank", type=int, default=None, help="predictor rank r (default min(1000, d_model/2))")
    g.add_argument(
        "--mlp-input",
        default="attn_input",
        choices=MLP_INPUTS,
        help="what the MLP predictor of layer l reads: the residual before layer l's attention "
        "LayerNorm (attn_input, default: runs beside attention) or before its MLP LayerNorm "
        "(mlp_input)",
    )
    g.add_argument(
        "--loss",
        default="bce",
        choices=LOSSES,
        help="bce (default: unweighted binary cross-entropy, best top-K recall in our measurements) or "
        "weighted_bce (DejaVu: negatives weighted by the label density + 0.005)",
    )
    g.add_argument("--epochs", type=int, default=5, help="passes over the training rows per predictor (default 5)")
    g.add_argument("--train-batch-size", type=int, default=2048, help="rows per optimizer step (default 2048)")
    g.add_argument(
        "--learning-rate",
        type=float,
        default=5e-3,
        help="Adam peak learning rate, warmup then cosine decay (default 5e-3)",
    )
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0: Adam)")
    g.add_argument(
        "--holdout",
        type=float,
        default=0.1,
        help="fraction of rows (the last ones collected) held out for calibration and testing (default 0.1)",
    )
    g.add_argument(
        "--head-label-mass",
        type=float,
        default=0.9,
        help="head label: the fewest heads (by decreasing output norm) carrying this share of the "
        "token's head-norm mass (default 0.9)",
    )
    g.add_argument(
        "--no-input-norm",
        action="store_true",
        help="feed the raw residual to the predictors instead of standardizing it per token",
    )
    g.add_argument("--seed", type=int, default=0, help="initialization and shuffling seed (default 0)")


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    from train.calibrate import DEFAULT_RECALL_CONFIDENCE

    g = p.add_argument_group("calibrate")
    g.add_argument(
        "--recall-target",
        type=float,
        default=0.99,
        help="MLP: K per layer is the smallest top-K whose mean recall of the truly active neurons "
        "reaches this, in (0, 1] (default 0.99)",
    )
    g.add_argument(
        "--head-recall-target",
        type=float,
        default=0.99,
        help="heads: the same, for the mean share of the head-norm mass kept (default 0.99)",
    )
    g.add_argument(
        "--recall-confidence",
        type=float,
        default=DEFAULT_RECALL_CONFIDENCE,
        help="confidence, in [0.5, 1), that the mean recall on unseen tokens reaches the targets: K (MLP and heads) "
        "and the MLP threshold are chosen where the one-sided lower confidence bound on the calibration tokens' "
        "mean recall, mean - t*SE, reaches the target; SE comes from the spread between the calibration windows "
        "(a window's tokens are correlated), t is Student's quantile with (windows - 1) degrees of freedom. 0.5 "
        "gives t = 0: the mean itself, which leaves the recall on new tokens below the target about half the time "
        f"(default {DEFAULT_RECALL_CONFIDENCE})",
    )
    g.add_argument(
        "--block",
        type=int,
        default=1,
        help="MLP K (top-K selection) is rounded up to a multiple of this, capped at ffn (default 1: "
        "the row-masked kernels compute exactly the chosen rows, so no rounding is needed)",
    )
    g.add_argument(
        "--head-block",
        type=int,
        default=1,
        help="head K is rounded up to a multiple of this, capped at the head count (default 1)",
    )
    g.add_argument(
        "--save-to",
        type=Path,
        default=None,
        help="also write the calibrated predictors to MODEL_DIR/predictors/ (a converted model "
        "directory, see python -m dejavu_jax.convert), where load_predictors(MODEL_DIR) finds them",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{collect,fit,calibrate,all}")
    for name, help_text, parts in (
        ("collect", "collect dense activations", (True, False, False)),
        ("fit", "train the predictors", (False, True, False)),
        ("calibrate", "choose K and a threshold per layer and write the report", (False, False, True)),
        ("all", "collect, fit, calibrate", (True, True, True)),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common(p)
        _collect_args(p, required=parts[0])
        if parts[1]:
            _fit_args(p)
        if parts[2]:
            _calibrate_args(p)
        if name == "all":
            _stream_args(p)
    return parser


def _options(args):
    from train.calibrate import CalibrateOptions
    from train.collect import CollectOptions
    from train.fit import FitOptions

    if args.work_dir is None:
        if not args.model:
            raise ValueError("pass --work-dir (or --model, whose directory name names the default runs/<name>)")
        args.work_dir = Path("runs") / Path(str(args.model).rstrip("/")).name
    predictors_dir = args.predictors or args.work_dir / "predictors"
    collect = fit = calibrate = stream = None
    if args.command in ("collect", "all"):
        collect = CollectOptions(
            model=args.model,
            data=args.data,
            out_dir=args.work_dir / "activations",
            max_tokens=args.max_tokens,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            shard_tokens=args.shard_tokens if args.shard_tokens is not None else SHARD_TOKENS,
            dtype=args.dtype or "float32",
        )
        collect.validate()
    if args.command in ("fit", "all"):
        fit = FitOptions(
            rank=args.rank,
            mlp_input=args.mlp_input,
            loss=args.loss,
            epochs=args.epochs,
            batch_size=args.train_batch_size,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            holdout=args.holdout,
            head_label_mass=args.head_label_mass,
            normalize_input=not args.no_input_norm,
            seed=args.seed,
        )
        fit.validate()
    if args.command in ("calibrate", "all"):
        calibrate = CalibrateOptions(
            recall_target=args.recall_target,
            head_recall_target=args.head_recall_target,
            recall_confidence=args.recall_confidence,
            block=args.block,
            head_block=args.head_block,
        )
        calibrate.validate()
        if args.save_to is not None:
            _check_save_to(args.save_to)
    if args.command == "all":
        stream = _stream_options(args, fit)
        if stream is not None:
            collect = None
    return collect, fit, calibrate, predictors_dir, stream


def _stream_dtype() -> str:
    """Streaming's default compute dtype: OPT's own float16 on a GPU (tensor-core matmuls, half the memory),
    float32 elsewhere (a CPU gains nothing from float16)."""
    import jax

    return "float16" if jax.default_backend() == "gpu" else "float32"


def _stream_options(args, fit):
    """StreamOptions when `all` streams (args.store_reason says why), None for disk mode."""
    from dejavu_jax.corpus import corpus_kind
    from train.disk_budget import plan_layer_groups
    from train.stream import StreamOptions, choose_store, read_config

    stream = StreamOptions(
        model=args.model,
        data=args.data,
        work_dir=args.work_dir,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        mix_tokens=args.mix_tokens,
        dtype=args.dtype or _stream_dtype(),
        layer_groups=args.layer_groups,
        disk_budget_gb=args.stream_disk_budget_gb,
        checkpoint_every=args.checkpoint_every,
        holdout_memory_gb=args.holdout_memory_gb,
    )
    stream.validate()
    corpus_kind(args.data)  # a bad corpus is reported before the model is looked at
    config = read_config(args.model)
    args.store, args.store_reason = choose_store(args.store, config, args.max_tokens, args.disk_budget_gb)
    if args.store == "disk":
        return None
    plan_layer_groups(config, fit.resolved_rank(config.hidden_size), stream.disk_budget_gb, stream.layer_groups)
    return stream


def _check_save_to(model_dir: Path) -> None:
    from dejavu_jax.checkpoint import is_converted_model

    if not model_dir.is_dir() or not is_converted_model(model_dir):
        raise ValueError(
            f"--save-to {model_dir} is not a converted model directory (no dejavu_jax.json); convert "
            f"it first with python -m dejavu_jax.convert --hf HF_DIR --out {model_dir}"
        )


def run(args, log) -> dict:
    collect_opts, fit_opts, calibrate_opts, predictors_dir, stream_opts = _options(args)  # checked before work
    progress = not args.quiet
    summary = {"work_dir": str(args.work_dir)}
    if args.command == "all":
        summary["store"] = {"mode": args.store, "reason": args.store_reason}
        log(f"store: {args.store} ({args.store_reason})")
        if stream_opts is not None and args.shard_tokens is not None:
            print("warning: --shard-tokens has no effect in stream mode (it writes no activations)", file=sys.stderr)
    if stream_opts is not None:
        from train.stream import run_stream

        held_out, summary["stream"] = run_stream(
            stream_opts, fit_opts, predictors_dir, overwrite=args.overwrite, progress=progress, log=log
        )
        s = summary["stream"]
        log(
            f"stream: rank {s['rank']}, {s['training_tokens']:,} training tokens x {s['epochs']} epochs, "
            f"{s['held_out_tokens']:,} held-out tokens in memory; {s['seconds']:.0f} s -> {predictors_dir}"
        )
        summary["calibrate"] = _calibrate(
            held_out, args, calibrate_opts, predictors_dir, progress, log, disk_plan=s["disk_plan"]
        )
        return summary
    if collect_opts is not None:
        from train.collect import collect

        start = time.perf_counter()
        summary["collect"] = collect(collect_opts, overwrite=args.overwrite, progress=progress)
        summary["collect"]["seconds"] = time.perf_counter() - start
        c = summary["collect"]
        log(
            f"collect: {c['rows']:,} tokens in {c['shards']} shards ({c['new_rows']:,} new, "
            f"{c['documents_consumed']} documents) -> {c['activations']}"
        )
    if fit_opts is None and calibrate_opts is None:
        return summary
    from train.activations import ActivationStore
    from train.stream import STATE_DIR

    if not (args.work_dir / "activations").exists() and (args.work_dir / STATE_DIR).exists():
        raise ValueError(
            f"{args.work_dir} was trained with --store stream and holds no activations; rerun the same "
            f"`python -m train all --store stream ...` command (with the new calibration options) to recalibrate "
            f"from its checkpoint"
        )
    store = ActivationStore(args.work_dir / "activations")
    if fit_opts is not None:
        from train.fit import fit

        log(f"fit: {store.num_rows:,} rows, {store.config.num_hidden_layers} layers")
        summary["fit"] = fit(
            store, fit_opts, args.work_dir, predictors_dir, log=log if progress else None, progress=progress
        )
        reused = len(summary["fit"]["reused"])
        log(
            f"fit: rank {summary['fit']['rank']}, {summary['fit']['seconds']:.0f} s -> {predictors_dir}"
            + (
                f" ({reused} of {2 * store.config.num_hidden_layers} predictors reused from an earlier run)"
                if reused
                else ""
            )
        )
    if calibrate_opts is not None:
        summary["calibrate"] = _calibrate(store, args, calibrate_opts, predictors_dir, progress, log)
    return summary


def _calibrate(rows, args, opts, predictors_dir: Path, progress: bool, log, disk_plan=None) -> dict:
    """Calibrate on `rows` (an ActivationStore, or a held-out sample in memory), write the report (with a stream
    run's disk plan); its summary."""
    from dejavu_jax.predictor_store import PREDICTORS_DIR
    from train.activations import ActivationStore
    from train.calibrate import calibrate, calibrate_held_out
    from train.report import mean_mlp_density, write_report

    save_to = None if args.save_to is None else args.save_to / PREDICTORS_DIR
    log(
        f"calibrate: recall target {opts.recall_target} (MLP), {opts.head_recall_target} (head-norm mass), "
        f"at confidence {opts.recall_confidence}"
    )
    run = calibrate if isinstance(rows, ActivationStore) else calibrate_held_out
    result = run(rows, predictors_dir, opts, save_to=save_to, log=log if progress else None)
    if disk_plan is not None:
        result["stream_disk_plan"] = disk_plan
    stem = "report" if predictors_dir.name == PREDICTORS_DIR else f"report-{predictors_dir.name}"
    result["report_files"] = write_report(result, args.work_dir, stem)
    summary = {k: result[k] for k in ("predictors", "saved_to", "mlp_k", "head_k", "report_files")}
    summary["mean_mlp_density_layers_1_plus"] = mean_mlp_density(result)
    summary["mlp_test_recall"] = [e["mlp"]["test"]["recall"] for e in result["layers"]]
    summary["head_test_mass_recall"] = [e["heads"]["test"]["recall"] for e in result["layers"]]
    summary["calibration_tokens"] = result["calibration_tokens"]
    summary["test_tokens"] = result["test_tokens"]
    summary["seconds"] = result["seconds"]
    log(
        f"calibrate: MLP K {result['mlp_k']}, heads K {result['head_k']}; mean MLP density (layers 1+) "
        f"{mean_mlp_density(result):.1%}; report {result['report_files']['markdown']}"
    )
    return summary


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "all")
    args = build_parser().parse_args(argv)
    from dejavu_jax.corpus import CorpusError
    from dejavu_jax.hf_checkpoint import CheckpointError

    out = sys.stderr if args.json else sys.stdout

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=out, flush=True)

    try:
        summary = run(args, log)
    except (CheckpointError, CorpusError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
