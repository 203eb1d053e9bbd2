"""The roofline bound: FLOPs and bytes per op against hand arithmetic, the bound of one op, fake
tensors counted like real ones, DiT-XL/2's forward FLOPs against the project's pinned figure, and
the counter's cost on a whole fake step."""
from __future__ import annotations

import contextlib
import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import kernels
from maskdit_fast.config import load_config
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.diffusion.loss import edm_loss
from maskdit_fast.plan.gpus import GPU
from maskdit_fast.plan.cli import main
from maskdit_fast.plan.memory import plan_memory
from maskdit_fast.plan.roofline import OpCounter, gpu_hours, images_per_s, step_time_bound, tensor_bytes

# DiT-XL/2 forward at 256 px, one image: multiply-adds of every matmul and convolution, attention's two
# matmuls, the embedders and the final layer included (tests/benchmarks/test_measure.py derives it layer
# by layer; 118.6 "Gflops" in the DiT paper's convention, where a multiply-add is one FLOP).
DIT_XL2_MACS = 118_616_702_976
# A made-up GPU with round numbers: 100 TFLOP/s bf16, 50 tf32, 10 fp32, 1 TB/s.
ROUND_GPU = GPU("round", 2**30, 100e12, 50e12, 10e12, 1e12)
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="the Triton ops' fake kernels need Triton")


def count(fn, phase: str = "step") -> OpCounter:
    with OpCounter() as counter, counter.phase(phase):
        fn()
    return counter


def only(counter: OpCounter, op: str):
    (record,) = [r for r in counter.records() if r.op == op]
    return record


# --- FLOPs ---------------------------------------------------------------------------------------

def test_matmul_linear_and_bmm_flops_forward_and_backward():
    m, k, n, b = 6, 10, 7, 3
    a, w = torch.randn(m, k, requires_grad=True), torch.randn(k, n, requires_grad=True)
    c = count(lambda: (a @ w).sum().backward())
    mms = [r for r in c.records() if r.op == "aten.mm"]
    assert sum(r.flops * r.count for r in mms) == 3 * 2 * m * n * k  # forward, grad a, grad w
    linear = torch.nn.Linear(k, n)
    x = torch.randn(m, k)
    assert only(count(lambda: linear(x)), "aten.addmm").flops == 2 * m * n * k  # the bias add is free
    x, y = torch.randn(b, m, k), torch.randn(b, k, n)
    assert only(count(lambda: torch.bmm(x, y)), "aten.bmm").flops == 2 * b * m * n * k


def test_conv_flops_forward_and_backward():
    n, c_in, c_out, size, kernel = 2, 3, 8, 10, 3
    conv = torch.nn.Conv2d(c_in, c_out, kernel, padding=1)
    x = torch.randn(n, c_in, size, size, requires_grad=True)
    forward = 2 * n * c_out * size * size * c_in * kernel * kernel
    counter = count(lambda: conv(x).sum().backward())
    assert only(counter, "aten.convolution").flops == forward
    assert only(counter, "aten.convolution_backward").flops == 2 * forward  # grad input + grad weight


