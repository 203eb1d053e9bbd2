"""Datasets: the bundled MNIST default, VAE latent shards and image folders encoded on the fly (docs/data.md)."""
from .latents import LatentFormatError, LatentShards
from .loader import build_loader
from .mnist import load_mnist, load_mnist_uint8
from .sampler import EpochBatches

__all__ = ["EpochBatches", "LatentFormatError", "LatentShards", "build_loader", "load_mnist", "load_mnist_uint8"]
