"""fit: train the per-layer low-rank predictors with optax on the collected activations.

Per layer l:
- MLP predictor: input = layer l's `attn_input` (default: it can run beside attention) or `mlp_input`
  (`--mlp-input`); target = which fc1 outputs are > 0 after ReLU.
- head predictor: input = layer l-1's `attn_input` (lookahead; layer 0 reads its own); target = the heads that
  carry the top `head_label_mass` (default 0.9) of the token's head-norm mass (`metrics.head_labels`).

Loss: unweighted binary cross-entropy (`bce`, the default) or DejaVu's weighted BCE (`weighted_bce`: every negative
weighted by w = label density of the batch + 0.005, positives by 1). DejaVu thresholds sigmoid > 0.5, where the
weighting buys recall; here the sparse model keeps the top K per token, so only the ranking inside a token matters,
and the unweighted loss — an estimate of P(active | x), whose ranking maximizes the expected hits at every K —
needs a smaller K for the same recall in layers 1-7 of the reference model (bench/results/predictors_opt-21m-wiki.md).

The last `holdout` fraction of rows (later documents, never seen in training) is held out; `calibrate` splits it
by alternating windows into calibration and test tokens. Each finished predictor is saved under `<work_dir>/fit-state/<key>/`
(atomic), so an interrupted fit resumes at the next layer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dejavu_jax.predictor_store import save_predictors
from dejavu_jax.predictors import MLP_INPUTS, LowRankPredictor, Predictors, init_low_rank, predictor_scores
from train.activations import ActivationStore
from train.metrics import BinaryCounts, head_labels

LOSSES = ("bce", "weighted_bce")


@dataclasses.dataclass(frozen=True)
class FitOptions:
    rank: Optional[int] = None  # None: min(1000, d_model // 2)
    mlp_input: str = "attn_input"
    loss: str = "bce"
    epochs: int = 5
    batch_size: int = 2048
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    holdout: float = 0.1
    head_label_mass: float = 0.9
    normalize_input: bool = True
    seed: int = 0
    steps_per_call: int = 25  # optimizer steps per jitted call (one lax.scan); the progress bar ticks per call

    def validate(self) -> None:
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"--rank must be a positive integer. Got {self.rank!r}")
        if self.mlp_input not in MLP_INPUTS:
            raise ValueError(f"--mlp-input must be one of {', '.join(MLP_INPUTS)}. Got {self.mlp_input!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}. Got {self.loss!r}")
        for name in ("epochs", "batch_size", "steps_per_call"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer. Got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be > 0. Got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0. Got {self.weight_decay}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"--holdout must be in (0, 1). Got {self.holdout}")
        if not 0 < self.head_label_mass <= 1:
            raise ValueError(f"--head-label-mass must be in (0, 1]. Got {self.head_label_mass}")

    def resolved_rank(self, d_model: int) -> int:
        return self.rank if self.rank is not None else max(1, min(1000, d_model // 2))


def split_rows(num_rows: int, holdout: float, corpus_ended: bool = False) -> tuple[int, int]:
    """(train rows, start of the test half): train = [0, n_train), calibration = [n_train, mid), test = [mid, n).
    `corpus_ended`: the collection stopped because the corpus ran out, so a larger --max-tokens cannot help."""
    n_train = int(num_rows * (1 - holdout))
    if n_train < 1 or num_rows - n_train < 2:
        remedy = (
            "the corpus ended there: collect from a larger one (--data)"
            if corpus_ended
            else "collect more (--max-tokens)"
        )
        raise ValueError(
            f"{num_rows} collected rows are too few to hold out {holdout:.0%} for calibration and testing; {remedy}"
        )
    return n_train, n_train + (num_rows - n_train) // 2


# ---- the training step ------------------------------------------------------------------------------------------


LABEL_RATE_ROWS = 65536  # the first training rows whose label rates set each predictor's initial output bias


def predictor_key(seed: int, layer: int, kind: str):
    """The PRNG key of one predictor (`kind` "mlp" or "heads"): its init and, on disk, its row order."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), layer), 0 if kind == "mlp" else 1)


