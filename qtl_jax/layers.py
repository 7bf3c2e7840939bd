"""Small Flax Linen building blocks shared by the compressors and the models.

Every parameter carries logical axis names (see `qtl_jax.sharding.RULES`), so one rule table shards each
half of the split model on its own mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INIT_STD = 0.02  # N(0, 0.02) for new Linear layers, as TinyLLaVA's _init_weights (initializer_range)


def dense(
    features: int,
    axes: tuple[str, str],
    *,
    name: str,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    init_std: float = INIT_STD,
) -> nn.Dense:
    """`nn.Dense` with N(0, init_std) kernel, zero bias and logical axis names (kernel `axes`, bias `axes[1]`)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm as OpenELM computes it: normalise in float32, cast back, then multiply by the weight.

    Attributes:
      eps: added to the mean square (1e-6 in OpenELM).
      axis_name: logical name of the normalised axis.
      param_dtype: weight dtype.
    """

    eps: float = 1e-6
    axis_name: str = "norm"
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param(
            "weight", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (x.shape[-1],), self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * weight.astype(x.dtype)


def layer_norm(eps: float, name: str, param_dtype: Any = jnp.float32) -> nn.LayerNorm:
    """`nn.LayerNorm` (float32 statistics) with logical axis names on scale and bias."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )
