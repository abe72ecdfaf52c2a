"""Predictor runtime: low-rank scorers that choose, per token, the MLP neurons and attention heads to compute.

Per layer l there are two predictors, each `d -> r -> out` with biases (DejaVu's low-rank classifier):
- MLP: reads the residual *before* layer l's attention LayerNorm (`mlp_input="attn_input"`, the default, so it can
  run beside attention) or before the MLP LayerNorm (`mlp_input="mlp_input"`); out = ffn_dim.
- heads: reads the residual before layer l-1's attention LayerNorm (lookahead: layer 0 reads its own), out = heads.

The input is standardized per token (zero mean, unit variance, no affine) before `w1`: the block it predicts sees
LayerNorm(residual), whose scale grows with depth, and a scale-free input trains faster and generalizes across
positions. It costs O(d) per token.

Calibration (`python -m train calibrate`, on held-out tokens, for a recall target) gives each layer two ways to
choose: `k`, the count kept per token by top-K selection (a static field), and `Predictors.mlp_threshold`, the score
a neuron must reach under threshold selection (no sort; the count varies per token). `dejavu_jax.sparsity` applies
them. A predictor directory (`<model_dir>/predictors/`) holds an orbax checkpoint of the weights (`params/`) and
`predictors.json` (rank, K and threshold per layer, recall targets, input choice, training token count, metrics);
it is written atomically (temp dir + rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dejavu_jax.atomic import atomic_directory

PREDICTORS_DIR = "predictors"
METADATA_FILE = "predictors.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
MLP_INPUTS = ("attn_input", "mlp_input")
HEAD_INPUT = "attn_input of layer l-1 (layer 0: its own)"
_NORM_EPS = 1e-5


class PredictorError(ValueError):
    """A predictor directory that is missing, incomplete, or does not fit the model."""


@struct.dataclass
class LowRankPredictor:
    """scores = (standardize(x) @ w1 + b1) @ w2 + b2 (no nonlinearity: a rank-r linear scorer, as in DejaVu)."""
    w1: jax.Array  # [d, r]
    b1: jax.Array  # [r]
    w2: jax.Array  # [r, out]
    b2: jax.Array  # [out]
    k: int = struct.field(pytree_node=False, default=0)  # outputs kept per token; 0 = not calibrated (keep all)
    normalize_input: bool = struct.field(pytree_node=False, default=True)

    @property
    def d_in(self) -> int:
        return self.w1.shape[0]

    @property
    def rank(self) -> int:
        return self.w1.shape[1]

    @property
    def num_outputs(self) -> int:
        return self.w2.shape[1]

    @property
    def keep(self) -> int:
        """K for this layer: the calibrated count, or every output when uncalibrated."""
        return self.k if self.k > 0 else self.num_outputs


@struct.dataclass
class Predictors:
    """All layers' predictors; `mlp[l]` and `heads[l]` belong to layer l."""
    mlp: tuple  # tuple[LowRankPredictor, ...], one per layer
    heads: tuple  # tuple[LowRankPredictor, ...], one per layer
    mlp_input: str = struct.field(pytree_node=False, default="attn_input")
    # Per layer, the score a neuron must reach under threshold selection; None = not calibrated.
    mlp_threshold: Optional[tuple] = struct.field(pytree_node=False, default=None)

    @property
    def num_layers(self) -> int:
        return len(self.mlp)

    @property
    def mlp_k(self) -> tuple[int, ...]:
        return tuple(p.keep for p in self.mlp)

    @property
    def head_k(self) -> tuple[int, ...]:
        return tuple(p.keep for p in self.heads)

    def with_threshold(self, thresholds) -> "Predictors":
        thresholds = tuple(float(t) for t in thresholds)
        if len(thresholds) != self.num_layers:
            raise ValueError(f"need one threshold per layer ({self.num_layers}). Got {len(thresholds)}")
        return self.replace(mlp_threshold=thresholds)

    def with_k(self, mlp_k, head_k) -> "Predictors":
        if len(mlp_k) != self.num_layers or len(head_k) != self.num_layers:
            raise ValueError(f"need one K per layer ({self.num_layers}). Got {len(mlp_k)} MLP and {len(head_k)} head Ks")
        mlp = tuple(_with_k(p, k) for p, k in zip(self.mlp, mlp_k))
        heads = tuple(_with_k(p, k) for p, k in zip(self.heads, head_k))
        return self.replace(mlp=mlp, heads=heads)


def _with_k(p: LowRankPredictor, k: int) -> LowRankPredictor:
    k = int(k)
    if not 0 < k <= p.num_outputs:
        raise ValueError(f"K must be in [1, {p.num_outputs}]. Got {k}")
    return p.replace(k=k)


