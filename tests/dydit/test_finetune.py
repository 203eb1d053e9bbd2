import math
import json
import subprocess
import sys

import pytest
import torch

from maskdit_fast.checkpoint import load_checkpoint, save_safetensors
from maskdit_fast.cli import sample_main
from maskdit_fast.dydit import (
    load_dydit,
    load_dydit_config,
    model_flops,
    routing_of,
    to_dydit,
)
from maskdit_fast.dydit.__main__ import main
from maskdit_fast.dydit.finetune import dydit_loss, sampler_sigmas, training_sigmas

from maskdit_fast.storage import latest_training_state, load_training_state
from maskdit_fast.train.preemption import PREEMPTED_EXIT
from tests.helpers import assert_same_final_state, train_and_crash
from tests.train.test_preemption import ENV, ROOT, WORKER, assert_same_training_state, finish, steps_saved

from .helpers import random_base

TINY_RUN = ["train.max_steps=3", "train.global_batch=8", "train.log_every=1", "train.ckpt_every=2",
            "sample.num_steps=2", "sample.grid_per_class=1", "dydit.lambda_warmup=2",
            "dydit.width_bias=1", "dydit.token_bias=1", "dydit.token_ratio=4"]


@pytest.fixture
def base_ckpt(tmp_path):
    net = random_base("maskdit")
    path = tmp_path / "base.safetensors"
    save_safetensors(path, net.state_dict(), net.model.cfg)
    return path


def test_sampler_sigmas_are_the_evaluated_levels():
    cfg = load_dydit_config("dydit-0.5", ["sample.num_steps=5"])
    levels = sampler_sigmas(cfg.sample)
    assert levels.shape == (9,) and levels.max() == pytest.approx(80.0) and levels.min() == pytest.approx(0.002)
    cfg = load_dydit_config("dydit-0.5", ["dydit.sampler_sigma_frac=0.5"])
    sigma = training_sigmas(8, cfg, levels, torch.device("cpu"))
    assert all(any(torch.isclose(s, levels).tolist()) for s in sigma[:4])


def test_loss_terms_and_their_gradients():
    cfg = load_dydit_config("dydit-0.5", ["dydit.width_bias=1", "dydit.token_bias=1", "dydit.distill_coef=0.5"])
    base = random_base("dit")
    net = to_dydit(base, cfg.dydit.router()).train()
    cfg.model = base.model.cfg
    images, labels = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="dropout"):
        dydit_loss(net, images, labels, 0.3, cfg, model_flops(net), sampler_sigmas(cfg.sample), base)
    net.model.y_embedder.dropout = 0.0
    terms = dydit_loss(net, images, labels, 0.3, cfg, model_flops(net), sampler_sigmas(cfg.sample), base)
    assert set(terms) >= {"loss", "dsm", "flops_loss", "min_tokens", "distill", "flops_ratio", "tokens"}
    ratio = model_flops(net).ratio(routing_of(net)).mean()
    assert terms["flops_loss"] == pytest.approx(2.0 * (ratio.item() - 0.3) ** 2)
    terms["loss"].backward()
    router = net.model.blocks[0].group_router.linear
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_min_token_penalty_bites_below_the_floor():
    cfg = load_dydit_config("dydit-0.5", ["dydit.min_tokens=0.5"])
    net = to_dydit(random_base("dit"), cfg.dydit.router()).train()
    with torch.no_grad():
        for block in net.model.dynamic_blocks():
            block.token_router.fc2.bias.fill_(-20.0)
    cfg.model = net.model.cfg
    terms = dydit_loss(net, torch.randn(2, 1, 32, 32), None, 0.5, cfg, model_flops(net), sampler_sigmas(cfg.sample))
    assert terms["min_tokens"] == pytest.approx(0.5 * cfg.model.depth)


