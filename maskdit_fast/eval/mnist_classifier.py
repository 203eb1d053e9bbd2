"""A small MNIST digit classifier and the metrics it gives for generated digits.

Inception features mean little for 32x32 grey digits, so MNIST runs are judged by a network that
knows digits: a 3-block CNN trained on the first 9000 bundled digits, with the last 1000 held out.
`mnist_metrics` reports how often samples are classified as the class they were generated for
(`accuracy`) and the Fréchet distance between the classifier's penultimate (128-d) features of the
samples and of the 1000 held-out real digits (`frechet`, an "FID" for MNIST; lower is better, 0
for the held-out set itself; like FID it is biased upwards for small sample counts, so compare
values computed from the same number of samples).

Weights: shipped with the package (`mnist_classifier_v{CLASSIFIER_VERSION}.safetensors` next to this
file, 0.6 MB), so every machine scores samples with the same network and Fréchet values compare
across machines, and the first MNIST run does not spend a minute training it. They are exactly what
`train_mnist_classifier()` gave on a 2-vCPU AMD EPYC with torch 2.13.0+cpu, written by
`python -m maskdit_fast.eval mnist-classifier OUT`; tests check that they load strictly into this
architecture, carry `CLASSIFIER_VERSION`, score >= 98% on the held-out digits and agree with a
freshly trained classifier. Bump the version (and re-ship) whenever the architecture or the training
recipe changes. `get_mnist_classifier(cache_dir)` instead trains the classifier on this machine once
and caches it in `cache_dir` under the versioned name. Training is seeded, single-threaded and takes
about half a minute on one core; it is deterministic on one kind of CPU with one torch build, while
other CPUs (other SIMD kernels) or torch versions may give slightly different weights.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from maskdit_fast.eval.frechet import feature_statistics, frechet_distance
from maskdit_fast.eval.images import ImageBatch, to_float_nchw

CLASSIFIER_VERSION = 1
NUM_TRAIN = 9000  # the first 9000 bundled digits train the classifier, the last 1000 are held out
FEATURE_DIM = 128
_MNIST_PATH = Path(__file__).resolve().parents[1] / "data" / "mnist10k.npz"
SHIPPED_WEIGHTS = Path(__file__).resolve().with_name(f"mnist_classifier_v{CLASSIFIER_VERSION}.safetensors")


class MnistClassifier(nn.Module):
    """CNN for (N, 1, 32, 32) digits in [-1, 1]: 3 x (conv3x3 + BN + ReLU + maxpool), then 1024 -> 128 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        blocks = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64)):  # 32x32 -> 16x16 -> 8x8 -> 4x4
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(
            *blocks, nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU()
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 128) of images x (N, 1, 32, 32) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10) of images x (N, 1, 32, 32) in [-1, 1]."""
        return self.head(self.body(x))


def mnist_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundled digits as the diffusion models see them: padded to 32x32, scaled to [-1, 1].

    Args:
        split: "train" (the first 9000 digits) or "heldout" (the last 1000).

    Returns:
        images (N, 1, 32, 32) float32 in [-1, 1] and labels (N,) int64.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    with np.load(_MNIST_PATH) as data:
        images, labels = data["images"], data["labels"]
    rows = slice(0, NUM_TRAIN) if split == "train" else slice(NUM_TRAIN, None)
    padded = np.pad(images[rows], ((0, 0), (2, 2), (2, 2)))
    return to_float_nchw(padded[..., None]), torch.from_numpy(labels[rows]).long()


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of x (N, 1, H, W) by its own random offset in [-max_shift, max_shift]^2.

    Pixels shifted in from outside are background (-1). Returns a new (N, 1, H, W) tensor.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train_mnist_classifier(
    seed: int = 0,
    epochs: int = 6,
    batch_size: int = 64,
    max_lr: float = 3e-3,
    max_shift: int = 2,  # random translation (pixels) so that off-centre generated digits are recognised
    progress: bool = True,
) -> MnistClassifier:
    """Train a `MnistClassifier` on the 9000 training digits (AdamW, one-cycle LR, random shifts).

    Seeded and single-threaded, hence deterministic whatever the core count (small convolutions gain
    little from threads, and lose a lot on a busy machine); the global RNG state and thread count are
    restored afterwards. Returns the model in eval mode with gradients disabled, on the CPU.
    Held-out accuracy is about 98.5-99%.
    """
    images, labels = mnist_split("train")
    steps_per_epoch = len(images) // batch_size
    with torch.random.fork_rng(), _single_threaded():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = MnistClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=max_lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr, total_steps=epochs * steps_per_epoch)
        model.train()
        bar = tqdm(total=epochs * steps_per_epoch, desc="training MNIST classifier", disable=not progress)
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator)
            for step in range(steps_per_epoch):
                batch = order[step * batch_size : (step + 1) * batch_size]
                logits = model(random_shift(images[batch], max_shift, generator))
                loss = F.cross_entropy(logits, labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    return model.eval().requires_grad_(False)


@contextmanager
def _single_threaded() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_cache_dir() -> Path:
    """`$MASKDIT_CACHE` if set, else `~/.cache/maskdit_fast`."""
    return Path(os.environ.get("MASKDIT_CACHE") or Path.home() / ".cache" / "maskdit_fast")


def get_mnist_classifier(
    cache_dir: str | Path | None = None, device: str | torch.device = "cpu", progress: bool = True
) -> MnistClassifier:
    """The package's MNIST classifier.

    Args:
        cache_dir: None (default): the weights shipped with the package (`SHIPPED_WEIGHTS`); when that
            file is missing (a stripped install), weights trained here once and cached in
            `default_cache_dir()`. A folder: weights trained on this machine (about half a minute) and
            cached there as `mnist_classifier_v{CLASSIFIER_VERSION}.safetensors`, reused next time.
        device: where the returned model lives; `mnist_metrics` runs it there.
        progress: show a progress bar while training.

    Returns:
        A `MnistClassifier` in eval mode with gradients disabled.
    """
    if cache_dir is None and SHIPPED_WEIGHTS.exists():
        return load_mnist_classifier(SHIPPED_WEIGHTS).to(device)
    path = Path(cache_dir or default_cache_dir()) / SHIPPED_WEIGHTS.name
    if path.exists():
        return load_mnist_classifier(path).to(device)
    model = train_mnist_classifier(progress=progress)
    save_mnist_classifier(model, path)
    return model.to(device)


def load_mnist_classifier(path: str | Path) -> MnistClassifier:
    """Weights written by `save_mnist_classifier` (strict: they must fit this architecture and version)."""
    with safe_open(str(path), framework="pt") as f:  # one read: the version tag and the tensors
        version = (f.metadata() or {}).get("version")
        if version != str(CLASSIFIER_VERSION):
            raise ValueError(f"{path}: MNIST classifier weights of version {version}, this code is version "
                             f"{CLASSIFIER_VERSION}; delete the file to train matching ones")
        state = {name: f.get_tensor(name) for name in f.keys()}
    model = MnistClassifier()
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def save_mnist_classifier(model: MnistClassifier, path: str | Path) -> None:
    """Write the weights atomically (concurrent users never see half a file), tagged with the version."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(model.state_dict(), tmp, metadata={"version": str(CLASSIFIER_VERSION)})
    os.replace(tmp, path)