def test_attention_flops_cpu_path_forward_and_backward():
    b, h, lq, lk, e = 2, 3, 5, 7, 8
    q = torch.randn(b, h, lq, e, requires_grad=True)
    k, v = torch.randn(b, h, lk, e, requires_grad=True), torch.randn(b, h, lk, e, requires_grad=True)
    counter = count(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert only(counter, "aten._scaled_dot_product_flash_attention_for_cpu").flops == 2 * 2 * b * h * lq * lk * e
    # Q K^T recomputed, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: five matmuls
    backward = only(counter, "aten._scaled_dot_product_flash_attention_for_cpu_backward")
    assert backward.flops == 5 * 2 * b * h * lq * lk * e


def test_attention_flops_cuda_kernels_on_meta_tensors():
    b, h, length, e = 2, 3, 5, 8
    q = torch.empty(b, h, length, e, device="meta", dtype=torch.bfloat16)
    aten = torch.ops.aten
    counter = count(lambda: (aten._scaled_dot_product_flash_attention(q, q, q),
                             aten._scaled_dot_product_efficient_attention(q, q, q, None, True),
                             aten._scaled_dot_product_cudnn_attention(q, q, q, None, True)))
    for op in ("flash", "efficient", "cudnn"):
        record = only(counter, f"aten._scaled_dot_product_{op}_attention")
        assert (record.flops, record.dtype) == (2 * 2 * b * h * length * length * e, "bf16")


# --- bytes ---------------------------------------------------------------------------------------

def test_bytes_of_elementwise_broadcast_view_and_in_place_ops():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    row = torch.randn(16)
    size = 8 * 16 * 4
    assert only(count(lambda: a + b), "aten.add.Tensor").bytes == 3 * size
    assert only(count(lambda: a + row), "aten.add.Tensor").bytes == 2 * size + 16 * 4
    assert tensor_bytes(row.expand(8, 16)) == 16 * 4  # a broadcast row is one row in memory
    assert count(lambda: (a.view(16, 8), a.t(), a.transpose(0, 1), a.expand(2, 8, 16), a[2:], a[0], a.permute(1, 0),
                          a.detach(), a.unsqueeze(0), a.split(4), torch.empty(5, 5))).records() == []
    assert only(count(lambda: a.add_(b)), "aten.add_.Tensor").bytes == 3 * size  # a read and written, b read
    assert only(count(lambda: a.copy_(b)), "aten.copy_").bytes == 2 * size  # the target is only written
    assert only(count(lambda: torch.zeros_like(a)), "aten.zeros_like").bytes == size  # a's shape, not its data
    assert only(count(lambda: a.to(torch.bfloat16)), "aten._to_copy").bytes == size + size // 2


def test_bytes_of_a_fused_adamw_step():
    params = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(4, 5))]
    optimizer = torch.optim.AdamW(params, fused=True)
    for _ in range(2):  # the first step creates the state; count the second, as every later one
        sum(p.sum() for p in params).backward()
        counter = count(optimizer.step)
    values = 30 * 4
    steps = 2 * 4  # one fp32 step count per parameter
    # reads params, grads, exp_avg, exp_avg_sq and the step counts; writes params, exp_avg, exp_avg_sq
    assert only(counter, "aten._fused_adamw_").bytes == 4 * values + steps + 3 * values
    state = [optimizer.state[p] for p in params]
    scaled = count(lambda: torch._fused_adamw_(
        params, [p.grad for p in params], [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [],
        [s["step"] for s in state], lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
        maximize=False, grad_scale=torch.ones(()), found_inf=None))
    # unscaling writes the gradients back (and reads the scale)
    assert only(scaled, "aten._fused_adamw_").bytes == 4 * values + steps + 3 * values + values + 4


@needs_triton
def test_phases_and_custom_ops():
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 8)
    with kernels.backend("triton"), FakeTensorMode():
        x, shift, scale = (torch.empty(t.shape) for t in (x, shift, scale))
        with OpCounter() as counter:
            with counter.phase("outer"):
                with counter.phase("norm"):
                    kernels.layernorm_modulate(x, shift, scale)
                x * 2
    (norm,) = [r for r in counter.records() if r.phase == "norm"]
    assert norm.op == "maskdit.layernorm_modulate"
    # reads x, shift, scale; writes the output and the fp32 mean and rstd per row
    assert norm.bytes == (2 * 5 * 8 + 2 * 8 + 2 * 8 + 2 * 5 * 8 + 2 * 2 * 5) * 4
    assert [r.op for r in counter.records() if r.phase == "outer"] == ["aten.mul.Tensor"]
    assert counter.phases == ["norm", "outer"]


# --- the bound -----------------------------------------------------------------------------------

def test_bound_of_one_compute_bound_and_one_memory_bound_op():
    size = 1024
    with FakeTensorMode():
        a = torch.empty(size, size, dtype=torch.bfloat16)
        with OpCounter() as counter:
            with counter.phase("matmul"):
                a @ a  # 2 * 1024^3 FLOPs, 3 * 2 MiB
            with counter.phase("add"):
                a + a  # 3 * 2 MiB
    flops, moved = 2 * size**3, 3 * size * size * 2
    bound = step_time_bound(counter, ROUND_GPU)
    assert bound.phases["matmul"].seconds == pytest.approx(flops / 100e12)  # compute-bound: 21.5 us > 6.3 us
    assert bound.phases["add"].seconds == pytest.approx(moved / 1e12)  # memory-bound
    assert bound.seconds == pytest.approx(flops / 100e12 + moved / 1e12)
    assert bound.compute_seconds == pytest.approx(flops / 100e12)
    assert bound.memory_seconds == pytest.approx(2 * moved / 1e12)
    assert bound.compute_bound_share == pytest.approx((flops / 100e12) / bound.seconds)
    assert [o.name for o in bound.top_ops] == ["aten.mm", "aten.add.Tensor"]
    assert bound.to_dict()["phases"]["add"]["bytes"] == moved


