"""Image preprocessing as Hugging Face's `SiglipImageProcessor` does it (SPEC §2.1).

Resize to size x size with PIL bicubic (no aspect-ratio keeping, no crop), scale by 1/255, normalise with
mean = std = 0.5, so pixels land in [-1, 1]; NHWC float32 for Flax. The resize is PIL's on uint8, not
`jax.image.resize` (which antialiases differently), so that real checkpoints see the pixels they were
trained on.
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


def preprocess_image(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB PIL image or uint8[H, W, 3] -> float32[size, size, 3] in [-1, 1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected a uint8[H, W, 3] image, got {image.dtype}{list(image.shape)}")
        image = Image.fromarray(image)
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image, np.float32) * (1 / 255)
    return (pixels - 0.5) / 0.5
