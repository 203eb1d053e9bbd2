"""``python -m benchmarks.data_loaders``: loader throughput and images-vs-latents step time (tiny runs)."""
import json

import pytest

from benchmarks.data_loaders import main, synthetic_folder
from maskdit_fast.data.dali import dali_available
from maskdit_fast.data.latents import LatentShards, verify


def test_synthetic_folder_is_a_valid_imagenet256_shaped_latent_folder(tmp_path):
    synthetic_folder(tmp_path, 10, shard_size=4)
    shards = LatentShards(tmp_path, verify=True)
    assert len(shards) == 10 and shards.shape == (4, 32, 32) and len(shards.meta["shards"]) == 3
    assert verify(tmp_path) == []


def test_loader_bench_reports_both_loaders(tmp_path, capsys):
    out = tmp_path / "loaders.json"
    argv = ["--synthetic", "300", "--batch", "32", "--steps", "3", "--warmup", "1", "--workers", "0", "--threads", "1",
            "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["command"] == "python -m benchmarks.data_loaders " + " ".join(argv)
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"]
    expected = ["torch", "dali"] if dali_available() else ["torch"]
    assert [r["loader"] for r in report["loaders"]] == expected
    for r in report["loaders"]:
        assert r["samples_per_s"] > 0 and r["batch"] == 32 and r["steps"] == 3 and r["shape"] == [4, 32, 32]
    assert "samples/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([])  # neither a folder nor --synthetic


def test_sources_bench_times_both_sources(tmp_path):
    pytest.importorskip("diffusers", reason="the images source needs diffusers")
    out = tmp_path / "sources.json"
    assert main(["--sources", "--images", "12", "--batch", "4", "--steps", "2", "--warmup", "1", "--workers", "1",
                 "--torch-threads", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["sources"]
    assert [r["source"] for r in result["rows"]] == ["shards", "images"]
    for r in result["rows"]:
        assert len(r["step_ms_all"]) == 2 and r["step_ms"] > 0 and r["img_per_s"] > 0
    assert result["images_over_shards"] == pytest.approx(result["rows"][1]["step_ms"] / result["rows"][0]["step_ms"])
