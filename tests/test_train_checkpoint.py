"""Training checkpoints written on a background thread: what `save` was given is what the file holds, and a failed
write surfaces at `wait`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.checkpoint import BackgroundCheckpointWriter, load_checkpoint


def test_background_writer_keeps_a_snapshot_and_reraises_a_failed_write(tmp_path):
    writer = BackgroundCheckpointWriter()
    metadata = {"final_loss": [1.0]}
    tree = {"a": jnp.arange(4.0), "b": [jnp.ones((2, 3), jnp.float16)]}
    writer.save(tmp_path / "c.npz", tree, metadata)
    metadata["final_loss"].append(2.0)  # changed after save: not in the file
    writer.wait()
    template = {"a": jax.ShapeDtypeStruct((4,), jnp.float32), "b": [jax.ShapeDtypeStruct((2, 3), jnp.float16)]}
    back, meta = load_checkpoint(tmp_path / "c.npz", template)
    assert meta == {"final_loss": [1.0]}
    np.testing.assert_array_equal(back["a"], np.arange(4.0))
    np.testing.assert_array_equal(back["b"][0], np.ones((2, 3), np.float16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # no temp file left
    (tmp_path / "d.npz").mkdir()  # a directory where the file should go: the rename fails
    writer.save(tmp_path / "d.npz", tree, {})
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # the error is raised once
