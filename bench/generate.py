"""Decode latency: JAX (one compiled prefill + decode program) dense and sparse, vs HF transformers eager, vs the floor.

    python -m bench generate --shape opt-6.7b --shape opt-13b [--batch 1] [--prompt-len 128] [--new-tokens 128]
        [--mlp-density 0.1 [--fire-rate 0.05] [--predictor-rank 256,1000] [--selection threshold,topk]]
        [--tp 1,2 [--lm-head replicated,vocab] [--all-reduce nccl,one-shot]]

With --mlp-density, every row below runs in the same process on the same weights. fc1's biases are set so that a
fixed random `--fire-rate` of each layer's neurons fire for every token (the others never do), and every selection
below contains those neurons (recall 1), so no row earns credit a real predictor would not, and every row applies
the same fc2 rule (only rows with a nonzero ReLU output are read):
- fixed: a fixed row mask of `--mlp-density` of the neurons (the firing ones plus random others): the ceiling;
- lossless: dense fc1, fc2 over the firing neurons only (no predictor);
- predicted: random-weight predictors of each `--predictor-rank` whose output biases make exactly the fixed row set
  score above 0 (so threshold 0 and top-K with K = the set's size choose it), computed in full at every step, with
  each `--selection`.

A random-weight fp16 OPT of the real shape. Decode time per token is (T(N) - T(1)) / (N - 1) where T(n) is the
median time of one full generation call of n tokens: the same compiled program (n is traced), so compile and
prefill cancel; T(1) is reported as the prefill (+ first token). EOS is disabled so every run makes N tokens.
The rows of one shape, batch and attention are compiled first, then timed in `--repeats` interleaved rounds (each
round runs every row once), so a drift of the card during the run does not favour the rows timed first.
The floor is (weight bytes + mean KV-cache bytes read per decode step) / the device copy bandwidth measured in
the same run.

With --head-density, attention heads are sparse too: each decode step computes only k = round(density · heads)
heads per layer (kernels/head_sparse.py), every head's K/V kept exact (the ring-buffer repair by default;
`--tuning head_kv=all` for every head's K/V each step; dejavu_jax/sparse_attention.py). Batches above 1 compute every
head and zero the unchosen ones' outputs (measured faster; `--tuning head_max_batch=N` runs the head kernels up to N
sequences). Rows added:
- fixed heads: a seeded random k heads per token, layer and step (so the repair runs), MLP dense (its tuned twins
  only without --mlp-density: beside the MLP rows the tuned "fixed rows + fixed heads" rows say the same);
- fixed rows + fixed heads (with --mlp-density and the fixed variant);
- predicted + predicted heads (with the predicted variant): random-weight head predictors of the row's rank, top-k
  on the previous layer's input (the lookahead), beside the MLP predictors; with --head-threshold also heads chosen
  by a threshold that keeps about k of them a token (up to every head).
With --head-union each of these rows has a twin "(batch union)" at batches above 1: every sequence keeps the union of
the batch's chosen heads (`SparsityPolicy.head_union`). The table's "heads kept" column says k of the heads. Under
`--tp`, each device computes the chosen heads it holds (`sparse_attention.head_sparse_decode_split`), the same heads
as on one device.

With `--tp`, each value runs in turn (dense, and with --mlp-density the fixed-rows, lossless and predicted
variants: each device chooses among and runs the row-masked kernels over its own neurons, the fixed rows and the
predictors' second layer split like the neurons by `parallel.shard_sparse_weights`; top-K then keeps each shard's
ceil(K / tp) best, and the planted predictors' K is raised so that each shard keeps all of its chosen rows: a top-K
row under tp reads a few rows beyond the fixed set, never fewer), its random
weights created directly into their Megatron shardings (`dejavu_jax.parallel`), so no device ever holds the whole
model; `--lm-head` says whether the tied
embedding / LM head is replicated or split on the vocabulary. The floor is then per device: the bytes the
most loaded device reads (its parameter shards, its share of the KV cache) / the copy bandwidth of one device.
HF eager runs only at --tp 1. The rows of different --tp values are timed one value after another (their weights
do not fit side by side), not interleaved. `--all-reduce` lists how the all-reduces run (generation.ALL_REDUCE_MODES):
under tp every row is compiled once per mode, all timed in the same interleaved rounds, each row's "vs dense" against
the dense row of its own mode.

A `--tuning` row that fails to compile or to make its tokens (an experimental setting XLA refuses) is not timed: the
error is printed and listed under the table, and the other rows go on.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import copy_bandwidth, median_seconds, provenance, write_results
from dejavu_jax.config import OPT_SHAPES, shape_config
from dejavu_jax.generation import ALL_REDUCE_MODES, AUTOTUNE_MODES, generation_program
from dejavu_jax.model import ATTENTION_IMPLS, OPTForCausalLM, abstract_params, check_attention_impl
from dejavu_jax.parallel import (
    TP_AXIS,
    mesh_of,
    param_bytes_per_device,
    param_shardings,
    shard_params,
    shard_sparse_weights,
    tp_mesh,
)
from dejavu_jax.predictors import init_low_rank
from dejavu_jax.sampling import SamplingConfig
from dejavu_jax.sparsity import (
    DENSE,
    DecodeTuning,
    HeadSparsity,
    MLPSparsity,
    Selection,
    SparseWeights,
    SparsityPolicy,
    decode_predictor,
    for_decode_batch,
    head_schedule,
)


def random_params(config, dtype, mesh=None, vocab_split: bool = False):
    """Random weights; with a tp `mesh`, created on the devices straight into their shardings."""
    model = OPTForCausalLM(config, dtype)
    shardings = None if mesh is None else param_shardings(abstract_params(config, dtype), mesh, vocab_split)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))["params"], out_shardings=shardings)
    return init(jax.random.PRNGKey(0))


def bytes_read_per_token(config, batch, prompt_len, new_tokens, itemsize=2, params=None) -> dict:
    """What one decode step must read: every weight once (one row of the position table), and the KV cache. With
    sharded `params`: what the most loaded device reads (its shards, its heads' share of the cache)."""
    c = config
    unread_positions = (c.max_position_embeddings + 2 - 1) * c.hidden_size * itemsize
    weights = c.num_params * itemsize - unread_positions
    kv_per_token = 2 * c.num_hidden_layers * c.hidden_size * itemsize * batch
    mean_context = prompt_len + (new_tokens - 1) / 2
    tp = 1
    if params is not None:
        per_device = param_bytes_per_device(params)
        tp = len(per_device)
        weights = max(per_device) - unread_positions
    return {"weights": weights, "kv": kv_per_token * mean_context / tp}


def planted_rows(config, density: float, fire_rate: float, seed: int = 3):
    """Per layer (firing [ffn] bool, chosen [ffn] bool): `fire_rate` of the neurons fire, and `density` of them are
    chosen, the firing ones included."""
    rng = np.random.default_rng(seed)
    ffn = config.ffn_dim
    n_fire, n_chosen = max(1, round(fire_rate * ffn)), max(1, round(density * ffn))
    if n_fire > n_chosen:
        raise ValueError(f"--fire-rate ({fire_rate}) must not exceed --mlp-density ({density})")
    out = []
    for _ in range(config.num_hidden_layers):
        order = rng.permutation(ffn)
        firing, chosen = np.zeros(ffn, bool), np.zeros(ffn, bool)
        firing[order[:n_fire]] = True
        chosen[order[:n_chosen]] = True
        out.append((firing, chosen))
    return out


def plant_firing(params, rows):
    """fc1 biases +8 on the firing neurons, -8 elsewhere: the same neurons fire for every token."""
    params = jax.tree.map(lambda a: a, params)
    for i, (firing, _) in enumerate(rows):
        mlp = dict(params[f"layers_{i}"]["mlp"])
        mlp["fc1_b"] = jnp.where(jnp.asarray(firing), 8.0, -8.0).astype(mlp["fc1_b"].dtype)
        params[f"layers_{i}"] = {**params[f"layers_{i}"], "mlp": mlp}
    return params


def planted_predictors(config, rows, rank: int, tp: int = 1, int8_scores: bool = False) -> SparseWeights:
    """Random rank-`rank` predictors whose output biases (+100 / -100) put exactly the chosen rows above 0. Their
    top-K count is the chosen set's size; over `tp` shards, where each keeps ceil(K / tp) (`sparse_mlp.shard_topk`),
    K is `tp` times the largest shard's share of the set, so every shard keeps all of its chosen rows (and the
    shards with fewer some others). `int8_scores`: the scoring rows as int8 (`sparsity.decode_predictor`); the
    chosen rows are the same."""
    keys = jax.random.split(jax.random.PRNGKey(5), config.num_hidden_layers)
    layers = []
    for key, (_, chosen) in zip(keys, rows):
        k = int(chosen.sum()) if tp == 1 else tp * int(chosen.reshape(tp, -1).sum(axis=1).max())
        p = init_low_rank(
            key,
            config.hidden_size,
            rank,
            config.ffn_dim,
            dtype=jnp.float16,
            output_bias=np.where(chosen, 100.0, -100.0),
        ).replace(k=k)
        layers.append(decode_predictor(p, 0.0, jnp.float16, int8_scores))
    return SparseWeights(mlp=tuple(layers))


SPARSE_VARIANTS = ("fixed", "lossless", "predicted")


def random_head_predictors(config, rank: int, threshold=None) -> tuple:
    """Random rank-`rank` head predictors in the decode layout, one per layer (layer l reads layer l-1's input):
    their top-k heads change from token to token, so a timed row's K/V repair runs as it would with trained
    predictors. With `threshold`, calibrated at that score (threshold selection); without, top-K only. A head's score
    is close to a standard normal (standardized input, weights N(0, 1/d) and N(0, 1/r)), so a threshold of
    `head_threshold_for(density)` keeps about that fraction of the heads."""
    keys = jax.random.split(jax.random.PRNGKey(7), config.num_hidden_layers)
    return tuple(
        decode_predictor(
            init_low_rank(key, config.hidden_size, rank, config.num_attention_heads), threshold, jnp.float16
        )
        for key in keys
    )


def head_threshold_for(density: float) -> float:
    """The standard normal's score above which a `density` fraction lies (`random_head_predictors`)."""
    return float(statistics.NormalDist().inv_cdf(1.0 - density)) if density < 1 else float("-inf")


def _head_setting(name: str) -> bool:
    return name.startswith("head_")  # `DecodeTuning.head_*`


def tunes_heads(tuning: tuple) -> bool:
    """The tuning overrides some head-sparse setting."""
    return any(_head_setting(name) for name, _ in tuning)


def mlp_tuning(tuning: tuple) -> tuple:
    """The settings of `tuning` an MLP-only row uses (every head setting dropped)."""
    return tuple((name, value) for name, value in tuning if not _head_setting(name))


def mlp_variants(tunings: list, ranks, selections, fixed, predictors: dict, int8_predictors: dict) -> list:
    """The --mlp-density rows: (label, policy, weights, extra) for each (tuning, the variant names it times). A
    tuned row carries only the tuning's MLP settings (`mlp_tuning`), and is left out where those equal an earlier
    tuning's (the same program: e.g. a heads-only tuning repeats the untuned row). `fixed`: the fixed-rows
    SparseWeights; `predictors` / `int8_predictors`: rank -> MLP SparseWeights (int8: only the ranks it has)."""
    out, seen = [], set()
    for tuning, names in tunings:
        tuning = mlp_tuning(tuning)
        if tuning in seen:
            continue
        seen.add(tuning)
        tag, extra = tuning_label(tuning)
        if "fixed" in names:
            out.append((f"fixed rows{tag}", SparsityPolicy(tuning=tuning), fixed, extra))
        if "lossless" in names:
            out.append((f"lossless{tag}", SparsityPolicy(MLPSparsity.LOSSLESS, tuning=tuning), None, extra))
        if "predicted" not in names:
            continue
        for rank in ranks:
            for sel in selections:
                policy = SparsityPolicy(MLPSparsity.PREDICTED, sel, tuning=tuning)
                out.append((f"predicted, {sel.value}{tag}", policy, predictors[rank], {"rank": rank, **extra}))
                if rank in int8_predictors:
                    label = f"predicted, {sel.value}, int8 scores{tag}"
                    out.append((label, policy, int8_predictors[rank], {"rank": rank, **extra}))
    return out


def head_variants(
    config,
    density: float,
    tunings: list,
    ranks,
    selections,
    fixed,
    predictors,
    union: bool = False,
    head_threshold: bool = False,
) -> list:
    """The --head-density rows: (label, policy, weights, extra) for each (tuning, the variant names it times).
    `fixed`: the fixed-rows SparseWeights (None without --mlp-density); `predictors`: rank -> MLP SparseWeights.
    `union`: each row is followed by its twin whose decode steps give every sequence the batch's union of heads
    (`SparsityPolicy.head_union`, labelled "(batch union)"; the same program as its twin at batch 1).
    `head_threshold`: each threshold-selection predicted row also with heads chosen by threshold (about `density` of
    them a token, at most every head: `head_threshold_for`), labelled "predicted heads by threshold"."""
    n_heads = config.num_attention_heads
    k = max(1, round(density * n_heads))
    schedule = head_schedule(11, config.num_hidden_layers, config.num_attention_heads)
    head_predictors = {}
    out = []
    for tuning, names in tunings:
        tag, tuned = tuning_label(tuning)
        extra = {"heads_kept": f"{k}/{n_heads}", **tuned}
        fixed_heads = SparsityPolicy(heads=HeadSparsity.FIXED, head_k=k, tuning=tuning)
        if "fixed" in names:
            # A tuned heads-alone row only without MLP rows: beside them it costs a compile and says what the
            # "fixed rows + fixed heads" twin says (an untuned tuning is the untuned row's program).
            if not tuning or (tunes_heads(tuning) and fixed is None):
                out.append((f"fixed heads{tag}", fixed_heads, SparseWeights(head_schedule=schedule), extra))
            if fixed is not None:
                out.append(
                    (f"fixed rows + fixed heads{tag}", fixed_heads, fixed.replace(head_schedule=schedule), extra)
                )
        if "predicted" not in names:
            continue
        for rank in ranks if predictors else []:
            if rank not in head_predictors:
                head_predictors[rank] = random_head_predictors(config, rank)
            weights = predictors[rank].replace(heads=head_predictors[rank])
            for sel in selections:
                policy = SparsityPolicy(
                    MLPSparsity.PREDICTED, sel, heads=HeadSparsity.PREDICTED, head_k=k, tuning=tuning
                )
                label = f"predicted, {sel.value} + predicted heads{tag}"
                out.append((label, policy, weights, {"rank": rank, **extra}))
                if head_threshold and sel == Selection.THRESHOLD:
                    key = (rank, "threshold")
                    if key not in head_predictors:
                        head_predictors[key] = random_head_predictors(config, rank, head_threshold_for(density))
                    by_threshold = dataclasses.replace(policy, head_k=n_heads)
                    label = f"predicted, threshold + predicted heads by threshold{tag}"
                    kept = {"heads_kept": f"~{k}/{n_heads} (at most {n_heads})"}
                    out.append(
                        (
                            label,
                            by_threshold,
                            weights.replace(heads=head_predictors[key]),
                            {"rank": rank, **extra, **kept},
                        )
                    )
    if not union:
        return out
    twins = []
    for label, policy, weights, extra in out:
        twins.append((label, policy, weights, extra))
        twins.append((f"{label} (batch union)", dataclasses.replace(policy, head_union=True), weights, extra))
    return twins


def parse_tuning(spec: str) -> tuple:
    """ "fc1_segment=128,hidden=xla" -> (("fc1_segment", 128), ("hidden", "xla")), checked by DecodeTuning."""
    pairs = []
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"expected NAME=VALUE items separated by commas. Got {spec!r}")
        value = value.strip()
        pairs.append((name.strip(), int(value) if value.lstrip("-").isdigit() else value))
    DecodeTuning.parse(tuple(pairs))
    return tuple(pairs)


