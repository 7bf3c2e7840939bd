"""Bit packing of b-bit indices into bytes, for any b in 1..8.

Layout (little-endian bit order, documented because both ends of the wire must agree): the indices are
flattened in C order; index i occupies bits [i*b, (i+1)*b) of one long bit string, least significant bit
first; bit k of that string is bit (k mod 8) of byte k // 8. So with b = 2 the first byte holds indices
0..3 as `i0 | i1 << 2 | i2 << 4 | i3 << 6` (the paper's 2-bit layout), with b = 4 index 0 is the low nibble,
and with b = 3 eight indices fill exactly three bytes. n indices take ceil(n*b/8) bytes; the unused high bits
of the last byte are zero.

Both functions are pure `jax.numpy` and jit-able: the byte count depends only on the static shape. For b in
{1, 2, 4} a byte holds 8/b whole indices and packing is a shifted sum over a [bytes, 8/b] view; for the other
widths the indices are processed in groups of eight (8 indices x b bits = b bytes), each output byte an OR
of at most four shifted uint8 columns. XLA fuses either into one pass over the data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.compress.checks import check_bits, check_indices

GROUP = 8  # indices per packing group: 8 * b bits is always a whole number (b) of bytes


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that `n` indices of `bits` bits occupy once packed: ceil(n * bits / 8)."""
    return (int(n) * check_bits(bits) + 7) // 8


def _pieces(bits: int):
    """For each byte k of a group: the (index j, left shift) pairs whose bits land in it.

    A negative shift means a right shift (the high part of an index that started in the previous byte).
    """
    pieces = []
    for k in range(bits):
        byte = []
        for j in range(GROUP):
            start = j * bits - 8 * k  # position of index j's bit 0 relative to byte k's bit 0
            if start < 8 and start + bits > 0:
                byte.append((j, start))
        pieces.append(byte)
    return pieces


def pack(idx: jax.Array, bits: int) -> jax.Array:
    """Packs integer indices into a byte string.

    Args:
      idx: int[...] indices in [0, 2^bits); any integer dtype. Bits above `bits` are discarded (they would
        otherwise corrupt the neighbouring index).
      bits: bits per index, 1..8.

    Returns:
      uint8[ceil(idx.size * bits / 8)], the layout in the module docstring.
    """
    bits = check_bits(bits)
    idx = check_indices(idx)
    n = idx.size
    flat = (idx.reshape(-1) & ((1 << bits) - 1)).astype(jnp.uint8)
    if bits == 8:
        return flat
    if 8 % bits == 0:
        # b in {1, 2, 4}: each byte holds 8/b whole indices. Written as a sum over a [bytes, 8/b] view, which
        # XLA:CPU fuses with the quantizer that produces the indices while evaluating it once per element
        # (the column form below made it re-run the quantizer per output column: 9x slower for NF 2-bit).
        per_byte = 8 // bits
        groups = -(-n // per_byte)
        view = jnp.pad(flat, (0, groups * per_byte - n)).reshape(groups, per_byte)
        shifts = np.arange(per_byte, dtype=np.uint8) * bits
        return jnp.sum(view << shifts, axis=1, dtype=jnp.uint8)
    groups = -(-n // GROUP)
    flat = jnp.pad(flat, (0, groups * GROUP - n)).reshape(groups, GROUP)
    out = []
    for byte in _pieces(bits):
        acc = None
        for j, shift in byte:
            col = flat[:, j]
            part = col << shift if shift >= 0 else col >> -shift  # uint8 shifts drop bits past the byte
            acc = part if acc is None else acc | part
        out.append(acc)
    packed = jnp.stack(out, axis=1).reshape(-1)
    return packed[: packed_nbytes(n, bits)]


def unpack(packed: jax.Array, bits: int, shape: tuple[int, ...] | int) -> jax.Array:
    """Inverts `pack`.

    Args:
      packed: uint8[ceil(prod(shape) * bits / 8)] bytes from `pack`.
      bits: bits per index, 1..8.
      shape: shape of the index array to rebuild.

    Returns:
      uint8[shape] indices in [0, 2^bits).
    """
    bits = check_bits(bits)
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    n = math.prod(shape)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8 or packed.ndim != 1:
        raise ValueError(f"packed must be a 1-D uint8 array, got {packed.dtype}{list(packed.shape)}")
    if packed.shape[0] != packed_nbytes(n, bits):
        raise ValueError(
            f"packed has {packed.shape[0]} bytes, expected ceil({n} * {bits} / 8) = {packed_nbytes(n, bits)} "
            f"for indices of shape {shape} at {bits} bits"
        )
    if bits == 8:
        return packed.reshape(shape)
    mask = jnp.uint8((1 << bits) - 1)
    if 8 % bits == 0:  # b in {1, 2, 4}: a broadcast shift over a [bytes, 8/b] view (see `pack`)
        shifts = np.arange(8 // bits, dtype=np.uint8) * bits
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n].reshape(shape)
    groups = -(-n // GROUP)
    data = jnp.pad(packed, (0, groups * bits - packed.shape[0])).reshape(groups, bits)
    cols = []
    for j in range(GROUP):
        k, start = divmod(j * bits, 8)
        col = data[:, k] >> start
        if start + bits > 8:  # the index continues in the next byte
            col = col | (data[:, k + 1] << (8 - start))
        cols.append(col & mask)
    return jnp.stack(cols, axis=1).reshape(-1)[:n].reshape(shape)
