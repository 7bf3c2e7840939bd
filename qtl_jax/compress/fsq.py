"""FSQ as pure functions (SPEC §3.2): the paper's tanh baseline and the canonical FSQ of Mentzer et al.

**The paper's "FSQ" baseline** (`FSQ_old` in the reference code): `u = tanh(z)` followed by the same d = 2^b
level grid as RD-FSQ (`qtl_jax.compress.rd_fsq.quantize_levels`), no commitment loss:

    idx = fsq_tanh_quantize(z, bits)     uint8[..., D]      client
    q   = dequantize_levels(idx, bits)   float32[..., D]    server

**Canonical FSQ** (Mentzer et al. 2023, arXiv 2309.15505) with a per-channel list of levels L_c:

    half_l = (L - 1) (1 - eps) / 2,  offset = 0.5 if L even else 0,  shift = arctanh(offset / half_l)
    bound(z) = tanh(z + shift) * half_l - offset
    codes = round_ste(bound(z)) / (L // 2)

The published notebook computes `shift = tan(offset / half_l)`; its author confirmed `arctanh` is meant
(the difference is small near 0 but not zero), so we use `arctanh`. Codes map to one integer per vector by
the mixed radix `basis = cumprod([1, L_0, ..., L_{C-2}])` (`fsq_codes_to_indices`); the codebook is
implicit (`fsq_codebook` materialises it only on request). For transmission we send the per-channel digits
(`fsq_digits`), bit-packed at ceil(log2(max L)) bits, not the mixed-radix integer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.compress.checks import check_bits, check_features, check_indices
from qtl_jax.compress.rd_fsq import levels_ste, quantize_levels
from qtl_jax.compress.ste import round_ste

FSQ_EPS = 1e-3
MAX_CODEBOOK = 2**24  # refuse to materialise larger implicit codebooks


def fsq_tanh_encode(z: jax.Array) -> jax.Array:
    """The tanh bound of the paper's FSQ baseline: float[..., N, D] -> float32[..., N, D] in (-1, 1)."""
    z = check_features(z, "z")
    return jnp.tanh(z.astype(jnp.float32))


def fsq_tanh_quantize(z: jax.Array, bits: int) -> jax.Array:
    """Indices of the paper's FSQ baseline: uint8[..., N, D] = quantize_levels(tanh(z), bits)."""
    return quantize_levels(fsq_tanh_encode(z), bits)


def fsq_tanh(z: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """The paper's FSQ baseline in one call: (q float32[..., N, D] with STE gradient, idx uint8[..., N, D])."""
    u = fsq_tanh_encode(z)
    return levels_ste(u, bits), quantize_levels(u, bits)


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """Validates an FSQ levels list: integers >= 3. Returns it as a tuple.

    L = 2 is refused: its shift arctanh(0.5 / (0.5 (1 - eps))) does not exist (the argument exceeds 1), so no
    bound centres two levels; use `quantize_levels(..., bits=1)` for binary codes.
    """
    levels = tuple(int(level) for level in levels)
    if not levels or any(level < 2 for level in levels):
        raise ValueError(f"levels must be a non-empty list of integers >= 3, got {levels}")
    if 2 in levels:
        raise ValueError(f"levels {levels}: L = 2 has no centred bound (arctanh shift undefined); use L >= 3")
    return levels


def fsq_bits(levels: Sequence[int]) -> int:
    """Bits per packed digit: ceil(log2(max L)), between 1 and 8."""
    levels = check_levels(levels)
    return check_bits(max(1, math.ceil(math.log2(max(levels)))), "ceil(log2(max(levels)))")


def _check_channels(z: jax.Array, levels: tuple[int, ...], name: str) -> None:
    if z.shape[-1] != len(levels):
        raise ValueError(f"{name} must have {len(levels)} channels (one per level), got shape {tuple(z.shape)}")


def _level_arrays(levels: tuple[int, ...]):
    L = np.asarray(levels, np.float32)
    half_l = (L - 1.0) * (1.0 - FSQ_EPS) / 2.0
    offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0).astype(np.float32)
    shift = np.arctanh(offset / half_l).astype(np.float32)
    half_width = np.asarray([level // 2 for level in levels], np.float32)
    return half_l, offset, shift, half_width


def fsq_bound(z: jax.Array, levels: Sequence[int]) -> jax.Array:
    """bound(z) = tanh(z + arctanh(offset / half_l)) * half_l - offset, float32[..., C] with C = len(levels)."""
    levels = check_levels(levels)
    z = check_features(z, "z", min_ndim=1)
    _check_channels(z, levels, "z")
    half_l, offset, shift, _ = _level_arrays(levels)
    return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset


def fsq_quantize(z: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Canonical FSQ codes: round_ste(bound(z)) / (L // 2), float32[..., C], straight-through gradient.

    Channel c takes L_c values: {-1, ..., 1} for odd L_c, {-1, ..., 1 - 2/L_c} for even L_c.
    """
    levels = check_levels(levels)
    _, _, _, half_width = _level_arrays(levels)
    return round_ste(fsq_bound(z, levels)) / half_width


def fsq_digits(codes: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Per-channel digits of codes: uint8[..., C] with channel c in [0, L_c)."""
    levels = check_levels(levels)
    _check_channels(codes, levels, "codes")
    _, _, _, half_width = _level_arrays(levels)
    return jnp.round(codes * half_width + half_width).astype(jnp.uint8)


def fsq_from_digits(digits: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Inverse of `fsq_digits`: uint8[..., C] -> float32[..., C] codes."""
    levels = check_levels(levels)
    digits = check_indices(digits, "digits")
    _check_channels(digits, levels, "digits")
    _, _, _, half_width = _level_arrays(levels)
    return (digits.astype(jnp.float32) - half_width) / half_width


def _basis(levels: tuple[int, ...]) -> np.ndarray:
    if math.prod(levels) > 2**31 - 1:
        raise ValueError(f"prod(levels) = {math.prod(levels)} does not fit an int32 index")
    return np.cumprod((1, *levels[:-1])).astype(np.int32)


def fsq_codes_to_indices(codes: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Mixed-radix index of each code vector: float[..., C] -> int32[...] in [0, prod(levels))."""
    levels = check_levels(levels)
    digits = fsq_digits(codes, levels).astype(jnp.int32)
    return jnp.sum(digits * _basis(levels), axis=-1)


def fsq_indices_to_codes(indices: jax.Array, levels: Sequence[int]) -> jax.Array:
    """Inverse of `fsq_codes_to_indices`: int[...] -> float32[..., C]."""
    levels = check_levels(levels)
    indices = check_indices(indices, "indices").astype(jnp.int32)
    digits = (indices[..., None] // _basis(levels)) % np.asarray(levels, np.int32)
    return fsq_from_digits(digits.astype(jnp.uint8), levels)


@functools.lru_cache(maxsize=16)
def _codebook(levels: tuple[int, ...]) -> np.ndarray:
    return np.asarray(fsq_indices_to_codes(jnp.arange(math.prod(levels)), levels))


def fsq_codebook(levels: Sequence[int]) -> np.ndarray:
    """The implicit codebook, float32[prod(levels), C], row i = `fsq_indices_to_codes(i)`.

    Raises `ValueError` above 2^24 entries: use the index functions instead of materialising it.
    """
    levels = check_levels(levels)
    if math.prod(levels) > MAX_CODEBOOK:
        raise ValueError(
            f"codebook of levels {levels} has {math.prod(levels)} entries (> {MAX_CODEBOOK}); "
            "use fsq_indices_to_codes on the indices you need"
        )
    return _codebook(levels)
