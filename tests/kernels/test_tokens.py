"""Triton gather/scatter kernels (kernels/tokens.py) against float64 ground truth from kernels.reference.

Covers K = 0, K = 1 and K = L, N = 1, widths 72/384/1152 and small odd ones, with and without
``pos``, and ``pos`` both frozen (the MaskDiT buffer) and trainable.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference, tokens
from kernels._common import _INTERPRETER_BLOCKS, row_chunks, row_tiles, simulated_gpu

pytestmark = pytest.mark.usefixtures("poison")

# (N, L, K, D)
SHAPES = [(3, 13, 5, 72), (1, 9, 9, 33), (2, 7, 1, 384), (2, 5, 3, 512), (2, 6, 3, 1152), (2, 5, 0, 8), (1, 1, 1, 8)]
CASES = [(torch.float32, s) for s in SHAPES] + [
    (dtype, s) for dtype in (torch.bfloat16, torch.float16) for s in [(3, 13, 5, 72), (2, 6, 3, 1152)]
]
IDS = [f"{str(dtype)[6:]}-{'x'.join(map(str, s))}" for dtype, s in CASES]


def _ids(n: int, length: int, k: int) -> torch.Tensor:
    """Unique kept positions per row, in random order (as MaskDiT's argsort of noise gives)."""
    return torch.stack([torch.randperm(length)[:k] for _ in range(n)]) if n else torch.empty(0, k, dtype=torch.long)


def _leaf(shape, dtype, device, grad=True):
    """A random (never zero) leaf in ``dtype`` on ``device`` and its exact float64 twin on the CPU."""
    t = (torch.randn(shape, dtype=torch.float64) + 0.1).to(dtype)
    return t.to(device, copy=True).requires_grad_(grad), t.double().requires_grad_(grad)


@pytest.mark.parametrize("pos_mode", ["none", "frozen", "trained"])
@pytest.mark.parametrize("dtype, shape", CASES, ids=IDS)
def test_gather_matches_float64_reference(dtype, shape, pos_mode, assert_close, device):
    n, length, k, d = shape
    ids = _ids(n, length, k)
    x, x64 = _leaf((n, length, d), dtype, device)
    pos, pos64 = _leaf((length, d), dtype, device, grad=pos_mode == "trained") if pos_mode != "none" else (None, None)
    out = kernels.gather_tokens(x, ids.to(device), pos)
    ref = reference.gather_tokens(x64, ids, pos64)
    assert out.shape == (n, k, d) and out.dtype == dtype
    assert_close(out.cpu(), ref, dtype, "output")
    upstream = torch.randn(n, k, d, dtype=torch.float64).to(dtype)
    out.backward(upstream.to(device))
    ref.backward(upstream.double())
    assert_close(x.grad.cpu(), x64.grad, dtype, "grad x")
    if pos_mode == "trained":
        assert pos.grad.dtype == dtype
        assert_close(pos.grad.cpu(), pos64.grad, dtype, "grad pos")


@pytest.mark.parametrize("pos_mode", ["none", "frozen", "trained"])
@pytest.mark.parametrize("dtype, shape", CASES, ids=IDS)
def test_scatter_matches_float64_reference(dtype, shape, pos_mode, assert_close, device):
    n, length, k, d = shape
    ids = _ids(n, length, k)
    x, x64 = _leaf((n, k, d), dtype, device)
    fill, fill64 = _leaf((d,), dtype, device)
    pos, pos64 = _leaf((length, d), dtype, device, grad=pos_mode == "trained") if pos_mode != "none" else (None, None)
    out = kernels.scatter_tokens(x, ids.to(device), length, fill, pos)
    ref = reference.scatter_tokens(x64, ids, length, fill64, pos64)
    assert out.shape == (n, length, d) and out.dtype == dtype
    assert_close(out.cpu(), ref, dtype, "output")
    upstream = torch.randn(n, length, d, dtype=torch.float64).to(dtype)
    out.backward(upstream.to(device))
    ref.backward(upstream.double())
    assert x.grad.dtype == fill.grad.dtype == dtype
    assert_close(x.grad.cpu(), x64.grad, dtype, "grad x_keep")
    assert_close(fill.grad.cpu(), fill64.grad, dtype, "grad fill")  # exactly zero when K = L
    if pos_mode == "trained":
        assert_close(pos.grad.cpu(), pos64.grad, dtype, "grad pos")


def test_gather_then_scatter_round_trip(device):
    """scatter(gather(x)) puts every kept row back bit-exactly and the fill everywhere else."""
    n, length, k, d = 2, 16, 8, 72
    ids = _ids(n, length, k).to(device)
    x = torch.randn(n, length, d, device=device)
    fill = torch.randn(d, device=device)
    out = kernels.scatter_tokens(kernels.gather_tokens(x, ids), ids, length, fill)
    kept = torch.zeros(n, length, dtype=torch.bool, device=device).scatter_(1, ids, True)
    assert torch.equal(out[kept], x[kept])
    assert torch.equal(out[~kept], fill.expand(n * length - n * k, d))


@pytest.mark.parametrize("d", [72, 1152])
def test_fill_gradient_is_deterministic(d, assert_close, device):
    n, length, k = 3, 80, 20
    tiles = row_tiles(d, tokens._REDUCE_WARPS, tokens._REDUCE_PER_THREAD)
    with simulated_gpu(8):
        assert row_chunks(n, length, tiles.rows, _INTERPRETER_BLOCKS, torch.device(device))[0] > 1
    ids = _ids(n, length, k).to(device)
    x = torch.randn(n, k, d, device=device, requires_grad=True)
    fill = torch.randn(d, device=device, requires_grad=True)
    upstream = torch.randn(n, length, d, device=device)
    grads = []
    with simulated_gpu(8):
        for _ in range(2):
            fill.grad = None
            kernels.scatter_tokens(x, ids, length, fill).backward(upstream)
            grads.append(fill.grad.clone())
    assert torch.equal(*grads)
    kept = torch.zeros(n, length, dtype=torch.bool).scatter_(1, ids.cpu(), True)
    assert_close(grads[0].cpu(), upstream.cpu()[~kept].double().sum(0), torch.float32)


@pytest.mark.parametrize("with_pos", [False, True])
def test_opcheck(with_pos, device):
    n, length, k, d = 2, 6, 3, 40
    ids = _ids(n, length, k).to(device)
    x = torch.randn(n, length, d, device=device, requires_grad=True)
    x_keep = torch.randn(n, k, d, device=device, requires_grad=True)
    fill = torch.randn(d, device=device, requires_grad=True)
    pos = torch.randn(length, d, device=device, requires_grad=True) if with_pos else None
    torch.library.opcheck(torch.ops.maskdit.gather_tokens.default, (x, ids, pos))
    torch.library.opcheck(torch.ops.maskdit.scatter_tokens.default, (x_keep, ids, length, fill, pos))
    torch.library.opcheck(torch.ops.maskdit.gather_tokens_backward.default, (x_keep.detach(), ids, length))
    torch.library.opcheck(torch.ops.maskdit.scatter_tokens_backward.default, (x.detach(), ids))


def test_torch_compile_sees_one_op(assert_close, device):
    n, length, k, d = 2, 8, 4, 24
    ids = _ids(n, length, k).to(device)
    pos = torch.randn(length, d, device=device)
    leaves = [torch.randn(n, length, d, device=device), torch.randn(d, device=device)]
    ours = [t.clone().requires_grad_() for t in leaves]
    theirs = [t.clone().requires_grad_() for t in leaves]

    def step(x, fill):
        kept = kernels.gather_tokens(x, ids, pos)
        return kernels.scatter_tokens(kept.sin(), ids, length, fill, pos).square().sum()

    backend = "inductor" if device == "cuda" else "aot_eager"  # inductor on CPU would need a C++ toolchain
    torch.compile(step, backend=backend, fullgraph=True)(*ours).backward()
    with kernels.backend("reference"):
        step(*theirs).backward()
    for a, b in zip(ours, theirs):
        assert_close(a.grad, b.grad, torch.float32)


def test_launches_are_single_pass(monkeypatch, device):
    """The ops use exactly one kernel each way (plus the fixed-order sum for dfill)."""
    launches = []
    for name in ("_gather_kernel", "_scatter_kernel", "_scatter_bwd_kernel"):
        kernel = getattr(tokens, name)
        monkeypatch.setattr(tokens, name, _Recorder(kernel, name, launches))
    ids = _ids(2, 8, 4).to(device)
    x = torch.randn(2, 8, 16, device=device, requires_grad=True)
    fill = torch.randn(16, device=device, requires_grad=True)
    kernels.scatter_tokens(kernels.gather_tokens(x, ids), ids, 8, fill).sum().backward()
    assert launches == ["_gather_kernel", "_scatter_kernel", "_scatter_bwd_kernel", "_scatter_kernel"]


class _Recorder:
    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 256, 128, 1152), (8, 256, 128, 512)])
