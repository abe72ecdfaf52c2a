"""Predictor directories on disk: an orbax checkpoint of the weights (`params/`) and `predictors.json` (rank, K and
threshold per layer, recall targets, input choice, training token count, metrics), written atomically (temp dir +
rename). A model directory holds its predictors in `<model_dir>/predictors/`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from dejavu_jax.atomic import atomic_directory
from dejavu_jax.predictors import HEAD_INPUT, LowRankPredictor, Predictors

PREDICTORS_DIR = "predictors"
METADATA_FILE = "predictors.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


class PredictorError(ValueError):
    """A predictor directory that is missing, incomplete, or does not fit the model."""


def _tree(predictors: Predictors) -> dict:
    def layer(p):
        return {"w1": p.w1, "b1": p.b1, "w2": p.w2, "b2": p.b2}

    return {
        "mlp": {f"layers_{i}": layer(p) for i, p in enumerate(predictors.mlp)},
        "heads": {f"layers_{i}": layer(p) for i, p in enumerate(predictors.heads)},
    }


def _structure_metadata(predictors: Predictors) -> dict:
    if predictors.num_layers == 0 or len(predictors.heads) != predictors.num_layers:
        raise ValueError(
            f"need one MLP and one head predictor per layer. Got {len(predictors.mlp)} and {len(predictors.heads)}"
        )
    first = predictors.mlp[0]
    return {
        "format": FORMAT_VERSION,
        "num_layers": predictors.num_layers,
        "d_model": first.d_in,
        "rank": first.rank,
        "ffn_dim": first.num_outputs,
        "num_heads": predictors.heads[0].num_outputs,
        "head_rank": predictors.heads[0].rank,
        "mlp_k": list(predictors.mlp_k),
        "head_k": list(predictors.head_k),
        "mlp_calibrated": all(p.k > 0 for p in predictors.mlp),
        "mlp_threshold": None if predictors.mlp_threshold is None else list(predictors.mlp_threshold),
        "heads_calibrated": all(p.k > 0 for p in predictors.heads),
        "head_threshold": None if predictors.head_threshold is None else list(predictors.head_threshold),
        "normalize_input": first.normalize_input,
        "mlp_input": predictors.mlp_input,
        "head_input": HEAD_INPUT,
        "dtype": str(np.dtype(first.w1.dtype)),
    }


def resolve_predictors_dir(path: str | os.PathLike) -> Path:
    """`path` itself if it holds predictors.json, else `path/predictors/` (a model directory)."""
    path = Path(path)
    if (path / METADATA_FILE).exists():
        return path
    if (path / PREDICTORS_DIR / METADATA_FILE).exists():
        return path / PREDICTORS_DIR
    raise PredictorError(
        f"no predictors in {path}: expected {path / PREDICTORS_DIR / METADATA_FILE} (run "
        f"`python -m train ... --save-to {path}`) or {path / METADATA_FILE}"
    )


def save_predictors(predictors: Predictors, out_dir: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Write `predictors` to `out_dir` (the predictors directory itself), replacing it atomically.

    `metadata` (JSON-serializable: recall targets, training token count, metrics, ...) is stored beside the
    structure fields in predictors.json.
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir)
    meta = dict(metadata or {})
    meta.update(_structure_metadata(predictors))
    text = json.dumps(meta, indent=2)  # fails here, before anything is written, if metadata is not JSON
    with atomic_directory(out) as tmp:
        tree = jax.tree.map(lambda a: np.asarray(a), _tree(predictors))
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp.absolute() / PARAMS_DIR, tree)
            checkpointer.wait_until_finished()
        (tmp / METADATA_FILE).write_text(text)
    return out


def predictor_metadata(path: str | os.PathLike) -> dict:
    """predictors.json of a predictors directory or a model directory holding `predictors/`."""
    directory = resolve_predictors_dir(path)
    try:
        meta = json.loads((directory / METADATA_FILE).read_text())
    except json.JSONDecodeError as e:
        raise PredictorError(f"{directory / METADATA_FILE} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT_VERSION:
        raise PredictorError(
            f"{directory} has predictor format {meta.get('format')!r}; this library reads {FORMAT_VERSION}"
        )
    return meta


def load_predictors(path: str | os.PathLike, config: Any = None) -> Predictors:
    """Load predictors from a model directory (`<model_dir>/predictors/`) or a predictors directory.

    With `config` (an OPTConfig), check that they fit the model (layers, d_model, ffn, heads).
    """
    import orbax.checkpoint as ocp

    directory = resolve_predictors_dir(path)
    meta = predictor_metadata(directory)
    try:
        L, d, r, ffn, heads = (int(meta[k]) for k in ("num_layers", "d_model", "rank", "ffn_dim", "num_heads"))
        head_rank = int(meta.get("head_rank", r))
        mlp_k, head_k = [int(k) for k in meta["mlp_k"]], [int(k) for k in meta["head_k"]]
        dtype = np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise PredictorError(f"{directory / METADATA_FILE} is incomplete ({type(e).__name__}: {e})") from e
    if config is not None:
        want = (config.num_hidden_layers, config.hidden_size, config.ffn_dim, config.num_attention_heads)
        if (L, d, ffn, heads) != want:
            raise PredictorError(
                f"predictors in {directory} are for (layers, d_model, ffn, heads) = "
                f"{(L, d, ffn, heads)}; the model has {want}"
            )
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(rank, out):
        return {
            "w1": jax.ShapeDtypeStruct((d, rank), dtype, sharding=sharding),
            "b1": jax.ShapeDtypeStruct((rank,), dtype, sharding=sharding),
            "w2": jax.ShapeDtypeStruct((rank, out), dtype, sharding=sharding),
            "b2": jax.ShapeDtypeStruct((out,), dtype, sharding=sharding),
        }

    target = {
        "mlp": {f"layers_{i}": abstract(r, ffn) for i in range(L)},
        "heads": {f"layers_{i}": abstract(head_rank, heads) for i in range(L)},
    }
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(directory.absolute() / PARAMS_DIR, target)
    except Exception as e:  # orbax raises several types for a missing or mismatched checkpoint
        raise PredictorError(f"could not restore {directory / PARAMS_DIR} ({type(e).__name__}: {e})") from e
    normalize = bool(meta.get("normalize_input", True))

    def build(group, ks):
        return tuple(
            LowRankPredictor(**tree[group][f"layers_{i}"], k=ks[i], normalize_input=normalize) for i in range(L)
        )

    def thresholds(key, what):
        values = meta.get(key)
        if values is not None and len(values) != L:
            raise PredictorError(f"{directory / METADATA_FILE} has {len(values)} {what} thresholds for {L} layers")
        return None if values is None else tuple(float(t) for t in values)

    return Predictors(
        mlp=build("mlp", mlp_k),
        heads=build("heads", head_k),
        mlp_input=meta.get("mlp_input", "attn_input"),
        mlp_threshold=thresholds("mlp_threshold", "MLP"),
        head_threshold=thresholds("head_threshold", "head"),
    )
