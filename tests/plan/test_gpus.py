"""The GPUs the planner names (issue 25: A100 40/80 GB, H100 80 GB, H200 141 GB) and ``--memory-gb``."""
from __future__ import annotations

import pytest

from maskdit_fast.errors import UserError
from maskdit_fast.plan.gpus import GIB, MIB, gpu_named


@pytest.mark.parametrize("name,mib", [
    ("a100-40gb", 40960), ("a100-80gb", 81920), ("a100", 81920),
    ("h100-80gb", 81559), ("H100", 81559), ("h200-141gb", 143771), ("h200", 143771),
])
def test_named_gpus_have_their_boards_memory(name, mib):
    assert gpu_named(name).memory_bytes == mib * MIB  # as nvidia-smi reports it


def test_memory_gb_replaces_the_memory_only():
    h100, share = gpu_named("h100"), gpu_named("h100", 20)
    assert share.memory_bytes == 20 * GIB and share.name == "h100-80gb (20 GiB)"
    assert (share.bf16_flops, share.hbm_bytes_per_s) == (h100.bf16_flops, h100.hbm_bytes_per_s)


@pytest.mark.parametrize("name,memory_gb,message", [("v100", None, "not a known GPU"), ("h100", 0, "must be positive")])
def test_bad_gpus_are_user_errors(name, memory_gb, message):
    with pytest.raises(UserError, match=message):
        gpu_named(name, memory_gb)
