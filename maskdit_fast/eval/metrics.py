"""Sample-quality metrics of ADM's evaluation suite: FID, sFID, Inception Score, precision/recall.

The pipeline is uint8 images -> feature extractor -> statistics -> metrics, and the extractor is
pluggable (`FeatureExtractor`): the real one is `InceptionV3`, tests inject a tiny random network.
Every number follows ADM's evaluator (openai/guided-diffusion `evaluations/evaluator.py`):

- FID: Fréchet distance of the 2048-d pool features ("pool_3").
- sFID: Fréchet distance of spatial features: the first 7 channels of the 17x17 "mixed_6/conv"
  map, flattened in (H, W, C) order (2023-d).
- Inception Score: from softmax(pool features @ W) (the logits *without* the bias), over splits
  of 5000 samples, averaged.
- Precision/recall: k-NN manifolds with k = 3 (Kynkäänniemi et al. 2019) on the pool features,
  squared Euclidean distances; precision = fraction of samples inside the reference manifold,
  recall = fraction of reference images inside the sample manifold.

Reference inputs: an ADM reference batch (`.npz` with `arr_0` uint8 (N, H, W, C) images and/or
precomputed `mu`, `sigma`, `mu_s`, `sigma_s`), or a statistics file written by `save_stats`
(`python -m maskdit_fast.eval stats`), which adds the name of the extractor that made it and the
reference pool features needed for precision/recall. Statistics are only ever compared with
features of the same extractor; files without a name (ADM's) are taken to be ADM's Inception.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from maskdit_fast.errors import UserError
from maskdit_fast.eval.frechet import feature_statistics, frechet_distance
from maskdit_fast.eval.images import ImageBatch, load_npz_images, to_uint8_nhwc

ADM_INCEPTION = "inception-v3-tf-2015-12-05"  # the network of ADM's evaluator and of FID in general
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_ENV = "MASKDIT_INCEPTION_WEIGHTS"


class FeatureExtractor(Protocol):
    """Maps a batch of images to features; the metrics pipeline only ever talks to this.

    `__call__` takes uint8 images (B, 3, H, W) in [0, 255] on the CPU (the extractor moves them to
    its own device and resizes them as it needs) and returns float tensors (on any device):
    "pool" (B, F), always; "spatial" (B, S) for sFID and "logits" (B, C) for the Inception Score,
    when the extractor has them. `name` identifies the network in statistics files.
    """

    name: str

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


class FeatureExtractorUnavailable(UserError):
    """The feature extractor's code or weights cannot be loaded; the message says how to fix it."""


