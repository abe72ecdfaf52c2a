"""Predictor runtime: low-rank scorers that choose, per token, the MLP neurons and attention heads to compute.

Per layer l there are two predictors, each `d -> r -> out` with biases (DejaVu's low-rank classifier):
- MLP: reads the residual *before* layer l's attention LayerNorm (`mlp_input="attn_input"`, the default, so it can
  run beside attention) or before the MLP LayerNorm (`mlp_input="mlp_input"`); out = ffn_dim.
- heads: reads the residual before layer l-1's attention LayerNorm (lookahead: layer 0 reads its own), out = heads.

The input is standardized per token (zero mean, unit variance, no affine) before `w1`: the block it predicts sees
LayerNorm(residual), whose scale grows with depth, and a scale-free input trains faster and generalizes across
positions. It costs O(d) per token.

Calibration (`python -m train calibrate`, on held-out tokens, for a recall target) gives each layer two ways to
choose: `k`, the count kept per token by top-K selection (a static field; threshold selection's bound), and
`Predictors.mlp_threshold` / `head_threshold`, the score a neuron / head must reach under threshold selection (no
sort; the count varies per token). `dejavu_jax.sparsity` applies
them. Saving and loading: `dejavu_jax/predictor_store.py`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


MLP_INPUTS = ("attn_input", "mlp_input")
HEAD_INPUT = "attn_input of layer l-1 (layer 0: its own)"
NORM_EPS = 1e-5


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
    # Per layer, the score a neuron (a head) must reach under threshold selection; None = not calibrated.
    mlp_threshold: Optional[tuple] = struct.field(pytree_node=False, default=None)
    head_threshold: Optional[tuple] = struct.field(pytree_node=False, default=None)

    @property
    def num_layers(self) -> int:
        return len(self.mlp)

    @property
    def mlp_k(self) -> tuple[int, ...]:
        return tuple(p.keep for p in self.mlp)

    @property
    def head_k(self) -> tuple[int, ...]:
        return tuple(p.keep for p in self.heads)

    def with_threshold(self, thresholds, head_thresholds=None) -> "Predictors":
        """The MLP thresholds (and the heads', where given) replaced: one per layer each."""
        thresholds = _per_layer(thresholds, self.num_layers)
        heads = self.head_threshold if head_thresholds is None else _per_layer(head_thresholds, self.num_layers)
        return self.replace(mlp_threshold=thresholds, head_threshold=heads)

    def with_k(self, mlp_k, head_k) -> "Predictors":
        if len(mlp_k) != self.num_layers or len(head_k) != self.num_layers:
            raise ValueError(
                f"need one K per layer ({self.num_layers}). Got {len(mlp_k)} MLP and {len(head_k)} head Ks"
            )
        mlp = tuple(_with_k(p, k) for p, k in zip(self.mlp, mlp_k))
        heads = tuple(_with_k(p, k) for p, k in zip(self.heads, head_k))
        return self.replace(mlp=mlp, heads=heads)


def _per_layer(thresholds, num_layers: int) -> tuple:
    thresholds = tuple(float(t) for t in thresholds)
    if len(thresholds) != num_layers:
        raise ValueError(f"need one threshold per layer ({num_layers}). Got {len(thresholds)}")
    return thresholds


def _with_k(p: LowRankPredictor, k: int) -> LowRankPredictor:
    k = int(k)
    if not 0 < k <= p.num_outputs:
        raise ValueError(f"K must be in [1, {p.num_outputs}]. Got {k}")
    return p.replace(k=k)


def init_low_rank(
    rng,
    d_in: int,
    rank: int,
    num_outputs: int,
    normalize_input: bool = True,
    output_bias: Optional[np.ndarray] = None,
    dtype=jnp.float32,
) -> LowRankPredictor:
    """Random init: w1 ~ N(0, 1/d), w2 ~ N(0, 1/r); b2 = `output_bias` (e.g. the logit of each output's rate)."""
    for name, value in (("d_in", d_in), ("rank", rank), ("num_outputs", num_outputs)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive int. Got {value!r}")
    k1, k2 = jax.random.split(rng)
    b2 = jnp.zeros((num_outputs,), dtype) if output_bias is None else jnp.asarray(output_bias, dtype)
    return LowRankPredictor(
        w1=(jax.random.normal(k1, (d_in, rank), jnp.float32) * d_in**-0.5).astype(dtype),
        b1=jnp.zeros((rank,), dtype),
        w2=(jax.random.normal(k2, (rank, num_outputs), jnp.float32) * rank**-0.5).astype(dtype),
        b2=b2,
        normalize_input=normalize_input,
    )


def standardize(x):
    """Per-token zero mean, unit variance over the last axis (a LayerNorm without affine), in fp32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


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
