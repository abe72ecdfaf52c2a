"""`python -m bench kernels --op head-sparse --interpret`: every implementation runs and agrees with the gather."""

import json

from bench.kernels_head_sparse import IMPLS, main


def test_interpret_smoke_writes_a_table_where_every_implementation_agrees(tmp_path):
    out = tmp_path / "hs.md"
    assert main(["--interpret", "--repeats", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert set(row["impls"]) == set(IMPLS) and row["heads"] == 2
    for impl in ("pallas", "pallas_unrolled", "pallas_q_only"):
        assert row["impls"][impl]["max_rel_err"] <= 1e-2  # the same projections as the gathered XLA path
    assert "| tiny | 1 | 2/4 |" in out.read_text()