def format_tuning(tuning: tuple) -> str:
    return ",".join(f"{name}={value}" for name, value in tuning)


def tuning_label(tuning: tuple) -> tuple[str, dict]:
    """(the suffix a tuned row's label gets, the row's extra fields); empty for the untuned rows."""
    if not tuning:
        return "", {}
    return f" [{format_tuning(tuning)}]", {"tuning": format_tuning(tuning)}


def prepare_jax(
    config,
    batch,
    prompt_len,
    new_tokens,
    params=None,
    policy=DENSE,
    sparse_weights=None,
    attention_impl="xla",
    autotune="default",
    all_reduce="nccl",
    check: bool = True,
):
    """Compile one generation program and (with `check`; else call `check_run` later) check it makes `new_tokens`
    tokens: (run(n) -> blocks, compile seconds)."""
    if params is None:
        params = random_params(config, jnp.float16)
    jax.block_until_ready(params)
    no_eos = dataclasses.replace(config, eos_token_id=-1)  # fixed token count
    ids = jax.random.randint(jax.random.PRNGKey(1), (batch, prompt_len), 3, config.vocab_size)
    mask = jnp.ones_like(ids)
    sampling = SamplingConfig().to_device()
    num_slots = prompt_len + new_tokens
    policy, sparse_weights = for_decode_batch(policy, sparse_weights, batch)  # as generation runs it
    static = dict(
        config=no_eos, num_slots=num_slots, policy=policy, attention_impl=attention_impl, mesh=mesh_of(params)
    )
    program = generation_program(autotune, all_reduce)

    def run(n):
        tokens, counts = program(
            params, ids, mask, jnp.int32(n), jax.random.PRNGKey(2), sampling, sparse_weights, **static
        )
        tokens.block_until_ready()
        return counts

    start = time.perf_counter()
    program.lower(params, ids, mask, jnp.int32(1), jax.random.PRNGKey(2), sampling, sparse_weights, **static).compile()
    compile_s = time.perf_counter() - start
    if check:
        check_run(run, new_tokens)
    return run, compile_s


