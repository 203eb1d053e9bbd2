"""Every kernel variant compiles to GPU code (PTX, then cubin with the ptxas bundled in Triton).

The CPU tests run the interpreter, which accepts code the compiler rejects (and never sees
register pressure), so this compiles each (kernel, flags, tile) combination the ops launch for
Ampere and Hopper. No GPU is needed. It runs in a subprocess because the kernels must be defined
without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
WIDTHS = (72, 512, 1152)
FLOAT32_POINTERS = {"MEAN", "RSTD", "PARTIAL"}
SIZES = {"L", "K", "D", "C"}  # the other CAPITALISED kernel arguments are pointers


def _variants():
    """(kernel, constexpr flags) for every way kernels/ launches its kernels."""
    from kernels import _common, adaln, tokens

    yield adaln._adaln_fwd_kernel, [dict(HAS_RESIDUAL=r, HAS_NORM=m) for r, m in ((1, 1), (0, 1), (1, 0))]
    yield adaln._adaln_bwd_kernel, [dict(HAS_RESIDUAL=r, HAS_NORM=m, HAS_DR=g, NORM_SLOT=r)
                                    for r, m, g in ((1, 1, 1), (0, 1, 0), (1, 0, 1))]
    yield tokens._gather_kernel, [dict(HAS_POS=p) for p in (0, 1)]
    yield tokens._scatter_kernel, [dict(HAS_FILL=f, HAS_POS=p) for f, p in ((1, 1), (1, 0), (0, 0))]
    yield tokens._scatter_bwd_kernel, [{}]
    yield _common._sum_partials_kernel, [dict(BLOCK_C=16, BLOCK_D=256)]


def _compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels._common import block_sizes

    count = 0
    for kernel, flag_sets in _variants():
        for flags in flag_sets:
            for d in WIDTHS if "BLOCK_D" not in flags else (None,):
                tiles = {} if d is None else dict(zip(("BLOCK_M", "BLOCK_D"), block_sizes(d)[:2]))
                num_warps = 4 if d is None else block_sizes(d)[2]
                constexprs = {k: bool(v) if k.startswith("HAS_") else v for k, v in {**flags, **tiles}.items()}
                signature = {}
                for name in kernel.arg_names:
                    if name in constexprs:
                        signature[name] = "constexpr"
                    elif name == "IDS":
                        signature[name] = "*i64"
                    elif name == "INV":
                        signature[name] = "*i32"
                    elif name.isupper() and name not in SIZES:
                        signature[name] = "*fp32" if name in FLOAT32_POINTERS or "sum_partials" in kernel.__name__ \
                            else "*bf16"
                    else:
                        signature[name] = "fp32" if name == "eps" else "i32"
                for arch in ARCHS:
                    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
                    assert compiled.asm.get("cubin"), (kernel.__name__, flags, d, arch)
                    count += 1
    return count


def test_every_kernel_variant_compiles_for_ampere_and_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) > 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print("compiled", _compile_all())