def test_fp32_matmuls_run_at_the_tf32_peak_only_when_asked():
    size = 1024
    with FakeTensorMode():
        a = torch.empty(size, size)
        with OpCounter() as counter:
            a @ a
    flops = 2 * size**3
    assert step_time_bound(counter, ROUND_GPU).seconds == pytest.approx(flops / 50e12)
    assert step_time_bound(counter, ROUND_GPU, tf32=False).seconds == pytest.approx(flops / 10e12)


def test_throughput_helpers():
    assert images_per_s(0.5, 256) == 512
    assert gpu_hours(0.5, 7200, 8) == 8


# --- fake tensors, DTensor, collectives ----------------------------------------------------------

def small_training_step(fake: bool) -> OpCounter:
    """Forward + backward of the MNIST preset's MaskDiT (50% masked, Triton ops: on CPU their
    interpreter for real tensors, their fake kernels for fake ones), counted. Without class labels:
    the denoiser checks the range of real labels only, which would be ops the fake step lacks."""
    cfg = load_config("mnist")
    with kernels.backend("triton"), FakeTensorMode() if fake else contextlib.nullcontext():
        net = build_net(cfg.model).train()
        images = torch.randn(3, 1, 32, 32)
        with OpCounter() as counter:
            with counter.phase("forward"):
                loss = edm_loss(net, images, None, 0.5, cfg.loss, cfg.model).loss.mean()
                assert isinstance(loss, FakeTensor) == fake  # the counter, inside the fake mode, sees fake tensors
            with counter.phase("backward"):
                loss.backward()
    return counter


@needs_triton
def test_fake_tensors_count_like_real_ones():
    fake, real = small_training_step(fake=True), small_training_step(fake=False)
    assert {"maskdit.gather_tokens", "maskdit.scatter_tokens_backward"} <= {r.op for r in fake.records()}
    assert fake.flops() > 0 and fake.bytes() > 0
    assert sorted(fake.records(), key=repr) == sorted(real.records(), key=repr)


@pytest.fixture
def two_rank_fake_group():
    """A fake process group of two ranks (no communication happens), torn down after the test."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:.*all_gather_tensor.* is deprecated:FutureWarning")
def test_dtensor_ops_count_their_local_shards_and_collectives_stay_apart(two_rank_fake_group):
    from torch.distributed._functional_collectives import all_gather_tensor, wait_tensor
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    x = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])  # 4 x 4 per rank
    counter = count(lambda: x * 2)
    assert counter.records() == [counter.records()[0]] and only(counter, "aten.mul.Tensor").bytes == 2 * 16 * 4
    shard = torch.randn(4, 4)
    counter = count(lambda: wait_tensor(all_gather_tensor(shard, 0, mesh)))
    assert counter.records() == []
    assert counter.collectives == {"step/_c10d_functional.all_gather_into_tensor": {"count": 1, "bytes": 3 * 16 * 4}}
    assert step_time_bound(counter, ROUND_GPU).seconds == 0


# --- DiT-XL/2 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_dit_xl2():
    """DiT-XL/2 at 256 px (EDM, no masking) on fake tensors, with one image and its label."""
    cfg = load_config("imagenet256-pretrain", ["model.arch=dit", "model.mask_ratio=0"])
    mode = FakeTensorMode()
    with kernels.backend("triton"), mode:
        net = build_net(cfg.model).train()
        x, sigma, y = torch.empty(1, 4, 32, 32), torch.ones(1), torch.zeros(1, dtype=torch.long)
    return mode, net, (x, sigma, y)


@needs_triton
def test_dit_xl2_forward_flops_are_the_pinned_figure(fake_dit_xl2):
    """The counter's forward FLOPs of DiT-XL/2 are exactly 2 x the project's pinned 118,616,702,976 MACs.

    Both count the same matmuls: patch embedding (a convolution), the timestep MLP, per block adaLN
    (6D), qkv, Q K^T and P V (here inside the fused CPU attention op), projection and MLP, then the
    final layer's adaLN and linear; both leave out bias adds, norms, softmax, activations and the
    label embedding (a lookup). The pinned figure counts a multiply-add once, the counter twice.
    """
    mode, net, (x, sigma, y) = fake_dit_xl2
    with kernels.backend("triton"), mode, OpCounter() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, sigma, y)
    assert counter.flops() == 2 * DIT_XL2_MACS
    assert {r.dtype for r in counter.records() if r.flops} <= {"bf16", "fp32"}


@needs_triton
def test_counting_costs_at_most_twice_the_fake_step(fake_dit_xl2):
    mode, net, (x, sigma, y) = fake_dit_xl2

    def step(counter: OpCounter | None) -> float:
        start = time.perf_counter()
        with kernels.backend("triton"), mode, counter or contextlib.nullcontext():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x, sigma, y)
            out.float().square().mean().backward()
        net.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(None)  # warm caches (dispatch, op plans) on both sides
    step(OpCounter())
    plain = min(step(None) for _ in range(2))
    counted = min(step(OpCounter()) for _ in range(2))
    assert counted < 2 * plain, f"counting took {counted:.2f} s, the fake step alone {plain:.2f} s"


def count_training_step(cfg, batch: int) -> OpCounter:
    """The ops of the planner's second (steady-state) fake training step."""
    counter = OpCounter()
    plan_memory(cfg, 1, batch, counter=counter)
    return counter