def check_run(run, new_tokens: int) -> None:
    """Runs a prepared program once (its first run, outside any timing) and checks it made `new_tokens` tokens."""
    counts = run(new_tokens)
    assert int(np.min(counts)) == new_tokens, f"generated {counts}, wanted {new_tokens}"


def compile_rows(compile_one, items: list, threads: int, may_fail=lambda item: True) -> list:
    """compile_one(item) for every item, in order: its result, or the exception it raised where `may_fail(item)`;
    any other exception ends the call at once (no further item starts). With `threads` > 1 the first item compiles
    alone (a group's dense row: XLA autotunes its GEMMs with the GPU to itself, and later programs find them in the
    process's autotuning cache), then the rest on that many threads: XLA compiles with the GIL released, and a row's
    compile is mostly XLA's."""

    def attempt(item):
        try:
            return compile_one(item)
        except Exception as e:
            if not may_fail(item):
                raise
            return e  # returned: the caller lists the row as not timed

    if threads <= 1 or len(items) <= 2:
        return [attempt(item) for item in items]
    first = attempt(items[0])
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    try:
        return [first, *pool.map(attempt, items[1:])]
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, the items not yet started never start


def time_interleaved(runs: list, new_tokens: int, repeats: int) -> list[dict]:
    """Time every prepared `run` in rounds (each round runs every program once at N and at 1 token), so a slow drift
    of the card (clocks, temperature) spreads over all rows instead of favouring the ones timed first."""
    full = [[] for _ in runs]
    one = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            for n, times in ((new_tokens, full[i]), (1, one[i])):
                start = time.perf_counter()
                run(n)
                times.append(time.perf_counter() - start)
    out = []
    for f, o in zip(full, one):
        t_full, t_one = float(np.median(f)), float(np.median(o))
        out.append(
            {
                "prefill_ms": t_one * 1e3,
                "decode_ms_per_token": (t_full - t_one) / (new_tokens - 1) * 1e3,
                "total_ms": t_full * 1e3,
            }
        )
    return out


