"""`python -m bench select` on the CPU: every selection returns K valid indices, and the report is written."""

import jax
import jax.numpy as jnp
import numpy as np

from bench.select import SELECTIONS, main


def test_selections_pick_k_of_the_top_scores():
    ffn, k = 1024, 100
    scores = jax.random.normal(jax.random.PRNGKey(0), (1, ffn), jnp.float32)
    threshold = jnp.sort(scores[0])[-k]
    exact = set(np.asarray(jax.lax.top_k(scores[0], k)[1]).tolist())
    for name, select in SELECTIONS.items():
        idx = np.asarray(select(scores, k, threshold - 1e-6))
        assert idx.shape == (k,) and ((0 <= idx) & (idx < ffn)).all(), name
        # approx_max_k is exact on the CPU; two_stage keeps 2K/blocks per block, plenty for random scores.
        assert set(idx.tolist()) == exact, name


def test_cli_writes_the_report(tmp_path):
    out = tmp_path / "select.md"
    assert main(["--shape", "opt-125m", "--chain", "2", "--repeats", "1", "--ranks", "16", "--out", str(out)]) == 0
    text = out.read_text()
    for name in SELECTIONS:
        assert f"select {name}" in text
    assert "predictor rank 16" in text and out.with_suffix(".json").exists()
