"""Image preprocessing: exact percentiles, normalisation, channels and layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training_backend.learning.data import HIGH_PCT, LOW_PCT, percentiles, preprocess_image


@pytest.mark.parametrize("dtype,top", [(np.uint8, 256), (np.uint16, 65536), (np.float32, 1)])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (40, 30, 3)])
def test_percentiles_match_numpy(dtype, top, shape):
    rng = np.random.default_rng(3)
    values = (rng.random(shape) * top).astype(dtype)
    for qs in ((LOW_PCT, HIGH_PCT), (0.0, 100.0), (37.3,)):
        assert np.allclose(percentiles(values, qs), np.percentile(values, qs), rtol=1e-6, atol=1e-6)


def test_sampled_percentiles_see_every_channel_of_interleaved_rgb():
    # 640 x 640 x 3 float values: a plain stride would be 9, a multiple of 3 (one channel only)
    img = np.empty((640, 640, 3), np.float32)
    img[..., 0], img[..., 1], img[..., 2] = 0.0, 10.0, 20.0
    assert percentiles(img) == [0.0, 20.0]


def _reference(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, (LOW_PCT, HIGH_PCT))
    return (np.clip((img.astype(np.float64) - lo) / (hi - lo), 0, 1) - 0.5) / 0.25


def test_rgb_uint8_normalised_exactly_and_channels_last():
    img = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    x = preprocess_image(img, 3, (24, 20))
    assert x.shape == (3, 24, 20) and x.dtype == torch.float32
    assert x.permute(1, 2, 0).is_contiguous()  # pixel-interleaved, as stored: no transposing copy
    assert np.allclose(x.permute(1, 2, 0).numpy(), _reference(img), atol=1e-5)


def test_grey_to_rgb_and_rgb_to_grey():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
    x = preprocess_image(grey, 3, 16)
    assert x.shape == (3, 16, 16)
    assert np.allclose(x.numpy(), _reference(grey)[None].repeat(3, 0), atol=1e-5)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    y = preprocess_image(rgb, 1, 16)
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert y.shape == (1, 16, 16) and np.allclose(y[0].numpy(), _reference(luma), atol=1e-4)


def test_percentiles_of_the_stored_image_whatever_the_size():
    # noise shrinks when downsized (antialiasing averages it): percentiles of the resized image
    # would map the constant region to another value at each working size
    img = np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)
    img[:32, :32] = 200
    full, half = preprocess_image(img, 1, 64), preprocess_image(img, 1, 32)
    assert half.shape == (1, 32, 32)
    assert torch.allclose(full[0, 4, 4], half[0, 2, 2]) and float(full[0, 4, 4]) < 2.0


def test_constant_and_boolean_images():
    assert torch.count_nonzero(preprocess_image(np.full((8, 8), 7, np.uint8), 1, 8)) == 0
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    x = preprocess_image(mask, 1, 8)
    assert float(x.max()) == 2.0 and float(x.min()) == -2.0
