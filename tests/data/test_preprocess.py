"""Image preprocessing parity with transformers' SiglipImageProcessor, and image decoding errors."""

import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from qtl_jax.data.preprocess import load_image, preprocess_image, resize_image
from qtl_jax.data.templates import BadSample


@pytest.mark.parametrize("shape", [(100, 150, 3), (384, 384, 3), (500, 300, 3), (17, 23, 3)])
def test_matches_siglip_image_processor(shape):
    image = Image.fromarray(np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8))
    processor = SiglipImageProcessorPil(size={"height": 384, "width": 384})
    theirs = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = preprocess_image(image, 384)
    assert ours.shape == (384, 384, 3) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-6


@pytest.mark.parametrize("shape", [(100, 150, 3), (48, 48, 3), (17, 23, 3)])
def test_resized_pixels_are_the_processors_before_rescaling(shape):
    # What the pipeline sends to the device: the processor's own resize (PIL on uint8), nothing rounded away.
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    processor = SiglipImageProcessorPil(size={"height": 48, "width": 48}, do_rescale=False, do_normalize=False)
    theirs = processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = resize_image(image, 48)
    assert ours.shape == (48, 48, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(preprocess_image(image, 48), (ours.astype(np.float32) * (1 / 255) - 0.5) / 0.5)


def test_load_image_errors_name_the_sample(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, format="PNG")  # grey: converted to RGB
    assert np.asarray(load_image(buffer.getvalue())).shape == (4, 4, 3)
    with pytest.raises(BadSample, match="sample s1: cannot decode image bytes"):
        load_image(b"not an image", "s1")
    with pytest.raises(BadSample, match=r"sample s2: image file .*missing\.png.* does not exist"):
        load_image(str(tmp_path / "missing.png"), "s2")
    with pytest.raises(ValueError, match=r"expected a uint8\[H, W, 3\] image"):
        preprocess_image(np.zeros((4, 4), np.float32), 8)
    with pytest.raises(ValueError, match=r"expected a uint8\[H, W, 3\] image"):
        resize_image(np.zeros((4, 4, 3), np.float32), 8)
