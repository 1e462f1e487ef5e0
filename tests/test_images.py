"""images: the torch-free preprocessing gives the pixels of data.eval_transform()."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data import imagefolder as data, images
from pipeline.config import PREPROCESS


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (256, 256), (257, 999), (1001, 257), (40, 32), (3000, 2000)])
def test_eval_array_equals_the_torchvision_eval_transform(size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    mean = np.array(PREPROCESS["mean"], np.float32)[:, None, None]
    std = np.array(PREPROCESS["std"], np.float32)[:, None, None]
    ours = (images.eval_array(image, PREPROCESS["resize"], PREPROCESS["crop"], PREPROCESS["interpolation"]) - mean) / std
    theirs = data.eval_transform()(image).numpy()
    assert ours.shape == theirs.shape == (3, PREPROCESS["crop"], PREPROCESS["crop"])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_eval_array_refuses_a_crop_larger_than_the_resize():
    with pytest.raises(ValueError, match="crop"):
        images.eval_array(Image.new("RGB", (50, 50)), 32, 40)
