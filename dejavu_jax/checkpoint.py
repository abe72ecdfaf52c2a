"""Model directories: write a converted one (orbax), and open any model a user names.

A converted model directory holds `config.json` (HF format), `dejavu_jax.json` (what this library wrote),
`params/` (an orbax checkpoint of the parameter tree) and the tokenizer files. `load_model` accepts that, a
Hugging Face checkpoint directory (converted in memory), or a hub id such as `facebook/opt-1.3b` (fetched
through huggingface_hub where a network exists).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from dejavu_jax.atomic import atomic_directory
from dejavu_jax.config import OPTConfig
from dejavu_jax.hf_convert import convert_hf_params, iter_converted_groups, numpy_dtype, read_hf_config
from dejavu_jax.hf_checkpoint import CheckpointError, HFTensorReader, is_hf_checkpoint
from dejavu_jax.parallel import abstract_sharded, shard_params, tp_mesh
from dejavu_jax.tokenizer import load_tokenizer

MANIFEST = "dejavu_jax.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


@dataclasses.dataclass
class LoadedModel:
    config: OPTConfig
    params: Any  # nested dict of jax arrays
    tokenizer: Any  # a transformers tokenizer, or None
    dtype: str
    path: Path


def is_converted_model(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MANIFEST).exists()


def save_param_groups(directory: Path, groups) -> None:
    """One orbax checkpoint per top-level group (`params/embed_tokens`, `params/layers_0`, ...): written and
    dropped one at a time, so converting never holds the whole model."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    for name, subtree in groups:
        checkpointer.save(directory.absolute() / PARAMS_DIR / name, subtree)
        checkpointer.wait_until_finished()
        del subtree


def restore_params(directory: Path, config: OPTConfig, dtype: str, mesh=None, vocab_split: bool = False):
    """The parameter tree of a converted model directory, in `dtype`. With a tp `mesh` (`parallel.tp_mesh`) every
    array is restored straight into its Megatron sharding: each device reads only its slices, so neither a device
    nor the host ever holds the whole model."""
    import orbax.checkpoint as ocp
    from dejavu_jax.model import abstract_params

    manifest = json.loads((directory / MANIFEST).read_text())
    stored = jnp.dtype(numpy_dtype(manifest["dtype"]))
    want = jnp.dtype(numpy_dtype(dtype))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, stored), abstract_params(config))
    if mesh is None:
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        targets = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one_device), abstract)
    else:
        targets = abstract_sharded(abstract, mesh, vocab_split)
    checkpointer = ocp.StandardCheckpointer()
    params = {}
    for name, target in targets.items():
        if not (directory / PARAMS_DIR / name).exists():
            raise CheckpointError(f"{directory} is missing params/{name}; reconvert the model")
        restored = checkpointer.restore(directory.absolute() / PARAMS_DIR / name, target)
        params[name] = restored if want == stored else jax.tree.map(lambda x: x.astype(want), restored)
    return params


def write_model_directory(
    out: str | os.PathLike, config: OPTConfig, groups, dtype: str, tokenizer, source: str, replace: bool = False
) -> Path:
    """Write a converted model directory atomically from `groups`, (name, parameter subtree) pairs in the layout
    `abstract_params(config)` gives, stored as `dtype`; `tokenizer` (a transformers tokenizer or None) is saved
    beside them, and `source` recorded in the manifest."""
    with atomic_directory(out, replace=replace) as tmp:
        save_param_groups(tmp, groups)
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {"format": FORMAT_VERSION, "dtype": dtype, "source": source, "num_params": config.num_params}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out)


def convert_to_directory(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float16", force: bool = False
) -> dict:
    """Convert an HF OPT checkpoint into a model directory, atomically (temp dir + rename)."""
    start = time.perf_counter()
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir} is not a directory")
    if out.resolve() == hf_dir.resolve():
        raise ValueError(f"--out must differ from --hf. Got {out} for both")
    config = read_hf_config(hf_dir)
    reader = HFTensorReader(hf_dir)
    numpy_dtype(dtype)
    tokenizer = load_tokenizer(hf_dir, required=False)
    groups = iter_converted_groups(reader, config, dtype, progress=True)
    write_model_directory(out, config, groups, dtype, tokenizer, source=str(hf_dir), replace=force)
    return {
        "source": str(hf_dir),
        "out": str(out),
        "dtype": dtype,
        "num_params": config.num_params,
        "seconds": time.perf_counter() - start,
    }


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_dir(model: str) -> Path:
    """A local directory for `model`: the directory itself, or a hub snapshot."""
    path = Path(model)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"--model {model} is a file; expected a model directory")
        return path
    if _HUB_ID.match(model):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
        except Exception as e:
            reason = " ".join(str(e).split())  # hub errors span lines; the CLI prints one
            raise CheckpointError(
                f"could not fetch {model!r} from the Hugging Face hub ({type(e).__name__}: "
                f"{reason}); download it elsewhere and pass its directory"
            ) from e
    raise CheckpointError(f"model {model!r} is neither a directory nor a hub id like 'facebook/opt-1.3b'")


def load_model(
    model: str | os.PathLike, dtype: str = "float16", tp: int | str = 1, vocab_split: bool = False
) -> LoadedModel:
    """Open a converted model directory, an HF checkpoint directory, or a hub id.

    `tp` > 1 (or "auto"; `parallel.tp_mesh` checks it against the config before any weight is read) places the
    parameters in the Megatron layout over that many devices: a converted directory restores straight into the
    shards; an HF checkpoint is converted on the host, then each device receives its slices."""
    numpy_dtype(dtype)
    path = resolve_model_dir(str(model))
    if is_converted_model(path):
        config = OPTConfig.from_json_file(path / "config.json")
        params = restore_params(path, config, dtype, tp_mesh(config, tp, vocab_split), vocab_split)
    elif is_hf_checkpoint(path):
        config = read_hf_config(path)
        mesh = tp_mesh(config, tp, vocab_split)
        host_params = convert_hf_params(HFTensorReader(path), config, dtype)
        params = (
            jax.tree.map(jnp.asarray, host_params) if mesh is None else shard_params(host_params, mesh, vocab_split)
        )
    elif (path / "config.json").exists():
        read_hf_config(path)  # a non-OPT config gets its own message
        raise CheckpointError(f"{path} has a config.json but no weights (model.safetensors, pytorch_model.bin, ...)")
    else:
        raise CheckpointError(
            f"{path} holds neither a converted model ({MANIFEST}) nor an HF checkpoint (config.json + weights)"
        )
    return LoadedModel(config, params, load_tokenizer(path, required=False), dtype, path)
