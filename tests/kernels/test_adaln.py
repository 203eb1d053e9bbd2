"""Triton adaLN kernels (kernels/adaln.py) against float64 ground truth from kernels.reference.

Shapes are small (the CPU run uses Triton's interpreter) but cover the widths that matter:
72 (MNIST preset), 384, 1152 (DiT-XL), odd/tiny ones, N = 1 and L = 1.
"""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import adaln, reference
from kernels._common import _INTERPRETER_BLOCKS, row_chunks, row_tiles, simulated_gpu

pytestmark = pytest.mark.usefixtures("poison")

# (N, L, D): widths with one column tile (8, 512) and two (72 = 64 + 8, 1152 = 1024 + 128, 33, 100 = 64 + 64)
SHAPES = [(1, 1, 8), (3, 13, 72), (2, 7, 384), (2, 3, 512), (2, 5, 1152), (1, 3, 33), (2, 4, 100)]
LOW_PRECISION = [(dtype, shape) for dtype in (torch.bfloat16, torch.float16) for shape in [(3, 13, 72), (2, 5, 1152)]]
CASES = [(torch.float32, shape) for shape in SHAPES] + LOW_PRECISION
IDS = [f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}" for dtype, shape in CASES]


def _inputs(shape, dtype, device, names):
    """Random (never zero) leaf tensors in ``dtype`` and their exact float64 twins."""
    n, length, d = shape
    sizes = {"x": (n, length, d), "y": (n, length, d), "gate": (n, d), "shift": (n, d), "scale": (n, d)}
    ours, truth = [], []
    for name in names:
        t = (torch.randn(sizes[name], dtype=torch.float64) + 0.1).to(dtype)
        ours.append(t.to(device, copy=True).requires_grad_())
        truth.append(t.double().requires_grad_())
    return ours, truth


def _grads_like(outputs):
    return [torch.randn(o.shape, dtype=torch.float64).to(o.dtype) for o in outputs]


def _run(fn, args, grads):
    outs = fn(*args)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    torch.autograd.backward(outs, [g.to(outs[0].device) for g in grads])
    return [o.detach().cpu() for o in outs], [a.grad.cpu() for a in args]


