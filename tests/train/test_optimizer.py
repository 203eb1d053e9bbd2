"""train.optimizer: torch's AdamW and apex's FusedAdam built alike (hyper-parameters, lr_scale groups),
apex's FusedAdam through the loop with exact resume, one clear user error per way apex can be missing,
and, where apex and a GPU are present, one update of each compared."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import sys
import types

import pytest
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from maskdit_fast.checkpoint import save_safetensors
from maskdit_fast.cli import train_main
from maskdit_fast.config import ConfigError, TrainConfig
from maskdit_fast.dydit.__main__ import main as dydit_main
from maskdit_fast.errors import UserError
from maskdit_fast.safe_pickle import SafeFileSystemReader
from maskdit_fast.storage import latest_training_state, load_training_state
from maskdit_fast.train import optimizer as optimizer_module
from maskdit_fast.train.optimizer import APEX_BUILD, EPS, build_optimizer, check_optimizer, set_learning_rate
from maskdit_fast.train.trainer import train
from tests.helpers import TINY_RUN, assert_same_final_state, tiny_config, train_and_crash

CUDA = torch.device("cuda")  # what build_optimizer is told; the fake apex updates the CPU tensors it is given
APEX = {"lr": 3e-4, "betas": [0.8, 0.95], "weight_decay": 0.05, "optimizer": "apex_fused_adam"}


class FakeFusedAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam as the loop meets it: its constructor (arguments recorded in ``kwargs``),
    its state layout (``step`` per group; ``exp_avg``, ``exp_avg_sq`` per parameter), its ``zero_grad``
    without arguments, and its AdamW-mode update, written in plain torch."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True, capturable=False, master_weights=False):
        self.kwargs = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "adam_w_mode": adam_w_mode,
                       "bias_correction": bias_correction}
        super().__init__(params, {"lr": lr, "bias_correction": bias_correction, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})

    def zero_grad(self):  # apex's signature
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            c1, c2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.sub_(group["lr"] * ((m / c1) / ((v / c2).sqrt() + group["eps"]) + group["weight_decay"] * p))


def install_apex(monkeypatch, kind: str) -> None:
    """Make ``import apex`` see: ``nvidia`` (apex with FusedAdam and its CUDA extension amp_C), ``missing``,
    ``pypi`` (the unrelated PyPI package: no apex.optimizers), ``broken`` (an apex whose own imports fail) or
    ``python_only`` (NVIDIA's apex built without its CUDA extensions)."""
    for name in ("apex", "apex.optimizers", "amp_C"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    if kind == "missing":
        monkeypatch.setitem(sys.modules, "apex", None)  # hides an installed apex too
        return
    if kind == "broken":
        monkeypatch.setattr(sys, "meta_path", [BrokenApexFinder(), *sys.meta_path])
        return
    apex = types.ModuleType("apex")
    monkeypatch.setitem(sys.modules, "apex", apex)
    if kind == "pypi":
        return
    apex.__path__ = []  # a package, with the subpackage below
    apex.optimizers = types.SimpleNamespace(FusedAdam=FakeFusedAdam)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    monkeypatch.setitem(sys.modules, "amp_C", None if kind == "python_only" else types.ModuleType("amp_C"))


class BrokenApexFinder:
    """Finds an ``apex`` whose import fails on a dependency of its own, as the PyPI package's may."""

    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "apex" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ModuleNotFoundError("No module named 'pyramid'", name="pyramid")


@pytest.fixture
def fake_apex(monkeypatch):
    install_apex(monkeypatch, "nvidia")


def test_adamw_is_torchs_with_the_configured_hyper_parameters_and_lr_scales():
    params = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))]
    train_cfg = TrainConfig(**{**APEX, "optimizer": "adamw"})
    opt = build_optimizer([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.5}], train_cfg,
                          torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert EPS == inspect.signature(torch.optim.AdamW).parameters["eps"].default  # the bits of the loop before
    first = opt.param_groups[0]
    assert (first["lr"], first["betas"], first["eps"], first["weight_decay"]) == (3e-4, (0.8, 0.95), EPS, 0.05)
    assert (first["foreach"], first["fused"]) == (True, False)  # fused on CUDA only
    set_learning_rate(opt, 2e-4)
    assert [g["lr"] for g in opt.param_groups] == [2e-4, 1e-4]


