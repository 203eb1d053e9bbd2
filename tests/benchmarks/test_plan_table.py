"""The README's memory table is what benchmarks/plan_table.py renders from its committed JSON, every
fit verdict follows from the peak, and a cell planned again gives the committed bytes."""
from __future__ import annotations

import json

from benchmarks.plan_table import BATCHES, GPUS, JSON, README, ROWS, plan_cell, readme_with, render


def committed() -> dict:
    return json.loads(JSON.read_text())


def test_the_readme_shows_the_rendered_table():
    readme = README.read_text()
    assert readme_with(render(committed()), readme) == readme


def test_every_cell_is_there_and_its_verdict_follows_from_its_peak():
    data = committed()
    keys = {(c["arch"], c["kernels"], c["parallel"], c["activation_checkpointing"], c["batch"]) for c in data["cells"]}
    assert keys == {(*row, ac, b) for row in ROWS for ac in (False, True) for b in BATCHES}
    for cell in data["cells"]:
        for gpu in GPUS:
            assert cell["fits"][gpu] == (cell["peak"] + data["reserve_bytes"] <= data["memory_bytes"][gpu]), cell
    # the planner's orderings: more samples hold more; checkpointing and sharding hold less
    cells = {(c["arch"], c["kernels"], c["parallel"], c["activation_checkpointing"], c["batch"]): c["peak"]
             for c in data["cells"]}
    assert all(cells[(*row, ac, a)] < cells[(*row, ac, b)] for row in ROWS for ac in (False, True)
                        for a, b in zip(BATCHES, BATCHES[1:]))
    assert all(cells[(*row, True, b)] < cells[(*row, False, b)] for row in ROWS for b in BATCHES)
    assert all(cells[(a, k, "fsdp", ac, b)] < cells[(a, k, "ddp", ac, b)] for a, k, _ in ROWS
               for ac in (False, True) for b in BATCHES)


def test_a_cell_planned_again_gives_the_committed_bytes():
    cell = next(c for c in committed()["cells"] if (c["arch"], c["kernels"], c["parallel"], c["activation_checkpointing"],
                                                     c["batch"]) == ("maskdit", "on", "ddp", False, 32))
    assert plan_cell("maskdit", "on", "ddp", False, 32) == cell["peak"]
