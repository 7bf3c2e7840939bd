"""`Payload`: what one compressor sends over the wire for one tensor.

A payload is a pytree (so `jax.jit`, `jax.device_put` and `jax.tree.map` move it like any array tree) with

* array leaves that *do* cross the wire: `codes` (packed indices as uint8, or the raw features for the
  identity baselines, or the entropy-coded words) and `side` (per-row / per-block side information: scales,
  minima), and
* static fields that *do not*: the codec name, the bit width and the shape of the tensor the codes stand for.
  These are part of the session's agreed configuration (both ends know them before the first step), like
  the model dimensions, so they cost nothing per step.

`payload.nbytes` is the exact number of bytes of the array leaves, and `to_bytes()` produces exactly that
many bytes (tested); every communication figure in logs and tables comes from `nbytes`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import numpy as np


def _leaf_nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


@flax.struct.dataclass
class Payload:
    """Compressed tensor as sent over the wire.

    Attributes:
      codes: uint8[n_bytes] packed codes (float16/bfloat16/float32[...] features for the identity baselines;
        uint8[n_bytes] entropy-coded words for the entropy coder).
      side: dict of side-information arrays, e.g. NF's `scales_q: uint8[R, D/G]`; empty for RD-FSQ.
      codec: name of the compressor that made it (static).
      bits: bits per index (static; 16/32 for the identity baselines).
      shape: shape of the index (or feature) array the codes stand for (static).
    """

    codes: Any
    side: dict[str, Any]
    codec: str = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        """Exact bytes on the wire: codes plus side information (static metadata is not sent per step)."""
        return sum(_leaf_nbytes(leaf) for leaf in jax.tree.leaves((self.codes, self.side)))

    @property
    def bits_per_element(self) -> float:
        """Wire bits per element of the tensor the payload stands for (side information included)."""
        return 8.0 * self.nbytes / max(1, int(np.prod(self.shape, dtype=np.int64)))

    def to_bytes(self) -> bytes:
        """Serialises the array leaves in a fixed order (codes, then side entries sorted by name), raw C-order
        bytes, no header. The receiver rebuilds the payload with `from_bytes` and a payload of the same
        structure (or `jax.eval_shape` of the sender), which both ends derive from the agreed config."""
        leaves = jax.tree.leaves((self.codes, self.side))
        return b"".join(np.ascontiguousarray(jax.device_get(leaf)).tobytes() for leaf in leaves)

    def from_bytes(self, data: bytes) -> Payload:
        """Rebuilds a payload with this one's structure (shapes, dtypes, static fields) from `to_bytes` output.

        Raises `ValueError` if `data` does not have exactly `self.nbytes` bytes.
        """
        if len(data) != self.nbytes:
            raise ValueError(
                f"payload for codec {self.codec!r} expects {self.nbytes} bytes, got {len(data)}"
            )
        leaves, treedef = jax.tree.flatten((self.codes, self.side))
        out, offset = [], 0
        for leaf in leaves:
            size = _leaf_nbytes(leaf)
            out.append(np.frombuffer(data, dtype=np.dtype(leaf.dtype), count=int(np.prod(leaf.shape)),
                                     offset=offset).reshape(leaf.shape))
            offset += size
        codes, side = jax.tree.unflatten(treedef, out)
        return self.replace(codes=codes, side=side)
