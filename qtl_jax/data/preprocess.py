"""Image preprocessing as Hugging Face's `SiglipImageProcessor` does it (SPEC §2.1).

Resize to size x size with PIL bicubic (no aspect-ratio keeping, no crop), scale by 1/255, normalise with
mean = std = 0.5, so pixels land in [-1, 1]; NHWC for Flax. The resize is PIL's on uint8, not
`jax.image.resize` (which antialiases differently), so that real checkpoints see the pixels they were
trained on.

Two halves, because the resize needs PIL (host) and the rest is two flops a pixel: `resize_image` gives the
resized uint8 pixels, which the training pipeline batches and the vision tower normalises on the device
(`SiglipVisionTower` accepts uint8), so a batch crosses host -> device in a quarter of the float32 bytes;
`preprocess_image` does both on the host (float32 in [-1, 1]) for callers that want the normalised image.
The resized pixels are the same either way; the normalisation differs only by float32 rounding.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


def load_image(data: bytes | str, sample_id: str = "?") -> Image.Image:
    """Decodes image bytes or opens an image file as RGB; `BadSample` naming the sample when unreadable."""
    from qtl_jax.data.templates import BadSample

    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)
        image.load()
    except FileNotFoundError as e:
        raise BadSample(f"sample {sample_id}: image file {data!r} does not exist") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        where = "image bytes" if isinstance(data, bytes | bytearray) else f"image file {data!r}"
        raise BadSample(f"sample {sample_id}: cannot decode {where} ({e})") from e
    return image.convert("RGB")


def resize_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB PIL image or uint8[H, W, 3] -> uint8[size, size, 3]: SigLIP's resize, before any rescaling."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8[H, W, 3] image, got {image.dtype}{list(image.shape)}")
        image = Image.fromarray(image)
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.array(image, np.uint8)


def preprocess_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB PIL image or uint8[H, W, 3] -> float32[size, size, 3] in [-1, 1]: `resize_image`, then normalised."""
    pixels = resize_image(image, size).astype(np.float32) * (1 / 255)
    return (pixels - 0.5) / 0.5
