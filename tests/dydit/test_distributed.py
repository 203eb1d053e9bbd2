"""The DyDiT fine-tune under torchrun (2 gloo processes on the CPU): DDP computes what one process
with two micro-batches does, and its training state resumes in one process."""
from __future__ import annotations

import pytest
import torch

from maskdit_fast.checkpoint import save_safetensors
from maskdit_fast.config import ConfigError
from maskdit_fast.dydit import load_dydit_config
from maskdit_fast.dydit.__main__ import main
from maskdit_fast.dydit.finetune import finetune
from maskdit_fast.storage import load_training_state
from tests.train.test_distributed import assert_close, final_state, torchrun

from .helpers import random_base

RUN = ["train.global_batch=8", "train.log_every=1", "train.ckpt_every=3", "sample.num_steps=2",
       "sample.grid_per_class=1", "dydit.lambda_warmup=2", "dydit.width_bias=1", "dydit.token_bias=1",
       "dydit.token_ratio=4", "train.keep_last=0"]


def test_ddp_equals_one_process_with_micro_batches_and_resumes_in_one(tmp_path):
    net = random_base("maskdit")
    base = tmp_path / "base.safetensors"
    save_safetensors(base, net.state_dict(), net.model.cfg)

    def args(out, *extra):
        return ["finetune", "--init", str(base), "--out", str(out), "--no-progress", *RUN, *extra]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers: the same summation order in every matmul
    try:
        assert main(args(tmp_path / "single", "train.max_steps=5", "train.micro_batch=4")) == 0
    finally:
        torch.set_num_threads(threads)
    done = torchrun([{"dydit": args(tmp_path / "ddp", "train.max_steps=3", "train.parallel=ddp")}],
                    tmp_path / "jobs.json", timeout=300)
    assert (tmp_path / "ddp" / "ema.safetensors").is_file(), done.stderr[-4000:]
    ddp = final_state(tmp_path / "ddp", 3)
    assert ddp["world_size"] == 2 and set(ddp["rng"]) == {"rank0", "rank1"}
    assert_close(ddp, load_training_state(tmp_path / "single" / "checkpoints" / "step-0000003"), rtol=1e-3)

    # the 2-process state, resumed by one process with two micro-batches per step
    assert main(args(tmp_path / "ddp", "train.max_steps=5", "train.micro_batch=4", "--resume")) == 0
    assert_close(final_state(tmp_path / "ddp", 5), final_state(tmp_path / "single", 5), rtol=1e-3)


@pytest.mark.parametrize("override, message", [("train.parallel=fsdp", "use ddp"),
                                               ("train.compile=true", "train.compile=false"),
                                               ("train.activation_checkpointing=true", "activation_checkpointing=false")])
def test_unsupported_training_options_are_refused(tmp_path, override, message):
    cfg = load_dydit_config("dydit-0.5", [override])
    with pytest.raises(ConfigError, match=message):
        finetune(cfg, tmp_path / "base.safetensors", tmp_path / "run")