class InceptionV3(nn.Module):
    """ADM's Inception-v3 (TF graph 2015-12-05) through torch-fidelity's PyTorch port.

    Why torch-fidelity: it is a maintained library whose `FeatureExtractorInceptionV3` is a
    weight-for-weight conversion of the TensorFlow graph that FID, IS and ADM's evaluator use, with
    TensorFlow-1.x-compatible bilinear resizing to 299x299, so its features match the TF evaluator
    closely (unlike torchvision's ImageNet Inception, whose weights differ). Its package imports
    torchvision at import time, so both must be installed (`pip install torch-fidelity torchvision`).

    Weights: `weights` (a local `.pth` path), else `$MASKDIT_INCEPTION_WEIGHTS`, else torch-fidelity
    downloads them into the torch hub cache. Nothing falls back silently: a missing file or a failed
    download raises `FeatureExtractorUnavailable` saying where to get the file and how to pass it.

    Args:
        weights: path of `weights-inception-2015-12-05-6726825d.pth`, or None (see above).
        device: where the network runs.
    """

    name = ADM_INCEPTION

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        super().__init__()
        weights = weights or os.environ.get(INCEPTION_WEIGHTS_ENV) or None
        how_to = (
            f"Download {INCEPTION_WEIGHTS_URL} on a machine with internet access and pass the file "
            f"with --inception-weights PATH (Python: InceptionV3(weights=PATH)) or set ${INCEPTION_WEIGHTS_ENV}."
        )
        if weights is not None and not Path(weights).is_file():
            raise FeatureExtractorUnavailable(f"Inception weights not found at {weights}. {how_to}")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as error:
            raise FeatureExtractorUnavailable(
                f"The Inception feature extractor needs torch-fidelity, which imports torchvision "
                f"(pip install torch-fidelity torchvision): {error}"
            ) from error
        try:
            self.net = FeatureExtractorInceptionV3(
                ADM_INCEPTION, ["2048", "logits_unbiased"], feature_extractor_weights_path=weights
            )
        except (OSError, RuntimeError) as error:  # failed download (URLError is an OSError) or bad file
            raise FeatureExtractorUnavailable(f"Could not load the Inception weights ({error}). {how_to}") from error
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)  # ADM's "mixed_6/conv"
        self.to(device)

    def _keep_spatial(self, module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        self._spatial = output[:, :7].permute(0, 2, 3, 1).flatten(1)  # (B, 17*17*7) in ADM's NHWC order

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (B, 3, H, W) -> pool (B, 2048), spatial (B, 2023), logits (B, 1008)."""
        device = next(self.net.parameters()).device
        pool, logits = self.net(images.to(device))
        return {"pool": pool, "spatial": self._spatial, "logits": logits}


@dataclass
class ReferenceStats:
    """What the metrics need to know about the reference set.

    Attributes:
        extractor: name of the feature extractor the statistics come from.
        mu, sigma: (F,), (F, F) statistics of the pool features (FID).
        mu_s, sigma_s: (S,), (S, S) statistics of the spatial features (sFID), if known.
        pool: (M, F) pool features of the reference images (precision/recall), if known.
    """

    extractor: str
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None


@torch.no_grad()
def extract_features(
    images: ImageBatch, extractor: FeatureExtractor, batch_size: int = 250, progress: bool = True
) -> dict[str, np.ndarray]:
    """Run the extractor over a set of images in batches.

    Args:
        images: uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1]; C = 1 (repeated to RGB) or 3.

    Returns:
        float32 arrays keyed like the extractor's output: "pool" (N, F) and possibly
        "spatial" (N, S) and "logits" (N, C).
    """
    images = to_uint8_nhwc(images)
    outputs: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(images), batch_size), desc=f"{extractor.name} features", disable=not progress):
        batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        batch = batch.expand(-1, 3, -1, -1).contiguous()  # grey -> RGB; no-op for RGB
        for key, value in extractor(batch).items():
            outputs.setdefault(key, []).append(value.float().cpu().numpy())
    if "pool" not in outputs:
        raise ValueError(f"feature extractor {extractor.name} returned no 'pool' features")
    return {key: np.concatenate(chunks) for key, chunks in outputs.items()}


def stats_from_features(features: dict[str, np.ndarray], extractor_name: str) -> ReferenceStats:
    """Reference statistics of features from `extract_features` (the pool features are kept)."""
    mu, sigma = feature_statistics(features["pool"])
    mu_s, sigma_s = feature_statistics(features["spatial"]) if "spatial" in features else (None, None)
    return ReferenceStats(extractor_name, mu, sigma, mu_s, sigma_s, pool=features["pool"])


def save_stats(stats: ReferenceStats, path: str | Path) -> None:
    """Write statistics as an `.npz` with ADM's keys (mu, sigma, mu_s, sigma_s) plus extractor and pool."""
    arrays = {key: value for key, value in vars(stats).items() if value is not None and key != "extractor"}
    np.savez(path, extractor=np.array(stats.extractor), **arrays)


