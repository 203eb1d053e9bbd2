"""``python -m maskdit_fast.data.prepare`` with a tiny random AutoencoderKL (needs the vae extra)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maskdit_fast.data.images import load_image
from maskdit_fast.data.latents import LatentShards
from maskdit_fast.data.prepare import main

diffusers = pytest.importorskip("diffusers", reason="prepare needs diffusers: pip install -e '.[vae]'")


def run(image_dir, out, vae, *extra):
    return main([str(image_dir), str(out), "--resolution", "32", "--vae", str(vae), "--shard-size", "5",
                 "--batch", "3", "--workers", "1", "--device", "cpu", "--no-progress", *extra])


@torch.no_grad()
def encode_direct(vae_path, arrays):
    vae = diffusers.AutoencoderKL.from_pretrained(vae_path).eval()
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    dist = vae.encode(x).latent_dist
    return dist.mean.numpy(), dist.logvar.numpy()


def test_prepare_writes_shards_lists_unreadable_and_resumes(tmp_path, image_dir, tiny_vae):
    out = tmp_path / "latents"
    assert run(image_dir, out, tiny_vae, "--flip") == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["images"] == 12 and meta["count"] == 24 and meta["flip_copies"] is True
    assert meta["shape"] == [4, 4, 4] and meta["dtype"] == "float16" and meta["latent_scale"] == 0.18215
    assert meta["vae"] == str(tiny_vae) and meta["resolution"] == 32 and meta["num_classes"] == 3
    assert len(meta["shards"]) == 3  # 13 files (one broken) in shards of 5
    assert (out / "classes.txt").read_text().split() == ["n01", "n02", "n03"]
    assert (out / "unreadable.txt").read_text().startswith("n02/broken.png\t")

    shards = LatentShards(out, verify=True)
    files, labels = [], []
    for s in meta["shards"]:
        summary = json.loads((out / s["file"].replace(".tar", ".json")).read_text())
        n = summary["images"]
        idx = np.arange(s["first"], s["first"] + 2 * n)
        post, lab = shards.read(idx)
        crops = [load_image(image_dir / f, 32) for f in summary["files"]]
        mean, logvar = encode_direct(tiny_vae, crops)
        fmean, flogvar = encode_direct(tiny_vae, [np.ascontiguousarray(c[:, ::-1]) for c in crops])
        np.testing.assert_allclose(post[:n, 0], mean, atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(post[:n, 1], logvar, atol=2e-2, rtol=2e-3)
        np.testing.assert_allclose(post[n:, 0], fmean, atol=2e-3, rtol=2e-3)  # flipped copies follow
        np.testing.assert_allclose(post[n:, 1], flogvar, atol=2e-2, rtol=2e-3)
        assert np.array_equal(lab[:n], lab[n:])
        files += summary["files"]
        labels += lab[:n].tolist()
    assert sorted(files) == sorted(f"{c}/img{i}.png" for c in ("n01", "n02", "n03") for i in range(4))
    assert labels == [int(f[2]) - 1 for f in files]  # label = index of the sorted class folder

    # resume: a lost shard is re-encoded identically, finished ones are left alone
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    for suffix in (".tar", ".json", ".idx"):
        (out / f"shard-00001{suffix}").unlink()
    (out / "meta.json").unlink()
    (out / ".shard-00001.tar.tmp").write_bytes(b"half a shard from a killed run")
    assert run(image_dir, out, tiny_vae, "--flip") == 0
    again = json.loads((out / "meta.json").read_text())
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in meta["shards"]]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert after["shard-00000.tar"] == before["shard-00000.tar"] and after["shard-00002.tar"] == before["shard-00002.tar"]

    with pytest.raises(SystemExit, match="other settings.*flip_copies"):
        run(image_dir, out, tiny_vae)


def test_strict_stops_at_an_unreadable_image(tmp_path, image_dir, tiny_vae, capsys):
    assert run(image_dir, tmp_path / "strict", tiny_vae, "--strict", "--shard-size", "20") == 1
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "meta.json").exists() and not list((tmp_path / "strict").glob("shard-*.tar"))


def test_dali_decoder_gives_the_same_latents_as_pil(tmp_path, image_dir, tiny_vae):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    assert run(image_dir, tmp_path / "pil", tiny_vae, "--decoder", "pil") == 0
    assert run(image_dir, tmp_path / "dali", tiny_vae, "--decoder", "dali") == 0  # DALI's CPU decoder here
    pil, dali = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("pil", "dali"))
    assert [s["sha256"] for s in pil["shards"]] == [s["sha256"] for s in dali["shards"]]  # PNG decodes exactly
    assert (tmp_path / "dali" / "unreadable.txt").read_text().startswith("n02/broken.png\t")


def test_two_processes_split_the_shards_and_write_the_same_folder(tmp_path, image_dir, tiny_vae):
    """torchrun: rank r encodes shards r, r+2, ...; rank 0 writes meta.json: the same bytes as one process."""
    assert run(image_dir, tmp_path / "one", tiny_vae) == 0
    args = [str(image_dir), str(tmp_path / "two"), "--resolution", "32", "--vae", str(tiny_vae), "--shard-size", "5",
            "--batch", "3", "--workers", "1", "--device", "cpu", "--no-progress"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "maskdit_fast.data.prepare", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("one", "two"))
    assert [(s["file"], s["count"], s["first"]) for s in two["shards"]] == [(s["file"], s["count"], s["first"])
                                                                         for s in one["shards"]]
    for name in ("shard-00000.json", "shard-00001.json", "shard-00002.json"):  # the same images in each shard
        assert json.loads((tmp_path / "two" / name).read_text())["files"] == \
            json.loads((tmp_path / "one" / name).read_text())["files"]
    (post1, lab1), (post2, lab2) = (LatentShards(tmp_path / d, verify=True).read(np.arange(12)) for d in ("one", "two"))
    assert np.array_equal(lab1, lab2)
    np.testing.assert_allclose(post2.astype(np.float32), post1.astype(np.float32), atol=2e-3, rtol=2e-3)  # threads
    assert (tmp_path / "two" / "unreadable.txt").read_text() == (tmp_path / "one" / "unreadable.txt").read_text()
