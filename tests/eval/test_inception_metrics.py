"""The FID / sFID / IS / precision-recall pipeline, end to end on CPU with a tiny injected extractor."""

from pathlib import Path

import numpy as np
import pytest
import torch

from maskdit_fast.eval.__main__ import main
from maskdit_fast.eval.frechet import feature_statistics, frechet_distance
from maskdit_fast.eval.images import to_float_nchw, to_uint8_nhwc
from maskdit_fast.eval.metrics import (
    FeatureExtractorUnavailable,
    InceptionV3,
    compute_metrics,
    evaluate_npz,
    extract_features,
    inception_score,
    load_reference,
    manifold_precision_recall,
    stats_from_features,
    write_reference_stats,
)
from maskdit_fast.eval.mnist_classifier import mnist_split


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """uint8 (N, 32, 32, 1) sets: two disjoint real sets, a noisy copy of the first, and pure noise."""
    images = to_uint8_nhwc(mnist_split("train")[0][:1000])
    rng = np.random.default_rng(0)
    noisy = np.clip(images.astype(np.float64) + rng.normal(0, 60, images.shape), 0, 255).astype(np.uint8)
    return {
        "real_a": images[:500],
        "real_b": images[500:],
        "noisy_a": noisy[:500],
        "noise": rng.integers(0, 256, (500, 32, 32, 1), dtype=np.uint8),
    }


def _save_batch(path: Path, images: np.ndarray, **extra: np.ndarray) -> Path:
    np.savez(path, arr_0=images, **extra)
    return path


def test_fid_orders_real_degraded_and_noise(digits, tiny_extractor) -> None:
    reference = stats_from_features(
        extract_features(digits["real_a"], tiny_extractor, progress=False), tiny_extractor.name
    )
    results = {name: compute_metrics(digits[name], reference, tiny_extractor, progress=False) for name in digits}
    assert results["real_a"]["fid"] == 0.0
    assert results["real_a"]["sfid"] == 0.0
    assert 0.0 < results["real_b"]["fid"] < results["noisy_a"]["fid"] < results["noise"]["fid"]
    assert 0.0 < results["real_b"]["sfid"] < results["noisy_a"]["sfid"] < results["noise"]["sfid"]
    # precision/recall: 1 against itself, high for other real digits, ~0 for noise
    assert results["real_a"]["precision"] == results["real_a"]["recall"] == 1.0
    assert results["real_b"]["precision"] > 0.6 and results["real_b"]["recall"] > 0.6
    assert results["noise"]["precision"] < 0.05 and results["noise"]["recall"] < 0.05
    for key in ("precision", "recall"):
        assert results["real_b"][key] > results["noisy_a"][key] >= results["noise"][key]
    for metrics in results.values():
        assert 1.0 <= metrics["inception_score"] <= 10.0  # the tiny extractor has 10 logits


def test_precision_recall_on_gaussians() -> None:
    """A narrow sample set lies inside the reference manifold (high precision, low recall); a wide one covers it."""
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((1000, 8))
    narrow, wide = 0.3 * rng.standard_normal((1000, 8)), 3.0 * rng.standard_normal((1000, 8))
    same = rng.standard_normal((1000, 8))
    p_narrow, r_narrow = manifold_precision_recall(reference, narrow)
    p_wide, r_wide = manifold_precision_recall(reference, wide)
    p_same, r_same = manifold_precision_recall(reference, same)
    assert p_narrow > 0.95 and r_narrow < 0.5
    assert p_wide < 0.3 and r_wide > 0.95
    assert 0.5 < p_same < 1.0 and 0.5 < r_same < 1.0
    with pytest.raises(ValueError):
        manifold_precision_recall(reference, narrow[:3], k=3)


def test_inception_score_limits() -> None:
    assert inception_score(np.zeros((100, 10))) == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(100) % 10] * 50.0  # one class per sample, all classes equally often
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    # averaged over splits: two splits, each with 5 balanced classes
    halves = np.eye(10)[np.r_[np.arange(50) % 5, 5 + np.arange(50) % 5]] * 50.0
    assert inception_score(halves, split_size=50) == pytest.approx(5.0, rel=1e-6)


def test_input_layouts_give_the_same_features(digits, tiny_extractor) -> None:
    grey = digits["real_a"][:64]
    reference = extract_features(grey, tiny_extractor, progress=False)
    rgb = extract_features(np.repeat(grey, 3, axis=3), tiny_extractor, progress=False)
    floats = extract_features(to_float_nchw(grey), tiny_extractor, batch_size=10, progress=False)
    for key in reference:
        np.testing.assert_array_equal(rgb[key], reference[key])
        np.testing.assert_allclose(floats[key], reference[key], rtol=1e-6, atol=1e-6)
    assert reference["pool"].shape == (64, 16) and reference["spatial"].shape == (64, 32)
    assert reference["logits"].shape == (64, 10)