def time_hf(config, batch, prompt_len, new_tokens, repeats) -> dict | None:
    try:
        import torch
        from transformers import OPTConfig as HFConfig, OPTForCausalLM as HFModel
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    hf_config = HFConfig(**{k: v for k, v in config.to_hf_dict().items() if k not in ("model_type", "architectures")})
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = HFModel(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(3, config.vocab_size, (batch, prompt_len), device="cuda")

    def run(n):
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=config.pad_token_id,
            )
        torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + n

    hf_repeats = max(3, repeats // 3)
    t_full, _ = median_seconds(lambda: run(new_tokens), hf_repeats)
    t_one, _ = median_seconds(lambda: run(1), hf_repeats)
    model = None  # free the GPU memory before JAX runs
    gc.collect()
    torch.cuda.empty_cache()
    return {"prefill_ms": t_one * 1e3, "decode_ms_per_token": (t_full - t_one) / (new_tokens - 1) * 1e3}


def attention_list(text: str) -> list[str]:
    try:
        return [check_attention_impl(name.strip()) for name in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", action="append", choices=sorted(OPT_SHAPES), help="OPT shape; repeat for several")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median)")
    p.add_argument("--no-hf", action="store_true", help="skip HF transformers eager")
    p.add_argument(
        "--int8-scores",
        action="store_true",
        help="with --mlp-density: also time each predicted row with the predictors' scoring rows in int8 "
        "(dejavu_jax.generate --int8-scores), on the same chosen rows",
    )
    p.add_argument(
        "--mlp-density",
        type=float,
        default=None,
        help="also time sparse-MLP decoding in the same run (fixed rows, lossless, predicted; see above): "
        "the fraction of each layer's neurons chosen per token",
    )
    p.add_argument(
        "--fire-rate",
        type=float,
        default=0.05,
        help="with --mlp-density: the fraction of neurons that fire (fc1 > 0) per token (default 0.05)",
    )
    p.add_argument(
        "--head-density",
        type=float,
        default=None,
        help="also time head-sparse decoding (see above): the fraction of each layer's attention heads computed per "
        "token (k = round(density x heads), at least 1)",
    )
    p.add_argument(
        "--head-union",
        action="store_true",
        help="with --head-density: also time each head row with every sequence keeping the batch's union of heads "
        "(dejavu_jax.generate --head-union), at batches above 1",
    )
    p.add_argument(
        "--head-threshold",
        action="store_true",
        help="with --head-density and the predicted variant: also time each threshold-selection row with its heads "
        "chosen by threshold too (random head predictors calibrated to keep about --head-density of the heads a "
        "token, up to every head; the count varies per token and layer)",
    )
    p.add_argument(
        "--predictor-rank",
        default="256,1000",
        help="with --mlp-density: comma list of predictor ranks (default 256,1000)",
    )
    p.add_argument(
        "--selection",
        default="threshold,topk",
        help="with --mlp-density: comma list of predicted selections, threshold and/or topk (default both)",
    )
    p.add_argument(
        "--variants",
        default=",".join(SPARSE_VARIANTS),
        help=f"with --mlp-density: comma list of the sparse rows to time beside dense (default all: "
        f"{','.join(SPARSE_VARIANTS)})",
    )
    p.add_argument(
        "--tuning",
        action="append",
        default=[],
        metavar="NAME=VALUE,...",
        help="with --mlp-density: also time every --variants row with these decode-kernel overrides "
        "(dejavu_jax.sparsity.DecodeTuning: hidden=pallas|xla, hidden_layernorm=0|1, hidden_block_r=N, "
        "hidden_stream=N, scores=fc1|kernel|xla, or MaskedMLPPlan fields such as fc1_segment=128; head_ + a "
        "HeadSparsePlan field for the --head-density rows); repeat for several. An MLP-only row takes the tuning's "
        "MLP settings, and is not repeated for a tuning whose MLP settings an earlier one had",
    )
    p.add_argument(
        "--tuned-variants",
        default=None,
        help="comma list of the rows each --tuning times (default: --variants)",
    )
    p.add_argument("--batches", default=None, help="comma list of batch sizes to time in this run (default --batch)")
    p.add_argument(
        "--compile-threads",
        type=int,
        default=1,
        help="compile a group's rows on this many threads, the first (dense) alone before the others (default 1: "
        "one after another). A row's 'compile s' is then its own compile beside the others'; XLA autotunes the GEMMs "
        "the dense program lacks while other rows compile",
    )
    p.add_argument(
        "--attention",
        type=attention_list,
        default=list(ATTENTION_IMPLS),
        help=f"comma list of decode attention implementations to time side by side "
        f"(default {','.join(ATTENTION_IMPLS)})",
    )
    p.add_argument(
        "--autotune",
        default="default",
        choices=AUTOTUNE_MODES,
        help="XLA GEMM autotuning of the JAX program (dejavu_jax.generation.AUTOTUNE_MODES); 'exhaustive' "
        "compiles for minutes the first time, its results cached (see autotune_cache_dir)",
    )
    from dejavu_jax.parallel_args import add_parallel_args, check_parallel_args

    add_parallel_args(p, several=True)
    p.add_argument(
        "--lm-head",
        default="replicated",
        help="with --tp > 1: comma list of LM-head (tied embedding) layouts to time, replicated and/or vocab "
        "(split on the vocabulary) (default replicated)",
    )
    p.add_argument(
        "--all-reduce",
        default="nccl",
        help=f"with --tp > 1: comma list of all-reduce modes to time side by side "
        f"({', '.join(ALL_REDUCE_MODES)}; dejavu_jax.generation.ALL_REDUCE_MODES) (default nccl)",
    )
    p.add_argument("--out", default=None, help="markdown path (default bench/results/generate_<card>_<date>.md)")
    args = p.parse_args(argv)
    shapes = args.shape or ["opt-6.7b", "opt-13b"]
    if args.new_tokens < 2 or args.batch < 1 or args.prompt_len < 1:
        p.error("need --new-tokens >= 2, --batch >= 1, --prompt-len >= 1")
    if args.mlp_density is not None and not 0 < args.mlp_density <= 1:
        p.error(f"--mlp-density must be in (0, 1]. Got {args.mlp_density}")
    try:
        ranks = [int(r) for r in args.predictor_rank.split(",")]
        selections = [Selection(v.strip()) for v in args.selection.split(",")]
        batches = [int(b) for b in args.batches.split(",")] if args.batches else [args.batch]
    except ValueError as e:
        p.error(f"--predictor-rank, --selection and --batches are comma lists ({e})")
    variant_names = [v.strip() for v in args.variants.split(",") if v.strip()]
    tuned_names = [v.strip() for v in (args.tuned_variants or args.variants).split(",") if v.strip()]
    if not set(variant_names) | set(tuned_names) <= set(SPARSE_VARIANTS):
        p.error(f"--variants and --tuned-variants take {','.join(SPARSE_VARIANTS)}. Got {args.variants!r}")
    try:
        tunings = [()] + [parse_tuning(spec) for spec in args.tuning]
    except ValueError as e:
        p.error(f"--tuning: {e}")
    if min(ranks) < 1 or min(batches) < 1 or args.compile_threads < 1:
        p.error("ranks, batches and --compile-threads must be >= 1")
    if args.mlp_density is not None and not 0 < args.fire_rate <= args.mlp_density:
        p.error(f"--fire-rate must be in (0, --mlp-density]. Got {args.fire_rate}")
    if args.head_density is not None and not 0 < args.head_density <= 1:
        p.error(f"--head-density must be in (0, 1]. Got {args.head_density}")
    if args.head_union and args.head_density is None:
        p.error("--head-union needs --head-density")
    if args.head_threshold and args.head_density is None:
        p.error("--head-threshold needs --head-density")
    if args.int8_scores and (args.mlp_density is None or "predicted" not in set(variant_names) | set(tuned_names)):
        p.error("--int8-scores adds predicted rows: it needs --mlp-density and the predicted variant")
    all_reduces = list(dict.fromkeys(m.strip() for m in args.all_reduce.split(",") if m.strip()))
    if not all_reduces or not set(all_reduces) <= set(ALL_REDUCE_MODES):
        p.error(f"--all-reduce takes a comma list of {', '.join(ALL_REDUCE_MODES)}. Got {args.all_reduce!r}")
    lm_heads = [h.strip() for h in args.lm_head.split(",") if h.strip()]
    if not lm_heads or not set(lm_heads) <= {"replicated", "vocab"}:
        p.error(f"--lm-head takes a comma list of replicated and vocab. Got {args.lm_head!r}")
    try:
        tps = check_parallel_args(args, several=True)
        for name in shapes:  # every layout checked against every shape before anything is timed
            for tp in tps:
                for head in lm_heads:
                    tp_mesh(shape_config(name), tp, head == "vocab")
    except ValueError as e:
        p.error(str(e))
    # One device has a single LM-head layout.
    layouts = [(tp, head) for tp in tps for head in (lm_heads if tp != 1 else ["replicated"])]
    layouts = list(dict.fromkeys(layouts))

    info = provenance()
    bandwidth = copy_bandwidth()
    bw = bandwidth["floor_bandwidth"]
    print(f"{info['card']}: copy bandwidth {bw / 1e12:.2f} TB/s ({bandwidth})", flush=True)
    rows = []
    not_timed = []  # (row label, error) of the --tuning rows that failed

    def write_so_far():
        """Write every row measured so far, so a run cut off by a time limit keeps its finished groups."""
        lines = [
            f"# Decode latency, {info['card']}",
            "",
            f"- date {info['date']}, commit `{info['commit']}`, jax {info['jax']}",
            f"- command: `{info['command']}`",
            f"- copy bandwidth (read+write) {bw / 1e12:.2f} TB/s; random fp16 weights; greedy; EOS disabled; "
            f"XLA autotuning: {args.autotune}",
        ]
        if args.mlp_density is not None:
            lines.append(
                f"- sparse rows: {args.mlp_density:.0%} of the neurons chosen per token, {args.fire_rate:.0%} "
                f"fire (every selection contains them); the floor is the dense one"
            )
        lines += [
            "",
            "| shape | tp | LM head | all-reduce | batch | attention | variant | predictor rank | heads kept | "
            "JAX ms/token | vs dense | tokens/s | floor ms | / floor | HF eager ms/token | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            jx, hf = r["jax"], r["hf"]
            ms = jx["decode_ms_per_token"]
            hf_cell = f"{hf['decode_ms_per_token']:.2f}" if hf else "-"
            lines.append(
                f"| {r['shape']} | {r['tp']} | {r['lm_head']} | {r.get('all_reduce', '-')} | {r['batch']} | "
                f"{r['attention']} | {r['variant']} | "
                f"{r.get('rank', '-')} | {r.get('heads_kept', 'all')} | {ms:.2f} | {r['speedup_vs_dense']:.2f}x | {1e3 * r['batch'] / ms:.1f} | {r['floor_ms']:.2f} | "
                f"{ms / r['floor_ms']:.2f} | {hf_cell} | {jx['compile_s']:.1f} |"
            )
        if not_timed:
            lines += ["", "Not timed (the setting failed):"]
            lines += [f"- {label}: {error}" for label, error in not_timed]
        markdown = "\n".join(lines) + "\n"
        card = info["card"].replace(" ", "-")
        results = {**info, "bandwidth": bandwidth, "rows": rows, "not_timed": [list(n) for n in not_timed]}
        path = write_results(f"generate_{card}_{info['date']}", markdown, results, args.out)
        return path, markdown

    for name in shapes:
        config = shape_config(name)
        for tp, lm_head in layouts:
            vocab_split = lm_head == "vocab"
            started = time.perf_counter()
            mesh = tp_mesh(config, tp, vocab_split)
            tp_n = 1 if mesh is None else mesh.shape[TP_AXIS]
            params = random_params(config, jnp.float16, mesh, vocab_split)
            placement = {"tp": tp_n, "lm_head": lm_head, "param_bytes_per_device": param_bytes_per_device(params)}
            where = "" if mesh is None else f" tp{tp_n}" + (" vocab-split" if vocab_split else "")
            variants = [("dense", DENSE, None, {})]
            if args.mlp_density is not None:
                planted = planted_rows(config, args.mlp_density, args.fire_rate)
                params = shard_params(plant_firing(params, planted), mesh)  # the planted biases split like fc1
                fixed_rows = tuple(jnp.asarray(c, jnp.int32) for _, c in planted)
                fixed = shard_sparse_weights(SparseWeights(fixed_rows=fixed_rows), mesh)  # split like the neurons
                wants_predictors = "predicted" in set(variant_names) | set(tuned_names)
                predictors = {
                    rank: shard_sparse_weights(planted_predictors(config, planted, rank, tp_n), mesh)
                    for rank in ranks
                    if wants_predictors
                }
                int8_predictors = {
                    rank: shard_sparse_weights(planted_predictors(config, planted, rank, tp_n, True), mesh)
                    for rank in ranks
                    if wants_predictors and args.int8_scores
                }
                variants += mlp_variants(
                    [(t, tuned_names if t else variant_names) for t in tunings],
                    ranks,
                    selections,
                    fixed,
                    predictors,
                    int8_predictors,
                )
            if args.head_density is not None:
                variants += head_variants(
                    config,
                    args.head_density,
                    [(t, tuned_names if t else variant_names) for t in tunings],
                    ranks,
                    selections,
                    fixed if args.mlp_density is not None else None,
                    predictors if args.mlp_density is not None else {},
                    args.head_union,
                    args.head_threshold,
                )
            # Printed so that whoever budgets a device call's time sees what a shape costs before its first compile.
            print(
                f"{name}{where}: weights and {len(variants)} rows' inputs made in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
            for batch in batches:
                read = bytes_read_per_token(config, batch, args.prompt_len, args.new_tokens, params=params)
                floor_ms = (read["weights"] + read["kv"]) / bw * 1e3
                skip_hf = args.no_hf or mesh is not None
                hf = None if skip_hf else time_hf(config, batch, args.prompt_len, args.new_tokens, args.repeats)
                # the all-reduce mode matters only with several devices
                modes = all_reduces if tp_n > 1 else ["-"]
                # a union row is its twin's program at batch 1
                rows_here = [v for v in variants if batch > 1 or not v[1].head_union]
                group = [(mode, variant) for mode in modes for variant in rows_here]
                for impl in args.attention:
                    tags = [f" [{impl}]" + ("" if mode == "-" else f" [{mode}]") for mode, _ in group]
                    prepared, compile_times, compiled = [], [], []

                    def compile_row(entry, impl=impl):
                        mode, (_, policy, weights, _) = entry
                        return prepare_jax(
                            config,
                            batch,
                            args.prompt_len,
                            args.new_tokens,
                            params,
                            policy,
                            weights,
                            attention_impl=impl,
                            autotune=args.autotune,
                            all_reduce="nccl" if mode == "-" else mode,
                            check=False,
                        )

                    def tuned(entry):  # only a --tuning row may fail without ending the run
                        return "tuning" in entry[1][3]

                    outcomes = compile_rows(compile_row, group, args.compile_threads, may_fail=tuned)
                    for i, (entry, how, outcome) in enumerate(zip(group, tags, outcomes)):
                        label = entry[1][0]
                        try:
                            if isinstance(outcome, Exception):
                                raise outcome
                            run, compile_s = outcome
                            check_run(run, args.new_tokens)
                        except Exception as e:
                            if not tuned(entry):
                                raise
                            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
                            not_timed.append((f"{name}{where} b{batch}{how} {label}", error))
                            print(f"{name}{where} b{batch}{how} {label}: NOT TIMED, {error}", flush=True)
                            continue
                        prepared.append(run)
                        compile_times.append(compile_s)
                        compiled.append(i)
                        print(f"{name}{where} b{batch}{how} {label}: compiled in {compile_s:.1f} s", flush=True)
                    group, tags = [group[i] for i in compiled], [tags[i] for i in compiled]
                    timings = time_interleaved(prepared, args.new_tokens, args.repeats)
                    dense_of = {m: t for (m, v), t in zip(group, timings) if v[0] == "dense"}
                    for (mode, (label, _, _, extra)), how, jx, compile_s in zip(group, tags, timings, compile_times):
                        jx = {"compile_s": compile_s, **jx}
                        ms = jx["decode_ms_per_token"]
                        dense_ms = dense_of[mode]["decode_ms_per_token"]
                        row = {
                            "shape": name,
                            "attention": impl,
                            "all_reduce": mode,
                            "batch": batch,
                            "prompt_len": args.prompt_len,
                            "new_tokens": args.new_tokens,
                            "variant": label,
                            **placement,
                            **extra,
                            "floor_ms": floor_ms,
                            "bytes_per_token": read,
                            "jax": jx,
                            "hf": hf if label == "dense" else None,
                            "speedup_vs_dense": dense_ms / ms,
                            "jax_gbs": (read["weights"] + read["kv"]) / ms / 1e6,
                        }
                        if args.mlp_density is not None and label != "dense":
                            row.update(density=args.mlp_density, fire_rate=args.fire_rate)
                        rows.append(row)
                        print(
                            f"{name}{where} b{batch}{how} {label} {extra or ''}: {ms:.2f} ms/token "
                            f"({dense_ms / ms:.2f}x dense, {ms / floor_ms:.2f}x the dense floor), compile "
                            f"{jx['compile_s']:.1f} s",
                            flush=True,
                        )
                    write_so_far()
            # the timed programs hold the weights: free both before the next layout's weights are made
            prepared = run = params = None
            gc.collect()

    path, markdown = write_so_far()
    print(markdown)
    print(f"wrote {path}")
    return 0
