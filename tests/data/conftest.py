"""Fixtures of the data tests: a tiny random AutoencoderKL and a tiny image folder."""
import pytest

from tests.data.helpers import make_image_folder


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A randomly initialised AutoencoderKL with the SD VAE's 8x downsampling and 4 latent channels
    (8 channels wide), saved as a local folder: no download."""
    pytest.importorskip("diffusers", reason="the VAE needs diffusers: pip install -e '.[vae]'")
    from maskdit_fast.data.vae import random_vae
    return random_vae("tiny", tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """12 images in 3 classes, plus one broken file in n02."""
    root = make_image_folder(tmp_path_factory.mktemp("images"))
    (root / "n02" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root
