import pytest
import torch

from maskdit_fast.models.masking import mask_from_ids, num_kept, random_masking


@pytest.mark.parametrize("length,ratio,expected", [(256, 0.5, 128), (64, 0.25, 48), (64, 0.75, 16), (10, 0.0, 10), (7, 0.5, 3)])
def test_kept_count_is_floor(length, ratio, expected):
    assert num_kept(length, ratio) == expected
    assert random_masking(3, length, ratio).shape == (3, expected)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_out_of_range_is_an_error(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 16, ratio)


def test_ratio_keeping_nothing_is_an_error():
    with pytest.raises(ValueError, match="keeps no token"):
        num_kept(3, 0.9)


def test_ids_unique_in_range_and_differ_per_sample():
    ids = random_masking(16, 64, 0.5)
    assert ids.dtype == torch.int64
    for row in ids:
        assert len(set(row.tolist())) == row.numel()
        assert row.min() >= 0 and row.max() < 64
    assert len({tuple(sorted(r.tolist())) for r in ids}) > 1


def test_generator_makes_masks_deterministic():
    a = random_masking(4, 64, 0.5, generator=torch.Generator().manual_seed(7))
    b = random_masking(4, 64, 0.5, generator=torch.Generator().manual_seed(7))
    c = random_masking(4, 64, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_from_ids_marks_exactly_the_dropped_tokens():
    ids = random_masking(5, 20, 0.4)
    mask = mask_from_ids(ids, 20)
    assert mask.shape == (5, 20)
    assert torch.all(mask.sum(1) == 20 - ids.shape[1])
    assert torch.all(mask.gather(1, ids) == 0)
