"""Input validation shared by every compressor.

Each check raises `ValueError` naming the argument and what was expected. Value checks (finiteness) can only
run on concrete arrays: under `jax.jit` / `vmap` / `grad` the values are tracers, so those checks are skipped
and only the static checks (shapes, bit widths) apply.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS, MAX_BITS = 1, 8


def check_bits(bits: int, name: str = "bits") -> int:
    """Returns `bits` as an int; raises unless it is an integer in 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer):
        raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return int(bits)


def is_concrete(x) -> bool:
    """True when `x` holds values now (not a tracer inside jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def check_features(x, name: str = "x", min_ndim: int = 2) -> jax.Array:
    """Checks a float feature array `float[..., N, D]` and returns it as a JAX array.

    Raises `ValueError` for a non-floating dtype, fewer than `min_ndim` axes, or (when concrete) NaN/inf values.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        axes = "[..., N, D] (rows x features)" if min_ndim == 2 else f"at least {min_ndim} axes"
        raise ValueError(f"{name} must have shape {axes}, got shape {tuple(x.shape)} (rank {x.ndim})")
    if is_concrete(x) and not bool(jnp.isfinite(x).all()):
        bad = int((~jnp.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, found {bad} NaN/inf values in shape {tuple(x.shape)}")
    return x


def check_mask(mask, x: jax.Array, name: str = "mask") -> jax.Array | None:
    """Checks a row mask `bool[...]` equal to `x.shape[:-1]` (True = real row, False = padding)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"{name} must have shape x.shape[:-1] = {tuple(x.shape[:-1])} (one flag per row), "
            f"got {tuple(mask.shape)}"
        )
    return mask.astype(bool)


def check_indices(idx, name: str = "idx") -> jax.Array:
    """Checks an integer index array and returns it as a JAX array."""
    idx = jnp.asarray(idx)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {idx.dtype}")
    return idx
