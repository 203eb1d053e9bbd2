"""The memory plan against independent measures (issue 25, item 4):

(a) on the CPU path, the planned peak of fake tensors against the CPU allocator's real peak in the
    same step on real tensors, read from the PyTorch profiler's allocation events (not from the
    planner's own tracker);
(b) parameter, gradient, AdamW and EMA bytes of DiT-XL/2 and MaskDiT-XL/2 against exact arithmetic,
    in one process and per rank under FSDP over 8 ranks;
(c) the MaskDiT / DiT ratio of the activations a forward pass leaves for the backward pass against
    the bytes autograd saves (``saved_tensors_hooks``).

And the plan's own consistency: the peak grows with the micro-batch, its parts sum to it, step 2
carries the optimizer states, DDP's gradients are held throughout, ``mask_ratio=None`` plans the
unmasked phase when the run has one.
"""
from __future__ import annotations

import gc
import math
from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import kernels
from maskdit_fast.config import Config, load_config
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.plan.memory import MemoryPlan, plan_memory
from maskdit_fast.train.loop import MicroBatch
from maskdit_fast.train.objective import maskdit_objective
from maskdit_fast.train.optimizer import build_optimizer
from maskdit_fast.train.parallel import block_lists
from tests.helpers import tiny_config

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="the Triton ops' fake kernels need Triton")
XL_DIT = ["model.arch=dit", "model.mask_ratio=0"]  # on the imagenet256-pretrain preset: DiT-XL/2
XL_MASKDIT: list[str] = []  # the preset itself: MaskDiT-XL/2, mask 0.5
WORLD = 8


