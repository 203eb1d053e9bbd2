"""Microbenchmarks of the fused kernels against the eager and ``torch.compile``'d references.

    python -m benchmarks.kernels.bench                      # CUDA: DiT-XL/2 and decoder shapes, bf16
    python -m benchmarks.kernels.bench --ops gated_residual_layernorm_modulate --json out.json
    python -m benchmarks.kernels.bench --tiny               # CPU smoke run (Triton interpreter)

For every op, shape and mode (``fwd``, ``fwd+bwd``) it reports the median time of the Triton op,
of ``kernels.reference`` in eager mode and of ``torch.compile(reference)``, the achieved
bandwidth of the Triton op (the bytes the op must move at least -- see ``_bytes`` -- divided by
its time), the speed-up over both references, and that bandwidth as a fraction of a measured
device-to-device copy (the target is 85%). On CUDA times come from ``triton.testing.do_bench``;
the ``--tiny`` CPU mode uses a wall clock and the interpreter, so its numbers only prove that the
harness runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

ADALN_OPS = ("layernorm_modulate", "gated_residual", "gated_residual_layernorm_modulate")
TOKEN_OPS = ("gather_tokens", "scatter_tokens")
OPS = ADALN_OPS + TOKEN_OPS
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (N, L, D) for the adaLN ops; (N, L, K, D) for the token ops. MaskDiT on DiT-XL/2 at 256px:
# 256 tokens per image, 128 kept by the encoder (mask ratio 0.5), decoder 512 wide.
SHAPES = {
    "adaln": {"xl-L256": (256, 256, 1152), "xl-L128": (256, 128, 1152), "dec-L256": (256, 256, 512)},
    "tokens": {"xl-L256-K128": (256, 256, 128, 1152), "dec-L256-K128": (256, 256, 128, 512)},
}
TINY_SHAPES = {"adaln": {"tiny": (2, 8, 72)}, "tokens": {"tiny": (2, 8, 4, 72)}}


@dataclass
class Result:
    op: str
    shape: str
    dims: tuple[int, ...]
    mode: str
    bytes: int
    triton_ms: float
    eager_ms: float
    compiled_ms: float
    triton_gbps: float
    vs_eager: float  # eager time / Triton time (> 1: Triton is faster)
    vs_compiled: float
    of_copy: float  # Triton bandwidth / device-to-device copy bandwidth


def _bytes(op: str, dims: Sequence[int], mode: str, elem: int | Mapping[str, int], pos: bool = True) -> int:
    """Bytes an ideal implementation reads and writes (per-sample (N, D) vectors included).

    ``elem``: bytes per element, one size for every tensor, or per role (a training step stores them
    differently): ``stream`` (x, the residual r and their gradients; the token ops' tokens),
    ``vectors`` (shift / scale / gate and their gradients), ``branch`` (y and dy), ``normed``
    (layernorm_modulate's output and its gradient). ``pos``: the token ops add a position table
    (L, D) in the stream's dtype, read once.
    """
    sizes = {role: elem for role in ("stream", "vectors", "branch", "normed")} if isinstance(elem, int) else elem
    if op in ADALN_OPS:
        n, length, d = dims
        sx, sv, sy, so = (sizes[r] for r in ("stream", "vectors", "branch", "normed"))
        big, vec, stats = n * length * d, n * d * sv, n * length * 4
        fwd, bwd = {
            # x -> out, mean, rstd | dout, x, mean, rstd -> dx, dshift, dscale
            "layernorm_modulate": ((sx + so) * big + 2 * vec + 2 * stats, (so + 2 * sx) * big + 3 * vec + 2 * stats),
            # x, y -> r | dr, y -> dy, dgate
            "gated_residual": ((2 * sx + sy) * big + vec, (sx + 2 * sy) * big + 2 * vec),
            # x, y -> r, out, mean, rstd | dr, dout, r, y, mean, rstd -> dx, dy, dgate, dshift, dscale
            "gated_residual_layernorm_modulate": ((2 * sx + sy + so) * big + 3 * vec + 2 * stats,
                                                  (3 * sx + 2 * sy + so) * big + 5 * vec + 2 * stats),
        }[op]
    else:
        n, length, k, d = dims
        elem = sizes["stream"]
        kept, full, table = n * k * d * elem, n * length * d * elem, length * d * elem * pos
        fwd, bwd = {
            # x rows + pos table -> out | dout -> dx (zeros included)
            "gather_tokens": (2 * kept + table, kept + full),
            # x_keep, pos, fill -> out | dout -> dx_keep, dfill
            "scatter_tokens": (kept + table + full, full + kept),
        }[op]
    return fwd if mode == "fwd" else fwd + bwd


def _inputs(op: str, dims: Sequence[int], dtype: torch.dtype, device: str, grad: bool):
    """Positional arguments of ``op`` (float leaves need grad in fwd+bwd mode) and its output shapes."""
    def leaf(*shape):
        return torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)

    if op in ADALN_OPS:
        n, length, d = dims
        x, y, gate, shift, scale = leaf(n, length, d), leaf(n, length, d), leaf(n, d), leaf(n, d), leaf(n, d)
        args = {"layernorm_modulate": (x, shift, scale), "gated_residual": (x, gate, y),
                "gated_residual_layernorm_modulate": (x, gate, y, shift, scale)}[op]
        return args, [(n, length, d)] * (2 if op == "gated_residual_layernorm_modulate" else 1)
    n, length, k, d = dims
    ids = torch.rand(n, length, device=device).argsort(dim=1)[:, :k]
    pos = torch.randn(length, d, dtype=dtype, device=device)  # a frozen buffer in MaskDiT
    if op == "gather_tokens":
        return (leaf(n, length, d), ids, pos), [(n, k, d)]
    return (leaf(n, k, d), ids, length, leaf(d), pos), [(n, length, d)]


def _step(fn: Callable, args, out_shapes, dtype: torch.dtype, device: str, backward: bool) -> Callable[[], None]:
    grads = [torch.randn(s, dtype=dtype, device=device) for s in out_shapes]

    def step() -> None:
        outs = fn(*args)
        if backward:
            torch.autograd.backward(list(outs) if isinstance(outs, tuple) else [outs], grads)

    return step


def _timer(device: str, reps: int) -> Callable[[Callable[[], None], list], float]:
    """Median milliseconds of ``step``; ``leaves`` get their ``.grad`` reset between runs."""
    if device == "cuda":
        import triton.testing

        return lambda step, leaves: triton.testing.do_bench(step, grad_to_none=leaves or None, return_mode="median")

    def wall(step: Callable[[], None], leaves: list) -> float:
        times = []
        for _ in range(reps + 1):  # the first run warms up (and compiles)
            for t in leaves:
                t.grad = None
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times[1:])

    return wall


def copy_bandwidth(device: str, nbytes: int, timer) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src), []) / 1e6


def run(ops: Sequence[str], shapes: dict, dtype: torch.dtype, device: str, compile_backend: str, reps: int,
        copy_bytes: int) -> tuple[float, list[Result]]:
    """Benchmark every (op, shape, mode); returns the copy bandwidth (GB/s) and the results."""
    import kernels
    from kernels import reference

    timer = _timer(device, reps)
    copy_gbps = copy_bandwidth(device, copy_bytes, timer)
    elem = torch.empty((), dtype=dtype).element_size()
    results = []
    for op in ops:
        family = "adaln" if op in ADALN_OPS else "tokens"
        for shape, dims in shapes[family].items():
            for mode in MODES:
                backward = mode == "fwd+bwd"
                args, out_shapes = _inputs(op, dims, dtype, device, backward)
                leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
                ref = getattr(reference, op)
                triton_fn = getattr(kernels, op)
                torch.compiler.reset()  # a fresh compile per case: no recompile limits, no stale guards
                compiled = torch.compile(ref, backend=compile_backend, dynamic=False)
                with kernels.backend("triton"):
                    triton_ms = timer(_step(triton_fn, args, out_shapes, dtype, device, backward), leaves)
                eager_ms = timer(_step(ref, args, out_shapes, dtype, device, backward), leaves)
                compiled_ms = timer(_step(compiled, args, out_shapes, dtype, device, backward), leaves)
                nbytes = _bytes(op, dims, mode, elem)
                gbps = nbytes / triton_ms / 1e6
                results.append(Result(op, shape, tuple(dims), mode, nbytes, triton_ms, eager_ms, compiled_ms, gbps,
                                      eager_ms / triton_ms, compiled_ms / triton_ms, gbps / copy_gbps))
    return copy_gbps, results


def _table(results: list[Result]) -> str:
    head = (f"{'op':34} {'shape':14} {'mode':8} {'triton ms':>10} {'GB/s':>8} {'of copy':>8} {'vs eager':>9} "
            f"{'vs compile':>10}")
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(f"{r.op:34} {r.shape:14} {r.mode:8} {r.triton_ms:10.4f} {r.triton_gbps:8.1f} {r.of_copy:8.1%} "
                    f"{r.vs_eager:8.2f}x {r.vs_compiled:9.2f}x")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes; on a CPU-only machine runs the interpreter")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend for the reference (default: inductor on CUDA, aot_eager otherwise)")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per measurement on CPU (CUDA uses do_bench)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.tiny:
            parser.error("no CUDA device: only --tiny runs on the CPU")
        # Must precede the first import of `kernels`: @triton.jit picks the interpreter at definition.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    compile_backend = args.compile_backend or ("inductor" if device == "cuda" else "aot_eager")
    copy_gbps, results = run(ops, TINY_SHAPES if args.tiny else SHAPES, DTYPES[args.dtype], device, compile_backend,
                             args.reps, (4 << 20) if args.tiny else (1 << 30))

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}   dtype: {args.dtype}   compile backend: {compile_backend}   "
          f"device-to-device copy: {copy_gbps:.1f} GB/s")
    print(_table(results))
    if args.json:
        report = {"device": name, "dtype": args.dtype, "compile_backend": compile_backend, "tiny": args.tiny,
                  "torch": torch.__version__, "copy_gbps": copy_gbps, "results": [asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
