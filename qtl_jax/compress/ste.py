"""The straight-through estimator: one `jax.custom_vjp`, shared by every quantizer.

A quantizer's forward map (round to a grid, look up a table, cast to fp16) has zero or undefined derivative,
so training through it needs a surrogate. The straight-through estimator (Bengio et al. 2013) uses the
identity as the backward map: the forward pass returns the quantized value, the backward pass hands the
incoming cotangent through unchanged. This is what the paper's `(x_q - x).detach() + x` does in PyTorch; we
write it as a `jax.custom_vjp` so that

* the forward value is bit-for-bit the quantizer's output (no `x + (q - x)` re-association that could move a
  value by one ulp away from what the server dequantizes), and
* the split runtime can cut the program at the quantizer and apply the server's gradient to the client's
  continuous code, which is exactly this identity backward map.

Works under `jit`, `grad`, `vmap` (forward-mode `jvp` is undefined for a `custom_vjp`, as for any of them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def straight_through(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Returns `fn(x)` in the forward pass; the backward pass is the identity.

    Args:
      fn: a shape- and dtype-preserving map, e.g. quantize-then-dequantize. It must not close over traced
        values (everything it needs besides `x` is static: bit width, block size, levels).
      x: float[...] input.

    Returns:
      float[...] = fn(x), with d/dx taken as the identity.
    """
    return fn(x)


def _straight_through_fwd(fn, x):
    return fn(x), None


def _straight_through_bwd(fn, _, g):
    del fn
    return (g,)


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def round_ste(x: jax.Array) -> jax.Array:
    """Rounds to the nearest integer (half to even, like `torch.round`) with an identity gradient."""
    return straight_through(jnp.round, x)
