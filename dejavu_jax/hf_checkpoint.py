"""Reading Hugging Face OPT checkpoint directories one tensor at a time.

Handles `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), `pytorch_model.bin` and its
sharded form, with keys with or without the `model.` prefix. Nothing is loaded until a tensor is asked for, so
a conversion holds one source tensor at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, corrupt or not OPT."""


SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def _weight_files(directory: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'torch', files) for the checkpoint in `directory`."""
    for index_name, kind in ((SAFETENSORS_INDEX, "safetensors"), (TORCH_INDEX, "torch")):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from e
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} names shards that are not in {directory}: {missing}")
            return kind, files
    if (directory / "model.safetensors").exists():
        return "safetensors", [directory / "model.safetensors"]
    if (directory / "pytorch_model.bin").exists():
        return "torch", [directory / "pytorch_model.bin"]
    raise CheckpointError(
        f"no Hugging Face checkpoint in {directory}: expected model.safetensors, {SAFETENSORS_INDEX}, "
        f"pytorch_model.bin or {TORCH_INDEX}"
    )


def is_hf_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / "config.json").exists() and any(
        (directory / n).exists() for n in ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", TORCH_INDEX)
    )


def canonical_key(key: str) -> str:
    """`model.decoder.x` and `decoder.x` name the same tensor; strip the optional `model.` prefix."""
    return key[len("model.") :] if key.startswith("model.") else key


class HFTensorReader:
    """Lazy access to every tensor of a checkpoint, by canonical key, as numpy arrays."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        self.kind, files = _weight_files(self.directory)
        self._where: dict[str, tuple[object, str]] = {}  # canonical key -> (open file handle, raw key)
        self._handles = []
        for path in files:
            handle = self._open(path)
            self._handles.append(handle)
            for raw_key in handle.keys():
                key = canonical_key(raw_key)
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears twice in {self.directory} (second in {path.name})")
                self._where[key] = (handle, raw_key)

    def _open(self, path: Path):
        if self.kind == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                return safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read {path} (truncated or not safetensors?): {e}") from e
        import torch

        try:
            return _TorchFile(torch.load(str(path), map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # torch raises many types for a corrupt file
            raise CheckpointError(f"cannot read {path} (truncated or not a torch checkpoint?): {e}") from e

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        handle, raw_key = self._where[key]
        if isinstance(handle, _TorchFile):
            return tuple(handle.tensors[raw_key].shape)
        return tuple(handle.get_slice(raw_key).get_shape())

    def get(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise CheckpointError(f"tensor {key!r} is missing from {self.directory}")
        handle, raw_key = self._where[key]
        try:
            return handle.get_tensor(raw_key)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key!r} from {self.directory} (truncated file?): {e}") from e

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self.get(key)


class _TorchFile:
    """A torch state dict with the safetensors handle's interface; bf16 goes through fp32 (numpy has no bf16)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def get_tensor(self, key):
        import torch

        t = self.tensors[key]
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
