"""Generation: prefill and the decode loop in one jitted XLA program.

Static under jit: the config, the prompt bucket P and the number of cache slots (P + a bucket of new tokens).
Traced: `max_new_tokens`, the sampling settings and the PRNG key, so changing them within a bucket reuses the
compiled program. Every sequence stops at its own EOS; the loop ends when all have or the budget is spent.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dejavu_jax.config import OPTConfig
from dejavu_jax.kv_cache import KVCache
from dejavu_jax.model import OPTForCausalLM
from dejavu_jax.parallel import constrain_cache, mesh_of
from dejavu_jax.sampling import SamplingConfig, SamplingParams, sample_tokens
from dejavu_jax.sparsity import DENSE, HeadSparsity, SparseWeights, SparsityPolicy, for_decode_batch


@struct.dataclass
class DecodeState:
    step: jax.Array  # [] int32: tokens generated so far (the same for every sequence)
    cache: KVCache
    last_token: jax.Array  # [B] int32
    done: jax.Array  # [B] bool: the sequence has emitted EOS
    num_generated: jax.Array  # [B] int32: tokens generated up to and including EOS
    tokens: jax.Array  # [B, capacity] int32, padding after each sequence's end
    rng: jax.Array


def _model_for(config: OPTConfig, params, attention_impl: str = "xla", mesh=None) -> OPTForCausalLM:
    return OPTForCausalLM(config, params["embed_tokens"]["embedding"].dtype, attention_impl, mesh)


# How hard XLA searches GEMM tilings when it compiles the generation program. "default": XLA's usual autotuning.
# "exhaustive": every Triton tiling it knows: a slightly faster decode step for a compile of minutes at
# multi-billion-parameter sizes (measured in bench/results/NOTES.md). The results are kept in a per-fusion cache
# directory (`autotune_cache_dir()`), so a later compile of the same shapes takes seconds.
AUTOTUNE_MODES = ("default", "exhaustive")
# How the program's tensor-parallel all-reduces (two per layer and decode step) run. "nccl": one NCCL call each, XLA's
# default. "one-shot": XLA's collective kernel, one launch in which every device reads each peer's input over the
# GPU interconnect and adds them (XLA uses it for the sums that qualify: devices of one host, a power-of-two count,
# inputs up to 2 MB; the rest stay on NCCL). On two H200s of one host it measured no faster per call than NCCL
# (bench/results/allreduce_NVIDIA-H200-x2_2026-11-28_one-shot.md), so it is a benchmark option (`bench generate
# --all-reduce`), not a default. With more than two devices each device starts the sum at its own input, so their
# copies may differ in the last bit. No effect on one device.
ALL_REDUCE_MODES = ("nccl", "one-shot")
_STATIC = ("config", "num_slots", "policy", "attention_impl", "mesh")


def autotune_cache_dir() -> Path:
    """Where exhaustive autotuning keeps its results: $DEJAVU_XLA_AUTOTUNE_CACHE, else ~/.cache/dejavu_jax/."""
    default = Path.home() / ".cache" / "dejavu_jax" / "xla-autotune"
    return Path(os.environ.get("DEJAVU_XLA_AUTOTUNE_CACHE", default))


def _generate_tokens(
    params,
    input_ids,
    attention_mask,
    max_new_tokens,
    rng,
    sampling: SamplingParams,
    sparse_weights: SparseWeights | None = None,
    *,
    config: OPTConfig,
    num_slots: int,
    policy: SparsityPolicy = DENSE,
    attention_impl: str = "xla",
    mesh=None,
):
    """input_ids, attention_mask [B, P] (left padded) -> (tokens [B, num_slots - P], num_generated [B]).

    `policy` (static) and `sparse_weights` (traced: predictors, fixed rows, a head schedule) choose the decode steps'
    MLP neurons and attention heads (`dejavu_jax.sparsity`); the prefill computes every neuron and head (and fills the
    recent-input buffer a head policy's decode steps need). `attention_impl` picks the decode steps' attention
    (model.ATTENTION_IMPLS). `mesh`: the tp mesh `params` are sharded on (`parallel.mesh_of`), None for one device;
    the KV cache is then split on heads like them.
    """
    batch, prompt_len = input_ids.shape
    capacity = num_slots - prompt_len
    model = _model_for(config, params, attention_impl, mesh)
    dtype = params["embed_tokens"]["embedding"].dtype

    with jax.named_scope("prefill"):
        cache = constrain_cache(KVCache.create(config, batch, num_slots, dtype, policy.recent_window), mesh)
        logits, cache = model.apply({"params": params}, input_ids, attention_mask, cache, logits_for="last")
    rng, key = jax.random.split(rng)
    first = sample_tokens(logits[:, -1], key, sampling)
    state = DecodeState(
        step=jnp.int32(1),
        cache=cache,
        last_token=first,
        done=first == config.eos_token_id,
        num_generated=jnp.ones((batch,), jnp.int32),
        tokens=jnp.full((batch, capacity), config.pad_token_id, jnp.int32).at[:, 0].set(first),
        rng=rng,
    )

    def keep_going(s: DecodeState):
        return (s.step < jnp.minimum(max_new_tokens, capacity)) & ~jnp.all(s.done)

    def decode_one(s: DecodeState) -> DecodeState:
        with jax.named_scope("decode_step"):
            logits, cache = model.apply(
                {"params": params},
                s.last_token[:, None],
                jnp.ones((batch, 1), jnp.int32),
                s.cache,
                policy=policy,
                sparse_weights=sparse_weights,
            )
        rng, key = jax.random.split(s.rng)
        token = jnp.where(s.done, config.pad_token_id, sample_tokens(logits[:, -1], key, sampling))
        return DecodeState(
            step=s.step + 1,
            cache=constrain_cache(cache, mesh),
            last_token=token,
            done=s.done | (token == config.eos_token_id),
            num_generated=s.num_generated + (~s.done).astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step)),
            rng=rng,
        )

    final = jax.lax.while_loop(keep_going, decode_one, state)
    return final.tokens, final.num_generated


generate_tokens = jax.jit(_generate_tokens, static_argnames=_STATIC)


@functools.cache
def generation_program(autotune: str = "default", all_reduce: str = "nccl"):
    """`generate_tokens` compiled with the GEMM autotuning of `autotune` (see AUTOTUNE_MODES) and the all-reduces of
    `all_reduce` (see ALL_REDUCE_MODES). The cache directory is read once per process, at the first request for a
    mode."""
    if autotune not in AUTOTUNE_MODES:
        raise ValueError(f"autotune must be one of {AUTOTUNE_MODES}. Got {autotune!r}")
    if all_reduce not in ALL_REDUCE_MODES:
        raise ValueError(f"all_reduce must be one of {ALL_REDUCE_MODES}. Got {all_reduce!r}")
    options = {}
    if autotune == "exhaustive":
        cache = autotune_cache_dir()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the autotune cache {cache} ({e}); set DEJAVU_XLA_AUTOTUNE_CACHE") from None
        options["xla_gpu_exhaustive_tiling_search"] = True
        options["xla_gpu_per_fusion_autotune_cache_dir"] = str(cache)
    if all_reduce == "one-shot":
        options["xla_gpu_unsupported_use_all_reduce_one_shot_kernel"] = True
    if not options:
        return generate_tokens
    return jax.jit(_generate_tokens, static_argnames=_STATIC, compiler_options=options)


@functools.partial(jax.jit, static_argnames=("config", "num_slots", "recent_window", "mesh"))
def prefill(params, input_ids, attention_mask, *, config: OPTConfig, num_slots: int, recent_window: int = 0, mesh=None):
    """Step-by-step API: a fresh cache holding the prompt, and the last position's logits [B, V].
    `recent_window`: the recent inputs a head policy's decode steps need (`SparsityPolicy.recent_window`). `mesh`: as
    for `generate_tokens`."""
    model = _model_for(config, params, mesh=mesh)
    dtype = params["embed_tokens"]["embedding"].dtype
    cache = constrain_cache(KVCache.create(config, input_ids.shape[0], num_slots, dtype, recent_window), mesh)
    logits, cache = model.apply({"params": params}, input_ids, attention_mask, cache, logits_for="last")
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("config", "policy", "attention_impl", "mesh"), donate_argnames=("cache",))
def decode_step(
    params,
    cache: KVCache,
    tokens,
    sparse_weights=None,
    *,
    config: OPTConfig,
    policy: SparsityPolicy = DENSE,
    attention_impl: str = "xla",
    mesh=None,
):
    """Step-by-step API: append tokens [B] to the (donated) cache; return their logits [B, V] and the cache.
    A head policy's "repair" decoding needs a cache with `policy.recent_window` recent inputs. `mesh`: as for
    `generate_tokens` (the sparse decode MLP runs per device on it)."""
    model = _model_for(config, params, attention_impl, mesh)
    logits, cache = model.apply(
        {"params": params},
        tokens[:, None],
        jnp.ones((tokens.shape[0], 1), jnp.int32),
        cache,
        policy=policy,
        sparse_weights=sparse_weights,
    )
    return logits[:, -1], cache


def bucket(n: int, minimum: int) -> int:
    """Round up to a power of two (at least `minimum`) so nearby sizes share one compiled program."""
    return max(minimum, 1 << max(0, (n - 1)).bit_length())


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, length - len(seq) :] = seq
            mask[row, length - len(seq) :] = 1
    return ids, mask


def check_tp_policy(mesh, policy: SparsityPolicy) -> None:
    """Sharded parameters decode with a dense MLP, fixed row masks, lossless or predicted MLP sparsity (threshold
    or top-K selection): each device chooses among and computes its own neurons (`sparse_mlp.mlp_decode_rows_split`;
    top-K then keeps each shard's share of K, not the single-device choice). Fixed (scheduled) and predicted head
    sparsity, with either way of keeping K/V exact (`DecodeTuning.head_kv`), decode with exactly the single-device
    choice of heads: each device computes the chosen heads it holds over its own shard of the weights and the KV
    cache (`sparse_attention.head_sparse_decode_split`), with the attention block's one all-reduce. Oracle head
    selection (every head computed, then ranked by output norm: a study's bound, nothing to split) is refused with a
    ValueError. Sparse weights placed by `parallel.shard_sparse_weights` reach each device without a copy."""
    if mesh is None:
        return
    if policy.heads == HeadSparsity.ORACLE:
        raise ValueError(
            "tensor-parallel generation (--tp > 1) does not run the oracle head selection (it ranks every head's "
            "output, a single-device study). Got head sparsity oracle; use fixed or predicted heads, or --tp 1"
        )


def check_lengths(config: OPTConfig, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int. Got {max_new_tokens!r}")
    limit = config.max_position_embeddings
    for i, n in enumerate(prompt_lengths):
        if n == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if n > limit:
            raise ValueError(f"prompt {i} has {n} tokens, more than the model's {limit} positions")
        if n + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} ({n} tokens) + max_new_tokens ({max_new_tokens}) runs past the model's "
                f"{limit} positions. Lower max_new_tokens to at most {limit - n}"
            )


def generate_ids(
    params,
    config: OPTConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    policy: SparsityPolicy = DENSE,
    sparse_weights: SparseWeights | None = None,
    attention_impl: str = "xla",
    autotune: str = "default",
    all_reduce: str = "nccl",
) -> list[list[int]]:
    """Token-level generation for a batch of prompts of any lengths; returns the generated ids only. Parameters
    sharded over a tp mesh (`parallel.shard_params`, `checkpoint.load_model(tp=...)`) run tensor-parallel, their
    all-reduces as `all_reduce` says (ALL_REDUCE_MODES)."""
    program = generation_program(autotune, all_reduce)
    check_lengths(config, [len(p) for p in prompts], max_new_tokens)
    prompt_len = bucket(max(len(p) for p in prompts), 8)
    ids, mask = left_pad(prompts, prompt_len, config.pad_token_id)
    num_slots = prompt_len + bucket(max_new_tokens, 16)
    policy, sparse_weights = for_decode_batch(policy, sparse_weights, len(prompts))
    mesh = mesh_of(params)
    check_tp_policy(mesh, policy)
    tokens, counts = program(
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        jnp.int32(max_new_tokens),
        jax.random.PRNGKey(seed),
        sampling.to_device(),
        sparse_weights,
        config=config,
        num_slots=num_slots,
        policy=policy,
        attention_impl=attention_impl,
        mesh=mesh,
    )
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    return [tokens[i, : counts[i]].tolist() for i in range(len(prompts))]


def generate_text(
    model,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    policy: SparsityPolicy = DENSE,
    sparse_weights: SparseWeights | None = None,
    attention_impl: str = "xla",
    autotune: str = "default",
    all_reduce: str = "nccl",
) -> list[dict]:
    """`model` is a `LoadedModel`. One dict per prompt: prompt, text (continuation only), token_ids."""
    if model.tokenizer is None:
        raise ValueError(f"the model at {model.path} has no tokenizer files; pass token ids to generate_ids")
    if not prompts:
        raise ValueError("give at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt {i} is empty; give some text")
    encoded = [model.tokenizer(p)["input_ids"] for p in prompts]
    generated = generate_ids(
        model.params,
        model.config,
        encoded,
        max_new_tokens,
        sampling,
        seed,
        policy,
        sparse_weights,
        attention_impl,
        autotune,
        all_reduce,
    )
    return [
        {"prompt": p, "text": model.tokenizer.decode(g, skip_special_tokens=True), "token_ids": g}
        for p, g in zip(prompts, generated)
    ]
