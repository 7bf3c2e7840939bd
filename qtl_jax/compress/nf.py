"""b-bit NF block quantizer with double-quantized scales (the paper's "QLoRA" baseline, SPEC §3.3).

No projections, no loss. Rows of D features are split into blocks of G (default 64) along the feature axis;
each block is min/max-normalised to [-1, 1] and every element is replaced by the index of the nearest entry
of a normal-quantile ("NF") table of 2^b values:

    t_i = Phi^-1((i + 0.5) / 2^b) / max_j |Phi^-1((j + 0.5) / 2^b)|,   i < 2^b   (symmetric, no exact zero)
    m = min(block), s = max(block) - min(block)
    idx = argmin_i | 2 (x - m) / (s + 1e-8) - 1 - t_i |
    x_hat = (t_idx + 1) / 2 * s' + m'

Double quantization: per row, the D/G block scales are sent as uint8 between the row's smallest and largest
scale (both sent as float32); `s'` is the dequantized scale. Block minima are sent as float32 (`mins_bits=32`,
the reference's choice: 0.5 bit/element at G = 64) or double-quantized like the scales (`mins_bits=8`).
Indices are computed with the exact block scale; only the reconstruction uses the dequantized one.

Wire cost per element at b bits, block G, row width D:
    mins_bits=32: b + 8/G + 32/G + 64/D        mins_bits=8: b + 8/G + 8/G + 128/D

The table is kept in float32 (the reference rounds it to float16, which moves entries by up to 5e-4).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import ndtri

from qtl_jax.compress.checks import check_bits, check_features, check_indices
from qtl_jax.compress.ste import straight_through

SCALE_EPS = 1e-8
SCALE_LEVELS = 255  # uint8 double quantization of per-block scales (and minima when mins_bits = 8)
DEFAULT_BLOCK = 64


@functools.cache
def _nf_table(bits: int) -> np.ndarray:
    p = (np.arange(2**bits, dtype=np.float64) + 0.5) / 2**bits
    t = ndtri(p)
    table = (t / np.max(np.abs(t))).astype(np.float32)
    table.flags.writeable = False
    return table


def nf_table(bits: int) -> np.ndarray:
    """The 2^bits-entry NF table, float32[2^bits], ascending, from -1 to 1 (see module docstring)."""
    return _nf_table(check_bits(bits))


def check_nf_args(x: jax.Array, block_size: int, mins_bits: int) -> None:
    """Raises `ValueError` unless the feature axis splits into whole blocks and mins_bits is 32 or 8."""
    if not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if x.shape[-1] % block_size:
        raise ValueError(
            f"the feature axis D = {x.shape[-1]} of x (shape {tuple(x.shape)}) must be divisible by "
            f"block_size G = {block_size}"
        )
    if mins_bits not in (32, 8):
        raise ValueError(f"mins_bits must be 32 or 8, got {mins_bits!r}")


def _double_quantize(values: jax.Array) -> dict[str, jax.Array]:
    """float32[R, K] -> uint8 codes between each row's min and max (both kept as float32[R])."""
    lo = jnp.min(values, axis=-1)
    hi = jnp.max(values, axis=-1)
    q = jnp.round((values - lo[:, None]) / (hi - lo + SCALE_EPS)[:, None] * SCALE_LEVELS)
    return {"q": q.astype(jnp.uint8), "lo": lo, "hi": hi}


