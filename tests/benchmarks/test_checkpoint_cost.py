"""benchmarks/checkpoint_cost.py at a tiny size: the state it times has the trainer's layout and size."""
from __future__ import annotations

from benchmarks.checkpoint_cost import measure
from tests.helpers import TINY_MODEL


def test_measures_a_state_of_the_trainers_layout(tmp_path):
    result = measure("mnist", TINY_MODEL, tmp_path)
    params = result["parameters"]
    # model + EMA + AdamW's two moments, 4 bytes each, plus steps, buffers and the RNG state
    assert 16 * params < result["state_bytes"] < 16 * params + 100_000
    assert result["file_bytes"] >= result["state_bytes"] and result["files"] == 4  # data, .metadata, meta, manifest
    assert 0 < result["manifest_s"] < result["save_s"] and 0 < result["dcp_save_s"] < result["save_s"]
    assert result["resume_verify_cold_s"] > 0 and result["resume_load_cold_s"] > 0
    assert not (tmp_path / "run").exists()  # nothing left behind
