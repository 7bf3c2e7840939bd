"""TinyLLaVA's `mlp2x_gelu` connector (SPEC §2.2): Linear(D_v -> D) -> exact (erf) GELU -> Linear(D -> D).

The erf GELU is PyTorch's `nn.GELU()` default; Flax's `nn.gelu` defaults to the tanh approximation, so the
approximation is switched off explicitly. Submodule names `linear_0` / `linear_2` follow the Hugging Face
`_connector.0` / `_connector.2` keys (index 1 is the parameter-free GELU).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtl_jax.layers import dense, in_float32


class Connector(nn.Module):
    """float[B, N, D_v] vision features -> float[B, N, features] LM-width rows.

    Attributes:
      features: D, the language model width (1280 for OpenELM-270M).
      dtype: compute dtype.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = dense(self.features, ("vision_embed", "embed"), name="linear_0", dtype=self.dtype)(x)
        x = in_float32(nn.gelu, x, approximate=False)
        return dense(self.features, ("mlp", "embed"), name="linear_2", dtype=self.dtype)(x)
