"""The GPUs a run is planned for: memory, dense peak throughput and memory bandwidth.

Figures are NVIDIA's data-sheet values for the SXM parts (dense, i.e. without 2:4 sparsity);
``memory_bytes`` is the board's memory as ``nvidia-smi`` reports it (MiB). A run cannot use all of
it: the CUDA context, cuBLAS / NCCL workspaces and the caching allocator's fragmentation take some,
which the planner keeps back as a reserve (:data:`DEFAULT_RESERVE_GB`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

MIB = 2**20
GIB = 2**30
DEFAULT_RESERVE_GB = 2.0  # GiB kept back for the CUDA context, library workspaces and fragmentation


@dataclass(frozen=True)
class GPU:
    """One accelerator model. Throughputs in FLOP/s (dense), bandwidth in bytes/s."""

    name: str
    memory_bytes: int
    bf16_flops: float
    tf32_flops: float
    fp32_flops: float
    hbm_bytes_per_s: float

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB

    def matmul_flops(self, dtype_name: str) -> float:
        """Dense tensor-core peak for a matmul in ``dtype_name`` (bf16 | fp16 | fp32 | tf32)."""
        if dtype_name in ("bf16", "fp16"):
            return self.bf16_flops
        if dtype_name == "tf32":
            return self.tf32_flops
        return self.fp32_flops


GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("a100-40gb", 40960 * MIB, 312e12, 156e12, 19.5e12, 1555e9),
        GPU("a100-80gb", 81920 * MIB, 312e12, 156e12, 19.5e12, 2039e9),
        GPU("h100-80gb", 81559 * MIB, 989.4e12, 494.7e12, 66.9e12, 3.35e12),
        GPU("h200-141gb", 143771 * MIB, 989.4e12, 494.7e12, 66.9e12, 4.8e12),
    )
}
ALIASES = {"a100": "a100-80gb", "h100": "h100-80gb", "h200": "h200-141gb"}


def gpu_named(name: str, memory_gb: float | None = None) -> GPU:
    """The GPU called ``name`` (a key of :data:`GPUS` or an alias), its memory replaced by
    ``memory_gb`` GiB when given (another memory size, or a share of the GPU)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise UserError(f"--gpu {name!r} is not a known GPU; use one of {sorted(GPUS)} (or an alias: "
                        f"{sorted(ALIASES)}), and --memory-gb for another memory size")
    gpu = GPUS[key]
    if memory_gb is None:
        return gpu
    if memory_gb <= 0:
        raise UserError(f"--memory-gb must be positive, got {memory_gb}")
    return GPU(f"{gpu.name} ({memory_gb:g} GiB)", int(memory_gb * GIB), gpu.bf16_flops, gpu.tf32_flops,
               gpu.fp32_flops, gpu.hbm_bytes_per_s)
