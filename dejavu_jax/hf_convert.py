"""HF OPT checkpoint -> this library's parameter tree (`python -m dejavu_jax.convert` writes it to disk).

The key map is strict: every target leaf names its source tensors and checks their shapes; a source tensor that
no target uses, a missing one, or one that appears twice is an error. Tensors are read, rearranged and cast one
target leaf at a time, so the peak memory is the converted tree plus one layer's worth of temporaries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from dejavu_jax.config import OPTConfig
from dejavu_jax.hf_checkpoint import CheckpointError, HFTensorReader

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}


def numpy_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}. Got {name!r}")
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return DTYPES[name]


# A target leaf: (path in the param tree, source keys, function of the source arrays -> the leaf).
Rule = tuple[tuple[str, ...], tuple[str, ...], Callable[..., np.ndarray]]


def _identity(x):
    return x


def conversion_rules(config: OPTConfig) -> list[Rule]:
    d, H, hd = config.hidden_size, config.num_attention_heads, config.head_dim
    rules: list[Rule] = [
        (("embed_tokens", "embedding"), ("decoder.embed_tokens.weight",), _identity),
        (("embed_positions", "embedding"), ("decoder.embed_positions.weight",), _identity),
    ]
    if config.has_projections:
        rules += [
            (("project_in", "kernel"), ("decoder.project_in.weight",), np.transpose),
            (("project_out", "kernel"), ("decoder.project_out.weight",), np.transpose),
        ]
    if config.has_final_layer_norm:
        rules += _layer_norm_rules(config, ("final_layer_norm",), "decoder.final_layer_norm")

    def qkv_w(q, k, v):  # three [d_out, d_in] -> [3, heads, head_dim, d_in]
        return np.stack([q, k, v]).reshape(3, H, hd, d)

    def qkv_b(q, k, v):
        return np.stack([q, k, v]).reshape(3, H, hd)

    for i in range(config.num_hidden_layers):
        src, dst = f"decoder.layers.{i}", f"layers_{i}"
        rules += _layer_norm_rules(config, (dst, "self_attn_layer_norm"), f"{src}.self_attn_layer_norm")
        rules += _layer_norm_rules(config, (dst, "final_layer_norm"), f"{src}.final_layer_norm")
        proj = [f"{src}.self_attn.{p}_proj" for p in "qkv"]
        rules += [
            ((dst, "self_attn", "qkv_w"), tuple(f"{p}.weight" for p in proj), qkv_w),
            ((dst, "self_attn", "out_w"), (f"{src}.self_attn.out_proj.weight",), lambda w: w.T.reshape(H, hd, d)),
            ((dst, "mlp", "fc1_w"), (f"{src}.fc1.weight",), _identity),
            ((dst, "mlp", "fc2_w_t"), (f"{src}.fc2.weight",), np.transpose),
        ]
        biases = [
            ((dst, "self_attn", "qkv_b"), tuple(f"{p}.bias" for p in proj), qkv_b, (3, H, hd)),
            ((dst, "self_attn", "out_b"), (f"{src}.self_attn.out_proj.bias",), _identity, (d,)),
            ((dst, "mlp", "fc1_b"), (f"{src}.fc1.bias",), _identity, (config.ffn_dim,)),
            ((dst, "mlp", "fc2_b"), (f"{src}.fc2.bias",), _identity, (d,)),
        ]
        for path, keys, fn, shape in biases:
            # Bias-free checkpoints (enable_bias=False) get zero biases: one code path for every variant.
            rules.append((path, keys, fn) if config.enable_bias else (path, (), _constant(shape, 0.0)))
    return rules


def _constant(shape, value):
    return lambda: np.full(shape, value, np.float32)


def _layer_norm_rules(config: OPTConfig, dst: tuple[str, ...], src: str) -> list[Rule]:
    if config.layer_norm_elementwise_affine:
        return [(dst + ("scale",), (f"{src}.weight",), _identity), (dst + ("bias",), (f"{src}.bias",), _identity)]
    d = config.hidden_size
    return [(dst + ("scale",), (), _constant((d,), 1.0)), (dst + ("bias",), (), _constant((d,), 0.0))]


# Keys a real checkpoint may carry that the model does not need.
_IGNORED_KEYS = ("lm_head.weight",)  # tied to embed_tokens (checked equal when present)


def iter_converted_groups(
    reader: HFTensorReader, config: OPTConfig, dtype: str = "float16", progress: bool = False
) -> Iterator[tuple[str, dict]]:
    """(top-level name, subtree) one group at a time (embeddings, each layer, ...), so a caller can write each
    group out and drop it: the peak is one group, not the model. Strict: raises on any unmapped source key."""
    from dejavu_jax.model import abstract_params

    target_dtype = numpy_dtype(dtype)
    expected = abstract_params(config)
    groups: dict[str, list[Rule]] = {}
    for rule in conversion_rules(config):
        groups.setdefault(rule[0][0], []).append(rule)
    if "lm_head.weight" in reader and not np.array_equal(
        reader.get("lm_head.weight"), reader.get("decoder.embed_tokens.weight")
    ):
        raise CheckpointError("lm_head.weight differs from embed_tokens: untied OPT heads are not supported")
    all_sources = {k for rules in groups.values() for _, keys, _ in rules for k in keys}
    unused = [k for k in reader.keys() if k not in all_sources and k not in _IGNORED_KEYS]
    if unused:
        raise CheckpointError(f"{len(unused)} tensors in {reader.directory} map to nothing: {unused[:5]}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(r) for r in groups.values()), desc="convert", unit="tensor")
    for name, rules in groups.items():
        subtree: dict = {}
        for path, keys, fn in rules:
            for key in keys:
                if key not in reader:
                    raise CheckpointError(f"tensor {key!r} is missing from {reader.directory}")
            leaf = fn(*(reader.get(k) for k in keys))
            want = _lookup(expected, path).shape
            if leaf.shape != want:
                raise CheckpointError(
                    f"tensor for {'/'.join(path)} from {list(keys)} has shape {leaf.shape}; the config wants {want}"
                )
            _insert(subtree, path[1:], np.ascontiguousarray(leaf.astype(target_dtype)))
            if bar is not None:
                bar.update()
        yield name, subtree
    if bar is not None:
        bar.close()


def convert_hf_params(
    reader: HFTensorReader, config: OPTConfig, dtype: str = "float16", progress: bool = False
) -> dict:
    """The whole param tree (nested dict of numpy arrays in `dtype`) for the checkpoint behind `reader`."""
    return dict(iter_converted_groups(reader, config, dtype, progress))


def _lookup(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _insert(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    if path[-1] in tree:
        raise CheckpointError(f"{'/'.join(path)} is produced twice")
    tree[path[-1]] = value


def read_hf_config(directory: str | Path) -> OPTConfig:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise CheckpointError(f"no config.json in {directory}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    return OPTConfig.from_hf_dict(hf)
