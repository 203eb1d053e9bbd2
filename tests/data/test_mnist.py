import hashlib
from importlib import resources

import torch

from maskdit_fast.data import EpochBatches, load_mnist, load_mnist_uint8
from maskdit_fast.data.mnist import MNIST_SHA256


def test_bundled_file_is_the_documented_one():
    data = resources.files("maskdit_fast.data").joinpath("mnist10k.npz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == MNIST_SHA256


def test_training_view_is_padded_and_scaled():
    raw, raw_labels = load_mnist_uint8()
    images, labels = load_mnist()
    assert images.shape == (10000, 1, 32, 32) and labels.shape == (10000,)
    assert images.min() == -1 and images.max() == 1
    assert torch.all(images[:, :, :2] == -1) and torch.all(images[:, :, :, -2:] == -1)
    assert torch.equal(((images[:, 0, 2:30, 2:30] + 1) * 127.5).round().byte(), torch.from_numpy(raw))
    assert set(labels.tolist()) == set(range(10)) and torch.equal(labels, torch.from_numpy(raw_labels).long())


def test_each_epoch_is_a_permutation_and_epochs_differ():
    batches = EpochBatches(size=50, batch_size=8, seed=3)
    assert batches.batches_per_epoch == 6
    epoch0 = torch.cat([batches(s) for s in range(6)])
    epoch1 = torch.cat([batches(s) for s in range(6, 12)])
    assert len(set(epoch0.tolist())) == 48 and len(set(epoch1.tolist())) == 48
    assert not torch.equal(epoch0, epoch1)


def test_batch_depends_only_on_seed_and_step():
    a, b = EpochBatches(100, 10, seed=1), EpochBatches(100, 10, seed=1)
    assert torch.equal(a(37), b(37))
    [a(s) for s in range(30)]
    assert torch.equal(a(13), EpochBatches(100, 10, seed=1)(13))
    assert not torch.equal(a(13), EpochBatches(100, 10, seed=2)(13))