@torch.no_grad()
def classify(
    classifier: MnistClassifier, images: ImageBatch, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the classifier on the classifier's device, in batches.

    Args:
        images: float (N, 1, 32, 32) in [-1, 1], or uint8 (N, 32, 32, 1).

    Returns:
        logits (N, 10) and penultimate features (N, 128), float32 on the CPU.
    """
    x = to_float_nchw(images)
    if tuple(x.shape[1:]) != (1, 32, 32):
        raise ValueError(f"expected (N, 1, 32, 32) digits (or uint8 (N, 32, 32, 1)), got {tuple(x.shape)}")
    device = next(classifier.parameters()).device
    logits, features = [], []
    for start in range(0, len(x), batch_size):
        feats = classifier.features(x[start : start + batch_size].to(device))
        features.append(feats.cpu())
        logits.append(classifier.head(feats).cpu())
    return torch.cat(logits), torch.cat(features)


def mnist_metrics(
    images: ImageBatch,
    labels: torch.Tensor | np.ndarray | None = None,
    classifier: MnistClassifier | None = None,
) -> dict[str, float | int | None]:
    """Classifier accuracy and Fréchet distance of generated digits.

    Args:
        images: float (N, 1, 32, 32) in [-1, 1], or uint8 (N, 32, 32, 1) (ADM layout); N >= 2.
        labels: (N,) the classes the images were generated for; None for unconditional samples.
        classifier: from `get_mnist_classifier()`; loaded (or trained) when None. Pass one to
            avoid reloading it on every call.

    Returns:
        dict(accuracy=fraction classified as their label (None without labels),
             frechet=Fréchet distance of penultimate features to the 1000 held-out digits,
             n=N).
    """
    classifier = classifier if classifier is not None else get_mnist_classifier()
    logits, features = classify(classifier, images)
    accuracy = None
    if labels is not None:
        labels = labels.cpu() if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels))
        labels = labels.long().reshape(-1)
        if labels.shape != (len(logits),):
            raise ValueError(f"expected {len(logits)} labels, got {tuple(labels.shape)}")
        accuracy = (logits.argmax(dim=1) == labels).double().mean().item()
    _, reference_features = classify(classifier, mnist_split("heldout")[0])
    frechet = frechet_distance(
        *feature_statistics(features.double().numpy()), *feature_statistics(reference_features.double().numpy())
    )
    return {"accuracy": accuracy, "frechet": frechet, "n": len(logits)}
