"""Shared kernel pieces (kernels/_common.py): tile sizes, row chunking, the deterministic sum."""
from __future__ import annotations

import pytest
import torch

from kernels._common import block_sizes, row_chunks, sum_partials


@pytest.mark.parametrize("d", [1, 8, 33, 72, 384, 512, 1152, 4096])
def test_block_sizes_cover_the_row(d):
    block_m, block_d, num_warps = block_sizes(d)
    assert block_d >= d and block_d & (block_d - 1) == 0  # a power of two, masked tail
    assert block_m >= 1 and block_m & (block_m - 1) == 0
    assert 1 <= num_warps <= 16


@pytest.mark.parametrize("batch, rows, block_m", [(1, 1, 1), (2, 13, 4), (256, 256, 2), (3, 100, 32), (1, 1000, 8)])
def test_row_chunks_partition_the_rows(batch, rows, block_m):
    chunks, per_chunk = row_chunks(batch, rows, block_m, torch.device("cpu"))
    assert per_chunk % block_m == 0
    assert (chunks - 1) * per_chunk < rows <= chunks * per_chunk  # every row once, no empty chunk


@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 37, 300), (2, 16, 256), (5, 1, 1152)])
def test_sum_partials_matches_torch_sum(shape, device):
    partial = torch.randn(shape, dtype=torch.float64)
    out = sum_partials(partial.float().to(device))
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2])
    torch.testing.assert_close(out.cpu().double(), partial.float().double().sum(1), rtol=1e-5, atol=1e-5)
