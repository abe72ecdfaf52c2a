"""The sparsity policy: what a forward pass computes sparsely and how the neurons are chosen, decided in one place.

Two halves, kept apart so that changing a traced value never recompiles:
- `SparsityPolicy` (static, frozen, hashable: a `static_argnames` value) says *what*: the MLP mode
  (`MLPSparsity`: none, lossless, predicted) and, for predicted, the `Selection` (threshold or top-K).
- `SparseWeights` (a pytree, traced) holds *with what*: per layer the predictor in its decode layout
  (`MLPPredictor`) or a fixed row mask (benchmarks' ceiling).

`mlp_rows` is the one function that turns them, and the layer's predictor input, into `MLPRows`: the rows a layer's
MLP block computes. The blocks take `MLPRows` and nothing else, so the model holds no selection logic; the model's
handle on a layer is `LayerChoice` (its `rows`, and `before_attention`: the predictor's first layer issued ahead of
the attention block where the tuning fuses it with that block's LayerNorm or puts it on a side stream).

Modes:
- none: the dense MLP.
- lossless: dense fc1, then fc2 over the neurons whose ReLU output is nonzero. Exact for every ReLU OPT (a zero
  contributes exactly 0), no predictor.
- predicted: a low-rank predictor scores every neuron from the layer's residual; threshold selection keeps the
  neurons whose score reaches the layer's calibrated threshold (no sort; the count varies per token), top-K keeps
  the layer's calibrated K best. fc2 then also skips the chosen neurons whose ReLU output is 0 (exact).

Two ways of applying the choice, by the shape of the forward pass:
- a decode step (one new token) of batch <= `SPARSE_DECODE_MAX_BATCH` runs the row-masked Pallas kernels
  (kernels/masked_mlp.py): threshold selection is fused into the fc1 kernel, and only chosen rows are read;
  larger batches run the dense MLP (their union of chosen rows is too large for the kernels to pay;
  bench/results/NOTES.md, "Choosing neurons at decode");
- a whole-sequence forward (perplexity, tasks) chooses per token and computes relu(fc1) on the chosen neurons and
  exact zeros elsewhere before fc2: the same function as the decode kernels (unchosen neurons add exact zeros), in
  one batched pass.

Heads (`HeadSparsity`, `head_rows`): each token keeps K heads per layer, chosen by the layer's head predictor from
layer l-1's input (lookahead), by a seeded random schedule (benchmarks' stand-in for predictors) or by an oracle
(largest output norm); predicted heads follow the policy's selection too: top-K keeps the K best, threshold the
heads whose score reaches the layer's calibrated threshold, at most K (`threshold_k`: the count varies, the decode
step's head list keeps its static length K with -1 entries, which the kernels skip); only the kept heads' outputs
reach out_proj. A whole-sequence forward computes every head and masks the outputs; a decode step of a small batch
computes only the chosen heads (`dejavu_jax.sparse_attention`), keeping every head's K/V exact, so it equals the
whole-sequence forward. `DecodeTuning` says how a decode step
computes what the policy chose (kernel choices, block sizes, how skipped heads' K/V are kept), never what it chooses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental.compute_on import compute_on

from dejavu_jax.predictors import NORM_EPS, LowRankPredictor, Predictors, standardize
from dejavu_jax.sparse_attention import HEAD_KV_MODES
from kernels import layernorm as kernel_layernorm
from kernels.head_sparse import HeadSparsePlan
from kernels.masked_mlp import MaskedMLPPlan, threshold_mask
from kernels.predictor_hidden import CHOOSE_MAX_HEADS, MAX_BATCH as HIDDEN_MAX_BATCH, HeadChooser, predictor_hidden

# Decode steps of at most this many sequences use the row-masked kernels; larger batches fall back to the dense MLP.
SPARSE_DECODE_MAX_BATCH = 1


class MLPSparsity(str, enum.Enum):
    NONE = "none"
    LOSSLESS = "lossless"
    PREDICTED = "predicted"


class HeadSparsity(str, enum.Enum):
    NONE = "none"
    PREDICTED = "predicted"  # each token's K best heads by the layer's head predictor (lookahead input)
    ORACLE = "oracle"  # each token's K heads of largest true output norm (a study's upper bound, no predictor)
    # K random heads per token, layer and sequence from `SparseWeights.head_schedule` (`head_schedule`: per layer a
    # seeded order of the heads, entered at a start hashed from the token's cache slot): benchmarks' stand-in for
    # predictors, changing from step to step.
    FIXED = "fixed"


class Selection(str, enum.Enum):
    THRESHOLD = "threshold"
    TOPK = "topk"


TOPK_METHODS = ("sort", "rank")
RANK_MAX_ENTRIES = 256  # "rank" compares every pair of entries: heads, not neurons


@dataclasses.dataclass(frozen=True)
class DecodeTuning:
    """How a batch-1 decode step computes what the policy chose (never what it chooses):

    - `hidden`: the predictor's first layer on the `predictor_hidden` Pallas kernel ("pallas") or in XLA ("xla");
    - `hidden_layernorm`: 1 = where the MLP predictor reads the attention block's input (a pre-LayerNorm model,
      `mlp_input="attn_input"`) and runs on the kernel, that launch also writes the attention LayerNorm of the same
      input (`attention_layernorm_and_hidden`), so the step runs no LayerNorm kernels before the q/k/v projection;
      0 = the LayerNorm and the predictor's first layer apart. A head-sparse step whose q/k/v kernel applies the
      LayerNorm itself (`head_qkv_layernorm`) keeps that fusion instead;
    - `hidden_block_r`: rows of w1_t each `predictor_hidden` program reads (0 = the kernel's default; the kernel takes
      the largest power of two that divides the rank and is at most this);
    - `hidden_sum_once`: 1 = `predictor_hidden` sums each of its dot products and statistics over d as one reduction
      (its column blocks added elementwise first); 0 = one reduction per column block (`kernels.block_math`);
    - `hidden_stream`: 0 = the predictor's first layer on the main stream; n > 0 = issued before the attention block
      on GPU stream n (`jax.experimental.compute_on("gpu_stream:n")`; the fused LayerNorm is then off), so it can
      overlap the attention block as DejaVu's side stream does. XLA honours it only with
      `XLA_FLAGS=--xla_gpu_experimental_stream_annotation=true`; elsewhere it runs in order. Only the MLP predictor
      goes there, at `LayerChoice.before_attention` (a head predictor's output is needed at once): its first layer,
      and with threshold selection and `scores` other than "fc1" its whole choice (the row mask), so that the fc1
      kernel after attention only reads a mask, as with fixed rows;
    - `scores`: threshold scores inside the fc1 kernel's prologue ("fc1"), or apart from it as a row mask that the
      fc1 kernel reads: by the `threshold_mask` Pallas kernel ("kernel"; for one device: under tensor parallelism
      XLA would gather the split scoring rows to every device for it) or an XLA GEMV ("xla");
    - `knobs`: `kernels.masked_mlp.MaskedMLPPlan` fields (block sizes, warps) overriding its per-shape defaults;
    - `head_kv`: with head sparsity, how skipped heads' K/V stay exact (`HEAD_KV_MODES`): "repair" (the default,
      measured faster since its window is one launch: `dejavu_jax/sparse_attention.py`) recomputes a computed head's
      recent K/V from a ring buffer of inputs, "all" computes every head's K/V each step;
    - `head_window`: R, the ring buffer's length in tokens ("repair");
    - `head_max_batch`: the largest batch whose decode steps compute only the chosen heads (`kernels.head_sparse`);
      larger batches compute every head and zero the unchosen ones' outputs before out_proj (the same outputs, at
      dense attention's cost). Default 1: on an H100 at batch 8 (prompt 1024, 16 of 32 heads a sequence, their
      union nearly every head) the head kernels decoded at 0.36x dense
      (bench/results/generate_NVIDIA-H100-80GB-HBM3_2026-12-06_heads_prompt1024_opt-6.7b.md);
    - `head_knobs`: `kernels.head_sparse.HeadSparsePlan` fields overriding its defaults, named with a "head_" prefix
      when parsed (`head_qkv_block_rows=8` sets `qkv_block_rows`);
    - `head_topk`: how predicted heads take their k best scores (`exactly_k`'s method, the same heads): "rank" (the
      default: pairwise comparisons, no sort kernel; measured faster, bench/results/NOTES.md, "The window kernel
      pipelined") or "sort" (`lax.top_k`);
    - `head_hidden_ahead`: 1 = where layer l's MLP predictor runs on the kernel with the attention LayerNorm
      (`attention_layernorm_and_hidden`), the same launch also computes the first layer of layer l+1's head predictor,
      which reads the same input (the lookahead), and layer l+1's head choice takes it (`head_predictor_ahead`): one
      `predictor_hidden` launch a layer instead of two (the default; also where the repair's window kernel applies
      the attention LayerNorm, `LayerChoice.carries_head_ahead`); 0 = each apart;
    - `head_choose_ahead`: 1 = where `head_hidden_ahead` applies on one device, that launch also scores layer l+1's
      heads and chooses them (`kernels.predictor_hidden.HeadChooser`: its last program to arrive), so no XLA kernel
      runs between it and the head kernels; 0 = the scores and the choice in XLA (the default until an H100 run
      times it).
    """

    hidden: str = "pallas"
    hidden_layernorm: int = 1
    hidden_block_r: int = 0
    hidden_sum_once: int = 1
    hidden_stream: int = 0
    scores: str = "fc1"
    knobs: tuple = ()
    head_kv: str = "repair"
    head_window: int = 16
    head_max_batch: int = 1
    head_knobs: tuple = ()
    head_topk: str = "rank"
    head_hidden_ahead: int = 1
    head_choose_ahead: int = 0

    CHOICES = {
        "hidden": ("pallas", "xla"),
        "scores": ("fc1", "kernel", "xla"),
        "head_kv": HEAD_KV_MODES,
        "head_topk": TOPK_METHODS,
    }
    # int fields: (least, most) value (None: no bound)
    INTS = {
        "head_window": (1, None),
        "head_max_batch": (1, None),
        "hidden_layernorm": (0, 1),
        "hidden_block_r": (0, 64),
        "hidden_sum_once": (0, 1),
        "hidden_stream": (0, 8),
        "head_hidden_ahead": (0, 1),
        "head_choose_ahead": (0, 1),
    }

    def __post_init__(self):
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"tuning {name} must be one of {allowed}. Got {getattr(self, name)!r}")
        for name in self.INTS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not self._in_range(name, value):
                raise ValueError(f"tuning {name} must be {self._range_text(name)}. Got {value!r}")

    @classmethod
    def _in_range(cls, name: str, value: int) -> bool:
        least, most = cls.INTS[name]
        return value >= least and (most is None or value <= most)

    @classmethod
    def _range_text(cls, name: str) -> str:
        least, most = cls.INTS[name]
        if (least, most) == (1, None):
            return "a positive int"
        return "0 or 1" if (least, most) == (0, 1) else f"an int in [{least}, {most}]"

    @classmethod
    def parse(cls, pairs: tuple) -> "DecodeTuning":
        plan_fields = {f.name for f in dataclasses.fields(MaskedMLPPlan)} - {"batch", "d", "ffn", "rank"}
        head_fields = {f.name for f in dataclasses.fields(HeadSparsePlan)} - {"batch", "d", "head_dim", "heads"}
        choices, knobs, head_knobs = {}, [], []
        for name, value in pairs:
            if name in cls.CHOICES:
                choices[name] = value  # checked by __post_init__
            elif name in cls.INTS:
                try:
                    choices[name] = int(value)
                except (TypeError, ValueError):
                    raise ValueError(f"tuning {name} must be {cls._range_text(name)}. Got {value!r}") from None
            elif name in plan_fields:
                knobs.append((name, int(value)))
            elif name.startswith("head_") and name[5:] in head_fields:
                head_knobs.append((name[5:], int(value)))
            else:
                raise ValueError(
                    f"unknown tuning {name!r}: use {sorted(cls.CHOICES) + list(cls.INTS)}, a MaskedMLPPlan field "
                    f"{sorted(plan_fields)} or head_ + a HeadSparsePlan field {sorted(head_fields)}"
                )
        return cls(knobs=tuple(knobs), head_knobs=tuple(head_knobs), **choices)


@dataclasses.dataclass(frozen=True)
class SparsityPolicy:
    """What is sparse and how it is chosen (static under jit)."""

    mlp: MLPSparsity = MLPSparsity.NONE
    selection: Selection = Selection.THRESHOLD
    # Decode steps use the row-masked MLP kernels and compute only the chosen heads (False: the per-token paths, every
    # head computed and masked: the kernels' reference).
    decode_kernels: bool = True
    # Overrides of the decode kernels' defaults, for benchmarks and tuning: given as (name, value) pairs, held as the
    # `DecodeTuning` they parse to.
    tuning: "DecodeTuning | tuple" = ()
    # Attention heads: which heads' outputs reach out_proj, per token (see `head_rows`); every head's K/V is kept
    # exact. `head_k`: heads kept per token in every layer (0 = each layer's calibrated K; oracle and fixed need it).
    heads: HeadSparsity = HeadSparsity.NONE
    head_k: int = 0
    # Predicted or fixed heads at a decode step of several sequences: False, each sequence keeps its own heads; True,
    # every sequence keeps the union of the batch's chosen heads (more heads each, for no more weight bytes where the
    # step computes the union anyway: `dejavu_jax.sparse_attention`). Whole-sequence forwards choose per token.
    head_union: bool = False
    # How predicted heads are chosen, where it should differ from the MLP's `selection` (benchmarks, studies); None:
    # as `selection` (the command line's one --selection flag sets both).
    head_selection: Optional[Selection] = None

    def __post_init__(self):
        object.__setattr__(self, "mlp", MLPSparsity(self.mlp))
        object.__setattr__(self, "selection", Selection(self.selection))
        if self.head_selection is not None:
            object.__setattr__(self, "head_selection", Selection(self.head_selection))
        object.__setattr__(self, "heads", HeadSparsity(self.heads))
        if not isinstance(self.head_k, int) or self.head_k < 0:
            raise ValueError(f"head_k must be a non-negative int (0 = the calibrated K). Got {self.head_k!r}")
        if self.heads in (HeadSparsity.ORACLE, HeadSparsity.FIXED) and self.head_k == 0:
            raise ValueError(f"the {self.heads.value} head selection needs head_k (how many heads each token keeps)")
        if self.head_union and self.heads not in (HeadSparsity.PREDICTED, HeadSparsity.FIXED):
            raise ValueError(f"head_union applies to predicted or fixed heads. Got heads={self.heads.value}")
        if not isinstance(self.tuning, DecodeTuning):  # bad names or values fail here, not inside a trace
            object.__setattr__(self, "tuning", DecodeTuning.parse(self.tuning))

    @property
    def head_selection_rule(self) -> Selection:
        """How predicted heads are chosen: `head_selection`, else `selection`."""
        return self.head_selection or self.selection

    @property
    def needs_weights(self) -> bool:
        return self.mlp == MLPSparsity.PREDICTED or self.heads in (HeadSparsity.PREDICTED, HeadSparsity.FIXED)

    @property
    def recent_window(self) -> int:
        """R, the tokens of recent attention inputs the KV cache must keep per layer for this policy's decode steps
        (`KVCache.recent_inputs`); 0 = none."""
        chooses = self.heads in (HeadSparsity.PREDICTED, HeadSparsity.FIXED)
        return self.tuning.head_window if chooses and self.tuning.head_kv == "repair" else 0

    def describe(self) -> str:
        mlp = f"predicted ({self.selection.value})" if self.mlp == MLPSparsity.PREDICTED else self.mlp.value
        if self.heads == HeadSparsity.NONE:
            return mlp
        k = f"K={self.head_k}" if self.head_k else "calibrated K"
        if self.heads == HeadSparsity.PREDICTED:
            rule = self.head_selection_rule
            k = f"threshold, at most {k}" if rule == Selection.THRESHOLD else f"top-K, {k}"
        union = ", the batch's union at decode" if self.head_union else ""
        return f"MLP {mlp}, heads {self.heads.value} ({k}{union})"


DENSE = SparsityPolicy()


@struct.dataclass
class MLPPredictor:
    """One layer's low-rank predictor in the decode layout: scores = standardize(x) · w1_t.T + b1 (rounded to the
    weights' dtype) · w2_t.T + b2. The rank is zero-padded to a power of two (exact) for the kernels. An MLP
    predictor scores the ffn neurons; a head predictor (`SparseWeights.heads`, from `decode_predictor` with no
    threshold) has the same layout with the heads as outputs, so its first layer runs on the same kernel."""

    w1_t: jax.Array  # [r, d]
    b1: jax.Array  # [r]
    w2_t: jax.Array  # [ffn, r]  neuron-major: a neuron's scoring weights are one row
    b2: jax.Array  # [ffn] fp32
    threshold: jax.Array  # [] fp32: a neuron is chosen when its score >= threshold
    # [ffn] fp32, or None: w2_t holds int8 codes and a neuron's scoring weights are w2_t[n] * w2_scale[n]
    # (`decode_predictor(..., int8_scores=True)`)
    w2_scale: Optional[jax.Array] = None
    k: int = struct.field(pytree_node=False, default=0)  # top-K count
    normalize_input: bool = struct.field(pytree_node=False, default=True)
    # False: `threshold` is −inf for want of a calibrated one (`decode_predictor` with None); a head predictor then
    # chooses top-K under either selection
    calibrated_threshold: bool = struct.field(pytree_node=False, default=True)

    @property
    def num_outputs(self) -> int:
        return self.w2_t.shape[0]

    @property
    def keep(self) -> int:
        """K: the calibrated count, or every output when uncalibrated (as `LowRankPredictor.keep`)."""
        return self.k if self.k > 0 else self.num_outputs

    def hidden(self, x):
        """x [..., d] -> [..., r] in the weights' dtype (the input of the second matmul)."""
        return _first_layer(self.w1_t, self.b1, x, normalize=self.normalize_input)

    def scores(self, x):
        """x [..., d] -> fp32 scores [..., ffn]."""
        return self.scores_from_hidden(self.hidden(x))

    def scores_from_hidden(self, p):
        """p [..., r] (from `hidden`) -> fp32 scores [..., ffn]."""
        if self.w2_scale is None:
            if jnp.issubdtype(self.w2_t.dtype, jnp.integer):
                raise ValueError("int8 scoring rows need their w2_scale (see decode_predictor)")
            return jnp.einsum("...r,nr->...n", p, self.w2_t, preferred_element_type=jnp.float32) + self.b2
        # int8 codes: the fp32 dot of p with a neuron's codes, times its scale (what the fc1 kernel computes). The
        # codes (|c| <= 127) are exact in p's dtype and their products with p exact in fp32, so the dot runs in p's
        # dtype (no fp32 copy of the rows; full fp32 precision where p is fp32).
        precision = jax.lax.Precision.HIGHEST if p.dtype == jnp.float32 else None
        dots = jnp.einsum(
            "...r,nr->...n", p, self.w2_t.astype(p.dtype), preferred_element_type=jnp.float32, precision=precision
        )
        return dots * self.w2_scale + self.b2

    def decode_hidden(self, x, tuning: "DecodeTuning", stream: int = 0, layernorm=None, second=None, choose=None):
        """`hidden` of one decode step's x [B, d], on the Pallas kernel unless `tuning` says XLA. `stream` > 0: issued
        on that GPU stream (`DecodeTuning.hidden_stream`). `layernorm` = (scale, bias, eps) (Pallas kernel only):
        returns (hidden, LayerNorm(x)) from the one launch (`attention_layernorm_and_hidden`). `second` (Pallas
        kernel only): another predictor reading the same x (same `normalize_input`), whose hidden comes from the
        same launch: returns (hidden, its hidden[, LayerNorm(x)]). `choose` = (k, threshold or None, sync), with a
        `second` that scores heads: the launch also chooses them (`HeadChooser`): returns (hidden, the heads idx
        [B, min(k, H)][, LayerNorm(x)], sync)."""
        if tuning.hidden == "xla":
            if layernorm is not None or second is not None:
                raise ValueError("only the predictor_hidden kernel writes a LayerNorm or a second hidden vector")
            compute = functools.partial(_first_layer, self.w1_t, self.b1, normalize=self.normalize_input)
        else:
            compute = functools.partial(
                predictor_hidden,
                w1_t=self.w1_t,
                b1=self.b1,
                normalize=self.normalize_input,
                eps=NORM_EPS,
                block_r=tuning.hidden_block_r or None,
                sum_once=bool(tuning.hidden_sum_once),
                **kernel_layernorm.wrapper_kwargs(layernorm),
                **({} if second is None else dict(w1_t_second=second.w1_t, b1_second=second.b1)),
                **({} if choose is None else dict(chooser=_head_chooser(second, *choose))),
            )
        return on_stream(stream, compute, x) if stream else compute(x)

    def decode_mask(self, p, tuning: "DecodeTuning"):
        """[ffn] int32 row mask of one decode step: 1 where the score from p [B, r] (`decode_hidden`) reaches the
        threshold for some batch row. `tuning.scores` "kernel": the `threshold_mask` kernel; else XLA's scores."""
        if tuning.scores == "kernel":
            return threshold_mask(p, self.w2_t, self.b2, self.threshold, w2_scale=self.w2_scale, knobs=tuning.knobs)
        chosen = self.scores_from_hidden(p) >= self.threshold
        return jnp.any(chosen, axis=0).astype(jnp.int32)


def _head_chooser(head: MLPPredictor, k: int, threshold, sync) -> HeadChooser:
    """The `predictor_hidden` chooser of head predictor `head`'s k heads (threshold None: top-K)."""
    return HeadChooser(head.w2_t, head.b2, threshold, sync, k)


def on_stream(stream: int, fn, *args):
    """fn(*args) issued on GPU stream `stream` as one call (`jax.experimental.compute_on`, honoured by XLA with
    `--xla_gpu_experimental_stream_annotation=true`). fn must trace to no jitted call of its own (its kernels'
    wrappers are `inline`): the annotation would reach those calls too, and XLA refuses an annotated call nested in
    another. jax 0.10 takes compute_on as a context manager around a jitted call; jax 0.11 wraps the function and
    asks for its outputs' memory space (device memory here)."""
    if "out_memory_spaces" in inspect.signature(compute_on).parameters:
        from jax._src.core import MemorySpace  # no public name in jax 0.11

        return compute_on(fn, compute_type=f"gpu_stream:{stream}", out_memory_spaces=MemorySpace.Device)(*args)
    with compute_on(f"gpu_stream:{stream}"):
        return jax.jit(fn)(*args)


def _first_layer(w1_t, b1, x, *, normalize: bool):
    """The predictor's first layer in XLA: (standardize(x) if normalize else x) · w1_tᵀ + b1, in w1_t's dtype."""
    h = standardize(x) if normalize else x.astype(jnp.float32)
    h = jnp.einsum("...d,rd->...r", h.astype(w1_t.dtype), w1_t, preferred_element_type=jnp.float32)
    return (h + b1.astype(jnp.float32)).astype(w1_t.dtype)


def int8_rows(w):
    """w [n, r] -> (codes [n, r] int8, scale [n] fp32): per row, symmetric, round to nearest; codes * scale[:, None]
    is within scale / 2 of w (an all-zero row gets scale 1 and zero codes)."""
    w = jnp.asarray(w, jnp.float32)
    top = jnp.max(jnp.abs(w), axis=1)
    scale = jnp.where(top > 0, top / 127.0, 1.0)
    codes = jnp.clip(jnp.round(w / scale[:, None]), -127, 127).astype(jnp.int8)
    return codes, scale


def decode_predictor(
    p: LowRankPredictor, threshold: Optional[float], dtype=None, int8_scores: bool = False
) -> MLPPredictor:
    """`p` in the decode layout (transposed, rank padded to a power of two, weights in `dtype`). `int8_scores`: the
    second matrix (w2_t, the scoring rows a decode step reads for every neuron: most of the predictor's bytes) as
    int8 codes with one fp32 scale per neuron (`int8_rows`): r + 4 bytes a neuron against 2r in fp16, scores within
    a rounding of the weights of the float ones; the threshold is used as calibrated."""
    dtype = dtype or p.w1.dtype
    r = p.rank
    r_pad = max(16, 1 << (r - 1).bit_length())
    pad = r_pad - r
    w1_t = jnp.pad(jnp.asarray(p.w1).T, ((0, pad), (0, 0))).astype(dtype)
    b1 = jnp.pad(jnp.asarray(p.b1), (0, pad)).astype(dtype)
    w2_t = jnp.pad(jnp.asarray(p.w2).T, ((0, 0), (0, pad)))
    w2_t, w2_scale = int8_rows(w2_t) if int8_scores else (w2_t.astype(dtype), None)
    thr = -jnp.inf if threshold is None else threshold
    return MLPPredictor(
        w1_t=w1_t,
        b1=b1,
        w2_t=w2_t,
        b2=jnp.asarray(p.b2, jnp.float32),
        threshold=jnp.asarray(thr, jnp.float32),
        w2_scale=w2_scale,
        k=p.keep,
        normalize_input=p.normalize_input,
        calibrated_threshold=threshold is not None,
    )


@struct.dataclass
class SparseWeights:
    """The traced half of sparsity: per layer an MLP predictor, or fixed row masks (None where unused)."""

    mlp: Optional[tuple] = None  # tuple[MLPPredictor, ...], one per layer
    fixed_rows: Optional[tuple] = None  # tuple of [ffn] int32 masks, one per layer
    # layer l's head predictor (reads layer l-1's input), in the decode layout (`decode_predictor` with no threshold)
    heads: Optional[tuple] = None  # tuple[MLPPredictor, ...]
    head_schedule: Optional[jax.Array] = None  # [layers, heads] int32 (`head_schedule`): `HeadSparsity.FIXED`'s heads
    mlp_input: str = struct.field(pytree_node=False, default="attn_input")


def sparse_weights_from_predictors(
    predictors: Predictors,
    dtype=None,
    thresholds=None,
    selection: Selection = Selection.THRESHOLD,
    mlp: bool = True,
    int8_scores: bool = False,
) -> SparseWeights:
    """Decode-layout MLP predictors (unless `mlp` is False) and head predictors; `thresholds` (one per layer)
    override the calibrated ones (e.g. −inf = all). Top-K selection needs no threshold. `int8_scores`: the MLP
    predictors' scoring rows as int8 (`decode_predictor`). The head predictors carry their calibrated thresholds
    (`Predictors.head_threshold`; where there are none, heads are chosen top-K under either selection)."""
    head_thresholds = predictors.head_threshold or [None] * predictors.num_layers
    heads = tuple(decode_predictor(p, t, dtype) for p, t in zip(predictors.heads, head_thresholds))
    if not mlp:
        return SparseWeights(heads=heads, mlp_input=predictors.mlp_input)
    if Selection(selection) == Selection.TOPK and thresholds is None and predictors.mlp_threshold is None:
        thresholds = [None] * predictors.num_layers
    if thresholds is None:
        thresholds = predictors.mlp_threshold
    if thresholds is None:
        raise ValueError(
            "these predictors have no calibrated thresholds (run `python -m train calibrate`), so "
            "threshold selection cannot be used; choose top-K selection"
        )
    if len(thresholds) != predictors.num_layers:
        raise ValueError(f"need one threshold per layer ({predictors.num_layers}). Got {len(thresholds)}")
    return SparseWeights(
        mlp=tuple(decode_predictor(p, t, dtype, int8_scores) for p, t in zip(predictors.mlp, thresholds)),
        heads=heads,
        mlp_input=predictors.mlp_input,
    )


@struct.dataclass
class MLPRows:
    """The rows one layer's MLP computes. `kind` (static): "dense", "lossless", "mask" (row mask [ffn], or per
    token [B, T, ffn]), "threshold" (decode: chosen inside the fc1 kernel from `hidden` [B, r] and `predictor`),
    "topk" (decode: each row's `predictor.k` best from `hidden` and `predictor`, chosen beside the fc1 kernel, per
    shard under tensor parallelism: `sparse_mlp.mlp_decode_rows_split`)."""

    kind: str = struct.field(pytree_node=False, default="dense")
    mask: Optional[jax.Array] = None
    hidden: Optional[jax.Array] = None
    predictor: Optional[MLPPredictor] = None
    knobs: tuple = struct.field(pytree_node=False, default=())  # the decode kernels' plan overrides


def topk_mask(scores, k: int):
    """[..., ffn] scores -> [..., ffn] bool: each token's k best."""
    kth = jax.lax.top_k(scores, k)[0][..., -1:]
    return scores >= kth


def _decode_kernels(policy: SparsityPolicy, decode: bool, batch: int, tokens: int) -> bool:
    """Whether a step of `batch` x `tokens` runs the row-masked decode kernels (else the per-token or dense path)."""
    return policy.decode_kernels and decode and tokens == 1 and batch <= SPARSE_DECODE_MAX_BATCH


def mlp_rows(
    policy: SparsityPolicy,
    weights: Optional[SparseWeights],
    layer: int,
    predictor_input,
    decode: bool,
    hidden=None,
) -> MLPRows:
    """The rows layer `layer` computes for tokens whose predictor input is `predictor_input` [B, T, d].

    `decode`: a one-token step that may use the row-masked kernels (batch small enough); otherwise per-token masks.
    `hidden`: the predictor's first layer of this decode step [B, r] where it was already computed
    (`LayerChoice.before_attention`: fused with the attention LayerNorm, or on a side stream); None = computed here.
    """
    batch, tokens = predictor_input.shape[:2]
    kernels = _decode_kernels(policy, decode, batch, tokens)
    tuning = policy.tuning
    if weights is not None and weights.fixed_rows is not None:
        mask = weights.fixed_rows[layer]
        return (
            MLPRows("mask", mask=mask, knobs=tuning.knobs)
            if kernels
            else MLPRows("mask", mask=jnp.broadcast_to(mask != 0, (batch, tokens, mask.shape[0])))
        )
    if policy.mlp == MLPSparsity.NONE:
        return MLPRows("dense")
    if policy.mlp == MLPSparsity.LOSSLESS:
        if kernels or not (decode and policy.decode_kernels):
            return MLPRows("lossless", knobs=tuning.knobs)
        return MLPRows("dense")
    check_sparsity(policy, weights)
    predictor = weights.mlp[layer]
    if decode and not kernels and policy.decode_kernels:
        return MLPRows("dense")  # the batch's union would be nearly every row: dense is exact and faster
    if kernels:
        if hidden is None:
            hidden = predictor.decode_hidden(predictor_input[:, 0], tuning)  # [B, r]
        if policy.selection == Selection.THRESHOLD and tuning.scores == "fc1":
            return MLPRows("threshold", hidden=hidden, predictor=predictor, knobs=tuning.knobs)
        if policy.selection == Selection.TOPK:  # chosen where the neurons are (per shard under tp: sparse_mlp)
            return MLPRows("topk", hidden=hidden, predictor=predictor, knobs=tuning.knobs)
        return MLPRows("mask", mask=predictor.decode_mask(hidden, tuning), knobs=tuning.knobs)
    return MLPRows("mask", mask=_choose(policy, predictor, predictor.scores(predictor_input)))


def _hidden_from_attn_input(policy: SparsityPolicy, weights: Optional[SparseWeights], attn_input, decode: bool):
    """Whether this step's MLP predictor reads the attention block's input `attn_input` [B, T, d] for the predicted
    decode kernels, so its first layer can run before (or beside) the attention block."""
    batch, tokens = attn_input.shape[:2]
    return (
        policy.mlp == MLPSparsity.PREDICTED
        and _decode_kernels(policy, decode, batch, tokens)
        and weights is not None
        and weights.fixed_rows is None
        and weights.mlp is not None
        and weights.mlp_input == "attn_input"
    )


def head_predictor_ahead(policy: SparsityPolicy, weights: Optional[SparseWeights], layer: int, attn_input):
    """The head predictor of layer `layer` + 1 whose first layer rides on layer `layer`'s MLP predictor launch
    (`DecodeTuning.head_hidden_ahead`), or None: where that layer's heads are predicted and scored on the kernel
    (`head_scores`' decode path, K below every head) from the lookahead input, which is `attn_input` [B, T, d], and
    the two predictors standardize alike."""
    if not (
        policy.tuning.head_hidden_ahead
        and policy.heads == HeadSparsity.PREDICTED
        and weights is not None
        and weights.heads is not None
        and weights.mlp is not None
        and layer + 1 < len(weights.heads)
        and _head_hidden_on_kernel(policy, attn_input)
    ):
        return None
    head, mlp = weights.heads[layer + 1], weights.mlp[layer]
    if not _scores_heads(policy, head):
        return None  # every head kept: nothing to score
    if head.normalize_input != mlp.normalize_input or head.w1_t.dtype != mlp.w1_t.dtype:
        return None
    return head


def attention_layernorm_and_hidden(
    policy: SparsityPolicy,
    weights: Optional[SparseWeights],
    layer: int,
    attn_input,
    layernorm,
    decode: bool,
    head_ahead: Optional["MLPPredictor"] = None,
    sync=None,
):
    """(LayerNorm(attn_input) [B, 1, d], the MLP predictor's first layer [B, r]) from one `predictor_hidden` launch,
    where layer `layer`'s step runs the predicted decode kernels with a predictor that reads the attention block's
    input `attn_input` [B, T, d] on the kernel (on the main stream), and `DecodeTuning.hidden_layernorm` is on;
    `layernorm` = the attention LayerNorm's (scale, bias, eps). None elsewhere: the caller applies its LayerNorm and
    `mlp_rows` computes the predictor's first layer. Both outputs equal the separate computations to a rounding (the
    kernel's LayerNorm is the model's formula, summed in another order), so this changes the kernels a step runs, not
    what it computes. With `head_ahead` (`head_predictor_ahead`): (..., its first layer [B, r2] or, where
    `chooses_heads_ahead` and given the step's `sync` counters, its layer's `HeadsChosenAhead`, sync)."""
    tuning = policy.tuning
    if not (
        tuning.hidden == "pallas"
        and tuning.hidden_layernorm
        and not tuning.hidden_stream
        and _hidden_from_attn_input(policy, weights, attn_input, decode)
    ):
        return None
    if head_ahead is not None and sync is not None and chooses_heads_ahead(policy, head_ahead):
        threshold = head_ahead.threshold if _head_threshold_applies(policy, head_ahead) else None
        choose = (_predicted_head_k(policy, head_ahead), threshold, sync)
        hidden, idx, x, sync = weights.mlp[layer].decode_hidden(
            attn_input[:, 0], tuning, layernorm=layernorm, second=head_ahead, choose=choose
        )
        return x[:, None], hidden, HeadsChosenAhead(idx), sync
    if head_ahead is not None:  # `head_predictor_ahead`: also the next layer's head predictor's first layer
        hidden, head_hidden, x = weights.mlp[layer].decode_hidden(
            attn_input[:, 0], tuning, layernorm=layernorm, second=head_ahead
        )
        return x[:, None], hidden, head_hidden, sync
    hidden, x = weights.mlp[layer].decode_hidden(attn_input[:, 0], tuning, layernorm=layernorm)
    return x[:, None], hidden


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """What chooses one layer's MLP neurons inside a forward pass (the model's handle on this module):
    `before_attention` runs what the policy computes ahead of the attention block (the attention LayerNorm fused with
    the predictor's first layer, or that layer on a side stream), `rows` gives the layer's `MLPRows` (`mlp_rows`,
    from the input its predictors read)."""

    policy: SparsityPolicy
    weights: Optional[SparseWeights]
    layer: int
    decode: bool  # a one-token step with a cache

    def before_attention(self, attn_input, layernorm=None):
        """(LayerNorm(attn_input) [B, T, d] or None, `ahead`: what of the MLP's choice was made here, or None) for
        the attention block's input `attn_input`; `layernorm`: the attention LayerNorm's (scale, bias, eps) where the
        block applies one first (pre-LayerNorm models), else None. None parts are left to the caller (its
        LayerNorm) and to `rows`, which takes `ahead`:
        - `attention_layernorm_and_hidden` where it applies: the LayerNorm and the predictor's first layer [B, r]
          from one launch;
        - with `DecodeTuning.hidden_stream` (and the predicted decode kernels reading `attn_input`): the first layer
          [B, r], or with threshold selection and `DecodeTuning.scores` other than "fc1" the whole choice (an
          `MLPRows` of kind "mask"), issued here on that GPU stream, so it can run beside the attention block."""
        if layernorm is not None:
            fused = attention_layernorm_and_hidden(
                self.policy, self.weights, self.layer, attn_input, layernorm, self.decode
            )
            if fused is not None:
                return fused
        tuning = self.policy.tuning
        if tuning.hidden_stream and _hidden_from_attn_input(self.policy, self.weights, attn_input, self.decode):
            predictor, x = self.weights.mlp[self.layer], attn_input[:, 0]
            if self.policy.selection == Selection.THRESHOLD and tuning.scores != "fc1":
                mask = on_stream(tuning.hidden_stream, functools.partial(_decode_choice, tuning=tuning), predictor, x)
                return None, MLPRows("mask", mask=mask, knobs=tuning.knobs)
            return None, predictor.decode_hidden(x, tuning, tuning.hidden_stream)
        return None, None

    def before_attention_with_heads(self, attn_input, layernorm=None, sync=None):
        """`before_attention` plus the first layer of the next layer's head predictor [B, r] where
        `head_predictor_ahead` lets it ride on this launch, or that layer's chosen heads (`HeadsChosenAhead`) where
        `chooses_heads_ahead` and the step's counters `sync` (kernels/split_sum.py; None: not on one device) are
        given; None elsewhere: (LayerNorm or None, ahead, head hidden or choice, sync)."""
        head = None if layernorm is None else head_predictor_ahead(self.policy, self.weights, self.layer, attn_input)
        if head is not None:
            fused = attention_layernorm_and_hidden(
                self.policy, self.weights, self.layer, attn_input, layernorm, self.decode, head_ahead=head, sync=sync
            )
            if fused is not None:
                return fused
        return (*self.before_attention(attn_input, layernorm), None, sync)

    def carries_head_ahead(self, attn_input) -> bool:
        """Whether this layer's MLP predictor launch would also compute the next layer's head predictor's first layer
        (`head_predictor_ahead`), so that `before_attention_with_heads` is worth calling even where the attention's
        q/k/v kernel applies the LayerNorm itself."""
        return head_predictor_ahead(self.policy, self.weights, self.layer, attn_input) is not None

    def rows(self, attn_input, mlp_input, ahead=None) -> MLPRows:
        """`attn_input` / `mlp_input` [B, T, d]: the residual before the attention / MLP LayerNorm; `ahead`: what
        `before_attention` returned (the predictor's first layer, or the whole choice)."""
        if isinstance(ahead, MLPRows):
            return ahead
        reads = "attn_input" if self.weights is None else self.weights.mlp_input
        predictor_input = attn_input if reads == "attn_input" else mlp_input
        return mlp_rows(self.policy, self.weights, self.layer, predictor_input, self.decode, ahead)


def _decode_choice(predictor: MLPPredictor, x, tuning: DecodeTuning):
    """One decode step's row mask [ffn] from x [B, d]: the predictor's first layer, then its threshold scores (no
    jitted call inside, so that `on_stream` issues the whole choice as one call)."""
    return predictor.decode_mask(predictor.decode_hidden(x, tuning), tuning)


def _choose(policy: SparsityPolicy, predictor: MLPPredictor, scores):
    """[..., ffn] scores -> [..., ffn] bool: the chosen neurons of each token."""
    if policy.selection == Selection.THRESHOLD:
        return scores >= predictor.threshold
    return topk_mask(scores, predictor.k)


def for_decode_batch(
    policy: SparsityPolicy, weights: Optional[SparseWeights], batch: int
) -> tuple[SparsityPolicy, Optional[SparseWeights]]:
    """The (policy, weights) a generation of `batch` sequences compiles with. Above `SPARSE_DECODE_MAX_BATCH` the
    decode steps of a kernel policy run the dense MLP anyway (and the prefill is dense), so the generation is handed
    the dense policy and no weights: it then runs the dense program itself (one compile, shared with dense
    generation), not merely an equivalent one; a head policy keeps its heads (and weights) with a dense MLP. Fixed row
    masks (benchmarks' ceiling) are kept as given."""
    fixed = weights is not None and weights.fixed_rows is not None
    if batch > SPARSE_DECODE_MAX_BATCH and policy.decode_kernels and not fixed:
        if policy.heads == HeadSparsity.NONE:
            return DENSE, None
        # the MLP's tuning back to its defaults (its MLP is dense), every head field (named head_*) kept
        mlp_fields = [f.name for f in dataclasses.fields(DecodeTuning) if not f.name.startswith("head_")]
        heads_tuning = dataclasses.replace(policy.tuning, **{name: getattr(DecodeTuning, name) for name in mlp_fields})
        return (
            dataclasses.replace(policy, mlp=MLPSparsity.NONE, selection=Selection.THRESHOLD, tuning=heads_tuning),
            weights,
        )
    return policy, weights


@struct.dataclass
class HeadRows:
    """Which heads' outputs reach out_proj. `kind` (static): "all"; "mask" (per token [B, T, heads] bool, at most
    `k` heads per token, or at most B·k under `SparsityPolicy.head_union`); "oracle" (the `k` heads of largest
    output norm per token, decided inside attention).
    `idx` [B, T, k] int32 or None: with "mask", the same choice as index lists (distinct heads, exactly the True
    entries of `mask`), which a batch-1 decode step uses directly instead of compacting the mask; with `padded`
    (static: threshold selection, whose count varies under the bound k) some entries may be -1 (no head).
    `decode_kernels` (static: `SparsityPolicy.decode_kernels`, for batches of at most
    `DecodeTuning.head_max_batch`): a decode step computes only the masked heads (False: every head, outputs masked:
    the reference, and the path of larger batches); `head_kv` and `window` (static, from `DecodeTuning`)
    say how it keeps K/V exact."""

    kind: str = struct.field(pytree_node=False, default="all")
    mask: Optional[jax.Array] = None
    k: int = struct.field(pytree_node=False, default=0)
    idx: Optional[jax.Array] = None
    decode_kernels: bool = struct.field(pytree_node=False, default=True)
    head_kv: str = struct.field(pytree_node=False, default="all")
    window: int = struct.field(pytree_node=False, default=16)
    knobs: tuple = struct.field(pytree_node=False, default=())  # `DecodeTuning.head_knobs`
    padded: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class HeadsChosenAhead:
    """A layer's predicted heads as the previous layer's predictor launch chose them (`chooses_heads_ahead`)."""

    idx: jax.Array  # [B, k] int32: `exactly_k`'s list, or `threshold_k`'s (-1 below the threshold)


def chooses_heads_ahead(policy: SparsityPolicy, head: MLPPredictor) -> bool:
    """Whether the launch that computes head predictor `head`'s first layer ahead (`head_predictor_ahead`) also
    chooses its heads (`DecodeTuning.head_choose_ahead`; fp16/bf16 scoring rows, at most `CHOOSE_MAX_HEADS`)."""
    return bool(policy.tuning.head_choose_ahead) and head.w2_scale is None and head.num_outputs <= CHOOSE_MAX_HEADS


def head_rows(
    policy: SparsityPolicy,
    weights: Optional[SparseWeights],
    layer: int,
    lookahead_input,
    n_heads: int,
    first_slot=0,
    hidden=None,
) -> HeadRows:
    """The heads layer `layer` (of `n_heads` heads) keeps for tokens whose lookahead input (layer l-1's residual
    before its attention LayerNorm; layer 0: its own) is `lookahead_input` [B, T, d], the chunk starting at cache
    slot `first_slot` (a scheduled choice depends on the slot, so a decode step and the whole-sequence forward
    choose alike). Predicted heads with K >= n_heads keep every head; scheduled ones still go through the mask
    (the sparse decode path with every head chosen). With `policy.head_union`, a decode step (T = 1) of several
    sequences gives every sequence the union of their heads (mask only: the rows no longer hold k heads each).
    `hidden` [B, r]: the predictor's first layer of this step, where the previous layer's launch computed it
    (`head_predictor_ahead`), or its chosen heads (`HeadsChosenAhead`); None computes it here."""
    if policy.heads == HeadSparsity.NONE:
        return HeadRows()
    if policy.heads == HeadSparsity.ORACLE:
        return HeadRows("oracle", k=policy.head_k)
    check_sparsity(policy, weights)
    tuning = policy.tuning
    batch, tokens = lookahead_input.shape[:2]
    how = dict(
        decode_kernels=policy.decode_kernels and batch <= tuning.head_max_batch,
        head_kv=tuning.head_kv,
        window=tuning.head_window,
        knobs=tuning.head_knobs,
    )
    if policy.heads == HeadSparsity.FIXED:
        k = min(policy.head_k, n_heads)
        mask, idx = scheduled_heads(weights.head_schedule, layer, first_slot, batch, tokens, n_heads, k)
    else:
        predictor = weights.heads[layer]
        k = _predicted_head_k(policy, predictor)
        if not _scores_heads(policy, predictor):
            return HeadRows()
        if isinstance(hidden, HeadsChosenAhead):  # chosen by the previous layer's predictor launch
            idx = hidden.idx[:, None]  # [B, 1, k]
            mask = mask_of(idx, n_heads)  # -1 entries match no head
            how["padded"] = _head_threshold_applies(policy, predictor)
        else:
            if hidden is not None:  # its first layer, computed by the previous layer's predictor launch
                scores = predictor.scores_from_hidden(hidden)[:, None]
            else:
                scores = head_scores(predictor, lookahead_input, policy)
            if _head_threshold_applies(policy, predictor):
                mask, idx = threshold_k(scores, predictor.threshold, k, tuning.head_topk)
                how["padded"] = True
            else:
                mask, idx = exactly_k(scores, k, tuning.head_topk)
    if policy.head_union and tokens == 1 and batch > 1:
        # at most batch·k heads: the size the decode step's union list already has
        mask, idx = jnp.broadcast_to(jnp.any(mask, axis=0, keepdims=True), mask.shape), None
    return HeadRows("mask", mask=mask, k=k, idx=idx, **how)


def head_scores(predictor: MLPPredictor, x, policy: SparsityPolicy):
    """A head predictor's fp32 scores [B, T, H] on x [B, T, d]. A kernel policy's decode step (T = 1, B <= the
    kernel's batch bound) computes the first layer on the `predictor_hidden` kernel, as the MLP predictor does (XLA
    read the training layout's [d, r] weight for one token at a fraction of bandwidth); whole sequences are scored by
    XLA."""
    if _head_hidden_on_kernel(policy, x):
        return predictor.scores_from_hidden(predictor.decode_hidden(x[:, 0], policy.tuning))[:, None]
    return predictor.scores(x)


def _head_hidden_on_kernel(policy: SparsityPolicy, x) -> bool:
    """Whether a head predictor's first layer on x [B, T, d] runs on the `predictor_hidden` kernel (`head_scores`)."""
    batch, tokens = x.shape[:2]
    return tokens == 1 and policy.decode_kernels and batch <= HIDDEN_MAX_BATCH


def _predicted_head_k(policy: SparsityPolicy, predictor: MLPPredictor) -> int:
    """The heads a predicted layer keeps (top-K), or at most keeps (threshold): the policy's `head_k`, else the
    predictor's calibrated K."""
    return policy.head_k or predictor.keep


def _head_threshold_applies(policy: SparsityPolicy, predictor: MLPPredictor) -> bool:
    """Threshold selection of heads, by a calibrated threshold (without one a layer chooses top-K)."""
    return policy.head_selection_rule == Selection.THRESHOLD and predictor.calibrated_threshold


def head_selection_used(policy: SparsityPolicy, weights: SparseWeights) -> str:
    """ "threshold" or "topk": how `policy`'s predicted heads are chosen with these weights (threshold selection needs
    calibrated head thresholds; without them a layer chooses top-K)."""
    by_threshold = [_head_threshold_applies(policy, p) for p in weights.heads]
    return Selection.THRESHOLD.value if all(by_threshold) else Selection.TOPK.value


def _scores_heads(policy: SparsityPolicy, predictor: MLPPredictor) -> bool:
    """Whether a predicted layer's heads need its predictor's scores: top-K below every head, or a threshold (which
    may drop heads even under a bound of every head)."""
    if _head_threshold_applies(policy, predictor):
        return True
    return _predicted_head_k(policy, predictor) < predictor.num_outputs


def exactly_k(scores, k: int, method: str = "sort"):
    """[..., n] scores -> (mask [..., n] bool with exactly k True per row, idx [..., k] int32: the same k entries,
    distinct, in `lax.top_k` order: by score, descending, ties to the lower index). A decode step sizes its head list
    from k, so a tie must not choose more.

    `method` (the same result, two programs): "sort" is `lax.top_k` (on a GPU a sort kernel per call); "rank"
    (n <= `RANK_MAX_ENTRIES`) counts for each entry the entries ranked above it (a higher score, or an equal one at a
    lower index) and takes the entries of rank 0 .. k-1: comparisons of every pair, elementwise work XLA fuses, no
    sort. Scores must not be NaN."""
    if method == "sort":
        idx = jax.lax.top_k(scores, k)[1].astype(jnp.int32)  # [..., k]
        return mask_of(idx, scores.shape[-1]), idx
    n = scores.shape[-1]
    if method != "rank" or n > RANK_MAX_ENTRIES:
        raise ValueError(
            f"method must be one of {TOPK_METHODS}, 'rank' for at most {RANK_MAX_ENTRIES} entries. "
            f"Got {method!r} for {n}"
        )
    order = jnp.arange(n, dtype=jnp.int32)
    mine, other = scores[..., :, None], scores[..., None, :]  # [..., n (entry), n (other entry)]
    above = (other > mine) | ((other == mine) & (order[None, :] < order[:, None]))
    rank = jnp.sum(above, axis=-1, dtype=jnp.int32)  # [..., n]: distinct, a permutation of 0 .. n-1
    at_rank = rank[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., k, n]: one True per row
    idx = jnp.sum(jnp.where(at_rank, order, 0), axis=-1, dtype=jnp.int32)
    return rank < k, idx


def threshold_k(scores, threshold, k: int, method: str = "sort"):
    """Threshold selection under a bound: [..., n] scores -> (mask [..., n] bool: the entries whose score reaches
    `threshold` among the k best, idx [..., k] int32: `exactly_k`'s k best in its order, -1 where the score is below
    `threshold`). A row whose count of passing entries exceeds k keeps its k best passing ones (the static bound a
    decode step's head list is compiled for); a threshold of -inf keeps exactly the k best. Scores must not be
    NaN."""
    if k >= scores.shape[-1]:  # no bound to apply: no ranking either
        mask = scores >= threshold
        n = scores.shape[-1]
        return mask, jnp.where(mask, jnp.arange(n, dtype=jnp.int32), -1)
    top, idx = exactly_k(scores, k, method)
    passed = jnp.take_along_axis(scores, idx, axis=-1) >= threshold
    return top & (scores >= threshold), jnp.where(passed, idx, -1)


def mask_of(idx, n: int):
    """idx [..., k] int (distinct entries in [0, n)) -> [..., n] bool, True at those entries."""
    return jnp.any(idx[..., :, None] == jnp.arange(n), axis=-2)


def head_schedule(seed: int, num_layers: int, n_heads: int) -> jax.Array:
    """[num_layers, n_heads] int32: per layer a random order of its heads, drawn on the host from `seed` (the
    `SparseWeights.head_schedule` of `HeadSparsity.FIXED`, read by `scheduled_heads`)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.stack([rng.permutation(n_heads) for _ in range(num_layers)]).astype(np.int32))


def scheduled_heads(schedule, layer: int, first_slot, batch: int, tokens: int, n_heads: int, k: int):
    """k heads per (sequence, token) from a seeded schedule, as `exactly_k` gives them (distinct heads): (mask
    [batch, tokens, n_heads] bool, idx [batch, tokens, k] int32).

    `schedule` [layers, n_heads] (`head_schedule`) holds each layer's random cyclic order of its heads, drawn before
    the program runs; a token keeps the k heads that follow a pseudo-random start in its layer's order, the start a
    hash of the token's cache slot, the sequence's row and the layer. So the choice changes from token to token (a
    timed row's K/V repair runs as with a predictor) with no random draw and no sort in a decode step, whose cost
    would otherwise count against the benchmarks' fixed-heads ceiling rows. (A key folded per layer inside the
    program left a threefry, a sort and a gather per layer in every step of XLA's GPU decode loop: XLA did not
    hoist them.)"""
    if schedule.ndim != 2 or schedule.shape[1] != n_heads or not layer < schedule.shape[0]:
        raise ValueError(
            f"the head schedule is {tuple(schedule.shape)}, but layer {layer} of a model with {n_heads} heads needs "
            "[num_layers, num_heads]: make it with sparsity.head_schedule(seed, num_layers, num_heads)"
        )
    order = schedule[layer]
    slots = (first_slot + jnp.arange(tokens)).astype(jnp.uint32)
    rows = jnp.arange(batch, dtype=jnp.uint32)
    h = (
        slots[None, :] * jnp.uint32(0x9E3779B1)
        + rows[:, None] * jnp.uint32(0x85EBCA77)
        + jnp.uint32((layer * 0x27D4EB2F) & 0xFFFFFFFF)
    )
    h = (h ^ (h >> 15)) * jnp.uint32(0x2C1B3C6D)  # a few rounds of mixing: nearby slots get unrelated starts
    h = (h ^ (h >> 12)) * jnp.uint32(0x297A2D39)
    start = ((h ^ (h >> 15)) % jnp.uint32(n_heads)).astype(jnp.int32)  # [batch, tokens]
    idx = order[(start[..., None] + jnp.arange(k, dtype=jnp.int32)) % n_heads]  # [batch, tokens, k]
    return mask_of(idx, n_heads), idx


def check_sparsity(policy: SparsityPolicy, weights: Optional[SparseWeights]) -> None:
    """A clear error for a policy that lacks what it needs."""
    if policy.mlp == MLPSparsity.PREDICTED and (weights is None or weights.mlp is None):
        raise ValueError(f"MLP sparsity {policy.describe()} needs trained predictors (--predictors DIR)")
    if policy.heads == HeadSparsity.PREDICTED and (weights is None or weights.heads is None):
        raise ValueError(f"head sparsity {policy.describe()} needs trained predictors (--predictors DIR)")
    if policy.heads == HeadSparsity.FIXED and (weights is None or weights.head_schedule is None):
        raise ValueError(
            f"head sparsity {policy.describe()} needs a schedule: "
            "SparseWeights(head_schedule=sparsity.head_schedule(seed, num_layers, num_heads))"
        )