OPS = {
    "layernorm_modulate": (kernels.layernorm_modulate, reference.layernorm_modulate, ("x", "shift", "scale")),
    "gated_residual": (kernels.gated_residual, reference.gated_residual, ("x", "gate", "y")),
    "gated_residual_layernorm_modulate": (
        kernels.gated_residual_layernorm_modulate, reference.gated_residual_layernorm_modulate,
        ("x", "gate", "y", "shift", "scale"),
    ),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype, shape", CASES, ids=IDS)
def test_forward_backward_match_float64_reference(op, dtype, shape, assert_close, device):
    fn, ref, names = OPS[op]
    ours, truth = _inputs(shape, dtype, device, names)
    upstream = _grads_like([ours[0]] * (2 if op == "gated_residual_layernorm_modulate" else 1))
    outs, grads = _run(fn, ours, upstream)
    ref_outs, ref_grads = _run(ref, truth, [g.double() for g in upstream])
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == dtype
        assert_close(o, r, dtype, f"{op} output {i}")
    for name, a, g, r in zip(names, ours, grads, ref_grads):
        assert g.dtype == a.dtype
        assert_close(g, r, dtype, f"{op} grad {name}")


def test_strided_modulation_vectors(assert_close, device):
    """adaLN chunks are strided views of one (N, k*D) tensor; the kernels read them in place."""
    n, length, d = 2, 6, 72
    mod = torch.randn(n, 3 * d, dtype=torch.float64)
    x, y = (torch.randn(n, length, d, dtype=torch.float64) for _ in range(2))
    ours = [t.float().to(device).requires_grad_() for t in (x, y, mod)]
    truth = [t.clone().requires_grad_() for t in (x, y, mod)]
    upstream = torch.randn(n, length, d, dtype=torch.float64)
    for (x_, y_, m), fn in ((ours, kernels.gated_residual_layernorm_modulate),
                            (truth, reference.gated_residual_layernorm_modulate)):
        gate, shift, scale = m.chunk(3, dim=1)
        r, out = fn(x_, gate, y_, shift, scale)
        (r.sum() + (out * upstream.to(out)).sum()).backward()
    for i, (a, b) in enumerate(zip(ours, truth)):
        assert_close(a.grad.cpu(), b.grad, torch.float32, f"grad {i}")


def test_fused_equals_unfused_pair(device):
    (x, gate, y, shift, scale), _ = _inputs((2, 9, 384), torch.float32, device, ("x", "gate", "y", "shift", "scale"))
    r, out = kernels.gated_residual_layernorm_modulate(x, gate, y, shift, scale)
    r2 = kernels.gated_residual(x, gate, y)
    assert torch.equal(r, r2)
    assert torch.equal(out, kernels.layernorm_modulate(r2, shift, scale))


@pytest.mark.parametrize("d", [72, 1152])
def test_gradients_are_deterministic(d, assert_close, device):
    """Two identical backward passes give bitwise-identical gradients (no atomics), rows split over programs."""
    shape = (2, 70, d)
    tiles = row_tiles(d, *adaln._BWD_FUSED_TWO_TILES)
    with simulated_gpu(4):
        assert row_chunks(shape[0], shape[1], tiles.rows, _INTERPRETER_BLOCKS, torch.device(device))[0] > 1
    ours, truth = _inputs(shape, torch.float32, device, ("x", "gate", "y", "shift", "scale"))
    upstream = [torch.randn(shape, device=device) for _ in range(2)]
    runs = []
    with simulated_gpu(4):
        for _ in range(2):
            for t in ours:
                t.grad = None
            torch.autograd.backward(list(kernels.gated_residual_layernorm_modulate(*ours)), upstream)
            runs.append([t.grad.clone() for t in ours])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    torch.autograd.backward(list(reference.gated_residual_layernorm_modulate(*truth)), [u.double() for u in upstream])
    for a, b in zip(runs[0], truth):
        assert_close(a.cpu(), b.grad, torch.float32)


class _LaunchCounter:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_fused_op_is_one_pass(monkeypatch, device):
    """Forward: one kernel (reads x, y once; writes r, normed once). Backward: one kernel + the partial sum."""
    fwd, bwd = _LaunchCounter(adaln._adaln_fwd_kernel), _LaunchCounter(adaln._adaln_bwd_kernel)
    monkeypatch.setattr(adaln, "_adaln_fwd_kernel", fwd)
    monkeypatch.setattr(adaln, "_adaln_bwd_kernel", bwd)
    ours, _ = _inputs((2, 5, 72), torch.float32, device, ("x", "gate", "y", "shift", "scale"))
    r, out = kernels.gated_residual_layernorm_modulate(*ours)
    assert (fwd.launches, bwd.launches) == (1, 0)
    (r.sum() + out.sum()).backward()
    assert (fwd.launches, bwd.launches) == (1, 1)


def test_unused_residual_output(assert_close, device):
    """Only ``normed`` is used: autograd hands the backward a zero grad for ``r``."""
    ours, truth = _inputs((2, 4, 72), torch.float32, device, ("x", "gate", "y", "shift", "scale"))
    kernels.gated_residual_layernorm_modulate(*ours)[1].square().sum().backward()
    reference.gated_residual_layernorm_modulate(*truth)[1].square().sum().backward()
    for a, b in zip(ours, truth):
        assert_close(a.grad.cpu(), b.grad, torch.float32)


@pytest.mark.parametrize("op, out_dtype", [("layernorm_modulate", torch.float32), ("layernorm_modulate", torch.bfloat16),
                                           ("gated_residual", None),
                                           ("gated_residual_layernorm_modulate", torch.float32),
                                           ("gated_residual_layernorm_modulate", torch.bfloat16)])
def test_opcheck(op, out_dtype, device):
    names = OPS[op][2]
    ours, _ = _inputs((2, 3, 40), torch.float32, device, names)
    args = tuple(ours) + ((1e-6, out_dtype) if "layernorm" in op else ())
    torch.library.opcheck(getattr(torch.ops.maskdit, op).default, args)


def test_opcheck_backward_ops(device):
    (x, gate, y, shift, scale), _ = _inputs((2, 3, 40), torch.float32, device, ("x", "gate", "y", "shift", "scale"))
    x, gate, y, scale = (t.detach() for t in (x, gate, y, scale))
    r, _, mean, rstd = torch.ops.maskdit.gated_residual_layernorm_modulate(x, gate, y, shift.detach(), scale, 1e-6,
                                                                       torch.float32)
    dout = torch.randn_like(x)
    shift = shift.detach()
    for dr in (None, dout.clone()):
        torch.library.opcheck(torch.ops.maskdit.layernorm_modulate_backward.default,
                              (dr, dout, r, shift, scale, mean, rstd))
    torch.library.opcheck(torch.ops.maskdit.gated_residual_backward.default, (dout, gate, y))
    torch.library.opcheck(torch.ops.maskdit.gated_residual_layernorm_modulate_backward.default,
                          (dout, dout.clone(), r, gate, y, shift, scale, mean, rstd))


def test_torch_compile_sees_one_op(assert_close, device):
    """fullgraph=True: the ops trace (fake impls, autograd) without graph breaks."""
    ours, truth = _inputs((2, 5, 72), torch.float32, device, ("x", "gate", "y", "shift", "scale"))

    def step(x, gate, y, shift, scale):
        x, h0 = kernels.residual_layernorm_modulate(x, shift, scale)  # an autograd.Function around the ops
        r, h = kernels.gated_residual_layernorm_modulate(x, gate, y * h0, shift, scale)
        return kernels.gated_residual(r, gate, kernels.layernorm_modulate(h, shift, scale)).square().sum()

    backend = "inductor" if device == "cuda" else "aot_eager"  # inductor on CPU would need a C++ toolchain
    torch.compile(step, backend=backend, fullgraph=True)(*ours).backward()
    with kernels.backend("reference"):
        step(*truth).backward()
    for a, b in zip(ours, truth):
        assert_close(a.grad.cpu(), b.grad, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 256, 1152), (8, 128, 1152), (8, 256, 512)])
