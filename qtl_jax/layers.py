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

# What a layer under rematerialisation keeps for the backward pass (`remat`): "none" = no remat (everything
# the backward needs is kept), "full" = only the layer's input (the layer is recomputed), "dots" = the outputs
# of its matmuls (the cheap elementwise work is recomputed), "dots_no_batch" = matmul outputs without batch
# dimensions (the weight-like ones; attention scores are recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def check_remat(name: str) -> None:
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {name!r}")


def remat(layer_cls: type[nn.Module], name: str) -> type[nn.Module]:
    """`layer_cls` itself for "none", else `nn.remat` of it with that policy: the parameter names (and so
    checkpoints) stay the same, only what the backward pass keeps changes."""
    check_remat(name)
    if name == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=REMAT_POLICIES[name], prevent_cse=True)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention through `jax.nn.dot_product_attention`, scale 1 / sqrt(head_dim), softmax in float32.

    Args:
      q: float[B, Lq, Hq, Dh]; k, v: float[B, Lk, Hkv, Dh] with Hq a multiple of Hkv (grouped-query
        attention: query head j reads kv head j // (Hq / Hkv), without materialising repeated keys).
      mask: bool, broadcastable to [B, Hq, Lq, Lk] (True = attend), or None.
      causal: also mask keys after the query (query i attends keys <= i).
      kv_lengths: int32[B] or None: keys at index >= the row's length are masked (right padding).

    On a GPU in bf16/fp16 without an explicit `mask` this is cuDNN's fused flash attention (no score matrix in
    memory); everywhere else, and whenever cuDNN refuses a shape, XLA's implementation, which masks with the
    finite -0.7 * float32 max so that a fully masked row stays NaN-free.
    """
    if kv_lengths is not None:
        kv_lengths = kv_lengths.astype(jnp.int32)
    if mask is None and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_lengths,
                                                implementation="cudnn")
        except Exception:
            pass
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, key_value_seq_lengths=kv_lengths,
                                        implementation="xla")


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
