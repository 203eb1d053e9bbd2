"""Training on a tiny latent folder (data.dataset=latents) with the PyTorch loader."""
import json

import pytest

from maskdit_fast.storage import latest_training_state
from maskdit_fast.train.trainer import train
from tests.data.helpers import make_latent_folder
from tests.helpers import assert_same_final_state, train_and_crash, tiny_config


def latent_config(path, *overrides):
    return tiny_config("data.dataset=latents", f"data.path={path}", "data.num_workers=0", "model.in_channels=4",
                       "model.input_size=8", "model.patch_size=2", "model.num_classes=3", *overrides)


def test_three_steps_on_latents(tmp_path):
    make_latent_folder(tmp_path / "data", counts=(10, 9))
    cfg = latent_config(tmp_path / "data", "train.max_steps=3", "train.log_every=1", "data.flip=true")
    train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and all(r["loss"] > 0 for r in lines)
    assert (tmp_path / "run" / "ema.safetensors").is_file()


def test_crashed_latent_run_resumes_exactly_with_worker_processes(tmp_path, monkeypatch):
    make_latent_folder(tmp_path / "data", counts=(10, 9))
    cfg = latent_config(tmp_path / "data", "train.max_steps=5", "train.ckpt_every=2", "data.num_workers=1",
                        "data.flip=true")
    train(cfg, tmp_path / "straight", progress=False)
    train_and_crash(cfg, tmp_path / "crashed", 3, monkeypatch)
    train(cfg, tmp_path / "crashed", resume=True, progress=False)
    assert_same_final_state(tmp_path / "straight", tmp_path / "crashed", 5)


def test_wrong_latent_shape_is_a_clear_error(tmp_path):
    make_latent_folder(tmp_path / "data", counts=(10,))
    with pytest.raises(ValueError, match="4x8x8 latents.*model.input_size=16"):
        train(latent_config(tmp_path / "data", "model.input_size=16"), tmp_path / "run", progress=False)


def test_two_ddp_processes_match_one_process(tmp_path):
    """The ranks' loaders split each global batch: 2 gloo processes = 1 process with 2 micro-batches."""
    from tests.train.test_distributed import assert_close, final_state, torchrun

    make_latent_folder(tmp_path / "data", counts=(10, 9))
    overrides = ["data.dataset=latents", f"data.path={tmp_path / 'data'}", "data.num_workers=1", "model.in_channels=4",
                 "model.input_size=8", "model.patch_size=2", "model.num_classes=3", "train.max_steps=3"]
    train(tiny_config(*overrides, "train.micro_batch=4"), tmp_path / "single", progress=False)
    done = torchrun([{"train": str(tmp_path / "ddp"), "overrides": [*overrides, "parallel=ddp"]}],
                    tmp_path / "jobs.json", timeout=300)
    assert latest_training_state(tmp_path / "ddp") is not None, done.stderr[-3000:]
    assert_close(final_state(tmp_path / "single", 3), final_state(tmp_path / "ddp", 3))


def test_the_folders_vae_decodes_grids_and_is_recorded_for_sample_py(tmp_path, tiny_vae):
    """data.vae unset: the VAE named in meta.json (the one that made the latents) is used and recorded."""
    from maskdit_fast.checkpoint import sample_settings

    make_latent_folder(tmp_path / "data", counts=(10,), shape=(4, 4, 4))
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    (tmp_path / "data" / "meta.json").write_text(json.dumps({**meta, "vae": str(tiny_vae)}))
    cfg = latent_config(tmp_path / "data", "model.input_size=4", "train.max_steps=2")
    assert cfg.data.vae is None
    ema = train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()
    assert sample_settings(ema).vae == str(tiny_vae)


def test_sample_py_decodes_with_the_runs_latent_scale(tmp_path, tiny_vae):
    """A run on latents of scale 0.5 (not SD's 0.18215): sample.py divides by 0.5 before decoding."""
    import numpy as np

    from maskdit_fast.checkpoint import load_checkpoint, sample_settings
    from maskdit_fast.cli import sample_main
    from maskdit_fast.config import SampleConfig
    from maskdit_fast.data.vae import decode_latents, load_vae
    from maskdit_fast.eval.images import to_uint8_nhwc
    from maskdit_fast.generate import generate, seed_labels

    make_latent_folder(tmp_path / "data", counts=(10,), shape=(4, 4, 4))
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    (tmp_path / "data" / "meta.json").write_text(json.dumps({**meta, "vae": str(tiny_vae), "latent_scale": 0.5}))
    cfg = latent_config(tmp_path / "data", "model.input_size=4", "train.max_steps=2", "data.latent_scale=0.5")
    ema = train(cfg, tmp_path / "run", progress=False)
    stored = sample_settings(ema)
    assert stored.latent_scale == 0.5 and stored.vae == str(tiny_vae)

    assert sample_main(["--ckpt", str(ema), "--out", str(tmp_path / "out"), "--n", "3", "--steps", "2"]) == 0
    written = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    net, vae = load_checkpoint(ema), load_vae(str(tiny_vae))
    seeds = [0, 1, 2]
    latents = generate(net, seeds, seed_labels(seeds, 3), SampleConfig(**{**stored.sampler, "num_steps": 2}))
    np.testing.assert_array_equal(written, to_uint8_nhwc(decode_latents(vae, latents, 0.5)))
    assert not np.array_equal(written, to_uint8_nhwc(decode_latents(vae, latents, 0.18215)))
