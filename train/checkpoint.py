"""Training checkpoints: a pytree of arrays and a JSON metadata dict in one `.npz` file, replaced atomically (temp
file, fsync, rename), so a crash leaves the previous checkpoint or the new one, never a torn file.

Arrays are stored under their pytree key paths; loading checks every path, shape and dtype against a template
tree of the same structure (e.g. from `jax.eval_shape`), so a checkpoint never silently fills the wrong leaf.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

_METADATA_KEY = "__metadata__"


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the run resuming it (other settings, other shapes)."""


def _flat(tree) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _host_arrays(tree) -> dict[str, np.ndarray]:
    # Copies, not views: the device buffers may be donated to the next training step while a writer holds these.
    arrays = {key: np.array(leaf, copy=True) for key, leaf in _flat(tree).items()}
    assert _METADATA_KEY not in arrays
    return arrays


class BackgroundCheckpointWriter:
    """`save` fetches the tree (arrays) to the host and returns; the file is written on a background thread while
    training goes on, replacing the previous one atomically. One write at a time: `save` and `wait` first finish
    the previous one, and `wait` re-raises an error a write hit. Call `wait` before the process may end."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def save(self, path: Path, tree, metadata: dict) -> None:
        self.wait()
        arrays = _host_arrays(tree)
        metadata = json.loads(json.dumps(metadata))  # a snapshot: the caller goes on changing its lists

        def write():
            try:
                _write(Path(path), arrays, metadata)
            except BaseException as e:  # handed to the training thread at the next wait
                self._error = e

        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _write(path: Path, arrays: dict, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # One fixed temp name: a write killed outright (SIGKILL, OOM) leaves a file that the next write replaces.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays, **{_METADATA_KEY: np.asarray(json.dumps(metadata))})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metadata(path: Path) -> Optional[dict]:
    """The metadata of the checkpoint at `path`, None when there is none (arrays are not read)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path) as f:
            return json.loads(str(f[_METADATA_KEY]))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointMismatch(f"{path} is not a readable checkpoint ({e}); delete it or pass --overwrite") from e


def load_checkpoint(path: Path, template) -> tuple[Any, dict]:
    """(tree shaped like `template` with the stored arrays, metadata)."""
    want = _flat(template)
    _, treedef = jax.tree_util.tree_flatten(template)
    with np.load(Path(path)) as f:
        have = set(f.files) - {_METADATA_KEY}
        if have != set(want):
            raise CheckpointMismatch(
                f"{path} holds other arrays than this run trains (missing {sorted(set(want) - have)[:3]}, "
                f"unexpected {sorted(have - set(want))[:3]}); pass --overwrite to start again"
            )
        leaves = []
        for key, spec in want.items():
            array = f[key]
            if array.shape != tuple(spec.shape) or array.dtype != np.dtype(spec.dtype):
                raise CheckpointMismatch(
                    f"{path}: {key} is {array.dtype}{list(array.shape)}, this run needs "
                    f"{np.dtype(spec.dtype)}{list(spec.shape)}; pass --overwrite to start again"
                )
            leaves.append(array)
        metadata = json.loads(str(f[_METADATA_KEY]))
    return jax.tree_util.tree_unflatten(treedef, leaves), metadata
