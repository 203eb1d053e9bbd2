"""ADM centre crop and the image-folder listing."""
import numpy as np
import pytest
from PIL import Image

from maskdit_fast.data.images import center_crop_arr, list_image_folder


def random_image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_center_crop_matches_the_adm_steps_done_by_hand():
    image = random_image(1000, 700)
    # 700 >= 2*64: BOX-halve to 500x350, 250x175, then 125x87 (87 < 128 stops);
    # BICUBIC to short side 64: (round(125 * 64 / 87), 64) = (92, 64); crop x from (92 - 64) // 2 = 14.
    expected = image.resize((500, 350), Image.BOX).resize((250, 175), Image.BOX).resize((125, 87), Image.BOX)
    expected = np.array(expected.resize((92, 64), Image.BICUBIC))[:, 14:78]
    got = center_crop_arr(image, 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.uint8
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("size", [(40, 90), (64, 64), (33, 257)])
def test_center_crop_small_and_tall_images(size):
    image = random_image(*size)
    got = center_crop_arr(image, 32)
    assert got.shape == (32, 32, 3)
    if size == (64, 64):  # exactly 2x: one BOX halving, no resize needed after it
        assert np.array_equal(got, np.array(image.resize((32, 32), Image.BOX)))


def test_list_image_folder_sorts_classes_and_files(tmp_path):
    for cls, names in {"b": ["2.png", "1.JPG"], "a": ["x.jpeg"], "c": []}.items():
        (tmp_path / cls).mkdir()
        for name in names:
            (tmp_path / cls / name).write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("")
    (tmp_path / "loose.png").write_bytes(b"")
    classes, items = list_image_folder(tmp_path)
    assert classes == ["a", "b", "c"]
    assert items == [("a/x.jpeg", 0), ("b/1.JPG", 1), ("b/2.png", 1)]
    with pytest.raises(ValueError, match="no class folders"):
        list_image_folder(tmp_path / "c")