def round512(nbytes: int) -> int:
    """What the CUDA caching allocator hands out for ``nbytes``."""
    return -(-nbytes // 512) * 512


# --- (a) the CPU allocator's real peak ------------------------------------------------------------

def allocator_peak(fn: Callable[[], object]) -> int:
    """The most bytes the CPU allocator held while ``fn`` ran, above what it held when it started, from
    the profiler's allocation events: each carries the allocator's running total after it, a counter of
    the whole process that outlives profiling sessions, so the first event gives the baseline."""
    event_types = getattr(torch._C._profiler, "_EventType", None)
    if event_types is None or not hasattr(event_types, "Allocation"):
        pytest.skip("this torch has no torch._C._profiler._EventType.Allocation")
    gc.collect()  # garbage of earlier tests, freed during the window, would lower the running total
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None or not hasattr(results, "experimental_event_tree"):
        pytest.skip("this torch's profiler has no kineto_results.experimental_event_tree()")
    allocations, stack = [], list(results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == event_types.Allocation:
            device = getattr(event.extra_fields, "device", None)
            if device is None:
                pytest.skip("this torch's allocation events carry no device")
            if device.type == "cpu":
                allocations.append(event)
    assert allocations, "the profiler recorded no CPU allocation"
    allocations.sort(key=lambda e: e.start_time_ns)
    first = allocations[0].extra_fields
    baseline = first.total_allocated - first.alloc_size
    return max(e.extra_fields.total_allocated for e in allocations) - baseline


def unseen_rng_states(cfg: Config) -> int:
    """Bytes real activation checkpointing holds that no op returns: each checkpointed block keeps the
    CPU generator's state (``torch.get_rng_state()``, made outside the dispatcher) for its recompute.
    On a CUDA run those are host memory, not GPU memory, so the planner rightly leaves them out."""
    if not cfg.train.activation_checkpointing:
        return 0
    blocks = sum(len(blocks) for blocks in block_lists(build_net(cfg.model)))
    return blocks * torch.get_rng_state().nbytes


@pytest.mark.parametrize("overrides", [
    [],                                                 # MaskDiT, half the tokens masked
    ["model.arch=dit", "model.mask_ratio=0"],           # DiT
    ["train.activation_checkpointing=true"],
    ["train.micro_batch=4"],                            # 2 micro-batches of 4 per step
    ["train.precision=bf16"],                           # CPU autocast
    ["train.precision=fp16", "train.grad_clip=1.0"],    # autocast, the grad scaler, unscaled for clipping
], ids=["maskdit", "dit", "activation-checkpointing", "accumulation-2", "bf16", "fp16-grad-clip"])
def test_the_fake_plan_matches_the_cpu_allocators_real_peak(overrides):
    """One process (no DDP), the CPU path, exact bytes. Measured with torch 2.13 (real peak - plan):
    12 bytes in every variant but DiT (0) and activation checkpointing (15,168): the 12 bytes are two
    scalars ``aten::mean`` makes inside its ``div_`` (8 bytes, and 4 cast to float) while the
    plan's peak is live, never an op's output; the 15,168 bytes are 3 checkpointed blocks x 5,056 bytes
    of CPU generator state (:func:`unseen_rng_states`). The issue asks for 5%; both are far inside."""
    cfg = tiny_config(*overrides)
    gc.collect()
    planned = plan_memory(cfg, device="cpu")
    real = allocator_peak(lambda: plan_memory(cfg, device="cpu", fake=False))
    assert abs(real - planned.peak) <= 0.05 * real, (real, planned.peak)
    unseen = unseen_rng_states(cfg)
    assert 0 <= real - planned.peak - unseen <= 1024, (real, planned.peak, unseen)


def test_a_real_run_is_one_process_on_a_device_that_exists():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="on cuda needs a CUDA device"):
            plan_memory(tiny_config(), device="cuda", fake=False)
    with pytest.raises(ValueError, match="one process only"):
        plan_memory(tiny_config("train.parallel=ddp"), world_size=2, device="cpu", fake=False)


# --- (b) state bytes at XL/2 ------------------------------------------------------------------------

def meta_net(overrides: list[str]) -> torch.nn.Module:
    """The XL/2 network on the meta device: shapes without memory."""
    with torch.device("meta"):
        return build_net(load_config("imagenet256-pretrain", overrides).model)


@pytest.fixture(scope="module")
def xl_plans() -> dict[str, MemoryPlan]:
    """One step of each XL/2 architecture at micro-batch 8 on the CUDA path, one process."""
    return {arch: plan_memory(load_config("imagenet256-pretrain", overrides), 1, 8, steps=1)
            for arch, overrides in (("dit", XL_DIT), ("maskdit", XL_MASKDIT))}


@pytest.fixture(scope="module")
def xl_fsdp_plans() -> dict[str, MemoryPlan]:
    """One step of each XL/2 architecture as rank 0 of FSDP over 8 ranks (one micro-batch of 128)."""
    return {arch: plan_memory(load_config("imagenet256-pretrain", [*overrides, "train.parallel=fsdp"]), WORLD, 128,
                              steps=1)
            for arch, overrides in (("dit", XL_DIT), ("maskdit", XL_MASKDIT))}


def test_fused_adamw_keeps_two_moments_and_a_float32_step_per_parameter():
    """What the arithmetic below counts for the optimizer, checked on the optimizer the CUDA path builds."""
    params = [torch.nn.Parameter(torch.randn(3, 5)), torch.nn.Parameter(torch.randn(7))]
    optimizer = build_optimizer([{"params": params}], load_config("mnist").train, torch.device("cuda"))
    assert optimizer.defaults["fused"]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    for p in params:
        state = optimizer.state[p]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == p.shape
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert state["step"].shape == () and state["step"].dtype == torch.float32
        assert state["step"].device == p.device  # on the GPU in a CUDA run: one 512-byte block each


@needs_triton
@pytest.mark.parametrize("arch,overrides", [("dit", XL_DIT), ("maskdit", XL_MASKDIT)])
def test_xl2_state_bytes_are_the_exact_arithmetic(xl_plans, arch, overrides):
    """Every tensor a 512-byte multiple: parameters and buffers in fp32, a gradient per trainable
    parameter, AdamW's two fp32 moments and fp32 step, the EMA a copy of the network. That is 20 bytes
    per parameter (4 + 4 + 8 + 4) up to the rounding and the position-embedding buffers: measured
    1.000186 x 20 B for DiT-XL/2 and 1.000247 x 20 B for MaskDiT-XL/2."""
    plan, net = xl_plans[arch], meta_net(overrides)
    params, buffers = list(net.parameters()), list(net.buffers())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(round512(4 * p.numel()) for p in params) + sum(round512(b.nbytes) for b in buffers)
    assert plan.state == {
        "parameters": weights,
        "gradients": sum(round512(4 * p.numel()) for p in trainable),
        "optimizer": sum(2 * round512(4 * p.numel()) + 512 for p in trainable),
        "ema": weights,
    }
    count = sum(p.numel() for p in params)
    assert plan.parameters == count
    assert abs(sum(plan.state.values()) / (20 * count) - 1) < 1e-3


def shard_bytes(p: torch.Tensor, world: int) -> int:
    """Rank 0's shard of ``p`` under FSDP2: dim 0 padded to a multiple of the world size, then split."""
    return math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) * p.element_size()


