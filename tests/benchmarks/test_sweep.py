"""The batch sweep's arithmetic: the largest-batch search (with fake step functions that run out of
memory) and the crossover sentences."""
from __future__ import annotations

import pytest
import torch

from benchmarks.sweep import crossover, fits_by_trying, largest_batch


@pytest.mark.parametrize("capacity", [1, 7, 8, 9, 100, 333, 1000, 4095])
def test_the_search_finds_the_largest_fitting_batch_to_within_a_sixteenth(capacity):
    found, tries = largest_batch(lambda batch: batch <= capacity, start=8, limit=4096)
    assert capacity - capacity // 16 <= found <= capacity
    assert all(fitted == (batch <= capacity) for batch, fitted in tries)
    assert len(tries) <= 2 * 12  # doubling then bisecting: logarithmic, not linear


def test_the_search_stops_at_the_limit_and_reports_nothing_fits():
    assert largest_batch(lambda batch: True, start=8, limit=100) == (100, [(8, True), (16, True), (32, True),
                                                                          (64, True), (100, True)])
    assert largest_batch(lambda batch: False, start=4, limit=100)[0] == 0
    with pytest.raises(ValueError, match="start"):
        largest_batch(lambda batch: True, start=0, limit=10)


def test_running_out_of_memory_or_over_the_budget_does_not_fit():
    """A fake step: 0.5 GiB + 10 MiB per image, out of device memory above batch 300."""
    calls = []

    def step(batch: int) -> float:
        calls.append(batch)
        if batch > 300:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at batch {batch}")
        return 0.5 + 0.01 * batch

    found, _ = largest_batch(fits_by_trying(step, budget_gib=2.0), start=8)
    assert 141 <= found <= 150  # 0.5 + 0.01 * 150 = 2.0 GiB
    found, tries = largest_batch(fits_by_trying(step, budget_gib=100.0), start=8)
    assert 282 <= found <= 300 and (512, False) in tries  # the OOM at 512 was caught, not raised
    with pytest.raises(RuntimeError, match="not memory"):
        fits_by_trying(lambda batch: (_ for _ in ()).throw(RuntimeError("not memory")), 1.0)(8)


def test_crossover_sentences():
    assert "faster than `dit` at every batch" in crossover([(16, 1.2), (8, 1.1)], "mask50", "dit")
    assert "never faster" in crossover([(8, 0.9), (16, 0.95)], "mask50", "dit")
    text = crossover([(8, 0.9), (16, 1.3), (32, 1.5), (64, 0.99)], "mask50", "dit")
    assert "appears between batch 8 (0.90×) and 16 (1.30×)" in text
    assert "vanishes between batch 32 (1.50×) and 64 (0.99×)" in text
    assert "no batch" in crossover([], "mask50", "dit")


def test_the_real_step_function_measures_and_fits_on_a_cpu():
    """peak_after_steps (two real training steps, their peak memory) drives the same search."""
    from benchmarks.configs import ModelSpec, Variant
    from benchmarks.run import peak_after_steps, resolve_settings

    settings = resolve_settings(device="cpu", tiny=True)
    spec, variant, cpu = ModelSpec.parse("tiny/2"), Variant.parse("mask50", "cpu"), torch.device("cpu")
    assert 0 <= peak_after_steps(spec, variant, 2, settings, cpu) < 1
    fits = fits_by_trying(lambda batch: peak_after_steps(spec, variant, batch, settings, cpu), budget_gib=4.0)
    assert largest_batch(fits, start=2, limit=4) == (4, [(2, True), (4, True)])
    assert largest_batch(fits_by_trying(lambda batch: peak_after_steps(spec, variant, batch, settings, cpu),
                                        budget_gib=-1.0), start=2, limit=4)[0] == 0