def test_dit_xl_shapes_on_gpu(shape, dtype, assert_close):
    """Full-size rows on the compiled kernels (the interpreter cannot afford these)."""
    names = ("x", "gate", "y", "shift", "scale")
    ours, truth = _inputs(shape, dtype, "cuda", names)
    upstream = _grads_like([ours[0], ours[0]])
    outs, grads = _run(kernels.gated_residual_layernorm_modulate, ours, upstream)
    ref_outs, ref_grads = _run(reference.gated_residual_layernorm_modulate, truth, [g.double() for g in upstream])
    for o, r in zip(outs + grads, ref_outs + ref_grads):
        assert_close(o, r, dtype)


def test_mixed_dtypes_follow_each_input(assert_close, device):
    """float32 residual stream with bf16 branch outputs (as under autocast): out in x's dtype, grads in each input's."""
    n, length, d = 2, 5, 72
    dtypes = {"x": torch.float32, "gate": torch.bfloat16, "y": torch.bfloat16, "shift": torch.bfloat16,
              "scale": torch.bfloat16}
    names = tuple(dtypes)
    ours, truth = [], []
    for name in names:
        (t,), (t64,) = _inputs((n, length, d), dtypes[name], device, (name,))
        ours.append(t)
        truth.append(t64)
    upstream = _grads_like([ours[0], ours[0]])
    outs, grads = _run(kernels.gated_residual_layernorm_modulate, ours, upstream)
    ref_outs, ref_grads = _run(reference.gated_residual_layernorm_modulate, truth, [g.double() for g in upstream])
    assert [o.dtype for o in outs] == [torch.float32, torch.float32]
    for name, g, r in zip(names, grads, ref_grads):
        assert g.dtype == dtypes[name]
        assert_close(g, r, dtypes[name], f"grad {name}")
    for o, r in zip(outs, ref_outs):
        assert_close(o, r, torch.float32)