def test_apex_fused_adam_gets_the_same_hyper_parameters_and_keeps_the_lr_scales(fake_apex):
    params = [nn.Parameter(torch.randn(40)), nn.Parameter(torch.randn(30))]
    train_cfg = TrainConfig(**{**APEX, "weight_decay": 0.0})
    opt = build_optimizer([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.5}], train_cfg, CUDA)
    assert isinstance(opt, FakeFusedAdam)
    assert opt.kwargs == {"lr": 3e-4, "betas": (0.8, 0.95), "eps": EPS, "weight_decay": 0.0, "adam_w_mode": True,
                          "bias_correction": True}
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    set_learning_rate(opt, 2e-4)
    opt.step()
    # Adam's first step moves every weight by its group's learning rate (|m_hat / sqrt(v_hat)| = 1)
    for p, old, lr in zip(params, before, (2e-4, 1e-4)):
        torch.testing.assert_close((p.detach() - old).abs(), torch.full_like(p, lr), rtol=1e-3, atol=0)


def test_apex_fused_adam_takes_torchs_zero_grad_so_a_fresh_one_gives_its_state_dict(fake_apex):
    model = nn.Linear(3, 2)
    opt = build_optimizer([{"params": list(model.parameters())}], TrainConfig(**APEX), CUDA)
    with pytest.raises(TypeError):
        FakeFusedAdam.zero_grad(opt, set_to_none=True)  # apex's own, which the loop and DCP would call
    _, state = get_state_dict(model, opt)  # a fresh optimizer: DCP steps it once and calls zero_grad(set_to_none=True)
    assert sorted(state["state"]["weight"]) == ["exp_avg", "exp_avg_sq"] and "step" in state["param_groups"][0]
    model.weight.grad = torch.ones_like(model.weight)
    opt.zero_grad(set_to_none=True)
    assert model.weight.grad is None