SMALL = ["model.size=S", "model.patch_size=8", "train.global_batch=2"]


@needs_triton
def test_a_small_training_step_is_counted_in_four_phases():
    cfg = load_config("imagenet256-pretrain", SMALL)
    counter = count_training_step(cfg, batch=2)
    assert counter.phases == ["forward", "backward", "optimizer", "ema"]
    assert counter.flops("backward") == pytest.approx(2 * counter.flops("forward"), rel=0.02)
    trained = [p for p in build_net(cfg.model).parameters() if p.requires_grad]
    values = sum(p.numel() for p in trained)
    every = sum(p.numel() for p in build_net(cfg.model).parameters())
    # fp32 params r+w, grads r, exp_avg r+w, exp_avg_sq r+w: 28 bytes a value, plus a step count a tensor
    assert only(counter, "aten._fused_adamw_").bytes == 28 * values + 4 * len(trained)
    # the EMA reads and writes its copy and reads the model, frozen tensors included
    assert only(counter, "aten._foreach_lerp_.Scalar").bytes == 3 * 4 * every


@needs_triton
def test_activation_checkpointing_recomputes_the_blocks_in_the_backward_pass():
    plain = count_training_step(load_config("imagenet256-pretrain", SMALL), batch=2)
    recomputed = count_training_step(
        load_config("imagenet256-pretrain", [*SMALL, "train.activation_checkpointing=true"]), batch=2)
    assert recomputed.flops("forward") == plain.flops("forward")
    # the blocks' forward again, not the embedders' nor the final layer's
    assert 0 < recomputed.flops("backward") - plain.flops("backward") < plain.flops("forward")


@needs_triton
def test_the_plan_command_bounds_both_architectures(tmp_path, capsys):
    out = tmp_path / "plan.json"
    main(["--model", "S/8", "--arch", "dit", "--global-batch", "16", "--gpus", "8", "--gpu", "h100",
          "--precision", "fp16", "--no-search", "--json", str(out), "train.tf32=false", "train.max_steps=1000"])
    assert "a LOWER bound" in capsys.readouterr().out
    bounds = json.loads(out.read_text())["roofline"]
    dit, maskdit = bounds["plan"], bounds["other_arch"]
    assert bounds["maskdit_over_dit"] == maskdit["step_s"] / dit["step_s"]
    seconds = dit["step_s"]
    assert seconds == pytest.approx(sum(p["seconds"] for p in dit["counted"]["phases"].values()))  # one micro-batch
    assert dit["images_per_s"] == pytest.approx(16 / seconds)
    assert dit["gpu_hours"] == pytest.approx(seconds * 1000 * 8 / 3600)
    assert dit["counted"]["gpu"] == "h100-80gb" and dit["counted"]["tf32"] is False
    # fp16 brings the trainer's grad scaler: an unscale check of the gradients before the optimizer step
    assert "aten._amp_foreach_non_finite_check_and_unscale_" in {o["name"] for o in dit["counted"]["top_ops"]}
