"""stream: collect and fit in one pass over the corpus, with the activations never leaving the accelerator.

Disk mode (`collect` then `fit`) stores every layer's activations, ~2·d·2 bytes per token per layer; this mode
stores none. Each batch of windows runs the dense model under jit (`collect.dense_activations`) and the same
compiled step updates every layer's MLP and head predictors (`fit.predictor_loss`, `fit.make_optimizer`,
`fit.initial_predictor`: the disk mode's loss, init and optimizer) from that batch's tokens.

Windows (`plan_windows`): the token stream (`collect.iter_windows`) is cut into windows of `seq_len` up to the
token budget; the first windows covering (1 - holdout) of the budget train, the rest are held out. Training windows
are all whole. A bounded sample of the held-out windows (the first ones, up to what fits in `holdout_memory_gb` of
host memory) is kept for calibration and the report: every field the calibration reads, per layer, as numpy.

Batches, pools and steps: each epoch visits the training windows in a seeded random order, `batch_size` windows
per forward pass (the last batch padded with empty windows). The layer inputs and labels of `pool_batches` forward
batches in a row (`mix_tokens // (batch_size * seq_len)`, at least 1) are pooled on the device; the pool's real
tokens are shuffled and cut into optimizer steps of `min(train_batch_size, pool tokens)` rows; padding never enters
a loss. Pooling sets how many windows one step's rows come from: at 8 windows a step (one batch of 8, no pooling)
the predictors of the reference model needed 1.6 points more MLP density than disk mode's, whose steps draw from
the whole training set, for the same recall (bench/results/train_stream_vs_disk_opt-21m-wiki.md). A pool of P
batches of B windows trains exactly as one batch of P * B windows would, with the forward pass's own memory that
of B windows. Every layer has its own predictor and optimizer state (as in disk mode); the learning-rate schedule
spans the run's step count.

Memory: the model, one batch's forward pass, the pool (`pool_bytes_per_token` per token: the group's layers'
inputs, packed labels and head labels) and the predictors and Adam state of one layer group live on the device;
with `layer_groups` G > 1 the layers are trained in G passes over the corpus (finished groups wait on the host),
each pass running the dense model over every training window again. Host memory: the token windows (4 bytes a
token) and the held-out sample.

Disk: G is the fewest groups whose peak disk use fits `disk_budget_gb` (`train/disk_budget.py`), unless given.
The group in training has its predictors, Adam state, losses and stream position (group, epoch, batch)
checkpointed every `checkpoint_every` forward batches (at the end of the pool that reaches the count: a
checkpoint always falls between pools) in `stream-state/checkpoint.npz` (`train/checkpoint.py`). When a group
ends, its predictors are rounded to float16 (in every run, resumed or not) and written once to
`stream-state/predictors-group-NNN.npz`, and its state leaves the checkpoint.

Resume: the shuffles and each pool's row order derive from (seed, group, epoch, the pool's first window), so a
resumed run repeats exactly what an uninterrupted one computes. A checkpoint made with other settings (or another
corpus) is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import resource
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dejavu_jax.config import OPTConfig
from dejavu_jax.corpus import corpus_kind
from dejavu_jax.predictors import Predictors
from train.activations import activation_bytes_per_token
from train.disk_budget import even_layer_groups, plan_layer_groups
from train.checkpoint import BackgroundCheckpointWriter, CheckpointMismatch, load_checkpoint, read_metadata
from train.collect import canonical_path, dense_activations, iter_windows, load_text_model
from train.fit import (
    LABEL_RATE_ROWS,
    FitOptions,
    initial_predictor,
    gather_rows,
    make_optimizer,
    optimizer_step,
    predictor_key,
    threshold_metrics,
)
from train.heldout import InMemoryHeldOut
from train.metrics import head_labels

STATE_DIR = "stream-state"
CHECKPOINT = "checkpoint.npz"
CHECKPOINT_FORMAT = 2  # 2: the checkpoint holds one group's state; finished groups have their own files
GROUP_FILE = "predictors-group-{:03d}.npz"


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    model: str  # converted model dir, HF checkpoint dir or hub id
    data: str  # .txt / .jsonl / .jsonl.xz / datasets dir
    work_dir: Path  # the checkpoint goes to work_dir/stream-state/
    max_tokens: int = 400_000  # token budget, training and held-out together
    seq_len: int = 512
    batch_size: int = 8  # windows per forward pass
    mix_tokens: int = 16384  # tokens of forward batches pooled before the optimizer steps over them
    dtype: str = "float32"  # compute dtype of the dense model
    layer_groups: Optional[int] = None  # passes over the corpus, each training a contiguous group of layers;
    # None: the fewest whose peak disk use fits `disk_budget_gb` (train/disk_budget.py)
    disk_budget_gb: float = 2.0  # peak disk under work_dir: resume state, finished predictors, report
    checkpoint_every: int = 100  # forward batches between checkpoints
    holdout_memory_gb: float = 2.0  # host memory for the held-out sample

    def validate(self) -> None:
        for name in ("max_tokens", "seq_len", "batch_size", "mix_tokens", "layer_groups", "checkpoint_every"):
            value = getattr(self, name)
            if name == "layer_groups" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer. Got {value!r}")
        if not self.disk_budget_gb > 0:
            raise ValueError(f"--stream-disk-budget-gb must be > 0. Got {self.disk_budget_gb}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2. Got {self.seq_len}")
        if not self.holdout_memory_gb > 0:
            raise ValueError(f"--holdout-memory-gb must be > 0. Got {self.holdout_memory_gb}")

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.work_dir) / STATE_DIR / CHECKPOINT

    @property
    def pool_batches(self) -> int:
        """Forward batches whose tokens one round of optimizer steps mixes: `mix_tokens` in whole batches, >= 1."""
        return max(1, self.mix_tokens // (self.batch_size * self.seq_len))


# ---- windows: which train, which are held out -------------------------------------------------------------------


def held_out_fields(mlp_input: str) -> tuple[str, ...]:
    """The per-layer fields calibration reads (`mlp_input` only when the MLP predictor reads it)."""
    return ("attn_input", "mlp_active", "head_norm") + (("mlp_input",) if mlp_input == "mlp_input" else ())


def held_out_bytes_per_token(config: OPTConfig, mlp_input: str) -> int:
    per = {
        "attn_input": 2 * config.hidden_size,
        "mlp_input": 2 * config.hidden_size,
        "mlp_active": -(-config.ffn_dim // 8),
        "head_norm": 4 * config.num_attention_heads,
    }
    return config.num_hidden_layers * sum(per[f] for f in held_out_fields(mlp_input))


def pool_bytes_per_token(config: OPTConfig, layers: int) -> int:
    """Device bytes a pooled token takes for `layers` layers: MLP and head inputs (f16), packed MLP labels, head
    labels (f32), and its weight."""
    return layers * (4 * config.hidden_size + -(-config.ffn_dim // 8) + 4 * config.num_attention_heads) + 4


def held_out_token_cap(config: OPTConfig, mlp_input: str, memory_gb: float, batch_tokens: int) -> int:
    """How many held-out tokens fit in `memory_gb` of host memory, beside the one layer of one forward batch
    (`batch_tokens`) that `collect_held_out` copies to the host at a time."""
    per_token = held_out_bytes_per_token(config, mlp_input)
    in_flight = batch_tokens * per_token // config.num_hidden_layers
    return max(1, (int(memory_gb * 1e9) - in_flight) // per_token)


class WindowPlan(NamedTuple):
    train: list  # [Window]: whole windows of seq_len tokens, in stream order
    held_out: list  # [Window]: the held-out sample's windows, in stream order (one cut short keeps its `end`)
    held_out_index: list  # [int]: each held-out window's index in the stream (its parity splits calib / test)
    held_out_available: int  # tokens in every window after the training ones (the sample is a prefix of them)
    total_tokens: int  # tokens in all windows read (the budget, or less where the corpus ended)
    exhausted: bool  # the corpus ended before the budget

    @property
    def train_tokens(self) -> int:
        return sum(len(w.tokens) for w in self.train)

    @property
    def held_out_tokens(self) -> int:
        return sum(len(w.tokens) for w in self.held_out)

    def fingerprint(self) -> str:
        """A hash of every training token, in order: a resumed run must train on the same windows (the held-out
        sample may differ: it does not enter training)."""
        h = hashlib.sha256()
        for w in self.train:
            h.update(np.ascontiguousarray(w.tokens, np.int32).tobytes())
        return h.hexdigest()[:16]


def plan_windows(tokenizer, data, seq_len: int, max_tokens: int, holdout: float, held_out_cap: int) -> WindowPlan:
    """Cut the budget into windows; train on the first whole windows covering (1 - holdout) of it, hold out the
    rest, and keep the first `held_out_cap` held-out tokens as the sample."""
    windows, total = [], 0
    for window in iter_windows(tokenizer, data, seq_len):
        take = min(len(window.tokens), max_tokens - total)
        windows.append(window if take == len(window.tokens) else window._replace(tokens=window.tokens[:take]))
        total += take
        if total >= max_tokens:
            break
    exhausted = total < max_tokens
    n_train = int(total * (1 - holdout)) // seq_len  # whole windows only
    held_out_available = total - n_train * seq_len
    if n_train < 1 or held_out_available < 2:
        remedy = "the corpus ended there: use a larger one (--data)" if exhausted else "raise --max-tokens"
        raise ValueError(
            f"{total} tokens are too few to train on whole windows of {seq_len} and hold out {holdout:.0%} for "
            f"calibration and testing; {remedy}"
        )
    held_out, index, kept = [], [], 0
    for i in range(n_train, len(windows)):
        if kept >= held_out_cap:
            break
        take = min(len(windows[i].tokens), held_out_cap - kept)
        held_out.append(windows[i]._replace(tokens=windows[i].tokens[:take]))
        index.append(i)
        kept += take
    return WindowPlan(windows[:n_train], held_out, index, held_out_available, total, exhausted)


def _batch_arrays(windows: list, batch_size: int, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, T] ids and mask: the windows left-aligned, missing windows and tails padded (mask 0)."""
    ids = np.full((batch_size, seq_len), pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    for b, window in enumerate(windows):
        ids[b, : len(window.tokens)] = window.tokens
        mask[b, : len(window.tokens)] = 1
    return ids, mask


def epoch_batches(plan: WindowPlan, batch_size: int, seed: int, group: int, epoch: int) -> list[list[int]]:
    """The training windows' indices for each forward batch of one epoch (a seeded shuffle)."""
    order = np.random.default_rng([seed, group, epoch]).permutation(len(plan.train))
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def _steps_in_batch(tokens: int, rows_per_step: int) -> int:
    return -(-tokens // rows_per_step)


# ---- the compiled step ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _StepSpec:
    """Everything static about the compiled step (hashable: the optimizer by identity, one per run)."""

    config: OPTConfig
    layers: tuple  # this group's layers
    mlp_input: str
    loss: str
    head_label_mass: float
    rows_per_step: int
    optimizer: Any


def _layer_inputs(acts: list, spec: _StepSpec, n: int):
    """Stacked over the group's layers: MLP input [G, n, d], head input [G, n, d] (layer l-1's attention input,
    layer 0 its own), packed MLP labels [G, n, ffn/8], head labels [G, n, heads] f32."""

    def flat(a):
        return a.reshape((n,) + a.shape[2:])

    mlp_x = jnp.stack([flat(acts[i][spec.mlp_input]) for i in spec.layers])
    head_x = jnp.stack([flat(acts[max(i - 1, 0)]["attn_input"]) for i in spec.layers])
    mlp_packed = jnp.stack([flat(acts[i]["mlp_active"]) for i in spec.layers])
    head_y = jnp.stack([head_labels(flat(acts[i]["head_norm"]), spec.head_label_mass, xp=jnp) for i in spec.layers])
    return mlp_x, head_x, mlp_packed, head_y.astype(jnp.float32)


def _update(spec: _StepSpec, predictor, opt_state, x, labels, weight, valid):
    """One optimizer step of one predictor on rows weighted by `weight`; a step without rows changes nothing."""
    new_predictor, new_opt_state, value = optimizer_step(
        predictor, opt_state, spec.optimizer, x, labels, spec.loss, weight
    )

    def keep(new, old):
        return jnp.where(valid, new, old)

    return jax.tree.map(keep, new_predictor, predictor), jax.tree.map(keep, new_opt_state, opt_state), value


def empty_pool(spec: _StepSpec, tokens: int) -> dict:
    """A pool of `tokens` rows for the group's layers (`_forward_into` fills it one batch at a time)."""
    c, g = spec.config, len(spec.layers)
    return {
        "mlp_x": jnp.zeros((g, tokens, c.hidden_size), jnp.float16),
        "head_x": jnp.zeros((g, tokens, c.hidden_size), jnp.float16),
        "mlp_packed": jnp.zeros((g, tokens, -(-c.ffn_dim // 8)), jnp.uint8),
        "head_y": jnp.zeros((g, tokens, c.num_attention_heads), jnp.float32),
        "weight": jnp.zeros((tokens,), jnp.float32),
    }


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def _forward_into(pool, params, input_ids, attention_mask, slot, *, spec: _StepSpec):
    """Forward one batch [B, T] and write its layer inputs, labels and token weights into rows
    [slot * B * T, (slot + 1) * B * T) of the pool."""
    batch, seq = input_ids.shape
    n = batch * seq
    acts = dense_activations(params, input_ids, attention_mask, config=spec.config)
    mlp_x, head_x, mlp_packed, head_y = _layer_inputs(acts, spec, n)
    weight = attention_mask.reshape(n).astype(jnp.float32)
    start = slot * n

    def put(dst, src, axis):
        return jax.lax.dynamic_update_slice_in_dim(dst, src.astype(dst.dtype), start, axis)

    return {
        "mlp_x": put(pool["mlp_x"], mlp_x, 1),
        "head_x": put(pool["head_x"], head_x, 1),
        "mlp_packed": put(pool["mlp_packed"], mlp_packed, 1),
        "head_y": put(pool["head_y"], head_y, 1),
        "weight": put(pool["weight"], weight, 0),
    }


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(0,))
def _train_pool(state, pool, filled, key, *, spec: _StepSpec):
    """Every optimizer step the pool's real tokens make (its first `filled` rows; later ones are stale), for every
    layer of the group."""
    n = pool["weight"].shape[0]
    weight = jnp.where(jnp.arange(n) < filled, pool["weight"], 0.0)
    # Real tokens first, in a random order; padding last, so only trailing steps can be empty (and are skipped).
    order = jnp.argsort(jnp.where(weight > 0, jax.random.uniform(key, (n,)), 2.0))
    rows = spec.rows_per_step
    steps = _steps_in_batch(n, rows)
    pad = steps * rows - n
    idx = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).reshape(steps, rows)
    w = jnp.concatenate([weight[order], jnp.zeros((pad,), weight.dtype)]).reshape(steps, rows)
    ffn = spec.config.ffn_dim

    def step(state, inputs):
        idx, w = inputs
        valid = w.sum() > 0

        def layer(_, per_layer):
            mlp, mlp_opt, heads, heads_opt, x_m, x_h, packed, y_h = per_layer
            mlp, mlp_opt, loss_m = _update(spec, mlp, mlp_opt, *gather_rows(x_m, packed, idx, ffn), w, valid)
            heads, heads_opt, loss_h = _update(
                spec, heads, heads_opt, jnp.take(x_h, idx, axis=0), jnp.take(y_h, idx, axis=0), w, valid
            )
            return None, (mlp, mlp_opt, heads, heads_opt, jnp.stack([loss_m, loss_h]))

        xs = (
            state["mlp"],
            state["mlp_opt"],
            state["heads"],
            state["heads_opt"],
            pool["mlp_x"],
            pool["head_x"],
            pool["mlp_packed"],
            pool["head_y"],
        )
        _, (mlp, mlp_opt, heads, heads_opt, losses) = jax.lax.scan(layer, None, xs)
        losses = jnp.where(valid, losses, state["loss"])
        return {"mlp": mlp, "mlp_opt": mlp_opt, "heads": heads, "heads_opt": heads_opt, "loss": losses}, None

    state, _ = jax.lax.scan(step, state, (idx, w))
    return state


@functools.partial(jax.jit, static_argnames=("config", "head_label_mass"))
def _label_counts(params, input_ids, attention_mask, *, config: OPTConfig, head_label_mass: float):
    """Per layer, how many of the batch's real tokens label each MLP neurone and each head active: [L, ffn], [L, H]."""
    n = input_ids.size
    acts = dense_activations(params, input_ids, attention_mask, config=config)
    weight = attention_mask.reshape(n, 1).astype(jnp.float32)
    mlp = [
        (jnp.unpackbits(a["mlp_active"].reshape(n, -1), axis=-1, count=config.ffn_dim) * weight).sum(0) for a in acts
    ]
    heads = [(head_labels(a["head_norm"].reshape(n, -1), head_label_mass, xp=jnp) * weight).sum(0) for a in acts]
    return jnp.stack(mlp), jnp.stack(heads)


# ---- the driver -------------------------------------------------------------------------------------------------


# One optimizer object per (options, step count): the compiled step is keyed on it, so a rerun in the same process
# (a resume, a test) reuses the compilation.
_optimizer = functools.lru_cache(maxsize=8)(make_optimizer)


def _settings(opts: StreamOptions, fit_opts: FitOptions, config: OPTConfig, layer_groups: int) -> dict:
    """What must match for a checkpoint to be resumed (the calibration options and the held-out sample's memory may
    change freely)."""
    fit = dataclasses.asdict(fit_opts)
    fit["rank"] = fit_opts.resolved_rank(config.hidden_size)
    fit.pop("steps_per_call")  # disk mode's dispatch granularity, unused here
    return {
        "format": CHECKPOINT_FORMAT,
        "model": canonical_path(opts.model),
        "data": canonical_path(opts.data),
        "max_tokens": opts.max_tokens,
        "seq_len": opts.seq_len,
        "batch_size": opts.batch_size,
        "pool_batches": opts.pool_batches,
        "compute_dtype": opts.dtype,
        "layer_groups": layer_groups,  # as chosen from the disk budget, or asked for
        "fit": fit,
    }


def _check_settings(have: dict, want: dict, path: Path) -> None:
    if have == want:
        return
    diff = []
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [
                f"{key}.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
        elif a != b:
            diff.append(f"{key}: {a!r} vs {b!r}")
    raise CheckpointMismatch(
        f"{path} was written by a run with other settings ({'; '.join(diff)}: checkpoint vs now); rerun with "
        f"the same arguments to resume, or pass --overwrite to start again, or another --work-dir"
    )


def _initial_state(spec: _StepSpec, fit_opts: FitOptions, rank: int, mlp_rate, head_rate) -> dict:
    """The group's predictors (the disk mode's init, per layer), stacked over layers, with their Adam states."""
    c = spec.config

    def init(kind, num_outputs, rate):
        return [
            initial_predictor(
                predictor_key(fit_opts.seed, i, kind),
                c.hidden_size,
                rank,
                num_outputs,
                rate[i],
                fit_opts.normalize_input,
            )[0]
            for i in spec.layers
        ]

    mlp, heads = init("mlp", c.ffn_dim, mlp_rate), init("heads", c.num_attention_heads, head_rate)
    stacked_mlp = jax.tree.map(lambda *a: jnp.stack(a), *mlp)
    stacked_heads = jax.tree.map(lambda *a: jnp.stack(a), *heads)
    return {
        "mlp": stacked_mlp,
        "mlp_opt": jax.vmap(spec.optimizer.init)(stacked_mlp),
        "heads": stacked_heads,
        "heads_opt": jax.vmap(spec.optimizer.init)(stacked_heads),
        "loss": jnp.full((len(spec.layers), 2), jnp.nan, jnp.float32),
    }


def _as_float16(stacked):
    return jax.tree.map(lambda a: np.asarray(a).astype(np.float16), stacked)


def _load_group(path: Path, abstract_state: dict, settings: dict) -> dict:
    """A finished group's predictors (float16, stacked over its layers), checked against this run's settings."""
    if not path.exists():
        raise CheckpointMismatch(f"{path} is missing, but the checkpoint beside it counts on it; pass --overwrite")
    template = {
        kind: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float16), abstract_state[kind])
        for kind in ("mlp", "heads")
    }
    tree, meta = load_checkpoint(path, template)
    if meta.get("settings") != settings:
        raise CheckpointMismatch(f"{path} was written by a run with other settings; pass --overwrite")
    return tree


def _remove_stale_files(state_dir: Path, keep_checkpoint: bool, keep_groups: int) -> None:
    """Remove temp files, group files from group `keep_groups` on, and the checkpoint unless `keep_checkpoint`."""
    if not state_dir.is_dir():
        return
    keep = {GROUP_FILE.format(g) for g in range(keep_groups)} | ({CHECKPOINT} if keep_checkpoint else set())
    for file in state_dir.iterdir():
        if file.is_file() and file.name not in keep and (file.name.startswith(".") or file.suffix == ".npz"):
            file.unlink()


def _unstack(stacked) -> list:
    return [jax.tree.map(lambda a, i=i: np.asarray(a[i]), stacked) for i in range(stacked.w1.shape[0])]


def device_peak_bytes() -> Optional[int]:
    """Peak bytes in use on the first device since the process started; None where the backend does not say."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return int(peak) if peak is not None else None


def host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train_stream(
    opts: StreamOptions,
    fit_opts: FitOptions,
    overwrite: bool = False,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> tuple[Predictors, InMemoryHeldOut, dict]:
    """Train every layer's predictors from the streamed corpus; return (predictors, the held-out sample, summary).

    Resumes the checkpoint in `opts.work_dir` when its settings match (raises `CheckpointMismatch` when not, and
    `DiskBudgetError` when no layer grouping fits the disk budget, both before anything is written). Before training
    it removes the state files no checkpoint refers to (all of them with `overwrite`), and writes nothing before the
    first checkpoint. `on_batch(batches_done)` runs after each forward batch and its checkpoint, if one is due
    (tests interrupt through it).
    """
    opts.validate()
    fit_opts.validate()
    corpus_kind(opts.data)  # a missing or unknown corpus fails before anything is loaded or written
    path = opts.checkpoint_path
    meta = None if overwrite else read_metadata(path)  # an old checkpoint is replaced by the first new one
    model = load_text_model(opts.model, opts.dtype, opts.seq_len)
    config = model.config
    rank = fit_opts.resolved_rank(config.hidden_size)
    disk = plan_layer_groups(config, rank, opts.disk_budget_gb, opts.layer_groups)
    groups = even_layer_groups(config.num_hidden_layers, disk.layer_groups)
    settings = _settings(opts, fit_opts, config, len(groups))
    if meta is not None:
        _check_settings(meta["settings"], settings, path)  # before the corpus is read: a mismatch fails fast
    cap = held_out_token_cap(config, fit_opts.mlp_input, opts.holdout_memory_gb, opts.batch_size * opts.seq_len)
    plan = plan_windows(model.tokenizer, opts.data, opts.seq_len, opts.max_tokens, fit_opts.holdout, cap)
    if meta is not None and meta["windows"] != plan.fingerprint():
        raise CheckpointMismatch(
            f"{path} was trained on other tokens (the corpus or tokenizer changed); pass --overwrite to start again"
        )
    if log:
        log(f"stream: plan: {disk.describe()}")
        log(
            f"stream: {plan.train_tokens:,} training tokens in {len(plan.train)} windows, {plan.held_out_tokens:,} "
            f"held-out tokens kept in memory for calibration (of {plan.held_out_available:,} held out; "
            f"--holdout-memory-gb {opts.holdout_memory_gb:g} holds {cap:,} at "
            f"{held_out_bytes_per_token(config, fit_opts.mlp_input):,} bytes a token)"
        )
        largest = max(len(g) for g in groups)
        log(
            f"stream: each round of optimizer steps mixes {opts.pool_batches} forward batches ("
            f"{opts.pool_batches * opts.batch_size * opts.seq_len:,} tokens, --mix-tokens {opts.mix_tokens:,}), "
            f"pooled on the device in "
            f"{opts.pool_batches * opts.batch_size * opts.seq_len * pool_bytes_per_token(config, largest) / 1e9:.3g} GB"
        )

    B, T, P = opts.batch_size, opts.seq_len, opts.pool_batches
    rows_per_step = min(fit_opts.batch_size, P * B * T)
    batches_per_epoch = -(-len(plan.train) // B)
    steps_per_epoch = sum(  # pools of P batches from the start of each epoch, the last one maybe shorter
        _steps_in_batch(min(P * B, len(plan.train) - i) * T, rows_per_step) for i in range(0, len(plan.train), P * B)
    )
    optimizer = _optimizer(fit_opts, steps_per_epoch * fit_opts.epochs)
    specs = [
        _StepSpec(config, g, fit_opts.mlp_input, fit_opts.loss, fit_opts.head_label_mass, rows_per_step, optimizer)
        for g in groups
    ]

    def abstract_state(spec):
        zeros = np.zeros((config.num_hidden_layers, max(config.ffn_dim, config.num_attention_heads)))
        return jax.eval_shape(
            lambda: _initial_state(
                spec, fit_opts, rank, zeros[:, : config.ffn_dim], zeros[:, : config.num_attention_heads]
            )
        )

    state_dir = path.parent
    windows_fingerprint = plan.fingerprint()

    # Position: group, epoch, batch (within the epoch) of the next forward pass.
    if meta is not None and meta["complete"]:
        group, epoch, batch_index = len(groups), 0, 0
    elif meta is not None:
        group, epoch, batch_index = meta["group"], meta["epoch"], meta["batch"]
    else:
        group, epoch, batch_index = 0, 0, 0
    finished_mlp, finished_heads, final_loss = [], [], []
    state = None
    if meta is not None:
        has_state = not meta["complete"] and meta.get("has_state", True)
        # Without state: training is complete, or it stopped between two layer groups.
        tree, meta = load_checkpoint(path, {"state": abstract_state(specs[group])} if has_state else {})
        final_loss = [list(x) for x in meta["final_loss"]]
        if has_state:
            state = jax.tree.map(jnp.asarray, tree["state"])
        for done in range(group):
            finished = _load_group(state_dir / GROUP_FILE.format(done), abstract_state(specs[done]), settings)
            finished_mlp.extend(_unstack(finished["mlp"]))
            finished_heads.extend(_unstack(finished["heads"]))
        if log:
            where = "training is complete" if meta["complete"] else f"group {group}, epoch {epoch}, batch {batch_index}"
            log(f"stream: resuming {path} ({where})")
    # What no checkpoint refers to (an earlier run's, or a group file written just before a crash) would only
    # take disk beyond the plan: gone before training starts.
    _remove_stale_files(state_dir, keep_checkpoint=meta is not None, keep_groups=group)

    label_rates = None

    def rates():
        nonlocal label_rates
        if label_rates is None:
            mlp = np.zeros((config.num_hidden_layers, config.ffn_dim))
            heads = np.zeros((config.num_hidden_layers, config.num_attention_heads))
            counted = 0  # the first LABEL_RATE_ROWS training tokens in stream order, as disk mode counts them
            for i in range(0, len(plan.train), B):
                windows = plan.train[i : i + B]
                ids, mask = _batch_arrays(windows, B, T, config.pad_token_id)
                mask.reshape(-1)[max(LABEL_RATE_ROWS - counted, 0) :] = 0
                m, h = _label_counts(model.params, ids, mask, config=config, head_label_mass=fit_opts.head_label_mass)
                mlp += np.asarray(m, np.float64)
                heads += np.asarray(h, np.float64)
                counted += int(mask.sum())
                if counted >= LABEL_RATE_ROWS:
                    break
            label_rates = (mlp / counted, heads / counted)
        return label_rates

    writer = BackgroundCheckpointWriter()  # the loop goes on while a checkpoint's file is written

    def checkpoint(complete: bool) -> None:
        # Only the group in training: finished groups are in their own files (`finish_group`).
        tree = {} if state is None else {"state": state}  # None between groups: the next starts from its init
        writer.save(
            path,
            tree,
            {
                "settings": settings,
                "windows": windows_fingerprint,
                "group": group,
                "epoch": epoch,
                "batch": batch_index,
                "complete": complete,
                "has_state": state is not None,
                "final_loss": final_loss,
            },
        )

    total_tokens = len(groups) * fit_opts.epochs * plan.train_tokens
    done_tokens = group * fit_opts.epochs * plan.train_tokens if group < len(groups) else total_tokens
    if group < len(groups):
        done_tokens += epoch * plan.train_tokens + min(batch_index * B, len(plan.train)) * T
    batches_done = 0
    bar = None
    compile_s = None
    clock_start, clock_tokens = None, 0
    start = time.perf_counter()
    try:
        while group < len(groups):
            spec = specs[group]
            if state is None:
                mlp_rate, head_rate = rates()
                state = _initial_state(spec, fit_opts, rank, mlp_rate, head_rate)
            pool = empty_pool(spec, P * B * T)
            while epoch < fit_opts.epochs:
                batches = epoch_batches(plan, B, fit_opts.seed, group, epoch)
                while batch_index < batches_per_epoch:
                    first, last = batch_index, min(batch_index + P, batches_per_epoch)
                    t0 = time.perf_counter()
                    tokens = 0
                    for slot, b in enumerate(range(first, last)):
                        windows = [plan.train[i] for i in batches[b]]
                        ids, mask = _batch_arrays(windows, B, T, config.pad_token_id)
                        pool = _forward_into(pool, model.params, ids, mask, slot, spec=spec)
                        tokens += int(mask.sum())
                        batches_done += 1
                        if b + 1 < last and on_batch is not None:
                            on_batch(batches_done)
                    key = jax.random.fold_in(
                        jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(fit_opts.seed), group), epoch),
                        first * B,  # the pool's first window in the epoch's order: a pool of P batches of B
                    )  # windows shuffles its rows as one batch of P * B windows does
                    state = _train_pool(state, pool, np.int32((last - first) * B * T), key, spec=spec)
                    # Wait for the pool (preparing the next one takes the host far less than the device takes
                    # for this one), so that the progress bar and its rate count finished work.
                    jax.block_until_ready(state["loss"])
                    done_tokens += tokens
                    batch_index = last
                    if clock_start is None:  # the first pool compiles: the rate clock starts after it
                        compile_s = time.perf_counter() - t0
                        clock_start = time.perf_counter()
                        bar = tqdm(
                            total=total_tokens,
                            initial=done_tokens,
                            unit="tok",
                            unit_scale=True,
                            desc="stream train",
                            disable=not progress,
                            dynamic_ncols=True,
                        )
                    else:
                        clock_tokens += tokens
                        bar.update(tokens)
                    if batches_done // opts.checkpoint_every > (batches_done - (last - first)) // opts.checkpoint_every:
                        checkpoint(complete=False)
                    if on_batch is not None:
                        on_batch(batches_done)
                epoch, batch_index = epoch + 1, 0
            final_loss.extend(np.asarray(state["loss"]).tolist())
            # Finished predictors are kept float16 from here on, resumed or not: what the plan counts on disk.
            finished = {kind: _as_float16(state[kind]) for kind in ("mlp", "heads")}
            writer.save(state_dir / GROUP_FILE.format(group), finished, {"settings": settings, "group": group})
            finished_mlp.extend(_unstack(finished["mlp"]))
            finished_heads.extend(_unstack(finished["heads"]))
            state = pool = None
            group, epoch = group + 1, 0
            checkpoint(complete=group == len(groups))
    finally:
        writer.wait()  # a checkpoint is on disk before this returns or raises
        if bar is not None:
            bar.close()
    train_s = time.perf_counter() - clock_start if clock_start is not None else 0.0

    def build(stack):
        return tuple(jax.tree.map(jnp.asarray, p) for p in stack)

    predictors = Predictors(mlp=build(finished_mlp), heads=build(finished_heads), mlp_input=fit_opts.mlp_input)
    held_out = collect_held_out(model, plan, opts, fit_opts.mlp_input)
    summary = {
        "rank": rank,
        "training_tokens": plan.train_tokens,
        "training_windows": len(plan.train),
        "held_out_tokens": plan.held_out_tokens,
        "held_out_available_tokens": plan.held_out_available,
        "held_out_token_cap": cap,
        "tokens_read": plan.total_tokens,
        "disk_mode_activation_bytes": activation_bytes_per_token(config) * plan.total_tokens,  # what this avoids
        "exhausted": plan.exhausted,
        "layer_groups": len(groups),
        "disk_plan": disk._asdict(),
        "epochs": fit_opts.epochs,
        "pool_batches": P,
        "pool_tokens": P * B * T,
        "rows_per_step": rows_per_step,
        "steps_per_layer": steps_per_epoch * fit_opts.epochs,
        "final_loss": final_loss,
        "forward_batches_run": batches_done,
        "compile_s": compile_s,  # the first pool of this process: compilation and one pool
        "train_s_after_compile": train_s,
        "tokens_per_s": clock_tokens / train_s if train_s > 0 else None,
        "seconds": time.perf_counter() - start,
        "checkpoint": str(path),
    }
    return predictors, held_out, summary


def collect_held_out(model, plan: WindowPlan, opts: StreamOptions, mlp_input: str) -> InMemoryHeldOut:
    """Run the dense model over the held-out sample's windows and keep, per layer, what calibration reads."""
    config = model.config
    fields = held_out_fields(mlp_input)
    n = plan.held_out_tokens
    B, T = opts.batch_size, opts.seq_len
    layers = []
    for _ in range(config.num_hidden_layers):
        layers.append(
            {
                "attn_input": np.empty((n, config.hidden_size), np.float16),
                "mlp_active": np.empty((n, -(-config.ffn_dim // 8)), np.uint8),
                "head_norm": np.empty((n, config.num_attention_heads), np.float32),
                **({"mlp_input": np.empty((n, config.hidden_size), np.float16)} if "mlp_input" in fields else {}),
            }
        )
    window_of_row = np.empty(n, np.int64)
    row = 0
    for i in range(0, len(plan.held_out), B):
        windows = plan.held_out[i : i + B]
        ids, mask = _batch_arrays(windows, B, T, config.pad_token_id)
        out = dense_activations(model.params, jnp.asarray(ids), jnp.asarray(mask), config=config)
        lengths = [len(window.tokens) for window in windows]
        for layer, arrays in enumerate(layers):
            for f in fields:
                # One layer's field of the batch on the host at a time: `held_out_token_cap` leaves room for it.
                batch_field = np.asarray(out[layer][f])
                at = row
                for b, m in enumerate(lengths):
                    arrays[f][at : at + m] = batch_field[b, :m]
                    at += m
        for b, m in enumerate(lengths):
            window_of_row[row : row + m] = plan.held_out_index[i + b]
            row += m
    assert row == n, (row, n)
    return InMemoryHeldOut(config, layers, window_of_row)


def held_out_fit_metrics(predictors: Predictors, held_out: InMemoryHeldOut, head_label_mass: float) -> dict:
    """Per layer, each predictor's own decision (score > 0) on the held-out sample, as disk mode's fit reports."""
    info = {"mlp": [], "heads": []}
    for layer in range(predictors.num_layers):
        x = held_out.read(layer, predictors.mlp_input)
        info["mlp"].append(threshold_metrics(predictors.mlp[layer], x, held_out.read_labels(layer)))
        labels = head_labels(held_out.read(layer, "head_norm"), head_label_mass)
        x_prev = held_out.read(max(layer - 1, 0), "attn_input")
        info["heads"].append(threshold_metrics(predictors.heads[layer], x_prev, labels))
    return info


# ---- the mode as a whole: choose it, train, save ----------------------------------------------------------------

STORES = ("auto", "disk", "stream")


def read_config(model: str) -> OPTConfig:
    """The model's config, without loading its weights."""
    from dejavu_jax.checkpoint import is_converted_model, resolve_model_dir
    from dejavu_jax.hf_convert import read_hf_config

    path = resolve_model_dir(model)
    return OPTConfig.from_json_file(path / "config.json") if is_converted_model(path) else read_hf_config(path)


def choose_store(store: str, config: OPTConfig, max_tokens: int, disk_budget_gb: float) -> tuple[str, str]:
    """(disk or stream, why): `auto` streams when the activations of `max_tokens` would exceed the disk budget."""
    if store not in STORES:
        raise ValueError(f"--store must be one of {', '.join(STORES)}. Got {store!r}")
    if not disk_budget_gb > 0:
        raise ValueError(f"--disk-budget-gb must be > 0. Got {disk_budget_gb}")
    need = activation_bytes_per_token(config) * max_tokens
    size = f"the activations of {max_tokens:,} tokens take {need / 1e9:.3g} GB in disk mode"
    if store != "auto":
        return store, f"as asked; {size}"
    if need > disk_budget_gb * 1e9:
        return "stream", f"{size} > --disk-budget-gb {disk_budget_gb:g}"
    return "disk", f"{size} <= --disk-budget-gb {disk_budget_gb:g}"


def run_stream(
    opts: StreamOptions,
    fit_opts: FitOptions,
    predictors_dir: Path,
    overwrite: bool = False,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> tuple[InMemoryHeldOut, dict]:
    """Train (or resume), then save the uncalibrated predictors to `predictors_dir` as `fit` does, with their
    metrics on the held-out sample. Returns (the held-out sample, summary)."""
    from dejavu_jax.predictor_store import save_predictors

    predictors, held_out, summary = train_stream(opts, fit_opts, overwrite, progress, log, on_batch)
    info = held_out_fit_metrics(predictors, held_out, fit_opts.head_label_mass)
    for layer, (loss_mlp, loss_heads) in enumerate(summary["final_loss"]):
        for kind, loss in (("mlp", loss_mlp), ("heads", loss_heads)):
            info[kind][layer].update(
                final_loss=loss, steps=summary["steps_per_layer"], train_rows=summary["training_tokens"]
            )
    metadata = {
        "stage": "fit",
        "model": canonical_path(opts.model),
        "activations": None,
        "store": "stream",
        "training_tokens": summary["training_tokens"],
        "holdout_tokens": summary["held_out_tokens"],
        "fit_options": {**dataclasses.asdict(fit_opts), "rank": summary["rank"]},
        "stream_options": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()},
        "head_label": f"heads carrying the top {fit_opts.head_label_mass:g} of the token's head-norm mass",
        "fit_metrics": info,
        "fit_seconds": summary["seconds"],
    }
    save_predictors(predictors, predictors_dir, metadata)
    summary["predictors"] = str(predictors_dir)
    summary["device"] = getattr(jax.devices()[0], "device_kind", jax.devices()[0].platform)
    summary["peak_device_bytes"] = device_peak_bytes()
    summary["peak_host_rss_bytes"] = host_peak_rss_bytes()
    return held_out, summary
