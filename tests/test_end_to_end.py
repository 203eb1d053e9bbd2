"""train.py -> sample.py through the real command lines."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.size=null", "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.decoder_hidden_size=24",
        "model.decoder_depth=1", "model.decoder_num_heads=2", "train.global_batch=8", "train.max_steps=3",
        "train.unmasked_steps=1", "train.warmup_steps=0", "sample.num_steps=2", "sample.grid_per_class=1"]


def run(script, *args, env=None):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)


def test_train_then_sample(tmp_path, mnist_classifier, mnist_cache):
    env = {**os.environ, "MASKDIT_CACHE": str(mnist_cache)}
    trained = run("train.py", "--out", str(tmp_path / "run"), "--no-progress", "--eval-samples", "20", *TINY, env=env)
    assert trained.returncode == 0, trained.stderr
    quality = json.loads((tmp_path / "run" / "mnist_quality.json").read_text())
    assert quality["n"] == 20 and 0 <= quality["accuracy"] <= 1 and quality["frechet"] > 0
    assert "classifier accuracy" in trained.stdout
    ckpt = tmp_path / "run" / "ema.safetensors"
    assert ckpt.is_file() and (tmp_path / "run" / "samples" / "step-0000003.png").is_file()

    sampled = run("sample.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--n", "12", "--steps", "2",
                  "--cfg-scale", "2", "--seed", "5")
    assert sampled.returncode == 0, sampled.stderr
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["arr_0"].shape == (12, 32, 32, 1) and data["arr_0"].dtype == np.uint8
    assert data["labels"].tolist() == [(5 + i) % 10 for i in range(12)]
    assert Image.open(tmp_path / "s" / "grid.png").size[0] > 32 * 8

    # seeds fix images whatever the batch size; --class fixes the label
    again = run("sample.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "t"), "--n", "3", "--steps", "2",
                "--cfg-scale", "2", "--seed", "7", "--batch", "1")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.load(tmp_path / "t" / "samples.npz")["arr_0"], data["arr_0"][2:5])
    one_class = run("sample.py", "--ckpt", str(ckpt), "--out", str(tmp_path / "u"), "--n", "2", "--steps", "1",
                    "--class", "4")
    assert one_class.returncode == 0 and np.load(tmp_path / "u" / "samples.npz")["labels"].tolist() == [4, 4]


def test_cli_errors_are_clear(tmp_path):
    bad = run("train.py", "--out", str(tmp_path), "model.mask_ratio=1.5")
    assert bad.returncode == 2 and "model.mask_ratio" in bad.stderr
    missing = run("sample.py", "--ckpt", str(tmp_path / "none.safetensors"), "--out", str(tmp_path))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_data = run("train.py", "--out", str(tmp_path / "run"), "data.dataset=latents", f"data.path={tmp_path / 'none'}")
    assert no_data.returncode == 2 and "meta.json: not found" in no_data.stderr and "Traceback" not in no_data.stderr
