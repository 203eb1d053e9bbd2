"""How far the planner's CPU path is from the CUDA path, in the forward pass: the bytes autograd saves
in one fake forward pass (bf16 autocast, Triton ops) on fake CUDA tensors against fake CPU tensors.

Needs a CUDA build of torch, not a GPU (a fake CUDA forward runs without a driver; its backward does
not, which is why the planner runs on CPU tensors, docs/planning.md):

    python -m benchmarks.plan_cuda_forward --model XL/2 --batch 32            # flash attention forced on CUDA
    python -m benchmarks.plan_cuda_forward --model XL/2 --batch 32 --sdpa-choice

``--sdpa-choice`` lets SDPA choose its kernel on the fake CUDA tensors, which without a GPU is the math
kernel (it keeps the attention matrices). Prints one JSON line per architecture.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from maskdit_fast.config import load_config
from maskdit_fast.diffusion.edm import build_net
from maskdit_fast.diffusion.loss import edm_loss
from maskdit_fast.plan.tracker import MemoryTracker


@contextlib.contextmanager
def cuda_autocast_bf16() -> Iterator[None]:
    """CUDA autocast switched on by hand: ``torch.autocast("cuda")`` turns itself off without a GPU."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", False)


@contextlib.contextmanager
def flash_sdpa() -> Iterator[None]:
    """F.scaled_dot_product_attention as the CUDA flash kernel (what an H100 runs at these head dims)."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v)[0]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def forward_saved(model: str, arch: str, batch: int, device: str) -> dict:
    """Bytes of the storages autograd saves in one fake forward, and the tracker's activations."""
    size, _, patch = model.partition("/")
    cfg = load_config("imagenet256-pretrain", [f"model.arch={arch}", f"model.size={size}", f"model.patch_size={patch}",
                                               *(["model.mask_ratio=0"] if arch == "dit" else [])])
    m = cfg.model
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with kernels.backend("triton"), FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device(device):
            net = build_net(m).train()
        for module in net.modules():  # buffers made from numpy (position embeddings) start on the CPU
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        x = torch.empty(batch, m.in_channels, m.input_size, m.input_size, device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        autocast = cuda_autocast_bf16() if device == "cuda" else torch.autocast("cpu", dtype=torch.bfloat16)
        with MemoryTracker() as tracker, tracker.phase("forward"), torch.autograd.graph.saved_tensors_hooks(
                pack, lambda t: t), autocast:
            edm_loss(net, x, y, m.mask_ratio, cfg.loss, m)
        return {"device": device, "arch": arch, "model": model, "batch": batch, "saved_bytes": sum(saved.values()),
                "activation_bytes": tracker.bytes_of("activations")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="XL/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sdpa-choice", action="store_true", help="let SDPA choose on fake CUDA tensors")
    args = parser.parse_args(argv)
    if not torch.backends.cuda.is_built():
        parser.error(f"needs a CUDA build of torch (this is {torch.__version__}); no GPU is needed")
    for arch in ("maskdit", "dit"):
        cpu = forward_saved(args.model, arch, args.batch, "cpu")
        with contextlib.nullcontext() if args.sdpa_choice else flash_sdpa():
            cuda = forward_saved(args.model, arch, args.batch, "cuda")
        print(json.dumps({"arch": arch, "cpu": cpu, "cuda": cuda, "saved_difference_bytes":
                          cuda["saved_bytes"] - cpu["saved_bytes"], "activations_cuda_over_cpu":
                          cuda["activation_bytes"] / cpu["activation_bytes"],
                          "attention": "sdpa's choice" if args.sdpa_choice else "flash (forced)",
                          "torch": torch.__version__}))


if __name__ == "__main__":
    main()
