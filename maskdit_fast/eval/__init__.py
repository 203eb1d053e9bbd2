"""Evaluation of generated samples.

- `frechet`: numerically stable Fréchet distance and feature statistics.
- `metrics`: FID, sFID, Inception Score, precision/recall (ADM protocol, pluggable feature extractor).
- `mnist_classifier`: a small digit classifier and the MNIST accuracy / Fréchet metrics.
- `images`: the uint8 NHWC <-> float NCHW [-1, 1] sample layouts.
- `python -m maskdit_fast.eval`: the command line over all of these.
"""

from maskdit_fast.eval.frechet import feature_statistics, frechet_distance
from maskdit_fast.eval.metrics import InceptionV3, compute_metrics, evaluate_npz, load_reference
from maskdit_fast.eval.mnist_classifier import get_mnist_classifier, mnist_metrics

__all__ = [
    "InceptionV3",
    "compute_metrics",
    "evaluate_npz",
    "feature_statistics",
    "frechet_distance",
    "get_mnist_classifier",
    "load_reference",
    "mnist_metrics",
]
