"""The MNIST classifier: accuracy, caching, and metrics that separate real digits from bad ones."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskdit_fast.eval.__main__ import main
from maskdit_fast.eval.images import to_uint8_nhwc
from maskdit_fast.eval import mnist_classifier as mc
from maskdit_fast.eval.mnist_classifier import (
    CLASSIFIER_VERSION,
    SHIPPED_WEIGHTS,
    MnistClassifier,
    get_mnist_classifier,
    load_mnist_classifier,
    mnist_metrics,
    mnist_split,
    random_shift,
    save_mnist_classifier,
)


def _blur(x: torch.Tensor, size: int) -> torch.Tensor:
    """Box blur of (N, 1, H, W) images in [-1, 1] with a background-coloured border."""
    return F.avg_pool2d(F.pad(x, (size // 2,) * 4, value=-1.0), size, stride=1)


def test_heldout_accuracy(mnist_classifier) -> None:
    images, labels = mnist_split("heldout")
    assert images.shape == (1000, 1, 32, 32) and images.min() == -1.0 and images.max() == 1.0
    metrics = mnist_metrics(images, labels, mnist_classifier)
    assert metrics["accuracy"] >= 0.98
    assert metrics["frechet"] == 0.0  # the held-out digits are the reference set
    assert metrics["n"] == 1000


def test_metrics_order_real_degraded_and_noise(mnist_classifier) -> None:
    images, labels = mnist_split("train")
    images, labels = images[:1000], labels[:1000]
    generator = torch.Generator().manual_seed(0)
    sets = {
        "real": images,  # other real digits (training split)
        "slightly_blurred": _blur(images, 3),
        "noisy": (images + 0.2 * torch.randn(images.shape, generator=generator)).clamp(-1, 1),
        "heavily_blurred": _blur(images, 5),
        "noise": torch.rand(images.shape, generator=generator) * 2 - 1,
    }
    results = {name: mnist_metrics(x, labels, mnist_classifier) for name, x in sets.items()}
    accuracy = {name: r["accuracy"] for name, r in results.items()}
    frechet = {name: r["frechet"] for name, r in results.items()}
    assert accuracy["real"] >= 0.98 and accuracy["noise"] < 0.25
    assert accuracy["real"] > accuracy["slightly_blurred"] > accuracy["heavily_blurred"] > accuracy["noise"]
    assert accuracy["real"] > accuracy["noisy"] > accuracy["noise"]
    assert 0 < frechet["real"] < frechet["slightly_blurred"] < frechet["heavily_blurred"] < frechet["noise"]
    assert frechet["real"] < frechet["noisy"] < frechet["noise"]


def test_uint8_nhwc_and_unlabelled_inputs(mnist_classifier) -> None:
    images, labels = mnist_split("train")
    images, labels = images[:200], labels[:200]
    as_float = mnist_metrics(images, labels, mnist_classifier)
    as_uint8 = mnist_metrics(to_uint8_nhwc(images), labels.numpy(), mnist_classifier)
    assert as_uint8["accuracy"] == as_float["accuracy"]
    assert as_uint8["frechet"] == pytest.approx(as_float["frechet"], rel=1e-4)
    unlabelled = mnist_metrics(images, None, mnist_classifier)
    assert unlabelled["accuracy"] is None and unlabelled["frechet"] == as_float["frechet"]
    with pytest.raises(ValueError):
        mnist_metrics(images, labels[:10], mnist_classifier)
    with pytest.raises(ValueError):
        mnist_metrics(torch.zeros(4, 1, 28, 28), None, mnist_classifier)


def test_cached_weights_are_reused(mnist_cache, mnist_classifier) -> None:
    path = mnist_cache / f"mnist_classifier_v{CLASSIFIER_VERSION}.safetensors"
    assert path.is_file() and not list(mnist_cache.glob("*.tmp"))
    loaded = get_mnist_classifier(mnist_cache)
    assert not loaded.training
    for name, tensor in mnist_classifier.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_shipped_weights_are_the_recipes(mnist_classifier) -> None:
    """The shipped file is a classifier of this version and recipe: as accurate as a fresh one and
    agreeing with it (the session fixture trains one here) on nearly every held-out digit."""
    shipped = load_mnist_classifier(SHIPPED_WEIGHTS)
    images, labels = mnist_split("heldout")
    assert mnist_metrics(images, labels, shipped)["accuracy"] >= 0.98
    agree = (shipped(images).argmax(1) == mnist_classifier(images).argmax(1)).float().mean().item()
    assert agree >= 0.97


def test_default_classifier_is_the_shipped_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MASKDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(mc, "train_mnist_classifier", lambda **_: pytest.fail("trained instead of loading"))
    model = get_mnist_classifier()
    shipped = load_mnist_classifier(SHIPPED_WEIGHTS)
    for name, tensor in shipped.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert not list(tmp_path.iterdir())  # nothing trained or cached


def test_missing_shipped_file_falls_back_to_training(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(mc, "SHIPPED_WEIGHTS", tmp_path / "gone" / SHIPPED_WEIGHTS.name)
    monkeypatch.setenv("MASKDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mc, "train_mnist_classifier", lambda **_: MnistClassifier().eval())
    get_mnist_classifier(progress=False)
    assert (tmp_path / "cache" / SHIPPED_WEIGHTS.name).is_file()


def test_weights_of_another_version_are_refused(tmp_path, monkeypatch) -> None:
    path = tmp_path / "old.safetensors"
    monkeypatch.setattr(mc, "CLASSIFIER_VERSION", CLASSIFIER_VERSION + 1)
    save_mnist_classifier(MnistClassifier(), path)
    monkeypatch.setattr(mc, "CLASSIFIER_VERSION", CLASSIFIER_VERSION)
    with pytest.raises(ValueError, match="version"):
        load_mnist_classifier(path)


def test_classifier_cli_writes_loadable_weights(tmp_path, monkeypatch, capsys) -> None:
    import maskdit_fast.eval.__main__ as cli

    monkeypatch.setattr(cli, "train_mnist_classifier", lambda: MnistClassifier().eval())
    main(["mnist-classifier", str(tmp_path / "c.safetensors")])
    assert "held-out accuracy" in capsys.readouterr().out
    load_mnist_classifier(tmp_path / "c.safetensors")


def test_random_shift_translates_without_losing_ink() -> None:
    images = mnist_split("heldout")[0][:64]
    generator = torch.Generator().manual_seed(0)
    shifted = random_shift(images, 2, generator)
    assert shifted.shape == images.shape
    # every digit keeps >= 2 blank pixels at each border, so a 2-pixel shift keeps all of its ink
    torch.testing.assert_close((shifted + 1).sum(dim=(1, 2, 3)), (images + 1).sum(dim=(1, 2, 3)))
    assert not torch.equal(shifted, images)
    torch.testing.assert_close(random_shift(images, 0, generator), images, rtol=0, atol=0)


def test_mnist_cli(tmp_path, monkeypatch, capsys, mnist_cache, mnist_classifier) -> None:
    monkeypatch.setenv("MASKDIT_CACHE", str(mnist_cache))
    reference = tmp_path / "heldout.npz"
    main(["mnist-ref", str(reference)])
    with np.load(reference) as data:
        assert data["arr_0"].shape == (1000, 32, 32, 1) and data["arr_0"].dtype == np.uint8
        digits, labels = data["arr_0"], data["labels"]
    capsys.readouterr()

    main(["mnist", str(reference)])  # labels from the npz
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(lines["accuracy"]) >= 0.98 and float(lines["frechet"]) == 0.0 and lines["n"] == "1000"

    sevens = tmp_path / "sevens.npz"
    np.savez(sevens, arr_0=digits[labels == 7])  # unlabelled file, class given on the command line
    main(["mnist", str(sevens), "--labels", "7"])
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(lines["accuracy"]) >= 0.95 and float(lines["frechet"]) > 0
