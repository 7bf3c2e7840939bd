"""Identity baselines (SPEC §3.4): features sent uncompressed as float32, bfloat16 or float16.

These are the references every compression ratio is measured against. "Quantization" is a cast; the
straight-through path casts there and back so that single-program training sees exactly the values the
server receives, with the cast's identity gradient. float16 overflows to inf above 65504: the features
entering a compressor (connector outputs, embeddings) are far below that.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qtl_jax.compress.checks import check_features
from qtl_jax.compress.ste import straight_through

IDENTITY_DTYPES = {"none_fp32": jnp.float32, "none_bf16": jnp.bfloat16, "none_fp16": jnp.float16}


def identity_quantize(x: jax.Array, dtype) -> jax.Array:
    """Casts float[..., N, D] features to the wire dtype (float32, bfloat16 or float16)."""
    x = check_features(x, "x")
    return x.astype(dtype)


def _cast_roundtrip(x: jax.Array, dtype) -> jax.Array:
    return x.astype(dtype).astype(x.dtype)


def identity_ste(x: jax.Array, dtype) -> jax.Array:
    """float[..., N, D] -> float32[..., N, D] rounded through `dtype`, identity gradient."""
    x = check_features(x, "x").astype(jnp.float32)
    return straight_through(functools.partial(_cast_roundtrip, dtype=dtype), x)
