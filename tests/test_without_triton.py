"""Where Triton does not import (macOS, Windows, not installed), the package still works: ``auto`` runs
the PyTorch references with one notice, a forced ``triton`` backend is a user error (exit 2).

Every check runs in a subprocess whose ``sitecustomize`` hides Triton from the import system, as on a
machine without it: ``import triton`` raises ModuleNotFoundError and ``importlib.util.find_spec`` finds
nothing (torch probes Triton both ways).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "Triton does not import"
TINY = ["model.size=null", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.decoder_hidden_size=24",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "train.global_batch=8", "train.max_steps=3",
        "train.unmasked_steps=0", "train.warmup_steps=0", "sample.num_steps=2", "sample.grid_per_class=1"]

HIDE_TRITON = '''
import sys


class _HideTriton:
    """Wraps a meta-path finder: it finds everything it found before, except Triton."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_HideTriton(finder) for finder in sys.meta_path]
'''


@pytest.fixture(scope="module")
def no_triton_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a subprocess in which Triton does not import."""
    hook = tmp_path_factory.mktemp("no_triton")
    (hook / "sitecustomize.py").write_text(HIDE_TRITON)
    env = {k: v for k, v in os.environ.items() if k not in ("MASKDIT_KERNELS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run(env: dict[str, str], *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env={**env, **extra_env},
                          timeout=300)


def test_package_runs_the_references_with_one_notice(no_triton_env):
    script = textwrap.dedent('''
        import importlib.util

        import torch

        try:
            import triton  # noqa: F401
            raise SystemExit("triton imported: the hook did not hide it")
        except ImportError:
            pass
        assert importlib.util.find_spec("triton") is None

        import kernels
        import maskdit_fast
        from maskdit_fast.diffusion.edm import build_net
        from maskdit_fast.models import random_masking
        from tests.helpers import tiny_model_config

        assert not kernels.triton_available() and kernels.get_backend() == "auto"

        def step(backend):
            torch.manual_seed(0)
            with kernels.backend(backend):
                net = build_net(tiny_model_config())
                x = torch.randn(4, 1, 32, 32)
                ids_keep = random_masking(4, net.model.num_patches, 0.5)
                out = net(x, torch.full((4,), 1.5), torch.tensor([1, 2, 3, 10]), ids_keep=ids_keep)
                out.square().mean().backward()
            return out.detach(), [p.grad for p in net.parameters()]

        out, grads = step("auto")
        ref_out, ref_grads = step("reference")
        step("auto")
        assert torch.equal(out, ref_out)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads, strict=True))

        x = torch.randn(2, 5, 8)
        with kernels.backend("triton"):
            try:
                kernels.layernorm_modulate(x, torch.randn(2, 8), torch.randn(2, 8))
                raise SystemExit("the triton backend ran without Triton")
            except kernels.TritonUnavailable as err:
                assert "pip install triton" in str(err)
        print("ok")
    ''')
    done = run(no_triton_env, "-c", script)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
    assert done.stderr.count(NOTICE) == 1 and "pip install triton" in done.stderr, done.stderr


def test_train_sample_eval_without_triton(no_triton_env, tmp_path, mnist_cache):
    env = {**no_triton_env, "MASKDIT_CACHE": str(mnist_cache)}
    forced = run(env, "train.py", "--out", str(tmp_path / "forced"), "--no-progress", "--eval-samples", "0", *TINY,
                 "model.kernels=triton")
    assert forced.returncode == 2, forced.stderr
    assert "Triton does not import" in forced.stderr and "pip install triton" in forced.stderr
    assert "Traceback" not in forced.stderr

    trained = run(env, "train.py", "--out", str(tmp_path / "run"), "--no-progress", "--eval-samples", "0", *TINY)
    assert trained.returncode == 0, trained.stderr
    assert (trained.stdout + trained.stderr).count(NOTICE) == 1, trained.stdout + trained.stderr
    ckpt = tmp_path / "run" / "ema.safetensors"
    assert ckpt.is_file() and (tmp_path / "run" / "samples" / "step-0000003.png").is_file()

    sampled = run(env, "sample.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--n", "2", "--steps", "1")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stderr.count(NOTICE) == 1 and (tmp_path / "s" / "grid.png").is_file()
    forced_sample = run(env, "sample.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "t"), "--n", "2", "--steps",
                        "1", MASKDIT_KERNELS="triton")
    assert forced_sample.returncode == 2 and "pip install triton" in forced_sample.stderr, forced_sample.stderr
    assert "Traceback" not in forced_sample.stderr

    ref = run(env, "-m", "maskdit_fast.eval", "mnist-ref", str(tmp_path / "ref.npz"))
    assert ref.returncode == 0 and (tmp_path / "ref.npz").is_file(), ref.stderr