def fsdp_groups(net: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The parameters of each ``fully_shard`` call of ``maskdit_fast.train.parallel.shard``: every DiT
    block, the timestep embedder, and the rest at the root."""
    groups = [list(block.parameters()) for blocks in block_lists(net) for block in blocks]
    groups.append(list(net.model.t_embedder.parameters()))
    grouped = {id(p) for group in groups for p in group}
    groups.append([p for p in net.parameters() if id(p) not in grouped])
    return groups


@needs_triton
@pytest.mark.parametrize("arch,overrides", [("dit", XL_DIT), ("maskdit", XL_MASKDIT)])
def test_xl2_fsdp_shards_per_rank_are_the_exact_arithmetic(xl_fsdp_plans, xl_plans, arch, overrides):
    """Parameters, moments and EMA: one 512-byte-rounded shard per tensor (buffers stay whole).
    Gradients: FSDP2 reduce-scatters each group into one flat buffer and leaves the sharded gradients
    as views of it, so a group's gradients round once, not per tensor (per tensor would say 44,544
    bytes more for DiT-XL/2, 49,152 for MaskDiT-XL/2)."""
    plan, net = xl_fsdp_plans[arch], meta_net(overrides)
    params = list(net.parameters())
    weights = sum(round512(shard_bytes(p, WORLD)) for p in params) + sum(round512(b.nbytes) for b in net.buffers())
    assert plan.state == {
        "parameters": weights,
        "gradients": sum(round512(sum(shard_bytes(p, WORLD) for p in group)) for group in fsdp_groups(net)),
        "optimizer": sum(2 * round512(shard_bytes(p, WORLD)) + 512 for p in params),
        "ema": weights,
    }
    # about an eighth of one process's: the padding and the unsharded buffers add 0.3%
    one = xl_plans[arch].state
    for key in ("parameters", "gradients", "optimizer", "ema"):
        assert plan.state[key] / one[key] == pytest.approx(1 / WORLD, rel=0.01), key
    assert plan.at_peak["fsdp_gathered"] > 0 and plan.parallel == "fsdp" and plan.world_size == WORLD


# --- (c) activations saved for the backward pass ---------------------------------------------------

def autograd_saved_bytes(cfg: Config, micro_batch: int) -> int:
    """Bytes (512-byte rounded, each storage once) of what autograd saves in one forward pass of the
    objective, counted by ``saved_tensors_hooks``, on fake tensors under bf16 autocast with the Triton
    ops: the CUDA path's choices. Parameters, buffers and the batch were there before: not counted."""
    m = cfg.model
    with kernels.backend("triton"), FakeTensorMode():
        net = build_net(m).train()
        images = torch.empty(micro_batch, m.in_channels, m.input_size, m.input_size)
        labels = torch.zeros(micro_batch, dtype=torch.long)
        existing = {t.untyped_storage()._cdata for t in [*net.parameters(), *net.buffers(), images, labels]}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage._cdata not in existing:
                saved[storage._cdata] = round512(storage.nbytes())
            return t

        loss_fn = maskdit_objective(cfg, lambda step: m.mask_ratio)
        batch = MicroBatch(0, torch.arange(micro_batch), images, labels)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss_fn(net, batch, 0)
    return sum(saved.values())