def initial_predictor(rng, d: int, rank: int, num_outputs: int, label_rate: np.ndarray, normalize_input: bool):
    """(predictor, data rng): random init, output bias = logit of each output's label rate in the training rows."""
    rate = np.clip(label_rate, 1e-4, 1 - 1e-4)
    init_rng, data_rng = jax.random.split(rng)
    predictor = init_low_rank(init_rng, d, rank, num_outputs, normalize_input, output_bias=np.log(rate / (1 - rate)))
    return predictor, data_rng


def make_optimizer(opts: FitOptions, total_steps: int):
    """Adam(W): linear warmup to the peak learning rate, then cosine decay to 5% of it at `total_steps`."""
    warmup = min(100, total_steps // 10 + 1)
    # At least one step of decay after the warmup: optax refuses a schedule without one (a tiny run of one step).
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, opts.learning_rate, warmup, max(total_steps, warmup + 1), end_value=opts.learning_rate * 0.05
    )
    return optax.adamw(schedule, weight_decay=opts.weight_decay) if opts.weight_decay else optax.adam(schedule)


def predictor_loss(predictor: LowRankPredictor, x, labels, loss: str, row_weight=None):
    """Mean per-element (weighted) BCE over rows x [N, d] and labels [N, out] in {0, 1}. `row_weight` [N] in {0, 1}
    leaves rows out (padding); without it every row counts."""
    logits = predictor_scores(predictor, x)
    per_element = optax.sigmoid_binary_cross_entropy(logits, labels)
    if row_weight is None:
        if loss == "weighted_bce":
            w = jax.lax.stop_gradient(labels.mean()) + 0.005
            per_element = per_element * jnp.where(labels > 0, 1.0, w)
        return per_element.mean()
    count = jnp.maximum(row_weight.sum(), 1.0)
    if loss == "weighted_bce":
        w = jax.lax.stop_gradient((labels.mean(-1) * row_weight).sum() / count) + 0.005
        per_element = per_element * jnp.where(labels > 0, 1.0, w)
    return (per_element.mean(-1) * row_weight).sum() / count


def gather_rows(x_all, packed_all, idx, num_outputs: int):
    """Rows `idx` of inputs x_all [N, d] and of packed labels [N, ceil(out/8)]: (x [n, d], labels [n, out] f32)."""
    labels = jnp.unpackbits(jnp.take(packed_all, idx, axis=0), axis=-1, count=num_outputs).astype(jnp.float32)
    return jnp.take(x_all, idx, axis=0), labels


def optimizer_step(predictor, opt_state, optimizer, x, labels, loss: str, row_weight=None):
    """One optimizer step on `predictor_loss`: (predictor, optimizer state, loss before the step)."""
    value, grads = jax.value_and_grad(predictor_loss)(predictor, x, labels, loss, row_weight)
    updates, opt_state = optimizer.update(grads, opt_state, predictor)
    return optax.apply_updates(predictor, updates), opt_state, value


@functools.partial(jax.jit, static_argnames=("optimizer", "loss", "num_outputs"), donate_argnums=(0, 1))
def _train_steps(predictor, opt_state, x_all, packed_all, batch_idx, *, optimizer, loss: str, num_outputs: int):
    """len(batch_idx) optimizer steps in one lax.scan; x_all [N, d] f16 and packed_all [N, bytes] u8 live on device."""

    def step(carry, idx):
        x, labels = gather_rows(x_all, packed_all, idx, num_outputs)
        predictor, opt_state, value = optimizer_step(*carry, optimizer, x, labels, loss)
        return (predictor, opt_state), value

    (predictor, opt_state), losses = jax.lax.scan(step, (predictor, opt_state), batch_idx)
    return predictor, opt_state, losses.mean()


@jax.jit
def _scores(predictor, x):
    return predictor_scores(predictor, x)