@pytest.mark.parametrize("op", ["layernorm_modulate", "residual_layernorm_modulate", "gated_residual_layernorm_modulate"])
@pytest.mark.parametrize("d", [72, 1152])
def test_out_dtype_writes_the_normed_output_in_that_dtype(op, d, assert_close, device):
    """A training step's dtypes (float32 stream, bf16 vectors and branch) with ``out_dtype=bf16``: the
    normalised output is written in bf16 (what the next autocast Linear reads), the residual stays in
    x's dtype, the gradients in each input's; all against float64."""
    dtypes = {"x": torch.float32, "gate": torch.bfloat16, "y": torch.bfloat16, "shift": torch.bfloat16,
              "scale": torch.bfloat16}
    names = tuple(dtypes) if op == "gated_residual_layernorm_modulate" else ("x", "shift", "scale")
    ours, truth = [], []
    for name in names:
        (t,), (t64,) = _inputs((2, 5, d), dtypes[name], device, (name,))
        ours.append(t)
        truth.append(t64)

    def residual_reference(x, shift, scale):
        return x, reference.layernorm_modulate(x, shift, scale)

    ref = residual_reference if op == "residual_layernorm_modulate" else getattr(reference, op)
    outs = getattr(kernels, op)(*ours, out_dtype=torch.bfloat16)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    assert [o.dtype for o in outs] == [torch.float32] * (len(outs) - 1) + [torch.bfloat16]
    upstream = [torch.randn(o.shape, dtype=torch.float64).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, [g.to(device) for g in upstream])
    ref_outs = ref(*truth)
    ref_outs = list(ref_outs) if isinstance(ref_outs, tuple) else [ref_outs]
    torch.autograd.backward(ref_outs, [g.double() for g in upstream])
    for o, r in zip(outs, ref_outs):
        assert_close(o.detach().cpu(), r, o.dtype)
    for name, a, b in zip(names, ours, truth):
        assert a.grad.dtype == dtypes[name]
        assert_close(a.grad.cpu(), b.grad, dtypes[name], f"{op} grad {name}")


@pytest.mark.parametrize("d", [72, 512, 1152, 33])
def test_residual_layernorm_modulate_sums_both_gradients_in_the_kernel(d, assert_close, device):
    """The block input's gradient from the residual stream and from the norm: added inside the backward
    kernel (HAS_DR), so autograd runs no N x L x D add."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FullSizeAdds(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.adds = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.name.startswith("aten::add") and isinstance(out, torch.Tensor) and out.dim() == 3:
                self.adds += 1
            return out

    shape = (2, 5, d)
    ours, truth = _inputs(shape, torch.float32, device, ("x", "gate", "y", "shift", "scale"))

    def block(fn_norm, fused, x, gate, y, shift, scale):
        x_res, h = fn_norm(x, shift, scale)
        return fused(x_res, gate, h * y, shift, scale)

    up = _grads_like([ours[0], ours[0]])
    outs = block(kernels.residual_layernorm_modulate, kernels.gated_residual_layernorm_modulate, *ours)
    with FullSizeAdds() as mode:
        torch.autograd.backward(list(outs), [g.to(device) for g in up])
    assert mode.adds == 0

    def ref_norm(x, shift, scale):
        return x, reference.layernorm_modulate(x, shift, scale)

    refs = block(ref_norm, reference.gated_residual_layernorm_modulate, *truth)
    torch.autograd.backward(list(refs), [g.double() for g in up])
    for name, a, b in zip(("x", "gate", "y", "shift", "scale"), ours, truth):
        assert_close(a.grad.cpu(), b.grad, torch.float32, f"grad {name}")


@pytest.mark.parametrize("op", list(OPS))
def test_broadcast_vectors(op, assert_close, device):
    """(1, D) gate/shift/scale broadcast over the batch (read with a zero row stride); their gradients sum."""
    fn, ref, names = OPS[op]
    n, length, d = 3, 4, 72
    ours, truth = _inputs((n, length, d), torch.float32, device, names)
    for i, name in enumerate(names):
        if name in ("gate", "shift", "scale"):
            t = (torch.randn(1, d, dtype=torch.float64) + 0.1)
            ours[i] = t.float().to(device).requires_grad_()
            truth[i] = t.clone().requires_grad_()
    upstream = _grads_like([ours[0]] * (2 if op == "gated_residual_layernorm_modulate" else 1))
    outs, grads = _run(fn, ours, upstream)
    ref_outs, ref_grads = _run(ref, truth, [g.double() for g in upstream])
    for o, r in zip(outs + grads, ref_outs + ref_grads):
        assert o.shape == r.shape
        assert_close(o, r, torch.float32)


@pytest.mark.parametrize("bad", [(2, 72), (3, 71), (72,), (3, 1, 72)])
def test_other_vector_shapes_are_refused(bad, device):
    x = torch.randn(3, 4, 72, device=device)
    with pytest.raises(ValueError, match=r"must be \(3, 72\) or \(1, 72\)"):
        kernels.layernorm_modulate(x, torch.randn(bad, device=device), torch.randn(3, 72, device=device))
    with kernels.backend("reference"), pytest.raises(ValueError, match="must be"):
        kernels.gated_residual(x, torch.randn(bad, device=device), x)
