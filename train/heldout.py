"""Held-out rows, the tokens `calibrate` chooses K and thresholds on and the report measures: read from an activation
store (disk mode), or kept in memory (stream mode, `InMemoryHeldOut`).

Both views give the same thing: per layer and field (`attn_input`, `mlp_input`, `mlp_active`, `head_norm`, as in
`train/activations.py`) the held-out rows in stream order, each row's window index in the token stream, and two
disjoint row masks that split them by window (`split_by_window`): even windows calibrate, odd windows test.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from dejavu_jax.config import OPTConfig
from train.activations import FIELDS, ActivationStore
from train.fit import split_rows


class HeldOut(Protocol):
    config: OPTConfig
    window_of_row: np.ndarray  # [n] int: each row's window in the token stream
    calibration: np.ndarray  # [n] bool: rows that calibrate
    test: np.ndarray  # [n] bool: rows that measure (disjoint from `calibration`)
    split: str  # where the rows come from and how they are split, for the report

    def read(self, layer: int, field: str) -> np.ndarray: ...

    def read_labels(self, layer: int) -> np.ndarray: ...


def split_by_window(window_of_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, test) row masks: even windows calibrate, odd windows test; rows that all lie in one window are
    split in halves instead."""
    calib = window_of_row % 2 == 0
    if calib.all() or not calib.any():
        calib = np.arange(len(window_of_row)) < len(window_of_row) // 2
    return calib, ~calib


class StoreHeldOut:
    """The rows of an activation store after the training rows (`split_rows`)."""

    split = "held-out rows (after the training rows), even windows calibrate, odd windows test"

    def __init__(self, store: ActivationStore, holdout: float):
        self.store = store
        self.config = store.config
        self.n_train, _ = split_rows(store.num_rows, holdout)
        self.window_of_row = np.arange(self.n_train, store.num_rows) // int(store.manifest["seq_len"])
        self.calibration, self.test = split_by_window(self.window_of_row)

    def read(self, layer: int, field: str) -> np.ndarray:
        return self.store.read(layer, field, self.n_train)

    def read_labels(self, layer: int) -> np.ndarray:
        return self.store.read_labels(layer, self.n_train)


@dataclasses.dataclass
class InMemoryHeldOut:
    """Held-out rows kept in host memory: `layers[l][field]` [n, ...] (the fields that were kept), and each row's
    window index in the token stream (its parity splits calibration from test)."""

    config: OPTConfig
    layers: list  # per layer {field: np.ndarray [n, ...]}
    window_of_row: np.ndarray  # [n] int
    split: str = "held-out windows (after the training windows, kept in memory), even windows calibrate, odd test"

    def __post_init__(self):
        self.calibration, self.test = split_by_window(self.window_of_row)

    @property
    def num_rows(self) -> int:
        return len(self.window_of_row)

    def read(self, layer: int, field: str) -> np.ndarray:
        if field not in FIELDS or field not in self.layers[layer]:
            raise ValueError(f"the held-out sample keeps {sorted(self.layers[layer])}, not {field!r}")
        return self.layers[layer][field]

    def read_labels(self, layer: int) -> np.ndarray:
        packed = self.layers[layer]["mlp_active"]
        return np.unpackbits(packed, axis=-1, count=self.config.ffn_dim).astype(bool)