def test_finetune_and_sample_from_the_command_line(tmp_path, base_ckpt, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--init", str(base_ckpt), "--out", str(out), "--no-progress", *TINY_RUN]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lambda"] == 1.0 and rows[-1]["lambda"] == 0.5
    assert (out / "samples" / "final.png").is_file()
    net = load_dydit(out / "ema.safetensors")
    assert net.model.router_cfg.token_ratio == 4
    assert net.model.cfg == load_checkpoint(base_ckpt).model.cfg
    assert "measured FLOPs" in capsys.readouterr().out

    samples = tmp_path / "samples"  # sample.py takes DyDiT checkpoints and reports the FLOPs it executed
    assert sample_main(["--ckpt", str(out / "ema.safetensors"), "--out", str(samples), "--n", "4", "--steps", "2"]) == 0
    flops = json.loads((samples / "flops.json").read_text())
    assert (samples / "grid.png").is_file() and (samples / "samples.npz").is_file()
    assert flops["rows"] == 2 * 3 * 4  # guidance doubles the rows, Heun with 2 steps evaluates 3 times
    assert 0 < flops["ratio"] < 1.1 and len(flops["per_evaluation"]) == 3
    assert flops["flops_per_image"] == pytest.approx(flops["total_flops"] / 4)
    assert "x the base model" in capsys.readouterr().out

    base_samples = tmp_path / "base-samples"
    assert sample_main(["--ckpt", str(base_ckpt), "--out", str(base_samples), "--n", "2", "--steps", "2"]) == 0
    assert json.loads((base_samples / "flops.json").read_text())["ratio"] == 1.0


def test_cli_rejects_bad_overrides(tmp_path, base_ckpt):
    with pytest.raises(SystemExit):
        main(["finetune", "--init", str(base_ckpt), "--out", str(tmp_path / "x"), "dydit.target=7"])
    with pytest.raises(SystemExit):
        main(["finetune", "--init", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "x")])



def test_killed_finetune_resumes_to_the_same_weights(tmp_path, base_ckpt, monkeypatch, capsys):
    run = [*TINY_RUN, "train.max_steps=5", "train.ckpt_every=2"]

    def finetune_cli(out, *extra):
        return main(["finetune", "--init", str(base_ckpt), "--out", str(out), "--no-progress", *extra, *run])

    finetune_cli(tmp_path / "straight")
    train_and_crash(None, tmp_path / "crashed", 3, monkeypatch, run=lambda: finetune_cli(tmp_path / "crashed"))
    assert load_training_state(latest_training_state(tmp_path / "crashed"))["step"] == 2
    with pytest.raises(SystemExit):
        finetune_cli(tmp_path / "crashed")
    assert "pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        finetune_cli(tmp_path / "crashed", "--resume", "dydit.target=0.3")
    assert exit_.value.code == 2 and "dydit.target (0.5 then, 0.3 now)" in capsys.readouterr().err
    finetune_cli(tmp_path / "crashed", "--resume")

    assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 5)
    for name, tensor in load_dydit(tmp_path / "straight" / "ema.safetensors").state_dict().items():
        assert torch.equal(tensor, load_dydit(tmp_path / "crashed" / "ema.safetensors").state_dict()[name])
    steps = [json.loads(line)["step"] for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the step logged after the checkpoint and before the crash is not repeated


def test_command_line_refuses_bad_input_with_a_message(tmp_path, base_ckpt, capsys):
    out = tmp_path / "run"
    assert main(["finetune", "--init", str(base_ckpt), "--out", str(out), "--no-progress", *TINY_RUN]) == 0
    with pytest.raises(SystemExit):  # a DyDiT is not a base model
        main(["finetune", "--init", str(out / "ema.safetensors"), "--out", str(tmp_path / "again"), *TINY_RUN])
    assert "already a DyDiT" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the run directory is taken
        main(["finetune", "--init", str(base_ckpt), "--out", str(out), "--no-progress", *TINY_RUN])
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--init", str(base_ckpt), "--out", str(tmp_path / "x"), "data.dataset=latents",
              f"data.path={tmp_path / 'none'}", *TINY_RUN])
    assert "meta.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # no empty run directory left behind


