"""`python -m bench kernels --op mlp` on the CPU: its reference timings (dense_equal_bytes, launch_probe) and the
CPU smoke run of the whole command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.kernels_mlp import Rotation, equal_bytes_sets, launch_probe

REPO = Path(__file__).resolve().parents[1]


def test_launch_probe_and_equal_bytes_sets():
    x = jax.random.normal(jax.random.key(0), (3, 100), jnp.float32).astype(jnp.float16)  # ragged d
    np.testing.assert_array_equal(np.asarray(launch_probe(x, interpret=True)), np.asarray(x * 0.5 + 1.0))
    ffn, d, k = 12, 4, 3
    w = [
        (
            jnp.arange(ffn * d).reshape(ffn, d) + 1000 * s,
            jnp.arange(ffn) + 1000 * s,
            -jnp.arange(ffn * d).reshape(ffn, d) - 1000 * s,
            jnp.zeros(d),
        )
        for s in range(2)
    ]
    sets, rot = equal_bytes_sets(w, Rotation(2, 3, ((0, 0), (0, 2), (1, 1))), k)
    assert len(sets) == 6 and rot.calls == ((0, 0), (2, 0), (4, 0)) and rot.n_idx_sets == 1
    np.testing.assert_array_equal(sets[2][0], w[0][0][6:9])  # copy 0, index set 2 -> rows 6..8
    np.testing.assert_array_equal(sets[4][1], w[1][1][3:6])  # copy 1, index set 1 -> rows 3..5
    assert all(s[0].shape == (k, d) and s[2].shape == (k, d) for s in sets)


def test_kernels_mlp_smoke_has_reference_columns(tmp_path):
    out = tmp_path / "k.md"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "kernels",
            "--op",
            "mlp",
            "--interpret",
            "--shapes",
            "256x1024",
            "--densities",
            "0.25",
            "--batches",
            "1,3",
            "--variants",
            "auto,split1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == 2
    for row in data["rows"]:
        assert row["impls"]["dense_equal_bytes"]["us"] > 0
        assert row["impls"]["launch_probe"]["us"] > 0
        for variant in ("auto", "split1"):
            assert row["impls"][variant]["max_rel_err"] < 2e-2
    md = out.read_text()
    for column in ("auto us", "split1 us", "eq-bytes dense us", "eq-bytes/floor", "launch probe us"):
        assert column in md