def score_rows(predictor: LowRankPredictor, x: np.ndarray, chunk: int = 8192):
    """Yield (start, scores [n, out] np.float32) over x in chunks (bounded memory)."""
    for start in range(0, len(x), chunk):
        block = x[start : start + chunk]
        if len(block) < chunk:  # pad to one compiled shape
            padded = np.zeros((chunk,) + block.shape[1:], block.dtype)
            padded[: len(block)] = block
            yield start, np.asarray(_scores(predictor, jnp.asarray(padded)))[: len(block)]
        else:
            yield start, np.asarray(_scores(predictor, jnp.asarray(block)))


def train_predictor(
    x: np.ndarray,
    packed: np.ndarray,
    num_outputs: int,
    rank: int,
    opts: FitOptions,
    rng,
    desc: str = "fit",
    progress: bool = True,
) -> tuple[LowRankPredictor, dict]:
    """Fit one d -> rank -> num_outputs predictor on x [N, d] and packed labels [N, ceil(out/8)]."""
    n, d = x.shape
    batch = min(opts.batch_size, n)
    steps_per_epoch = max(n // batch, 1)
    total_steps = steps_per_epoch * opts.epochs
    label_rate = np.unpackbits(packed[: min(n, LABEL_RATE_ROWS)], axis=-1, count=num_outputs).mean(0)
    predictor, data_rng = initial_predictor(rng, d, rank, num_outputs, label_rate, opts.normalize_input)
    optimizer = make_optimizer(opts, total_steps)
    opt_state = optimizer.init(predictor)
    x_dev, packed_dev = jnp.asarray(x), jnp.asarray(packed)
    order_rng = np.random.default_rng(np.asarray(jax.random.key_data(data_rng)).ravel()[-1])
    start = time.perf_counter()
    losses = []
    bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for _ in range(opts.epochs):
            perm = order_rng.permutation(n)[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
            for s in range(0, steps_per_epoch, opts.steps_per_call):
                idx = jnp.asarray(perm[s : s + opts.steps_per_call].astype(np.int32))
                predictor, opt_state, loss = _train_steps(
                    predictor,
                    opt_state,
                    x_dev,
                    packed_dev,
                    idx,
                    optimizer=optimizer,
                    loss=opts.loss,
                    num_outputs=num_outputs,
                )
                bar.update(len(idx))
                losses.append(float(loss))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
    return predictor, {
        "steps": total_steps,
        "train_rows": int(n),
        "final_loss": losses[-1],
        "seconds": time.perf_counter() - start,
    }


def threshold_metrics(predictor: LowRankPredictor, x: np.ndarray, labels: np.ndarray) -> dict:
    counts = BinaryCounts()
    for start, scores in score_rows(predictor, x):
        counts.update(scores > 0, labels[start : start + len(scores)])
    return counts.result()


# ---- per-layer driver -------------------------------------------------------------------------------------------


def _fit_key(opts: FitOptions, store: ActivationStore) -> str:
    blob = json.dumps(
        {
            "opts": dataclasses.asdict(opts),
            "rows": store.num_rows,
            "shards": store.manifest["shards"],
            "settings": {k: store.manifest.get(k) for k in ("model", "data", "seq_len")},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _save_layer(path: Path, predictor: LowRankPredictor, info: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(
        tmp,
        w1=np.asarray(predictor.w1),
        b1=np.asarray(predictor.b1),
        w2=np.asarray(predictor.w2),
        b2=np.asarray(predictor.b2),
        info=np.asarray(json.dumps(info)),
    )
    os.replace(tmp, path)


def _load_layer(path: Path, normalize_input: bool) -> tuple[LowRankPredictor, dict]:
    with np.load(path) as f:
        predictor = LowRankPredictor(
            w1=jnp.asarray(f["w1"]),
            b1=jnp.asarray(f["b1"]),
            w2=jnp.asarray(f["w2"]),
            b2=jnp.asarray(f["b2"]),
            normalize_input=normalize_input,
        )
        return predictor, json.loads(str(f["info"]))


def fit(
    store: ActivationStore,
    opts: FitOptions,
    work_dir: Path,
    predictors_dir: Path,
    log: Optional[Callable[[str], None]] = None,
    progress: bool = True,
) -> dict:
    """Train every layer's MLP and head predictors; save them (uncalibrated) to `predictors_dir`."""
    opts.validate()
    config = store.config
    L, d = config.num_hidden_layers, config.hidden_size
    rank = opts.resolved_rank(d)
    n_train, _ = split_rows(store.num_rows, opts.holdout, corpus_ended=bool(store.manifest.get("exhausted")))
    state_dir = Path(work_dir) / "fit-state" / _fit_key(opts, store)
    state_dir.mkdir(parents=True, exist_ok=True)
    if log and any(state_dir.glob("layer_*.npz")):
        log(f"  resuming: predictors an earlier run trained with these settings ({state_dir}) are reused")
    mlp, heads = [None] * L, [None] * L
    info = {"mlp": [None] * L, "heads": [None] * L}
    reused_layers: list[str] = []  # predictors loaded from fit-state instead of trained now
    start = time.perf_counter()

    def run(kind: str, layer: int, x: np.ndarray, packed: np.ndarray, labels_holdout: np.ndarray, out: int):
        path = state_dir / f"layer_{layer}.{kind}.npz"
        reused = path.exists()
        if reused:
            predictor, layer_info = _load_layer(path, opts.normalize_input)
            reused_layers.append(f"{kind} {layer}")
        else:
            key = predictor_key(opts.seed, layer, kind)
            predictor, layer_info = train_predictor(
                x[:n_train], packed[:n_train], out, rank, opts, key, desc=f"fit {kind} layer {layer}", progress=progress
            )
            layer_info.update(threshold_metrics(predictor, x[n_train:], labels_holdout))
            _save_layer(path, predictor, layer_info)
        (mlp if kind == "mlp" else heads)[layer] = predictor
        info[kind][layer] = layer_info
        if log:
            how = "reused" if reused else f"{layer_info['seconds']:.0f} s"
            log(
                f"  {kind:5s} layer {layer}: recall {layer_info['recall']:.3f} precision "
                f"{layer_info['precision']:.3f} true density {layer_info['true_density']:.3f} predicted "
                f"{layer_info['predicted_density']:.3f} ({how})"
            )

    for layer in range(L):
        attn_in = store.read(layer, "attn_input")
        # Head predictor of layer l+1 reads this layer's attention input (lookahead); layer 0 reads its own.
        for head_layer in [0, 1] if layer == 0 else [layer + 1]:
            if head_layer < L:
                norms = store.read(head_layer, "head_norm")
                labels = head_labels(norms, opts.head_label_mass)
                run(
                    "heads",
                    head_layer,
                    attn_in,
                    np.packbits(labels, axis=-1),
                    labels[n_train:],
                    config.num_attention_heads,
                )
        x = attn_in if opts.mlp_input == "attn_input" else store.read(layer, "mlp_input")
        del attn_in
        packed = store.read(layer, "mlp_active")
        run("mlp", layer, x, packed, store.read_labels(layer, n_train), config.ffn_dim)
        del x, packed

    predictors = Predictors(mlp=tuple(mlp), heads=tuple(heads), mlp_input=opts.mlp_input)
    metadata = {
        "stage": "fit",
        "model": store.manifest["model"],
        "activations": str(store.directory),
        "training_tokens": n_train,
        "holdout_tokens": store.num_rows - n_train,
        "fit_options": {**dataclasses.asdict(opts), "rank": rank},
        "head_label": f"heads carrying the top {opts.head_label_mass:g} of the token's head-norm mass",
        "fit_metrics": info,
        "fit_seconds": time.perf_counter() - start,
    }
    save_predictors(predictors, predictors_dir, metadata)
    return {
        "predictors": str(predictors_dir),
        "rank": rank,
        "training_tokens": n_train,
        "seconds": metadata["fit_seconds"],
        "reused": reused_layers,
        "metrics": info,
    }
