"""agent.filters: OpenCV's kernels with scipy.ndimage's conventions (the same maps, faster)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

from agent.filters import gaussian_blur, maximum_filter


@pytest.mark.parametrize("sigma", [0.25, 0.375, 1.0, 1.5, 3.0, 16.0, 40.0])
def test_gaussian_blur_is_scipys_gaussian_filter(sigma):
    rng = np.random.default_rng(0)
    image = (rng.random((256, 200)) * (rng.random((256, 200)) > 0.5)).astype(np.float32)  # sparse, like a masked map
    expected = scipy.ndimage.gaussian_filter(image.astype(np.float64), sigma)
    got = gaussian_blur(image, sigma)
    assert got.dtype == np.float32 and got.shape == image.shape
    np.testing.assert_allclose(got, expected, atol=2e-6 * np.abs(expected).max())


def test_gaussian_blur_takes_channels_together_and_wide_kernels_fall_back_to_scipy():
    rng = np.random.default_rng(1)
    stack = rng.random((64, 48, 5)).astype(np.float32)
    got = gaussian_blur(stack, 2.0)
    for c in range(5):
        np.testing.assert_allclose(got[..., c], scipy.ndimage.gaussian_filter(stack[..., c].astype(np.float64), 2.0), atol=2e-6)
    one = gaussian_blur(stack[..., :1], 2.0)  # a trailing axis of one channel stays
    assert one.shape == (64, 48, 1)
    # a kernel wider than the image: scipy reflects again and again, OpenCV once, so scipy computes it
    small = rng.random((20, 30)).astype(np.float32)
    np.testing.assert_allclose(gaussian_blur(small, 8.0), scipy.ndimage.gaussian_filter(small, 8.0), atol=1e-6)
    np.testing.assert_array_equal(gaussian_blur(small, 0.0), small)


def test_maximum_filter_is_scipys_including_the_border():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(40, 33)).astype(np.float32)  # negative values: a constant-zero border would show
    for size in (3, 5):
        np.testing.assert_array_equal(maximum_filter(image, size), scipy.ndimage.maximum_filter(image, size=size))
    with pytest.raises(ValueError, match="odd"):
        maximum_filter(image, 4)
