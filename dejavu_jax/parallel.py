"""Where arrays live across devices: tensor parallelism over a one-axis `tp` mesh, and several hosts.

Megatron layout of the parameter tree (`dejavu_jax.model`), over the mesh axis `TP_AXIS`:
- attention: `qkv_w` [3, H, hd, d] and `qkv_b` [3, H, hd] split on H, `out_w` [H, hd, d] split on H, `out_b`
  replicated: each device computes its own heads end to end, and out_proj's contraction over H ends in one
  all-reduce;
- MLP: `fc1_w` [ffn, d], `fc1_b` [ffn] and `fc2_w_t` [ffn, d] split on ffn, `fc2_b` replicated: fc1 and the ReLU
  stay local, fc2's contraction over ffn ends in one all-reduce;
- LayerNorms, positions, `project_in` / `project_out`: replicated;
- the token embedding (also the tied LM head): replicated, or split on the vocabulary with `vocab_split`.

Sparse weights (`dejavu_jax.sparsity.SparseWeights`) follow the neurons they choose: `shard_sparse_weights` splits
fixed row masks and the MLP predictors' second layer (w2_t [ffn, r], b2 [ffn]) on ffn and replicates the rest, so
each device's sparse decode step (`sparse_mlp.mlp_decode_rows_split`) scores and computes only its own neurons.
Head choices (head predictors, the fixed schedule) are replicated: every device sees the single-device choice, and
its head-sparse decode step (`sparse_attention.head_sparse_decode_split`) computes the chosen heads it holds, writes
their K/V into its shard of the cache, and ends in the attention block's one all-reduce.

The KV cache (`dejavu_jax.kv_cache`, per layer [B, H, S, hd]) is split on H like the heads that write it. With
the parameters placed by `shard_params` (or restored into `param_shardings`), jit compiles the unchanged model
program under GSPMD, which inserts the two all-reduces per layer; generation (`dejavu_jax.generation`) pins the
cache's layout with `constrain_cache`, and stays one compiled program. One device (`tp` 1) means no mesh at all:
the single-device path is unchanged.

Several hosts: `initialize_hosts` wires `jax.distributed.initialize`, after which `jax.devices()` lists every
host's devices and the same commands run as one program on each host.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dejavu_jax.config import OPTConfig

TP_AXIS = "tp"

# The parameter names split across the mesh and the axis each one splits on; every other leaf is replicated.
_SPLIT_AXIS = {
    "qkv_w": 1,  # [3, H, hd, d]
    "qkv_b": 1,  # [3, H, hd]
    "out_w": 0,  # [H, hd, d]
    "fc1_w": 0,  # [ffn, d]
    "fc1_b": 0,  # [ffn]
    "fc2_w_t": 0,  # [ffn, d]
}


def parse_tp(text) -> int | str:
    """The value of `--tp`: a positive int, or "auto" (every device JAX sees). A ValueError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str) and text.strip() == "auto":
        return "auto"
    else:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError(f"--tp takes a positive device count or 'auto'. Got {text!r}") from None
    if value < 1:
        raise ValueError(f"--tp takes a positive device count or 'auto'. Got {text!r}")
    return value


def tp_mesh(config: OPTConfig, tp: int | str = 1, vocab_split: bool = False) -> Optional[Mesh]:
    """The mesh for `tp` devices (see `parse_tp`), or None for one device (the single-device path).

    `tp` must divide the heads and the ffn width (each device holds whole heads and an equal share of neurons) and,
    with `vocab_split`, the vocabulary; it may not exceed the devices JAX sees. A ValueError names the numbers.
    """
    tp = parse_tp(tp)
    devices = jax.devices()
    n = len(devices) if tp == "auto" else tp
    if n > len(devices):
        raise ValueError(
            f"--tp {n} needs {n} devices, but JAX sees {len(devices)} ({devices[0].platform}); "
            f"use --tp auto or at most {len(devices)}"
        )
    heads, ffn = config.num_attention_heads, config.ffn_dim
    if heads % n or ffn % n:
        raise ValueError(
            f"--tp {n} must divide the model's {heads} attention heads and its ffn width {ffn}; "
            f"pick a common divisor of {heads} and {ffn}"
        )
    if vocab_split and config.vocab_size % n:
        raise ValueError(
            f"a vocabulary split over --tp {n} devices needs {n} to divide the vocabulary size {config.vocab_size}"
        )
    if n == 1:
        return None
    return Mesh(np.array(devices[:n]), (TP_AXIS,))


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def _param_spec(path, ndim: int, vocab_split: bool) -> P:
    name = _leaf_name(path)
    keys = [str(getattr(k, "key", k)) for k in path]
    if name == "embedding" and "embed_tokens" in keys:
        return P(TP_AXIS) if vocab_split else P()
    axis = _SPLIT_AXIS.get(name)
    if axis is None:
        return P()
    assert ndim > axis, f"{'/'.join(keys)} has {ndim} dims; the layout splits axis {axis}"
    return P(*([None] * axis), TP_AXIS)