def test_auto_micro_batch_is_refused(tmp_path, base_ckpt, capsys):
    """The memory planner plans MaskDiT / DiT training, not the DyDiT fine-tune: a message naming the key,
    exit status 2, before the run directory is made."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--init", str(base_ckpt), "--out", str(out), "--no-progress", *TINY_RUN,
              "train.micro_batch=auto"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and err.count("error:") == 1
    assert "train.micro_batch: auto plans MaskDiT / DiT training" in err
    assert not out.exists()


def test_resume_refuses_a_run_without_training_state(tmp_path, base_ckpt, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "ema.safetensors").write_bytes(base_ckpt.read_bytes())
    with pytest.raises(SystemExit):
        main(["finetune", "--init", str(base_ckpt), "--out", str(out), "--no-progress", "--resume", *TINY_RUN])
    assert "no training state" in capsys.readouterr().err


@pytest.fixture
def latent_base(tmp_path):
    """A tiny MaskDiT for 4x8x8 latents with 3 classes, and a latent folder of 19 samples."""
    from tests.data.helpers import make_latent_folder

    make_latent_folder(tmp_path / "data", counts=(10, 9))
    net = random_base("maskdit", in_channels=4, input_size=8, patch_size=2, num_classes=3)
    path = tmp_path / "latent-base.safetensors"
    save_safetensors(path, net.state_dict(), net.model.cfg)
    return path, tmp_path / "data"


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_finetune_on_latent_shards_resumes_exactly(tmp_path, latent_base, monkeypatch, loader):
    """Fine-tunes read latent folders through the trainer's loaders (torch workers, DALI reader state)."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    base, data = latent_base
    run = [*TINY_RUN, "train.max_steps=5", "train.ckpt_every=2", "data.dataset=latents", f"data.path={data}",
           "data.flip=true", f"data.loader={loader}", "data.num_workers=1", "data.dali_threads=1",
           "data.shuffle_buffer=8"]

    def finetune_cli(out, *extra):
        return main(["finetune", "--init", str(base), "--out", str(out), "--no-progress", *extra, *run])

    finetune_cli(tmp_path / "straight")
    train_and_crash(None, tmp_path / "crashed", 3, monkeypatch, run=lambda: finetune_cli(tmp_path / "crashed"))
    finetune_cli(tmp_path / "crashed", "--resume")
    a, _ = assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 5, parts=("model",))
    assert ("loader" in a["rng"]["rank0"]) == (loader == "dali")  # DALI's reader position is saved
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows) and len(rows) == 5
    assert load_dydit(tmp_path / "straight" / "ema.safetensors").model.cfg.in_channels == 4


def test_a_non_finite_loss_stops_the_run_at_its_step(tmp_path, base_ckpt, monkeypatch, capsys):
    import maskdit_fast.dydit.finetune as ft

    real, calls = ft.dydit_loss, []

    def poisoned(*args, **kwargs):
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(ft, "dydit_loss", poisoned)
    with pytest.raises(SystemExit) as exit_:  # a message, no traceback
        main(["finetune", "--init", str(base_ckpt), "--out", str(tmp_path / "run"), "--no-progress", *TINY_RUN])
    assert exit_.value.code == 2 and "loss is nan at step 2" in capsys.readouterr().err


def finetune_process(base, out, *args: str, signal_at: dict | None = None) -> tuple[int, str]:
    """``python -m maskdit_fast.dydit finetune`` in a subprocess (through the fault worker, which sends
    ``signal_at``); its exit status and output."""
    n = len(list(out.parent.glob(f"{out.name}-*.json")))
    spec, log = out.parent / f"{out.name}-{n}.json", out.parent / f"{out.name}-{n}.log"
    argv = ["finetune", "--init", str(base), "--out", str(out), "--no-progress", *args]
    spec.write_text(json.dumps({"command": "dydit", "argv": argv, **({"signal": signal_at} if signal_at else {})}))
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(spec)], cwd=ROOT, env=ENV, stdout=sink,
                                stderr=subprocess.STDOUT)
    return finish(proc, log)


def test_preempted_finetune_resumes_bit_for_bit(tmp_path, base_ckpt):
    """SIGUSR1 in step 3 of a 5-step fine-tune: exit 75 and one line naming step 3 and its saved state;
    --resume is then signalled during the final samples (exit 75, no final.png, the state of step 5
    saved once); a last --resume samples and ends. Model, EMA and optimizer equal an uninterrupted run's."""
    run = [*TINY_RUN, "train.max_steps=5", "train.ckpt_every=2", "train.keep_last=0"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    code, text = finetune_process(base_ckpt, straight, *run)
    assert code == 0, text[-4000:]

    code, text = finetune_process(base_ckpt, out, *run, signal_at={"at": "step", "step": 3, "name": "SIGUSR1"})
    assert code == PREEMPTED_EXIT, text[-4000:]
    assert text.count(f"preempted (SIGUSR1): stopped after step 3, its training state is saved in "
                      f"{out / 'checkpoints' / 'step-0000003'}") == 1, text[-4000:]
    assert steps_saved(out) == [2, 3]

    code, text = finetune_process(base_ckpt, out, "--resume", *run, signal_at={"at": "final", "name": "SIGUSR1"})
    assert code == PREEMPTED_EXIT and "preempted during the final samples" in text, text[-4000:]
    assert steps_saved(out) == [2, 3, 4, 5] and not (out / "samples" / "final.png").exists()
    assert_same_training_state(straight, out, 5)

    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    code, text = finetune_process(base_ckpt, out, "--resume", *run)
    assert code == 0 and (out / "samples" / "final.png").is_file(), text[-4000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before
    assert_same_training_state(straight, out, 5)
