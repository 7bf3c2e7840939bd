"""Small Flax Linen building blocks shared by the compressors and the models.

Every parameter carries logical axis names (see `qtl_jax.sharding.RULES`), so one rule table shards each
half of the split model on its own mesh.
"""

from __future__ import annotations

import functools
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


# Query rows per block of the blocked attention (below): a block's scores, [batch, kv heads, 128, keys] in
# float32, stay in the cache between the matmul, the softmax and the second matmul.
ATTENTION_BLOCK = 128
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blocked")


def check_attention(name: str) -> None:
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Softmax attention, scale 1 / sqrt(head_dim), softmax in float32.

    Args:
      q: float[B, Lq, Hq, Dh]; k, v: float[B, Lk, Hkv, Dh] with Hq a multiple of Hkv (grouped-query
        attention: query head j reads kv head j // (Hq / Hkv), without materialising repeated keys).
      mask: bool, broadcastable to [B, Hq, Lq, Lk] (True = attend), or None.
      causal: also mask keys after the query (query i attends keys <= i).
      kv_lengths: int32[B] or None: keys at index >= the row's length are masked (right padding).
      implementation: "auto" (below), "xla" (`jax.nn.dot_product_attention`'s XLA path) or "blocked"
        (`blocked_attention`); the models take it from their config's `attention` field.

    Which code computes it ("auto"): on a GPU in bf16/fp16 without an explicit `mask`, cuDNN's fused flash
    attention (no score matrix in memory); on a CPU, when the grouped query rows (Hq / Hkv x Lq) fill at
    least two blocks, `blocked_attention` (the query rows in blocks of `ATTENTION_BLOCK`, its own backward; at
    the paper's sizes its forward + backward ran 1.35-1.5x faster than XLA's whole-matrix attention,
    `benchmarks/models.py --profile`); everywhere else, and whenever cuDNN refuses a shape,
    `jax.nn.dot_product_attention`'s XLA path. All of them mask with the finite -0.7 * float32 max, so that a
    fully masked row averages all values instead of giving NaN.
    """
    check_attention(implementation)
    if kv_lengths is not None:
        kv_lengths = kv_lengths.astype(jnp.int32)
    backend = jax.default_backend()
    if implementation == "auto":
        if mask is None and backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:
                return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=kv_lengths,
                                                    implementation="cudnn")
            except Exception:
                pass
        rows = q.shape[1] * q.shape[2] // k.shape[2]
        implementation = "blocked" if backend == "cpu" and rows >= 2 * ATTENTION_BLOCK else "xla"
    if implementation == "blocked":
        return blocked_attention(q, k, v, mask=mask, causal=causal, kv_lengths=kv_lengths)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, key_value_seq_lengths=kv_lengths,
                                        implementation="xla")


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # what jax.nn.dot_product_attention masks with


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    causal: bool = False,
    kv_lengths: jax.Array | None = None,
    block: int | None = None,
) -> jax.Array:
    """`attention` computed `block` query rows at a time (the arguments as there).

    Each kv head's query rows (its Hq / Hkv query heads x Lq) are cut into blocks; a loop over the blocks
    computes each block's scores, softmax and output, so the score matrix never exists whole and each block's
    scores stay in the cache. The backward pass is its own (`jax.custom_vjp`, FlashAttention-2's): it keeps only
    the output and each row's softmax statistics, recomputes a block's probabilities from them, and accumulates
    the key and value gradients over the blocks. The backward computes a block's scores transposed ([keys, rows],
    as k @ q.T), so that the dK and dV matmuls contract the last axis of their left operand (the form XLA:CPU's
    fast kernels take) and no score block is ever transposed in memory. The same function as
    `jax.nn.dot_product_attention` (tested to float32 rounding, values and gradients, with every mask).
    """
    block = block or ATTENTION_BLOCK
    batch, lq, hq, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    groups = hq // hkv
    rows = groups * lq
    pad = -rows % block  # the last block filled with zero rows
    # [B, Lq, Hkv, G, Dh] -> [B, Hkv, G * Lq, Dh]: row r of kv head h is query position r % Lq of head h*G + r//Lq
    qg = q.reshape(batch, lq, hkv, groups, dh).transpose(0, 2, 3, 1, 4).reshape(batch, hkv, rows, dh)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, pad), (0, 0)))
    if mask is not None:
        mask = jnp.broadcast_to(mask.astype(bool), (batch, hq, lq, lk)).reshape(batch, hkv, rows, lk)
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
    out = _blocked_core(qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, kv_lengths,
                        causal, lq, block)
    out = out[:, :, :rows].reshape(batch, hkv, groups, lq, dh).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, lq, hq, dh)


def _block_logits(qb, k, i, mask, lengths, causal, lq, block, transposed=False):
    """Masked, scaled float32 scores of row block i: [B, Hkv, block, Lk], or [B, Hkv, Lk, block] `transposed`
    (computed as k @ qb.T, not transposed after)."""
    dh, lk = k.shape[-1], k.shape[2]
    spec, operands = ("bhsd,bhrd->bhsr", (k, qb)) if transposed else ("bhrd,bhsd->bhrs", (qb, k))
    s = jnp.einsum(spec, *operands, preferred_element_type=jnp.float32) * (dh ** -0.5)
    valid = None
    keys = jnp.arange(lk)
    if causal:
        pos = (i * block + jnp.arange(block)) % lq
        valid = pos[:, None] >= keys[None, :]
    if lengths is not None:
        by_length = keys[None, None, None, :] < lengths[:, None, None, None]
        valid = by_length if valid is None else valid & by_length
    if mask is not None:
        mb = _row_block(mask, i, block)
        valid = mb if valid is None else valid & mb
    if valid is None:
        return s, None
    if transposed:
        valid = jnp.swapaxes(valid, -1, -2)
    return jnp.where(valid, s, _MASKED), valid


def _row_block(x, i, block):
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=2)


def _blocked_forward(q, k, v, mask, lengths, causal, lq, block):
    """The output [B, Hkv, rows, Dh] and each row's score maximum and log of the sum of exp(score - maximum)
    (kept apart: a fully masked row's maximum, -0.7 * float32 max, would absorb the log)."""
    def one(i):
        s, _ = _block_logits(_row_block(q, i, block), k, i, mask, lengths, causal, lq, block)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhrs,bhsd->bhrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
        return o.astype(q.dtype), m[..., 0], jnp.log(total[..., 0])

    out, m, log_total = jax.lax.map(one, jnp.arange(q.shape[2] // block))  # [n, B, Hkv, block, ...]
    return _unblock(out), _unblock(m), _unblock(log_total)


def _unblock(x):
    """[n, B, H, block, ...] -> [B, H, n * block, ...]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blocked_core(q, k, v, mask, lengths, causal, lq, block):
    return _blocked_forward(q, k, v, mask, lengths, causal, lq, block)[0]


def _blocked_core_fwd(q, k, v, mask, lengths, causal, lq, block):
    out, m, log_total = _blocked_forward(q, k, v, mask, lengths, causal, lq, block)
    return out, (q, k, v, mask, lengths, out, m, log_total)


def _blocked_core_bwd(causal, lq, block, residuals, d_out):
    q, k, v, mask, lengths, out, m, log_total = residuals
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Hkv, rows]

    # Scores, probabilities and their gradients transposed ([keys, rows]): the dK and dV matmuls then contract
    # the rows, the last axis of their left operand, the form XLA:CPU's fast kernels take (bf16 ones only so).
    row_stat = lambda x, i: _row_block(x, i, block)[..., None, :]

    def one(carry, i):
        dk, dv = carry
        qb, dob = _row_block(q, i, block), _row_block(d_out, i, block)
        st, valid = _block_logits(qb, k, i, mask, lengths, causal, lq, block, transposed=True)
        pt = jnp.exp((st - row_stat(m, i)) - row_stat(log_total, i))
        dv = dv + jnp.einsum("bhsr,bhrd->bhsd", pt.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
        dpt = jnp.einsum("bhsd,bhrd->bhsr", v, dob, preferred_element_type=jnp.float32)
        dst = pt * (dpt - row_stat(delta, i)) * scale
        if valid is not None:  # masked scores are constants: no gradient (matters for fully masked rows)
            dst = jnp.where(valid, dst, 0.0)
        dq = jnp.einsum("bhsr,bhsd->bhrd", dst.astype(k.dtype), k, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bhsr,bhrd->bhsd", dst.astype(qb.dtype), qb, preferred_element_type=jnp.float32)
        return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(one, (zeros, zeros), jnp.arange(q.shape[2] // block))
    return _unblock(dq), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)


def _f32_dot(a: jax.Array, b: jax.Array, contract: tuple[tuple[int, ...], tuple[int, ...]]) -> jax.Array:
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_matmul(x: jax.Array, kernel: jax.Array, out_dtype: Any = None) -> jax.Array:
    """bfloat16[..., K] @ bfloat16[K, N] -> [..., N] in `out_dtype` (default bf16), accumulated in float32 and
    rounded once (not at all for a float32 `out_dtype`: the logits of a language model head).

    The same numbers as a plain bf16 `lax.dot_general` (XLA:CPU computes that in float32 too), asked for in
    the form XLA:CPU (jaxlib 0.10) hands to its YNNPACK bf16 kernels: bf16 x bf16 -> f32. A plain bf16 dot
    (bf16 out) and one with a transposed left operand are refused by them and run as float32 matmuls instead;
    so the backward is written here too: dx = g @ kernel.T the same fast way, and the kernel's gradient
    x.T @ g with x transposed in memory first (`_transposed_copy`). `benchmarks/models.py --bf16` measures the
    difference. Meant for XLA:CPU: `dense_dot_general` picks it there.
    """
    return _f32_dot(x, kernel, ((x.ndim - 1,), (0,))).astype(out_dtype or x.dtype)


def _bf16_matmul_fwd(x, kernel, out_dtype):
    return bf16_matmul(x, kernel, out_dtype), (x, kernel)


def _bf16_matmul_bwd(out_dtype, residuals, g):
    x, kernel = residuals
    g = g.astype(x.dtype)  # a float32 cotangent (out_dtype float32) is rounded to bf16, as under torch.autocast
    dx = _f32_dot(g, kernel, ((g.ndim - 1,), (1,))).astype(x.dtype)
    x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    if not x.shape[0]:
        return dx, jnp.zeros_like(kernel)
    if x.shape[0] % 2:  # an even row count for _transposed_copy; a zero row adds nothing to x.T @ g
        x, g = (jnp.pad(a, ((0, 1), (0, 0))) for a in (x, g))
    return dx, _f32_dot(_transposed_copy(x), g, ((1,), (0,))).astype(kernel.dtype)


def _transposed_copy(a: jax.Array) -> jax.Array:
    """bfloat16[n, k] (n even) -> bfloat16[k, n], transposed in memory.

    A plain transpose feeding a matmul is folded into it by XLA's simplifier, and XLA:CPU's bf16 kernels refuse
    a left operand whose contracted axis is not the last in memory: it would run as a float32 matmul (this CPU's
    float32 rate is 2.3-3.5x below its bf16 one; benchmarks/models.py --bf16 prints both). Here each pair of
    bf16 along n is read as one uint32 (no layout of `a` holds such pairs side by side, so the transpose must be
    a copy) behind an optimization barrier, which keeps XLA from folding the bitcasts and the transpose back into
    the matmul; the values are unchanged bit for bit. (An OR with a zero that the data decide, used before,
    is proved zero and folded by jax 0.11's XLA, after the pass that runs unsupported bf16 matmuls in float32:
    XLA:CPU then failed with "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32".)"""
    n, k = a.shape
    pairs = jax.lax.optimization_barrier(jax.lax.bitcast_convert_type(a.T.reshape(k, n // 2, 2), jnp.uint32))
    return jax.lax.bitcast_convert_type(pairs, a.dtype).reshape(k, n)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None) -> jax.Array:
    """`nn.Dense`'s matmul: `lax.dot_general`, except bf16 x bf16 [..., K] x [K, N] on a CPU (bf16 or float32
    out), which goes through `bf16_matmul` (same values to float rounding; OpenELM-270M's bf16 forward +
    backward 1.5-1.7x faster on this project's CPU, `benchmarks/models.py --bf16`). GPUs and TPUs accumulate
    bf16 matmuls in float32 in their own kernels and keep `lax.dot_general`."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if (jax.default_backend() == "cpu" and lhs.dtype == rhs.dtype == jnp.bfloat16 and rhs.ndim == 2
            and precision is None and preferred_element_type in (None, jnp.bfloat16, jnp.float32) and not any(batch)
            and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)):
        return bf16_matmul(lhs, rhs, None if preferred_element_type is None else jnp.dtype(preferred_element_type))
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def in_float32(fn, *xs: jax.Array, **kwargs) -> jax.Array:
    """`fn(*xs, **kwargs)` (elementwise) computed in float32, cast back to the first input's dtype.

    In bf16 an activation then rounds once, as PyTorch's bf16 kernels do; written on bf16 arrays, XLA rounds
    after every operation inside it (a tanh GELU: about ten times), which also made it a tenth of SigLIP's bf16
    forward on XLA:CPU. A no-op cast in float32."""
    return fn(*(x.astype(jnp.float32) for x in xs), **kwargs).astype(xs[0].dtype)


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
    """`nn.Dense` with N(0, init_std) kernel, zero bias, logical axis names (kernel `axes`, bias `axes[1]`) and
    `dense_dot_general` as its matmul."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(init_std), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        dot_general=dense_dot_general,
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