def test_maskdit_shapes_on_gpu(shape, dtype, assert_close):
    n, length, k, d = shape
    ids = _ids(n, length, k)
    x, x64 = _leaf((n, length, d), dtype, "cuda")
    fill, fill64 = _leaf((d,), dtype, "cuda")
    pos = torch.randn(length, d).to(dtype)
    kept = kernels.gather_tokens(x, ids.cuda(), pos.cuda())
    out = kernels.scatter_tokens(kept, ids.cuda(), length, fill, pos.cuda())
    ref = reference.scatter_tokens(reference.gather_tokens(x64, ids, pos.double()), ids, length, fill64, pos.double())
    upstream = torch.randn(n, length, d).to(dtype)
    out.backward(upstream.cuda())
    ref.backward(upstream.double())
    for a, b in ((out, ref), (x.grad, x64.grad), (fill.grad, fill64.grad)):
        assert_close(a.detach().cpu(), b.detach(), dtype)


def test_gather_reads_strided_rows_in_place(monkeypatch, assert_close, device):
    """A (N, L, D) input with other row strides (a slice, a transposed batch) is read without a copy."""
    base = torch.randn(8, 3, 72, device=device)
    x = base.transpose(0, 1)  # (3, 8, 72), strides (72, 216, 1)
    ids = _ids(3, 8, 5).to(device)
    copies = []
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: copies.append(self) or self)
    out = kernels.gather_tokens(x, ids)
    monkeypatch.undo()
    assert not [t for t in copies if t.dim() == 3]
    assert_close(out.cpu(), reference.gather_tokens(x.cpu().double(), ids.cpu()), torch.float32)


def test_debug_flag_checks_ids(monkeypatch, device):
    x = torch.randn(2, 6, 8, device=device)
    repeated = torch.tensor([[0, 1, 1], [2, 3, 4]], device=device)
    out_of_range = torch.tensor([[0, 1, 6], [2, 3, 4]], device=device)
    kernels.gather_tokens(x, repeated)  # unchecked without the flag (documented)
    monkeypatch.setenv("MASKDIT_KERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="repeated"):
        kernels.gather_tokens(x, repeated)
    with pytest.raises(ValueError, match="outside"):
        kernels.scatter_tokens(x[:, :3], out_of_range, 6, torch.zeros(8, device=device))
    kernels.gather_tokens(x, _ids(2, 6, 3).to(device))
