import json

from PIL import Image

from benchmarks.dydit import main


def test_tiny_benchmark_runs_side_by_side(tmp_path, capsys):
    out = tmp_path / "dydit"
    assert main(["--tiny", "--n", "2", "--batch", "2", "--steps", "2", "--reps", "1", "--warmup", "0",
                 "--masked", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    names = [r["model"] for r in report["rows"]]
    assert names[0] == "base" and "emulated-0.5" in names and "emulated-0.5 (masked)" in names
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["base"]["flops_ratio"] == 1.0 and rows["base"]["speedup"] == rows["base"]["speedup_paired"] == 1.0
    assert rows["emulated-0.3"]["flops_ratio"] < rows["emulated-0.5"]["flops_ratio"] < rows["emulated-0.7"]["flops_ratio"] < 1
    assert rows["emulated-0.5 (masked)"]["flops_ratio"] > 1  # same decisions, nothing skipped
    assert rows["emulated-0.5 (masked)"]["mean_tokens"] == rows["emulated-0.5"]["mean_tokens"] < 1
    assert "| base |" in out.with_suffix(".md").read_text()
    assert "speed-up" in capsys.readouterr().out
    assert report["precision"] == "fp32"  # auto on a CPU
    picture = Image.open(out.with_suffix(".png"))  # the tiny model is a 1-channel pixel model
    assert picture.width > picture.height > 0


def test_bf16_autocast_is_recorded_and_counted(tmp_path):
    out = tmp_path / "dydit"
    assert main(["--tiny", "--n", "2", "--batch", "2", "--steps", "2", "--reps", "1", "--warmup", "0",
                 "--precision", "bf16", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["precision"] == "bf16" and "precision bf16" in out.with_suffix(".md").read_text()
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["base"]["flops_ratio"] == 1.0 and rows["emulated-0.5"]["flops_ratio"] < 1