@needs_triton
def test_xl2_activation_ratio_matches_what_autograd_saves(xl_plans):
    """Per architecture the plan counts exactly 3 x 512 bytes more than autograd saved: the loss and the
    two loss terms the objective returns, alive at the end of the forward pass, saved by nothing. The
    ratios (0.78141 at micro-batch 8: the bf16 weight copies, the same for every batch size, weigh in
    at so small a batch) agree to 1e-7."""
    hooks = {arch: autograd_saved_bytes(load_config("imagenet256-pretrain", overrides), 8)
             for arch, overrides in (("dit", XL_DIT), ("maskdit", XL_MASKDIT))}
    for arch, saved in hooks.items():
        assert xl_plans[arch].saved_activations - saved == 3 * 512, arch
    planned = xl_plans["maskdit"].saved_activations / xl_plans["dit"].saved_activations
    assert planned == pytest.approx(hooks["maskdit"] / hooks["dit"], rel=0.01)
    assert 0.6 < planned < 0.9  # half the encoder's tokens, plus the decoder on all of them


# --- the plan's own consistency --------------------------------------------------------------------

def test_the_peak_grows_with_the_micro_batch_and_its_parts_sum_to_it():
    """Here at every size. Where the gradients outweigh a micro-batch's activations the whole share (one
    micro-batch per step, gradients freed before its forward pass) can peak lower than half of it
    (MaskDiT-S/8, 64 per GPU: 1.41 GiB at 64, 1.53 at 32, 1.47 at 16); the search tries it first (test_search.py)."""
    cfg = tiny_config("train.global_batch=8")
    plans = [plan_memory(cfg, micro_batch=m, device="cpu") for m in (1, 2, 4, 8)]
    assert [p.accumulation for p in plans] == [8, 4, 2, 1]
    peaks = [p.peak for p in plans]
    assert peaks == sorted(set(peaks)), peaks  # strictly increasing
    for plan in plans:
        assert sum(plan.at_peak.values()) == plan.peak
        assert plan.peak == max(plan.steps) and plan.peak_step == 2
        # step 2 starts with the optimizer states step 1 made: they are part of its peak
        assert plan.steps[1] >= plan.steps[0]
        assert plan.at_peak["optimizer"] == plan.state["optimizer"] > 0
        assert plan.at_peak["parameters"] == plan.at_peak["ema"] == plan.state["parameters"]


def test_one_step_is_the_first_step_of_two():
    cfg = tiny_config()
    one, two = plan_memory(cfg, device="cpu", steps=1), plan_memory(cfg, device="cpu")
    assert one.steps == two.steps[:1] and one.peak_step == 1
    assert one.at_peak["optimizer"] == 0 or one.peak_phase == "optimizer"  # no states before the first step


def test_ddp_holds_every_gradient_from_the_start():
    """DDP's buckets (gradient_as_bucket_view) hold the gradients for the whole run: rank 0 of 8 plans
    the one-process step plus them, at the same micro-batch and accumulation."""
    one = plan_memory(tiny_config("train.global_batch=8"), 1, 8)
    ddp = plan_memory(tiny_config("train.global_batch=64", "train.parallel=ddp"), WORLD, 8)
    assert (ddp.parallel, ddp.world_size, ddp.accumulation) == ("ddp", WORLD, one.accumulation)
    assert any("DDP emulated" in note for note in ddp.fallbacks)
    assert ddp.state["gradients"] == one.state["gradients"] > 0
    assert ddp.at_peak["gradients"] == ddp.state["gradients"] and one.at_peak["gradients"] == 0
    assert ddp.peak == one.peak + ddp.state["gradients"]


def test_without_a_mask_ratio_the_unmasked_phase_is_planned():
    """A run with unmasked steps at its end needs the most memory there: every token goes through the
    encoder. ``mask_ratio=None`` plans that phase; a run without unmasked steps plans its mask ratio."""
    unmasked_end = tiny_config("train.unmasked_steps=2")
    plan = plan_memory(unmasked_end, device="cpu")
    assert plan.mask_ratio == 0.0
    assert plan.peak == plan_memory(unmasked_end, device="cpu", mask_ratio=0.0).peak
    masked = plan_memory(tiny_config("train.unmasked_steps=0"), device="cpu")
    assert masked.mask_ratio == unmasked_end.model.mask_ratio == 0.5
    assert masked.peak < plan.peak
    assert plan_memory(unmasked_end, device="cpu", mask_ratio=0.5).peak == masked.peak
