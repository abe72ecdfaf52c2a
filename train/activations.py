"""The on-disk activation store that `collect` writes and `fit` / `calibrate` read.

Layout of `<work_dir>/activations/`:

    manifest.json                  what was collected, from where, and how far (rows done, stream position)
    shard_00000/tokens.npy         [n] int32: the token id of each row (rows are tokens, in stream order)
    shard_00000/layer_3.attn_input.npy   [n, d] float16: residual before layer 3's attention LayerNorm
    shard_00000/layer_3.mlp_input.npy    [n, d] float16: residual before layer 3's MLP LayerNorm
    shard_00000/layer_3.mlp_active.npy   [n, ceil(ffn/8)] uint8: np.packbits of (post-ReLU fc1 output > 0)
    shard_00000/layer_3.head_norm.npy    [n, heads] float32: |softmax(QK^T)V| per head, before out_proj
    ...

A shard directory is written under a temporary name and renamed into place; only then is the manifest (itself
replaced atomically) updated to count it. A shard directory the manifest does not count is a leftover of a crash
between the two steps and is deleted on resume, so no row is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from dejavu_jax.config import OPTConfig

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
FIELDS = ("attn_input", "mlp_input", "mlp_active", "head_norm")


class ActivationStoreError(ValueError):
    """An activation directory that is missing, incomplete or made with other settings."""


def activation_bytes_per_token(config: OPTConfig) -> int:
    """Bytes one row takes in the store: per layer two float16 inputs, packed MLP labels, float32 head norms."""
    per_layer = 2 * config.hidden_size * 2 + -(-config.ffn_dim // 8) + config.num_attention_heads * 4
    return config.num_hidden_layers * per_layer + 4  # + the int32 token id


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def field_file(layer: int, field: str) -> str:
    return f"layer_{layer}.{field}.npy"


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ActivationStoreError(f"{path} is not valid JSON ({e}); delete {directory} and collect again") from e


def write_shard(directory: Path, index: int, tokens: np.ndarray, layers: list[dict[str, np.ndarray]]) -> None:
    """Write one shard atomically: every file into a temp dir, then one rename."""
    final = directory / shard_name(index)
    tmp = directory / f".{shard_name(index)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    np.save(tmp / "tokens.npy", tokens)
    for layer, arrays in enumerate(layers):
        for field in FIELDS:
            np.save(tmp / field_file(layer, field), arrays[field])
    tmp.rename(final)


def remove_uncounted(directory: Path, manifest: dict) -> list[str]:
    """Delete temp dirs and shards the manifest does not count (left by a crash); return their names."""
    counted = {s["name"] for s in manifest["shards"]}
    removed = []
    for entry in directory.iterdir():
        if entry.is_dir() and (
            entry.name.startswith(".shard_") or (entry.name.startswith("shard_") and entry.name not in counted)
        ):
            shutil.rmtree(entry)
            removed.append(entry.name)
        elif entry.name.startswith(f".{MANIFEST}.tmp-"):
            entry.unlink()
    return removed


class ActivationStore:
    """Read-only view of a finished (or partly finished) collection."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise ActivationStoreError(
                f"no activations in {self.directory} (no {MANIFEST}); run `python -m train collect` first"
            )
        if manifest.get("format") != FORMAT_VERSION:
            raise ActivationStoreError(
                f"{self.directory} has format {manifest.get('format')!r}, expected {FORMAT_VERSION}; collect again"
            )
        self.manifest = manifest
        self.config = OPTConfig.from_hf_dict(manifest["config"])
        self.shards = manifest["shards"]
        self.num_rows = sum(s["rows"] for s in self.shards)
        if self.num_rows == 0:
            raise ActivationStoreError(f"{self.directory} holds no rows yet; run `python -m train collect`")
        for s in self.shards:
            if not (self.directory / s["name"]).is_dir():
                raise ActivationStoreError(f"{self.directory / s['name']} is missing; collect again")

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def read(self, layer: int, field: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of one field of one layer, concatenated over shards (`field` may be "tokens")."""
        if field != "tokens" and field not in FIELDS:
            raise ValueError(f"unknown field {field!r}; known: tokens, {', '.join(FIELDS)}")
        if not 0 <= layer < self.config.num_hidden_layers:
            raise ValueError(f"layer must be in [0, {self.config.num_hidden_layers}). Got {layer}")
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        name = "tokens.npy" if field == "tokens" else field_file(layer, field)
        parts, offset = [], 0
        for s in self.shards:
            lo, hi = max(start - offset, 0), min(stop - offset, s["rows"])
            if lo < hi:
                parts.append(np.load(self.directory / s["name"] / name, mmap_mode="r")[lo:hi])
            offset += s["rows"]
        if not parts:
            raise ValueError(f"no rows in [{start}, {stop}) (the store holds {self.num_rows})")
        return np.concatenate(parts)

    def read_labels(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """MLP labels [n, ffn] bool, unpacked."""
        packed = self.read(layer, "mlp_active", start, stop)
        return np.unpackbits(packed, axis=-1, count=self.config.ffn_dim).astype(bool)