def test_stats_file_round_trip(tmp_path, digits, tiny_extractor) -> None:
    ref_path = _save_batch(tmp_path / "ref.npz", digits["real_a"])
    samples_path = _save_batch(tmp_path / "samples.npz", digits["real_b"])
    write_reference_stats(ref_path, tmp_path / "stats.npz", tiny_extractor, progress=False)
    with np.load(tmp_path / "stats.npz") as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "pool", "extractor"} <= set(data.keys())
        assert "arr_0" not in data
    from_images = evaluate_npz(samples_path, ref_path, tiny_extractor, progress=False)
    from_stats = evaluate_npz(samples_path, tmp_path / "stats.npz", tiny_extractor, progress=False)
    assert from_stats == pytest.approx(from_images, rel=1e-9)
    assert set(from_stats) == {"inception_score", "fid", "sfid", "precision", "recall"}


def test_precomputed_stats_take_precedence(tmp_path, digits, tiny_extractor) -> None:
    """As in ADM's evaluator: mu/sigma stored beside the images are used when they match the extractor."""
    other = stats_from_features(extract_features(digits["noise"], tiny_extractor, progress=False), tiny_extractor.name)
    path = _save_batch(
        tmp_path / "ref.npz", digits["real_a"], mu=other.mu, sigma=other.sigma, extractor=np.array(tiny_extractor.name)
    )
    reference = load_reference(path, tiny_extractor, progress=False)
    np.testing.assert_array_equal(reference.mu, other.mu)
    assert reference.mu_s is None  # not stored, so no sFID
    results = compute_metrics(digits["real_a"], reference, tiny_extractor, progress=False)
    assert "sfid" not in results and results["precision"] == 1.0  # pool features come from arr_0
    expected = frechet_distance(*feature_statistics(reference.pool), other.mu, other.sigma)
    assert results["fid"] == pytest.approx(expected)


def test_adm_stats_of_another_extractor(tmp_path, digits, tiny_extractor) -> None:
    """ADM files carry no extractor name: their mu/sigma are Inception's, never mixed with other features."""
    inception_stats = {"mu": np.zeros(8), "sigma": np.eye(8)}  # stand-ins for ADM's 2048-d statistics
    with_images = load_reference(
        _save_batch(tmp_path / "adm.npz", digits["real_a"], **inception_stats), tiny_extractor, progress=False
    )
    assert with_images.mu.shape == (16,) and with_images.extractor == tiny_extractor.name
    np.savez(tmp_path / "adm_stats_only.npz", **inception_stats)
    with pytest.raises(ValueError, match="inception-v3"):
        load_reference(tmp_path / "adm_stats_only.npz", tiny_extractor)
    mismatched = stats_from_features(extract_features(digits["real_a"], tiny_extractor, progress=False), "other-net")
    with pytest.raises(ValueError, match="other-net"):
        compute_metrics(digits["real_a"], mismatched, tiny_extractor, progress=False)


def test_missing_inception_weights_say_how_to_provide_them(tmp_path, capsys) -> None:
    with pytest.raises(FeatureExtractorUnavailable, match="--inception-weights"):
        InceptionV3(weights=tmp_path / "missing.pth")
    batch = _save_batch(tmp_path / "b.npz", np.zeros((4, 32, 32, 1), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        main(["metrics", str(batch), str(batch), "--inception-weights", str(tmp_path / "missing.pth")])
    assert exit_info.value.code == 2
    assert "MASKDIT_INCEPTION_WEIGHTS" in capsys.readouterr().err


def test_inception_wrapper_with_random_weights(tmp_path, monkeypatch) -> None:
    """The torch-fidelity wrapper (runs where torch-fidelity and torchvision import): shapes and feature taps."""
    inception_module = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    network = inception_module.FeatureExtractorInceptionV3
    with monkeypatch.context() as patch:  # a randomly initialised network instead of downloaded weights
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(network, "load_state_dict", lambda self, state_dict: None)
        random_net = InceptionV3()
    weights = tmp_path / "random_inception.pth"
    torch.save(random_net.net.state_dict(), weights)
    extractor = InceptionV3(weights)
    images = to_uint8_nhwc(mnist_split("heldout")[0][:4])
    features = extract_features(images, extractor, batch_size=2, progress=False)
    assert features["pool"].shape == (4, 2048)
    assert features["spatial"].shape == (4, 17 * 17 * 7)
    assert features["logits"].shape == (4, 1008)
    np.testing.assert_allclose(features["logits"], features["pool"] @ extractor.net.fc.weight.numpy().T, atol=1e-4)