def param_shardings(params, mesh: Mesh, vocab_split: bool = False):
    """A tree of NamedSharding matching `params` (arrays or ShapeDtypeStructs) in the Megatron layout."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _param_spec(path, len(leaf.shape), vocab_split)), params
    )


def shard_params(params, mesh: Optional[Mesh], vocab_split: bool = False):
    """`params` placed in the Megatron layout on `mesh` (each device receives only its slices); as they are for
    None."""
    if mesh is None:
        return params
    return jax.device_put(params, param_shardings(params, mesh, vocab_split))


def abstract_sharded(abstract, mesh: Optional[Mesh], vocab_split: bool = False):
    """ShapeDtypeStructs carrying their target NamedSharding: what orbax restores into, and jit's out_shardings
    for parameters created on the devices."""
    if mesh is None:
        return abstract
    shardings = param_shardings(abstract, mesh, vocab_split)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings)


# The `dejavu_jax.sparsity.SparseWeights` leaves split on the tp axis like the MLP neurons (their first axis is ffn):
# every fixed row mask [ffn], and each MLP predictor's second layer w2_t [ffn, r] and b2 [ffn], so each device scores
# and chooses only its own neurons. Everything else (w1_t, b1, the threshold, head predictors, the head schedule) is
# replicated.
_SPARSE_SPLIT_FIELDS = {"fixed_rows": None, "mlp": {"w2_t", "b2", "w2_scale"}}  # field -> its split leaves (None: all)


def _sparse_spec(path) -> P:
    field, leaf = path[0].name, getattr(path[-1], "name", None)
    if field not in _SPARSE_SPLIT_FIELDS:
        return P()
    split_leaves = _SPARSE_SPLIT_FIELDS[field]
    return P(TP_AXIS) if split_leaves is None or leaf in split_leaves else P()


def sparse_weight_shardings(weights, mesh: Mesh):
    """A tree of NamedSharding matching `weights` (a `sparsity.SparseWeights`): fixed row masks and the MLP
    predictors' w2_t, b2 and w2_scale split on ffn over the tp axis, the rest replicated."""
    return jax.tree_util.tree_map_with_path(lambda path, _: NamedSharding(mesh, _sparse_spec(path)), weights)


def shard_sparse_weights(weights, mesh: Optional[Mesh]):
    """`weights` (a `sparsity.SparseWeights`) placed beside parameters in the Megatron layout on `mesh`
    (`sparse_weight_shardings`: each device receives the scoring rows of its own neurons); as they are for None.
    `mesh`'s size must divide the ffn width, as `tp_mesh` checks."""
    if mesh is None or weights is None:
        return weights
    return jax.device_put(weights, sparse_weight_shardings(weights, mesh))


def mesh_of(params) -> Optional[Mesh]:
    """The tp mesh `params` live on, or None when they sit on one device."""
    leaf = params["embed_tokens"]["embedding"]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and TP_AXIS in sharding.mesh.axis_names:
        return sharding.mesh if sharding.mesh.shape[TP_AXIS] > 1 else None
    return None


def tp_size(params) -> int:
    mesh = mesh_of(params)
    return 1 if mesh is None else mesh.shape[TP_AXIS]


def constrain_cache(cache, mesh: Optional[Mesh]):
    """Inside jit: the KV cache split on heads (K/V [B, H, S, hd]), its bookkeeping replicated. None: unchanged."""
    if mesh is None:
        return cache
    heads = NamedSharding(mesh, P(None, TP_AXIS))
    replicated = NamedSharding(mesh, P())
    constrain = jax.lax.with_sharding_constraint
    return cache.replace(
        keys=tuple(constrain(k, heads) for k in cache.keys),
        values=tuple(constrain(v, heads) for v in cache.values),
        slot_mask=constrain(cache.slot_mask, replicated),
        next_position=constrain(cache.next_position, replicated),
        cursor=constrain(cache.cursor, replicated),
    )


def param_bytes_per_device(params) -> list[int]:
    """Bytes of `params` held on each of this process's devices that hold any, in device-id order."""
    held: dict[Any, int] = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return [held[d] for d in sorted(held, key=lambda d: d.id)]


# ---- several hosts ---------------------------------------------------------------------------------------------

HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_hosts(
    coordinator: Optional[str] = None, num_processes: Optional[int] = None, process_id: Optional[int] = None
) -> bool:
    """Join a multi-host run through `jax.distributed.initialize` when one is asked for: by the arguments, else by
    the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns whether it
    initialized. Must run before anything touches a device; a ValueError for an incomplete or bad setting."""
    env = {name: os.environ.get(name) for name in HOST_ENV}
    coordinator = coordinator or env["JAX_COORDINATOR_ADDRESS"]
    try:
        num_processes = num_processes if num_processes is not None else _env_int(env["JAX_NUM_PROCESSES"])
        process_id = process_id if process_id is not None else _env_int(env["JAX_PROCESS_ID"])
    except ValueError:
        raise ValueError(
            f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers. Got {env['JAX_NUM_PROCESSES']!r} and "
            f"{env['JAX_PROCESS_ID']!r}"
        ) from None
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if not any(given):
        return False
    if not all(given):
        raise ValueError(
            "a multi-host run needs the coordinator address, the number of processes and this process's id "
            "(--coordinator, --num-processes, --process-id or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
            f"JAX_PROCESS_ID). Got {coordinator!r}, {num_processes!r} and {process_id!r}"
        )
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"the process id must lie in [0, number of processes). Got {process_id} and {num_processes}")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def _env_int(value: Optional[str]) -> Optional[int]:
    return None if value is None or value == "" else int(value)
