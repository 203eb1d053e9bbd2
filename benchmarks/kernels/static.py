"""Static kernel report: what decides a memory-bound kernel's speed, read from its GPU binary, no GPU needed.

    python -m benchmarks.kernels.static                    # table on stdout, JSON in static-report.json
    python -m benchmarks.kernels.static --json out.json --gpus sm_90

Every public op runs at the DiT-XL/2 training shapes, in the dtypes a bf16-autocast training step
gives its tensors (:data:`TRAIN`; a few pure-bf16 rows too), on CPU tensors with the Triton backend forced,
while ``JITFunction.run`` is replaced by a recorder: the launchers build their real grids (sized for
the simulated GPU's SM count), arguments, constexprs and ``num_warps``, and nothing launches. Each
recorded call is then specialised exactly as Triton's launcher does it (its binder: divisibility by
16 of pointers and integers, constexprs) and compiled ahead of time for sm_90 and sm_80 with the
ptxas bundled in the triton wheel. From the binary it reads:

- registers per thread, spill instructions (``STL``/``LDL`` in the SASS, local memory), shared memory;
- resident blocks and warps per SM from those and the architecture's limits (65536 registers
  allocated per warp in 256-register units, 64 warps, 32 blocks, 228 KB / 164 KB shared memory with
  1 KB reserved per block), hence warp occupancy, and the waves the grid needs;
- the widths of the global loads and stores (``LDG.E.128`` = 16 bytes ...), and the bytes of loads
  a row step has in flight per SM (resident threads x the 8/16-byte loads inside the row loop);
- the bytes each op moves: every tensor a kernel dereferences (a pointer parameter the PTX loads)
  counted once at its footprint (row-gathered inputs: the rows gathered), plus every byte read and
  written by PyTorch ops the op runs besides its kernels (a ``.contiguous()`` copy, an autograd
  gradient sum), seen through a ``TorchDispatchMode``; against the op's minimum from the shapes
  (``benchmarks.kernels.bench._bytes``).

What it cannot show: time. No clock, no DRAM or L2 behaviour (re-reads of small per-sample vectors
by every program are assumed to hit L2 and are not counted; whether the loads of a row step overlap
is the scheduler's business), no instruction latency or issue-rate limits, no contention with other
kernels. It proves the preconditions of full bandwidth (occupancy, vector width, minimal traffic,
no spills, no wave tails); the GPU microbenchmark (``benchmarks.kernels.bench``) is the final word.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

import triton
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import kernels
from benchmarks.kernels.bench import _bytes
from kernels import _common

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: int
    limits: _common.GpuLimits


GPUS = {
    "sm_90": Gpu("sm_90", 90, _common.GpuLimits(sms=132, smem=228 * 1024)),  # H100 / H200 SXM
    "sm_80": Gpu("sm_80", 80, _common.GpuLimits(sms=108, smem=164 * 1024)),  # A100
}

@dataclass(frozen=True)
class Dtypes:
    """The storage dtype of each tensor role of an op in one kind of training step."""
    name: str
    stream: torch.dtype  # x, the residual r and their gradients; the token ops' tokens
    vectors: torch.dtype  # shift / scale / gate: chunks of the adaLN Linear's output
    branch: torch.dtype  # y: the attention / MLP output the gated residual adds
    normed: torch.dtype  # layernorm_modulate's output as the next Linear (qkv, fc1) reads it

    def sizes(self) -> dict[str, int]:
        return {role: torch.empty((), dtype=getattr(self, role)).element_size()
                for role in ("stream", "vectors", "branch", "normed")}

    def describe(self) -> dict[str, str]:
        return {role: str(getattr(self, role)).replace("torch.", "") for role in ("stream", "vectors", "branch", "normed")}


# A bf16-autocast training step (maskdit_fast.models.precision, read off a DiT block's forward and
# backward under torch.autocast): the residual stream is float32 for every architecture; the
# modulation vectors come out of an autocast Linear in bf16, and so do the attention / MLP outputs;
# the normalised output is read by an autocast Linear, which wants bf16. Gradients have their
# tensor's dtype. The pure-bf16 rows (a model cast to bf16) are kept at one shape per adaLN op.
TRAIN = Dtypes("train", torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16)
BF16 = Dtypes("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16)

# DiT-XL/2 at 256 px: N = 64 images per GPU, L = 256 tokens, 128 kept at mask ratio 0.5, D = 1152;
# decoder 512 wide. DyDiT packs the tokens routed to the MLP (about half) across the batch: the
# normalised output, in its dtype.
N, L, K, D, D_DEC = 64, 256, 128, 1152, 512
SCENARIOS = [
    ("layernorm_modulate", "xl-L128", (N, K, D), TRAIN),
    ("layernorm_modulate", "xl-L256", (N, L, D), TRAIN),
    ("layernorm_modulate", "dec-L256", (N, L, D_DEC), TRAIN),
    ("layernorm_modulate", "xl-L128", (N, K, D), BF16),
    ("gated_residual", "xl-L128", (N, K, D), TRAIN),
    ("gated_residual", "dec-L256", (N, L, D_DEC), TRAIN),
    ("gated_residual", "xl-L128", (N, K, D), BF16),
    ("gated_residual_layernorm_modulate", "xl-L128", (N, K, D), TRAIN),
    ("gated_residual_layernorm_modulate", "xl-L256", (N, L, D), TRAIN),
    ("gated_residual_layernorm_modulate", "dec-L256", (N, L, D_DEC), TRAIN),
    ("gated_residual_layernorm_modulate", "xl-L128", (N, K, D), BF16),
    ("gather_tokens", "xl-L256-K128", (N, L, K, D), TRAIN),
    ("gather_tokens", "dydit-packed", (1, N * L, N * L // 2, D), TRAIN),
    ("scatter_tokens", "dec-L256-K128", (N, L, K, D_DEC), TRAIN),
]


def tokens_dtype(shape: str, dtypes: Dtypes) -> torch.dtype:
    """The token ops' tensors: the residual stream, except DyDiT's packing of the normalised output."""
    return dtypes.normed if shape == "dydit-packed" else dtypes.stream


@dataclass
class Launch:
    """One recorded kernel launch, specialised for one GPU."""
    kernel: str
    op: str
    shape: str
    dtypes: str
    phase: str
    gpu: str
    grid: tuple[int, ...]
    num_warps: int
    constexprs: dict
    tensor_bytes: list  # per non-constexpr parameter in order: footprint bytes, or None (not a tensor)
    cols: int  # the row width D the kernel was launched for
    source: object = field(repr=False, default=None)


@dataclass
class Binary:
    registers: int
    spills: int  # STL + LDL instructions in the SASS
    local_bytes: int
    shared: int
    loads: dict  # bytes per instruction -> count
    stores: dict
    used_params: list
    step_load_bytes: int  # per thread, wide (8/16-byte) loads inside loops


@contextlib.contextmanager
def recording(out: list, gpu: Gpu) -> Iterator[None]:
    """Replace kernel launches by a record of ``(kernel, args, kwargs, grid)``; answer ``warmup`` (which the
    launchers use to read a kernel's occupancy) with the binary compiled for ``gpu``."""
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:
            src, options, _, _ = _specialise(self, args, kwargs, gpu)
            b = compile_and_analyse(src, options, gpu)
            return SimpleNamespace(n_regs=b.registers, metadata=SimpleNamespace(num_warps=options.num_warps,
                                                                                shared=b.shared),
                                   _init_handles=lambda: None)
        out.append((self, args, kwargs, grid))
        return None

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = run


_compiled: dict = {}


def compile_and_analyse(src: ASTSource, options, gpu: Gpu) -> Binary:
    """Compile for ``gpu`` (once per source, specialisation and options) and read the binary."""
    key = (gpu.arch, src.hash(), options.hash())
    if key not in _compiled:
        _compiled[key] = analyse(triton.compile(src, target=GPUTarget("cuda", gpu.arch, 32), options=options.__dict__))
    return _compiled[key]


def footprint(t: torch.Tensor) -> int:
    """Distinct bytes a tensor covers (broadcast, stride-0 dimensions count once)."""
    elems = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            elems *= size
    return elems * t.element_size() if t.numel() else 0


_FREE = {"empty", "empty_like", "new_empty", "empty_strided", "detach", "lift_fresh", "_local_scalar_dense",
         "alias", "_to_copy_noop"}
_WRITE_ONLY = {"full", "zeros", "zeros_like", "new_zeros", "ones", "ones_like", "fill_", "zero_", "arange",
               "full_like", "new_full"}


class TorchBytes(TorchDispatchMode):
    """Bytes read and written by the PyTorch ops an op runs around its kernels (copies, sums, casts).

    The package's custom ops are entered (their Python implementation runs under this mode), so
    the ops inside them are seen too; kernel launches are recorded separately.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("maskdit::"):
            with self:
                return OPDEFS[name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        base = name.split("::")[-1]
        tensors_in = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        # Views and ops that may return their input (contiguous, to, expand ...) move nothing when they do.
        inputs = {t.untyped_storage().data_ptr() for t in tensors_in if t.numel()}
        fresh = [t for t in tensors_out if t.numel() and t.untyped_storage().data_ptr() not in inputs]
        if base not in _FREE and fresh:
            moved = sum(footprint(t) for t in ([] if base in _WRITE_ONLY else tensors_in) + fresh)
            self.ops.append((name, moved))
        return out


def _leaf(*shape, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return (torch.randn(shape, dtype=torch.float32) + 0.1).to(dtype).requires_grad_(grad)


def op_inputs(op: str, shape: str, dims: tuple[int, ...], dtypes: Dtypes):
    """(callable, differentiable inputs) of one public op at ``dims`` on CPU tensors, as a training step
    runs it: the normalised output written in ``dtypes.normed`` (``out_dtype``, as the model layers
    set it under autocast), then cast to it as the Linear that reads it does (a no-op then; a full
    extra pass, counted, for an op that wrote another dtype)."""
    if op in ("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate"):
        n, length, d = dims
        # The adaLN vectors are chunks of one (N, 6D) Linear output: strided views, as in a DiT block.
        mod = _leaf(n, 6 * d, dtype=dtypes.vectors)
        shift, scale, gate = mod[:, :d], mod[:, d:2 * d], mod[:, 2 * d:3 * d]
        x, y = _leaf(n, length, d, dtype=dtypes.stream), _leaf(n, length, d, dtype=dtypes.branch)
        if op == "layernorm_modulate":
            return lambda: [kernels.layernorm_modulate(x, shift, scale, out_dtype=dtypes.normed).to(dtypes.normed)], (x, shift, scale)
        if op == "gated_residual":
            return lambda: [kernels.gated_residual(x, gate, y)], (x, gate, y)

        def fused():
            r, normed = kernels.gated_residual_layernorm_modulate(x, gate, y, shift, scale, out_dtype=dtypes.normed)
            return [r, normed.to(dtypes.normed)]
        return fused, (x, gate, y, shift, scale)
    n, length, k, d = dims
    dtype = tokens_dtype(shape, dtypes)
    ids = torch.rand(n, length).argsort(dim=1)[:, :k]
    if op == "gather_tokens":
        if n == 1:  # DyDiT: the packed tokens of the flattened batch, no position embedding
            x = _leaf(n, length, d, dtype=dtype)
            return lambda: [kernels.gather_tokens(x, ids, None)], (x,)
        x, pos = patch_embed_output(n, length, d, dtype), _leaf(length, d, dtype=dtype, grad=False)
        return lambda: [kernels.gather_tokens(x, ids, pos)], (x,)
    x_keep, fill, pos = _leaf(n, k, d, dtype=dtype), _leaf(d, dtype=dtype), _leaf(length, d, dtype=dtype, grad=False)
    return lambda: [kernels.scatter_tokens(x_keep, ids, length, fill, pos)], (x_keep, fill)


def patch_embed_output(n: int, length: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """The tokens MaskDiT gathers from: the patch embedding's output in the layout it really has, in
    the residual stream's ``dtype``."""
    from maskdit_fast.models.layers import PatchEmbed

    side = int(length ** 0.5)
    embed = PatchEmbed(4, d, 2).to(dtype)
    with torch.no_grad():
        tokens = embed(torch.randn(n, 4, 2 * side, 2 * side, dtype=dtype))
    return tokens.requires_grad_()


def _specialise(fn: JITFunction, args, kwargs, gpu: Gpu):
    """What Triton's launcher would compile for this call on ``gpu``.

    Returns the ASTSource, the options, the runtime parameters as ``{name: value}`` in order (what
    the binary receives) and the constexprs ``{name: value}``.
    """
    backend = make_backend(GPUTarget("cuda", gpu.arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    values = dict(zip(signature, bound.values()))
    params = {name: values[name] for name, kind in signature.items() if kind != "constexpr"}
    fixed = {name: values[name] for name, kind in signature.items() if kind == "constexpr"}
    return ASTSource(fn, signature, constexprs, attrs), options, params, fixed


def _gathered_rows(name: str, bound: dict) -> dict[str, int]:
    """Parameters read only at gathered rows, with the bytes read (the rest of the tensor is never touched)."""
    if name == "_gather_kernel":
        x, ids = bound["X"], bound["IDS"]
        return {"X": ids.numel() * x.shape[-1] * x.element_size()}
    return {}


def record_scenario(op: str, shape: str, dims: tuple[int, ...], dtypes: Dtypes, gpu: Gpu) -> tuple[list[Launch], dict]:
    """Run ``op`` forward, then backward, recording launches and torch-op bytes of each phase."""
    fn, inputs = op_inputs(op, shape, dims, dtypes)
    launches: list[Launch] = []
    torch_bytes = {}
    outs = []
    with _common.simulated_gpu(gpu.limits), kernels.backend("triton"):
        for phase in ("fwd", "bwd"):
            calls: list = []
            mode = TorchBytes()
            grads = [torch.randn(o.shape).to(o.dtype) for o in outs]
            with recording(calls, gpu), mode:
                if phase == "fwd":
                    outs = fn()
                else:  # autograd.grad: no accumulation into .grad (a copy a leaf of another layout would get)
                    torch.autograd.grad(outs, list(inputs), grads)
            torch_bytes[phase] = mode.ops
            for kernel, cargs, ckwargs, grid in calls:
                src, options, params, constexprs = _specialise(kernel, cargs, ckwargs, gpu)
                gathered = _gathered_rows(kernel.__name__, params)
                sizes = [gathered.get(name, footprint(v) if isinstance(v, torch.Tensor) else None)
                         for name, v in params.items()]
                grid = tuple(grid) + (1,) * (3 - len(grid))
                launches.append(Launch(kernel.__name__, op, shape, dtypes.name, phase, gpu.name, grid,
                                       options.num_warps,
                                       {k: v for k, v in constexprs.items() if isinstance(v, (int, float, bool))},
                                       sizes, int(params.get("D", constexprs.get("D", 0)) or 0), (src, options)))
    return launches, torch_bytes


_WIDTH = {"128": 16, "64": 8, "U16": 2, "S16": 2, "16": 2, "U8": 1, "S8": 1}


def _sass_widths(sass: str, opcode: str) -> dict[int, int]:
    widths: dict[int, int] = {}
    for suffix in re.findall(rf"\b{opcode}((?:\.[A-Z0-9_]+)*)\s", sass):
        parts = suffix.strip(".").split(".")
        width = next((_WIDTH[p] for p in parts if p in _WIDTH), 4)
        widths[width] = widths.get(width, 0) + 1
    return dict(sorted(widths.items(), reverse=True))


def _loop_load_bytes(sass: str) -> int:
    """Bytes one thread loads with 8- and 16-byte LDGs inside the kernel's loops (backward branches):
    the streamed tensors of one row step, not the per-program prologue (the modulation vectors)."""
    loops = [(int(target, 16), int(addr, 16))
             for addr, target in re.findall(r"/\*([0-9a-f]{4,})\*/[^\n]*?\bBRA(?:\.[A-Z]+)* 0x([0-9a-f]+)", sass)
             if int(target, 16) < int(addr, 16)]
    total = 0
    for addr, suffix in re.findall(r"/\*([0-9a-f]{4,})\*/[^\n]*?\bLDG((?:\.[A-Z0-9_]+)*)\s", sass):
        width = next((_WIDTH[p] for p in suffix.strip(".").split(".") if p in _WIDTH), 4)
        if width >= 8 and any(lo <= int(addr, 16) <= hi for lo, hi in loops):
            total += width
    return total


def analyse(compiled) -> Binary:
    """Registers, spills, shared memory, global access widths and the parameters the code reads."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spills = len(re.findall(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\s", sass))
    used = sorted({int(i) for i in re.findall(r"_param_(\d+)\]", compiled.asm["ptx"])})
    return Binary(int(fields["REG"]), spills, int(fields["LOCAL"]) + int(fields["STACK"]),
                  max(int(fields["SHARED"]), compiled.metadata.shared), _sass_widths(sass, "LDG"),
                  _sass_widths(sass, "STG"), used, _loop_load_bytes(sass))


def build(gpus: Sequence[Gpu], scenarios=SCENARIOS) -> dict:
    """Record, compile and analyse every scenario on every GPU; returns the JSON-able report."""
    if not isinstance(_common._sum_partials_kernel, JITFunction):
        # Under TRITON_INTERPRET=1 the kernels are interpreted functions that the recorder cannot see.
        raise RuntimeError("the static report compiles the kernels: run it without TRITON_INTERPRET=1")
    kernel_rows, op_rows = [], []
    for gpu in gpus:
        for op, shape, dims, dtypes in scenarios:
            launches, torch_bytes = record_scenario(op, shape, dims, dtypes, gpu)
            for phase in ("fwd", "bwd"):
                kernel_bytes = 0
                for launch in (x for x in launches if x.phase == phase):
                    src, options = launch.source
                    b = compile_and_analyse(src, options, gpu)
                    moved = sum(s for i, s in enumerate(launch.tensor_bytes) if s and i in b.used_params)
                    kernel_bytes += moved
                    lim = gpu.limits
                    blocks = _common.blocks_per_sm(b.registers, launch.num_warps, b.shared, lim)
                    programs = launch.grid[0] * launch.grid[1] * launch.grid[2]
                    waves = programs / (blocks * lim.sms) if blocks else float("inf")
                    width = launch.constexprs.get("BLOCK_D", 0) + launch.constexprs.get("BLOCK_E", 0)
                    padding = -(-launch.cols // width) * width / launch.cols if width and launch.cols else 1.0
                    kernel_rows.append(dict(
                        kernel=launch.kernel, padding=padding, op=op, shape=shape, dtypes=dtypes.name, phase=phase,
                        gpu=gpu.name,
                        constexprs=launch.constexprs, num_warps=launch.num_warps, grid=launch.grid,
                        registers=b.registers, spills=b.spills, local_bytes=b.local_bytes, shared=b.shared,
                        blocks_per_sm=blocks, warps_per_sm=blocks * launch.num_warps,
                        occupancy=blocks * launch.num_warps / lim.max_warps, programs=programs, waves=waves,
                        wave_fill=waves / max(1, -(-programs // max(1, blocks * lim.sms))) if blocks else 0.0,
                        in_flight=blocks * launch.num_warps * 32 * b.step_load_bytes,
                        load_widths=b.loads, store_widths=b.stores, bytes=moved))
                sizes = dtypes.sizes()
                if op in ("gather_tokens", "scatter_tokens"):
                    sizes["stream"] = torch.empty((), dtype=tokens_dtype(shape, dtypes)).element_size()
                pos = shape != "dydit-packed"
                minimum = _bytes(op, dims, "fwd", sizes, pos)
                if phase == "bwd":
                    minimum = _bytes(op, dims, "fwd+bwd", sizes, pos) - minimum
                extra = sum(b for _, b in torch_bytes[phase])
                op_rows.append(dict(op=op, shape=shape, dims=dims, dtypes=dtypes.name,
                                    tensor_dtypes=dtypes.describe(), phase=phase, gpu=gpu.name,
                                    kernel_bytes=kernel_bytes, torch_bytes=extra,
                                    torch_ops=sorted({n for n, _ in torch_bytes[phase]}),
                                    minimum=minimum, ratio=(kernel_bytes + extra) / minimum))
    return {"triton": triton.__version__, "torch": torch.__version__, "dtypes": {d.name: d.describe() for d in {s[3] for s in scenarios}},
            "gpus": [dict(name=g.name, arch=g.arch, **g.limits._asdict()) for g in gpus],
            "kernels": kernel_rows, "ops": op_rows}


# Targets for a memory-bound kernel (design.md, "Performance truth without a GPU").
MIN_OCCUPANCY = 0.5
MIN_IN_FLIGHT = 32 * 1024  # bytes of loads per SM that keep HBM busy with fewer warps (argued in the kernel)
MAX_BYTES_RATIO = 1.10
MIN_WAVE_FILL = 0.85
MAX_PADDING = 1.10
# Kernels exempt from the occupancy / wave targets, with the reason (each also argued where it is defined).
SMALL_KERNELS = {
    "_sum_partials_kernel": "second pass of the split reductions: reads the (P, D) partials, < 7% of the op's bytes",
}


def violations(report: dict) -> list[str]:
    """Every way the report misses a target: spills, occupancy, wave tails, padding, bytes over the minimum."""
    found = []
    for r in report["kernels"]:
        where = f"{r['gpu']} {r['kernel']} ({r['op']} {r['shape']} {r.get('dtypes', '')} {r['phase']})"
        if r["spills"]:
            found.append(f"{where}: {r['spills']} spill instructions")
        if r["kernel"] in SMALL_KERNELS:
            continue
        if r["occupancy"] < MIN_OCCUPANCY and r.get("in_flight", 0) < MIN_IN_FLIGHT:
            found.append(f"{where}: {r['occupancy']:.0%} warp occupancy ({r['registers']} registers, "
                         f"{r['num_warps']} warps, {r['blocks_per_sm']} blocks/SM), "
                         f"{r.get('in_flight', 0) / 1024:.0f} KB of loads in flight per SM")
        if r["wave_fill"] < MIN_WAVE_FILL:
            found.append(f"{where}: {r['waves']:.2f} waves, last one {r['wave_fill']:.0%} full")
        if r.get("padding", 1.0) > MAX_PADDING:
            found.append(f"{where}: column tiles {r['padding']:.2f}x the row width")
    for r in report["ops"]:
        if r["ratio"] > MAX_BYTES_RATIO:
            found.append(f"{r['gpu']} {r['op']} ({r['shape']} {r.get('dtypes', '')} {r['phase']}): moves {r['ratio']:.3f}x the minimum bytes")
    return found


def _widths(w: dict) -> str:
    return " ".join(f"{b}Bx{c}" for b, c in w.items()) or "-"


def tables(report: dict) -> str:
    """The report as two fixed-width tables: kernels (per launch), then bytes per op."""
    head = (f"{'gpu':5} {'kernel':22} {'op':34} {'shape':14} {'dtypes':6} {'ph':3} {'warps':>5} {'regs':>4} {'spill':>5} "
            f"{'smem':>6} {'blk/SM':>6} {'occ':>4} {'programs':>8} {'waves':>6} {'fill':>5} {'pad':>4} {'KB fl':>5}  ld / st widths")
    rows = [head, "-" * len(head)]
    for r in report["kernels"]:
        rows.append(f"{r['gpu']:5} {r['kernel'].strip('_'):22} {r['op']:34} {r['shape']:14} {r['dtypes']:6} {r['phase']:3} "
                    f"{r['num_warps']:5} {r['registers']:4} {r['spills']:5} {r['shared']:6} {r['blocks_per_sm']:6} "
                    f"{r['occupancy']:4.0%} {r['programs']:8} {r['waves']:6.2f} {r['wave_fill']:5.0%} {r['padding']:4.2f} {r['in_flight'] / 1024:5.0f}  "
                    f"{_widths(r['load_widths'])} / {_widths(r['store_widths'])}")
    head2 = f"{'gpu':5} {'op':34} {'shape':14} {'dtypes':6} {'ph':3} {'kernel MB':>9} {'torch MB':>8} {'min MB':>8} {'ratio':>6}  torch ops"
    rows += ["", head2, "-" * len(head2)]
    for r in report["ops"]:
        rows.append(f"{r['gpu']:5} {r['op']:34} {r['shape']:14} {r['dtypes']:6} {r['phase']:3} {r['kernel_bytes'] / 1e6:9.2f} "
                    f"{r['torch_bytes'] / 1e6:8.2f} {r['minimum'] / 1e6:8.2f} {r['ratio']:6.3f}  "
                    f"{', '.join(r['torch_ops']) or '-'}")
    return "\n".join(rows)


def summary(report: dict) -> str:
    """One markdown row per GPU, op, shape and dtypes: the main kernel of each pass, and the op's bytes ratio."""
    main = {}
    for r in report["kernels"]:
        if r["kernel"] not in SMALL_KERNELS:
            main.setdefault((r["gpu"], r["op"], r["shape"], r["dtypes"], r["phase"]), r)
    ratio = {(r["gpu"], r["op"], r["shape"], r["dtypes"], r["phase"]): r["ratio"] for r in report["ops"]}

    def cell(r: dict) -> str:
        return (f"{r['registers']} / {r['num_warps']}w / {r['occupancy']:.0%} / {r['waves']:.2f} / "
                f"{r['in_flight'] // 1024} KB / {max((int(w) for w in r['load_widths']), default=0)} B")

    rows = ["| GPU | op | shape | dtypes | fwd: regs / warps / occupancy / waves / in flight / widest load | "
            "bwd: same | bytes / minimum fwd, bwd |", "|---|---|---|---|---|---|---|"]
    for (gpu, op, shape, dtypes, phase), r in main.items():
        if phase == "fwd":
            key = (gpu, op, shape, dtypes)
            rows.append(f"| {gpu} | {op} | {shape} | {dtypes} | {cell(r)} | {cell(main[(*key, 'bwd')])} | "
                        f"{ratio[(*key, 'fwd')]:.3f}, {ratio[(*key, 'bwd')]:.3f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default=",".join(GPUS), help=f"comma-separated subset of {','.join(GPUS)}")
    parser.add_argument("--json", default="static-report.json", help="where to write the JSON report")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed (listed on stderr)")
    parser.add_argument("--markdown", action="store_true", help="print the per-op summary table (docs/kernels.md) instead")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.gpus.split(",")) - set(GPUS))
    if unknown:
        parser.error(f"unknown GPUs {unknown}; choose from {list(GPUS)}")
    report = build([GPUS[g] for g in args.gpus.split(",")])
    print(summary(report) if args.markdown else tables(report))
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    missed = violations(report)
    if missed:
        print(f"\n{len(missed)} targets missed:\n" + "\n".join(missed), file=sys.stderr if args.check else sys.stdout)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
