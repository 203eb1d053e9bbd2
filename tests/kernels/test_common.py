"""Shared kernel pieces (kernels/_common.py): tile sizes, row chunking, the deterministic sum."""
from __future__ import annotations

import pytest
import torch

from kernels._common import col_tiles, row_chunks, row_tiles, simulated_gpu, sum_partials


@pytest.mark.parametrize("d, tiles", [(1, (1, 0)), (8, (8, 0)), (33, (32, 1)), (72, (64, 8)), (512, (512, 0)),
                                      (1152, (1024, 128)), (1000, (512, 512)), (4096, (4096, 0))])
def test_col_tiles_cover_the_row_without_padding_to_the_next_power_of_two(d, tiles):
    assert col_tiles(d) == tiles
    block_d, block_e = tiles
    assert block_d <= d <= block_d + block_e or (block_e == 0 and block_d == d)


@pytest.mark.parametrize("d", [1, 8, 33, 72, 384, 512, 1152, 4096])
@pytest.mark.parametrize("warps, per_thread", [(4, 8), (16, 4)])
def test_row_tiles_give_each_thread_its_share(d, warps, per_thread):
    t = row_tiles(d, warps, per_thread)
    assert 1 <= t.num_warps <= warps and t.rows & (t.rows - 1) == 0
    assert t.rows * t.block_d <= 32 * t.num_warps * per_thread or t.rows == 1


@pytest.mark.parametrize("batch, rows, step, per_sm, sms", [(1, 1, 1, 2, 1), (2, 13, 4, 2, 8), (256, 256, 2, 16, 132),
                                                            (3, 100, 32, 2, 4), (1, 1000, 8, 16, 108), (64, 128, 2, 2, 132),
                                                            (64, 128, 4, 1, 108), (64, 128, 2, 2, 108)])
def test_row_chunks_partition_the_rows_in_full_waves(batch, rows, step, per_sm, sms):
    with simulated_gpu(sms):
        chunks, per_chunk = row_chunks(batch, rows, step, per_sm, torch.device("cpu"))
    assert per_chunk % step == 0
    assert (chunks - 1) * per_chunk < rows <= chunks * per_chunk  # every row once, no empty chunk
    slots = per_sm * sms

    def fill(programs: int) -> float:
        return programs / slots / -(-programs // slots)

    steps = -(-rows // step)
    best = max(fill(batch * -(-rows // (-(-steps // c) * step))) for c in range(1, steps + 1))
    assert fill(batch * chunks) >= min(0.85, best)  # no wave tail, unless no split of the rows avoids one


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 37, 300), (2, 16, 256), (5, 1, 1152)])
def test_sum_partials_matches_torch_sum(shape, device):
    partial = torch.randn(shape, dtype=torch.float64)
    out = sum_partials(partial.float().to(device))
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2])
    torch.testing.assert_close(out.cpu().double(), partial.float().double().sum(1), rtol=1e-5, atol=1e-5)
    low = sum_partials(partial.float().to(device), torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.cpu().double(), partial.float().double().sum(1), rtol=1e-2, atol=1e-2)
