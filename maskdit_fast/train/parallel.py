"""Scale-out wrappers around an :class:`EDMPrecond`: activation checkpointing and ``torch.compile``
per DiT block, then DDP or FSDP2 (``fully_shard`` per block and at the root).

FSDP2 mixed precision (``train.precision=bf16``): block and root parameters are all-gathered in
bf16 and gradients reduce-scattered in ``train.fsdp_reduce_dtype`` (fp32 by default) into fp32
shards; the timestep embedder keeps fp32 parameters (its own shard group), and the root does not
cast its inputs, so ``x`` and ``sigma`` reach the EDM preconditioning in fp32. The loop runs under
bf16 autocast as without FSDP, which keeps LayerNorm/modulation (kernels), softmax (attention
backends accumulate in fp32) and the timestep embedding in fp32.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Iterable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..config import Config
from ..diffusion.edm import EDMPrecond

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def block_lists(net: EDMPrecond) -> list[nn.ModuleList]:
    """The DiT block lists: encoder blocks, plus MaskDiT's decoder blocks."""
    model = net.model
    return [model.blocks] + ([model.decoder_blocks] if hasattr(model, "decoder_blocks") else [])


def _per_block(net: EDMPrecond, fn) -> None:
    for blocks in block_lists(net):
        for i, block in enumerate(blocks):
            blocks[i] = fn(block)


def static_graph_ok(cfg: Config, accumulation: int) -> bool:
    """DDP's ``static_graph`` needs the same used parameters every step and no ``no_sync``: a MaskDiT
    that switches from masked to unmasked steps stops using its mask token."""
    m, t = cfg.model, cfg.train
    phases_differ = m.arch == "maskdit" and m.mask_ratio > 0 and t.unmasked_steps > 0
    return accumulation == 1 and not phases_differ


def mixed_precision(precision: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    """FSDP2 policy for the blocks: bf16 gather/compute with ``reduce_dtype`` reductions, or fp32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=DTYPES[reduce_dtype])
    return MixedPrecisionPolicy()


def shard(net: EDMPrecond, mesh, mp: MixedPrecisionPolicy, offload: OffloadPolicy) -> None:
    """``fully_shard`` every DiT block, the timestep embedder (fp32) and the root, in place."""
    for blocks in block_lists(net):
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    fully_shard(net.model.t_embedder, mesh=mesh, mp_policy=fp32, offload_policy=offload)
    root = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, cast_forward_inputs=False)
    fully_shard(net, mesh=mesh, mp_policy=root, offload_policy=offload)


def parallelize(net: EDMPrecond, ema_model: EDMPrecond, cfg: Config, precision: str, device: torch.device,
                world_size: int, accumulation: int) -> nn.Module:
    """Apply ``train.activation_checkpointing``, ``train.compile`` and ``train.parallel`` to ``net``;
    under FSDP the EMA copy is sharded like it (same placements, so the EMA update stays local).
    Returns the module to call in the training step."""
    t = cfg.train
    if t.activation_checkpointing:
        _per_block(net, checkpoint_wrapper)
    if t.compile:
        # static shapes: with dynamo's automatic dynamic shapes a block compiled for the encoder's tokens
        # is compiled again with a symbolic length once it sees the decoder's, and later steps run that
        # second graph: a process's first step ran other kernels than its later ones, so a resumed run
        # was not bit-identical to an uninterrupted one
        for blocks in block_lists(net):
            for block in blocks:
                block.compile(dynamic=False)
    if t.parallel == "ddp":
        static = static_graph_ok(cfg, accumulation)
        return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                       bucket_cap_mb=t.ddp_bucket_mb, gradient_as_bucket_view=True,
                                       static_graph=static, find_unused_parameters=not static)
    if t.parallel == "fsdp":
        with unset_fake_temporarily():  # the rank table is real data, also when the memory planner fakes the rest
            mesh = init_device_mesh(device.type, (world_size,))
        offload = CPUOffloadPolicy() if t.fsdp_cpu_offload else OffloadPolicy()
        shard(net, mesh, mixed_precision(precision, t.fsdp_reduce_dtype), offload)
        shard(ema_model, mesh, MixedPrecisionPolicy(), offload)
    return net


def gradient_sync(net: nn.Module, sync: bool) -> ContextManager:
    """DDP: skip the all-reduce on all but the last micro-batch of a step. FSDP reduce-scatters every
    micro-batch, which keeps gradients sharded (memory is what FSDP is for)."""
    if isinstance(net, DistributedDataParallel) and not sync:
        return net.no_sync()
    return nullcontext()


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to ``max_norm`` in total and return the total norm before clipping: the norm
    of the whole model's gradient, also when the gradients are FSDP shards (DTensors)."""
    parameters = list(parameters)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
