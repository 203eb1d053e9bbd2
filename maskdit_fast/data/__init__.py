"""Datasets: the bundled MNIST default (ImageNet latents come with the data issue)."""
from .mnist import load_mnist, load_mnist_uint8
from .sampler import EpochBatches

__all__ = ["EpochBatches", "load_mnist", "load_mnist_uint8"]