def _double_dequantize(q: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    return lo[:, None] + q.astype(jnp.float32) / SCALE_LEVELS * (hi - lo)[:, None]


def nf_quantize(
    x: jax.Array, bits: int, block_size: int = DEFAULT_BLOCK, mins_bits: int = 32
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Quantizes features blockwise to NF indices plus side information.

    Args:
      x: float[..., N, D] features; D divisible by `block_size`.
      bits: 1..8.
      block_size: G, elements per block along D.
      mins_bits: 32 (block minima sent as float32) or 8 (double-quantized like the scales).

    Returns:
      idx: uint8[..., N, D] indices into `nf_table(bits)`.
      side: dict with R = prod(x.shape[:-1]) rows and K = D / G blocks per row:
        `scales_q` uint8[R, K], `scale_lo`, `scale_hi` float32[R];
        `mins` float32[R, K] if mins_bits = 32, else `mins_q` uint8[R, K], `min_lo`, `min_hi` float32[R].
    """
    bits = check_bits(bits)
    x = check_features(x, "x")
    check_nf_args(x, block_size, mins_bits)
    rows = math.prod(x.shape[:-1])
    blocks = x.astype(jnp.float32).reshape(rows, x.shape[-1] // block_size, block_size)
    # Materialise the per-block statistics before the elementwise pass: otherwise XLA:CPU may fuse the block
    # reductions into the consumer and recompute them for every element (measured 3x slower on CPU).
    mins, scales = jax.lax.optimization_barrier((jnp.min(blocks, axis=-1), jnp.ptp(blocks, axis=-1)))
    normed = 2.0 * (blocks - mins[..., None]) / (scales[..., None] + SCALE_EPS) - 1.0
    idx = nearest_entry(normed, nf_table(bits)).reshape(x.shape)
    scales_dq = _double_quantize(scales)
    side = {"scales_q": scales_dq["q"], "scale_lo": scales_dq["lo"], "scale_hi": scales_dq["hi"]}
    if mins_bits == 32:
        side["mins"] = mins
    else:
        mins_dq = _double_quantize(mins)
        side.update(mins_q=mins_dq["q"], min_lo=mins_dq["lo"], min_hi=mins_dq["hi"])
    return idx, side


CHAIN_MAX_ENTRIES = 32  # up to this table size the compare chain beats counting + gathering on CPU


def nearest_entry(values: jax.Array, table: np.ndarray) -> jax.Array:
    """Index of the nearest entry of an ascending table, ties to the lower index (= argmin |values - t|).

    Tables of up to 32 entries (b <= 5) run the argmin as a chain of elementwise compares that XLA fuses
    into one pass with no gathers. Larger ones count the entries <= value (the first entry above it is
    `upper`) and pick the nearer of `upper` and its predecessor: floating-point subtraction is monotone, so
    no other entry can be nearer, and the strict comparison keeps argmin's tie-breaking. Both equal `argmin`
    exactly (tested against brute force for every b).

    Args:
      values: float32[...].
      table: float32[T], ascending, 2 <= T <= 256.

    Returns:
      uint8[...] indices in [0, T).
    """
    table = np.asarray(table, np.float32)
    if table.shape[0] <= CHAIN_MAX_ENTRIES:
        best = jnp.abs(values - table[0])
        idx = jnp.zeros(values.shape, jnp.uint8)
        for i in range(1, table.shape[0]):
            dist = jnp.abs(values - table[i])
            nearer = dist < best
            idx = jnp.where(nearer, jnp.uint8(i), idx)
            best = jnp.where(nearer, dist, best)
        return idx
    upper = jnp.zeros(values.shape, jnp.int32)
    for entry in table:
        upper = upper + (values >= entry)
    upper = jnp.clip(upper, 1, table.shape[0] - 1)
    t = jnp.asarray(table)
    take_upper = jnp.abs(values - t[upper]) < jnp.abs(values - t[upper - 1])
    return jnp.where(take_upper, upper, upper - 1).astype(jnp.uint8)


def nf_dequantize(
    idx: jax.Array, side: dict[str, jax.Array], bits: int, block_size: int = DEFAULT_BLOCK
) -> jax.Array:
    """Rebuilds features from `nf_quantize` output: float32[idx.shape]."""
    bits = check_bits(bits)
    idx = check_indices(idx)
    rows = math.prod(idx.shape[:-1])
    n_blocks = idx.shape[-1] // block_size
    scales = _double_dequantize(side["scales_q"], side["scale_lo"], side["scale_hi"])
    if "mins" in side:
        mins = side["mins"]
    else:
        mins = _double_dequantize(side["mins_q"], side["min_lo"], side["min_hi"])
    t = jnp.asarray(nf_table(bits))[idx.reshape(rows, n_blocks, block_size).astype(jnp.int32)]
    x_hat = (t + 1.0) / 2.0 * scales[..., None] + mins[..., None]
    return x_hat.reshape(idx.shape)


def _nf_roundtrip(x: jax.Array, bits: int, block_size: int, mins_bits: int) -> jax.Array:
    idx, side = nf_quantize(x, bits, block_size, mins_bits)
    return nf_dequantize(idx, side, bits, block_size)


def nf_ste(x: jax.Array, bits: int, block_size: int = DEFAULT_BLOCK, mins_bits: int = 32) -> jax.Array:
    """NF quantize-dequantize with an identity gradient: float[..., N, D] -> float32[..., N, D]."""
    bits = check_bits(bits)
    x = check_features(x, "x")
    check_nf_args(x, block_size, mins_bits)
    fn = functools.partial(_nf_roundtrip, bits=bits, block_size=block_size, mins_bits=mins_bits)
    return straight_through(fn, x.astype(jnp.float32))


def nf_bits_per_element(bits: int, block_size: int, features: int, mins_bits: int = 32) -> float:
    """Wire bits per element, side information included (see module docstring)."""
    per_row_floats = 2 if mins_bits == 32 else 4  # scale lo/hi, plus min lo/hi when double-quantized
    return bits + 8 / block_size + mins_bits / block_size + 32 * per_row_floats / features