def load_reference(
    path: str | Path, extractor: FeatureExtractor, batch_size: int = 250, progress: bool = True
) -> ReferenceStats:
    """Read reference statistics from a stats file or an ADM reference batch.

    Precomputed statistics are used when they come from `extractor` (files without an `extractor`
    key are ADM's and count as `ADM_INCEPTION`), as ADM's evaluator does; otherwise, and for the
    pool features that precision/recall need, the images under `arr_0` go through `extractor`.
    """
    with np.load(path) as data:
        source = str(data["extractor"]) if "extractor" in data else ADM_INCEPTION
        has_images = "arr_0" in data
        stored = {}
        if source == extractor.name:
            stored = {key: data[key] for key in ("mu", "sigma", "mu_s", "sigma_s", "pool") if key in data}
    if "mu" in stored:
        pool = stored.get("pool")
        if pool is None and has_images:
            pool = extract_features(load_npz_images(path), extractor, batch_size, progress)["pool"]
        return ReferenceStats(source, stored["mu"], stored["sigma"], stored.get("mu_s"), stored.get("sigma_s"), pool)
    if has_images:
        features = extract_features(load_npz_images(path), extractor, batch_size, progress)
        return stats_from_features(features, extractor.name)
    raise ValueError(
        f"{path} holds statistics of feature extractor {source!r} and no images, so it cannot be "
        f"compared with features of {extractor.name!r}"
    )


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of logits (N, C), averaged over splits as in ADM."""
    log_probs = torch.log_softmax(torch.from_numpy(np.asarray(logits, np.float64)), dim=1)
    scores = []
    for chunk in log_probs.split(split_size):
        log_marginal = torch.logsumexp(chunk, dim=0) - np.log(len(chunk))
        kl = (chunk.exp() * (chunk - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def manifold_precision_recall(
    reference: np.ndarray, samples: np.ndarray, k: int = 3, device: str | torch.device | None = None
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of samples against a reference set.

    Each set's manifold is the union of balls around its points, of radius the distance to the
    point's k-th nearest neighbour within the set.

    Args:
        reference: (M, F) reference features, M > k.
        samples: (N, F) sample features, N > k.
        k: neighbourhood size (ADM: 3).
        device: where the distances are computed (default: CUDA if available).

    Returns:
        precision (fraction of samples in the reference manifold) and recall (fraction of the
        reference in the sample manifold).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reference_t = torch.as_tensor(reference, dtype=torch.float32, device=device)
    samples_t = torch.as_tensor(samples, dtype=torch.float32, device=device)
    reference_radii = _knn_radii(reference_t, k)
    sample_radii = _knn_radii(samples_t, k)
    precision = _inside_manifold(samples_t, reference_t, reference_radii).float().mean().item()
    recall = _inside_manifold(reference_t, samples_t, sample_radii).float().mean().item()
    return precision, recall


_BLOCK_ELEMENTS = 2**26  # entries of one block of the distance matrix (256 MiB in float32)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) between rows of a (A, F) and b (B, F)."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min(0)


def _knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance (N,) of each point to its k-th nearest other point of points (N, F)."""
    if len(points) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points, got {len(points)}")
    rows = max(1, _BLOCK_ELEMENTS // len(points))
    # The point itself is among the distances (at 0), hence the (k+1)-th smallest.
    return torch.cat([_squared_distances(block, points).kthvalue(k + 1, dim=1).values for block in points.split(rows)])


def _inside_manifold(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Bool (Q,): whether each query (Q, F) lies within radii (N,) of at least one of points (N, F)."""
    rows = max(1, _BLOCK_ELEMENTS // len(points))
    return torch.cat([(_squared_distances(block, points) <= radii).any(dim=1) for block in queries.split(rows)])


def compute_metrics(
    samples: ImageBatch,
    reference: ReferenceStats,
    extractor: FeatureExtractor,
    batch_size: int = 250,
    progress: bool = True,
) -> dict[str, float]:
    """FID, sFID, Inception Score and precision/recall of samples against a reference.

    Args:
        samples: uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1].
        reference: from `load_reference` or `stats_from_features`, made with the same extractor.

    Returns:
        {"inception_score", "fid", "sfid", "precision", "recall"}, each present only when the
        extractor and the reference provide what it needs (FID always).
    """
    if reference.extractor != extractor.name:
        raise ValueError(f"reference statistics come from {reference.extractor!r}, not {extractor.name!r}")
    features = extract_features(samples, extractor, batch_size, progress)
    results = {}
    if "logits" in features:
        results["inception_score"] = inception_score(features["logits"])
    results["fid"] = frechet_distance(*feature_statistics(features["pool"]), reference.mu, reference.sigma)
    if "spatial" in features and reference.mu_s is not None:
        results["sfid"] = frechet_distance(*feature_statistics(features["spatial"]), reference.mu_s, reference.sigma_s)
    if reference.pool is not None:
        results["precision"], results["recall"] = manifold_precision_recall(reference.pool, features["pool"])
    return results


def evaluate_npz(
    samples_path: str | Path,
    reference_path: str | Path,
    extractor: FeatureExtractor,
    batch_size: int = 250,
    progress: bool = True,
) -> dict[str, float]:
    """`compute_metrics` for an ADM sample batch (`arr_0`) against a reference `.npz` (see module doc)."""
    reference = load_reference(reference_path, extractor, batch_size, progress)
    return compute_metrics(load_npz_images(samples_path), reference, extractor, batch_size, progress)


def write_reference_stats(
    images_path: str | Path,
    out_path: str | Path,
    extractor: FeatureExtractor,
    batch_size: int = 250,
    progress: bool = True,
) -> ReferenceStats:
    """Compute statistics of the images under `arr_0` of `images_path` and save them to `out_path`."""
    features = extract_features(load_npz_images(images_path), extractor, batch_size, progress)
    stats = stats_from_features(features, extractor.name)
    save_stats(stats, out_path)
    return stats