def init_low_rank(rng, d_in: int, rank: int, num_outputs: int, normalize_input: bool = True,
                  output_bias: Optional[np.ndarray] = None, dtype=jnp.float32) -> LowRankPredictor:
    """Random init: w1 ~ N(0, 1/d), w2 ~ N(0, 1/r); b2 = `output_bias` (e.g. the logit of each output's rate)."""
    for name, value in (("d_in", d_in), ("rank", rank), ("num_outputs", num_outputs)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive int. Got {value!r}")
    k1, k2 = jax.random.split(rng)
    b2 = jnp.zeros((num_outputs,), dtype) if output_bias is None else jnp.asarray(output_bias, dtype)
    return LowRankPredictor(
        w1=(jax.random.normal(k1, (d_in, rank), jnp.float32) * d_in ** -0.5).astype(dtype),
        b1=jnp.zeros((rank,), dtype),
        w2=(jax.random.normal(k2, (rank, num_outputs), jnp.float32) * rank ** -0.5).astype(dtype),
        b2=b2, normalize_input=normalize_input)


def standardize(x):
    """Per-token zero mean, unit variance over the last axis (a LayerNorm without affine), in fp32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + _NORM_EPS)


def predictor_scores(predictor: LowRankPredictor, x):
    """x [..., d] -> scores [..., out] (fp32 logits; higher = more likely active)."""
    if x.shape[-1] != predictor.d_in:
        raise ValueError(f"predictor expects inputs of width {predictor.d_in}. Got shape {x.shape}")
    h = standardize(x) if predictor.normalize_input else x.astype(jnp.float32)
    # Inputs in the weights' dtype, fp32 accumulation (a no-op for fp32 weights), rather than fp16 weights upcast.
    # (Decoding uses `sparsity.MLPPredictor`, the same function in a layout XLA reads at bandwidth.)
    h = jnp.einsum("...d,dr->...r", h.astype(predictor.w1.dtype), predictor.w1, preferred_element_type=jnp.float32)
    h = h + predictor.b1.astype(jnp.float32)
    scores = jnp.einsum("...r,ro->...o", h.astype(predictor.w2.dtype), predictor.w2, preferred_element_type=jnp.float32)
    return scores + predictor.b2.astype(jnp.float32)


# ---- save / load ------------------------------------------------------------------------------------------------

def _tree(predictors: Predictors) -> dict:
    def layer(p):
        return {"w1": p.w1, "b1": p.b1, "w2": p.w2, "b2": p.b2}
    return {"mlp": {f"layers_{i}": layer(p) for i, p in enumerate(predictors.mlp)},
            "heads": {f"layers_{i}": layer(p) for i, p in enumerate(predictors.heads)}}


def _structure_metadata(predictors: Predictors) -> dict:
    if predictors.num_layers == 0 or len(predictors.heads) != predictors.num_layers:
        raise ValueError(f"need one MLP and one head predictor per layer. Got {len(predictors.mlp)} and "
                         f"{len(predictors.heads)}")
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
    raise PredictorError(f"no predictors in {path}: expected {path / PREDICTORS_DIR / METADATA_FILE} (run "
                         f"`python -m train ... --save-to {path}`) or {path / METADATA_FILE}")


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
        raise PredictorError(f"{directory} has predictor format {meta.get('format')!r}; this library reads "
                             f"{FORMAT_VERSION}")
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
            raise PredictorError(f"predictors in {directory} are for (layers, d_model, ffn, heads) = "
                                 f"{(L, d, ffn, heads)}; the model has {want}")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(rank, out):
        return {"w1": jax.ShapeDtypeStruct((d, rank), dtype, sharding=sharding),
                "b1": jax.ShapeDtypeStruct((rank,), dtype, sharding=sharding),
                "w2": jax.ShapeDtypeStruct((rank, out), dtype, sharding=sharding),
                "b2": jax.ShapeDtypeStruct((out,), dtype, sharding=sharding)}
    target = {"mlp": {f"layers_{i}": abstract(r, ffn) for i in range(L)},
              "heads": {f"layers_{i}": abstract(head_rank, heads) for i in range(L)}}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(directory.absolute() / PARAMS_DIR, target)
    except Exception as e:  # orbax raises several types for a missing or mismatched checkpoint
        raise PredictorError(f"could not restore {directory / PARAMS_DIR} ({type(e).__name__}: {e})") from e
    normalize = bool(meta.get("normalize_input", True))

    def build(group, ks):
        return tuple(LowRankPredictor(**tree[group][f"layers_{i}"], k=ks[i], normalize_input=normalize)
                     for i in range(L))
    thresholds = meta.get("mlp_threshold")
    if thresholds is not None and len(thresholds) != L:
        raise PredictorError(f"{directory / METADATA_FILE} has {len(thresholds)} MLP thresholds for {L} layers")
    return Predictors(mlp=build("mlp", mlp_k), heads=build("heads", head_k),
                      mlp_input=meta.get("mlp_input", "attn_input"),
                      mlp_threshold=None if thresholds is None else tuple(float(t) for t in thresholds))