def test_a_run_with_apex_fused_adam_resumes_bit_for_bit(fake_apex, monkeypatch, tmp_path):
    monkeypatch.setattr(optimizer_module, "APEX_DEVICE_TYPES", ("cuda", "cpu"))  # the fake updates CPU tensors
    cfg = tiny_config("train.optimizer=apex_fused_adam", "train.max_steps=6", "train.ckpt_every=2",
                      "train.weight_decay=0.01")
    train(cfg, tmp_path / "straight", progress=False)
    train_and_crash(cfg, tmp_path / "crashed", 3, monkeypatch)  # after the state of step 2
    train(cfg, tmp_path / "crashed", resume=True, progress=False)

    a, b = assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 6)  # model and EMA
    for name, moments in a["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, b["optimizer"]["state"][name][key]), (name, key)
    # apex's layout went through DCP: the step count is per group (the resume restored it), none per parameter
    saved = SafeFileSystemReader(latest_training_state(tmp_path / "crashed")).read_metadata().state_dict_metadata
    assert any(k.startswith("optimizer.param_groups.") and k.endswith(".step") for k in saved)
    assert not any(k.startswith("optimizer.state.") and k.endswith(".step") for k in saved)


def test_resume_refuses_to_change_the_optimizer(fake_apex, monkeypatch, tmp_path):
    monkeypatch.setattr(optimizer_module, "APEX_DEVICE_TYPES", ("cuda", "cpu"))
    train(tiny_config("train.max_steps=2"), tmp_path, progress=False)
    assert load_training_state(latest_training_state(tmp_path))["optimizer"]["state"]  # AdamW's, with its steps
    with pytest.raises(UserError, match=r"train.optimizer \('adamw' then, 'apex_fused_adam' now\)"):
        train(tiny_config("train.max_steps=3", "train.optimizer=apex_fused_adam"), tmp_path, resume=True,
              progress=False)


@pytest.mark.parametrize("kind, expected", [
    ("missing", "needs NVIDIA's apex, which is not installed; it is built from NVIDIA's source"),
    ("pypi", "has no apex.optimizers.FusedAdam: it is the unrelated PyPI package named apex; pip uninstall apex"),
    ("broken", "the installed package apex does not import (No module named 'pyramid')"),
    ("python_only", "installed without its CUDA extensions (a Python-only build)"),
])
def test_each_way_apex_can_be_missing_is_one_message_with_the_build_command(monkeypatch, kind, expected):
    install_apex(monkeypatch, kind)
    with pytest.raises(ConfigError) as err:
        check_optimizer(TrainConfig(**APEX), CUDA)
    message = str(err.value)
    assert message.startswith("train.optimizer: apex_fused_adam") and expected in message
    assert APEX_BUILD in message and "\n" not in message
    assert ("PyPI package named apex" in message) == (kind != "python_only")


def test_apex_fused_adam_on_the_cpu_is_refused(fake_apex):
    check_optimizer(TrainConfig(**APEX), CUDA)  # apex as it should be
    with pytest.raises(ConfigError, match="updates CUDA tensors only, but this run is on the cpu"):
        build_optimizer([{"params": [nn.Parameter(torch.ones(2))]}], TrainConfig(**APEX), torch.device("cpu"))


def test_config_takes_the_two_optimizers_only_and_apex_not_with_fsdp():
    assert TrainConfig().optimizer == "adamw"
    with pytest.raises(ConfigError, match=r"train.optimizer: 'sgd' is not one of \['adamw', 'apex_fused_adam'\]"):
        tiny_config("train.optimizer=sgd")
    with pytest.raises(ConfigError, match="not FSDP2's sharded DTensors"):
        tiny_config("train.optimizer=apex_fused_adam", "parallel=fsdp")


def assert_one_line_exit_2(capsys, exit_: pytest.ExceptionInfo, *expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_train_py_without_apex_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    install_apex(monkeypatch, "missing")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        train_main(["--out", str(out), "--no-progress", "--eval-samples", "0", *TINY_RUN,
                    "train.optimizer=apex_fused_adam"])
    assert_one_line_exit_2(capsys, exit_, "error: train.optimizer: apex_fused_adam needs NVIDIA's apex", APEX_BUILD,
                           "the PyPI package named apex is an unrelated project")
    assert not out.exists()  # refused before anything was read or written


def test_dydit_finetune_without_apex_exits_2_with_one_line(monkeypatch, capsys, tmp_path):
    from tests.dydit.helpers import random_base
    from tests.dydit.test_finetune import TINY_RUN as DYDIT_RUN

    net = random_base("maskdit")
    save_safetensors(tmp_path / "base.safetensors", net.state_dict(), net.model.cfg)
    install_apex(monkeypatch, "missing")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        dydit_main(["finetune", "--init", str(tmp_path / "base.safetensors"), "--out", str(out), "--no-progress",
                    *DYDIT_RUN, "train.optimizer=apex_fused_adam"])
    assert_one_line_exit_2(capsys, exit_, "needs NVIDIA's apex, which is not installed", APEX_BUILD)
    assert not out.exists()


def test_one_update_of_apex_fused_adam_matches_torchs_fused_adamw():
    """Two steps (the second from non-zero moments and a step count of 2) of both over the same fp32
    parameters and gradients, two groups (lr_scale 1 and 0.1), decoupled weight decay. Both compute in
    fp32 with the same formula in another order (torch: sqrt(v) / sqrt(c2) and the decay first; apex:
    sqrt(v / c2), the decay inside the update), so they agree to a few ulp: parameters rtol 1e-6 (8 ulp)
    atol 1e-7, moments rtol 1e-6 atol 1e-10."""
    if importlib.util.find_spec("apex") is None:
        pytest.skip("apex not installed")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        check_optimizer(TrainConfig(**APEX), CUDA)
    except ConfigError as err:
        pytest.skip(f"apex not usable: {err}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1152, 1152), (4608,), (7, 13)]  # DiT-XL widths and a shape that is not a power of two
    start = [torch.randn(s, device=CUDA, generator=gen) for s in shapes]
    grads = [[torch.randn(s, device=CUDA, generator=gen) for s in shapes] for _ in range(2)]
    results = {}
    for name in ("adamw", "apex_fused_adam"):
        params = [nn.Parameter(p.clone()) for p in start]
        opt = build_optimizer([{"params": params[:2]}, {"params": params[2:], "lr_scale": 0.1}],
                              TrainConfig(**{**APEX, "optimizer": name}), CUDA)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            set_learning_rate(opt, 1e-3)
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[name] = (params, opt)
    (torch_params, torch_opt), (apex_params, apex_opt) = results["adamw"], results["apex_fused_adam"]
    assert isinstance(torch_opt, torch.optim.AdamW) and torch_opt.param_groups[0]["fused"]
    for a, b in zip(apex_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(apex_opt.state[a][key], torch_opt.state[b][key], rtol=1e-6, atol=1e-10)
