"""RD-FSQ, the paper's compressor (SPEC §3.1), as pure functions.

Per modality the client maps features to a continuous code `u` in [-1, 1] by a robust 3-sigma scaling, rounds
`u` to one of d = 2^b evenly spaced levels and sends the level indices (b bits each, nothing else per row);
the server turns indices back into levels. The projections around it (in_proj on the client, out_proj on the
server) live in the Flax modules (`qtl_jax.compress.modules`).

    u   = robust_scale(z, mask)          float32[..., N, D] in [-1, 1]       client
    idx = quantize_levels(u, bits)       uint8[..., N, D] in [0, 2^b - 1]    client, sent packed
    q   = dequantize_levels(idx, bits)   float32[..., N, D] on linspace(-1, 1, 2^b)    server
    L   = distortion_loss(v, q, mask)    float32[]                           client (our default)
    L   = commitment_loss(u, q, mask)    float32[]                           client (the paper's)

The loss term (`LOSSES`). The paper's cosine commitment `1 - cos(u, sg(q))` is minimal when every element sits
on a level, and the cheapest way there is past the clip: a clipped element sits exactly on the outer level
and receives no gradient from the clip, so nothing pulls it back, and once a channel's tokens all clip, they
all get the same code (code collapse, measured in README "Code collapse"). Our default, the distortion term,
is the squared error between the *unclipped* scaled value `v = scale(z)` (`robust_scale(..., clip=False)`)
and the level the server receives: inside the clip range it is the usual quantization error; past it, it is
the clipping error, which grows with the distance, so saturation costs instead of paying. Both are weighted
by alpha per modality.

For single-program training `levels_ste(u, bits)` is `dequantize_levels(quantize_levels(u))` with the
straight-through (identity) gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qtl_jax.compress.checks import check_bits, check_features, check_indices, check_mask
from qtl_jax.compress.ste import straight_through

SCALE_EPS = 1e-4  # the reference's +1e-4 in both numerator and denominator of the scaling
COSINE_EPS = 1e-3  # the reference's cosine-similarity eps (CosineLoss passes 1e-3, not the 1e-4 default)
LOSSES = ("distortion", "cosine")  # RD-FSQ's loss term: ours (default), the paper's


def _level_grid(bits: int) -> tuple[float, float]:
    """(half, offset) of the d = 2^bits level grid: levels are linspace(-1, 1, d) = idx / half - 1."""
    d = 2**bits
    half = (d - 1) / 2
    offset = 0.5 if d % 2 == 0 else 0.0  # always 0.5 for d = 2^b >= 2; the formula keeps the odd case
    return half, offset


def masked_moments(z: jax.Array, mask: jax.Array | None, per_sample: bool = False,
                   per_channel: bool = False) -> tuple[jax.Array, jax.Array]:
    """Mean and unbiased standard deviation of all elements of the real rows of `z` (of each channel's, with
    `per_channel`).

    Args:
      z: float[..., N, D].
      mask: bool[..., N] (True = real row) or None (all rows are real).
      per_sample: False: one mean and std over every real row of the batch (training, as the paper). True: one
        per sample, over that sample's real rows only (inference: an answer must not depend on which other
        samples share its batch).
      per_channel: False: over every channel (the paper). True: one per channel (the last axis), so a channel's
        offset or spread does not take the range of the others (README "Code collapse").

    Returns:
      (mean, std): float32 scalars, or float32[..., 1, 1] with `per_sample`, float32[D] / float32[..., 1, D] with
      `per_channel`; the std uses n_elements - 1 like
      `torch.std`. Gradients flow through both, as in the reference (nothing is detached). A constant input
      (or a sample without real rows) gives std 0 with a zero (not NaN) gradient.
    """
    z = z.astype(jnp.float32)
    if mask is None:
        weights = jnp.ones((*z.shape[:-1], 1), jnp.float32)
    else:
        weights = mask.astype(jnp.float32)[..., None]
    if per_sample:
        axes = (-2,) if per_channel else (-2, -1)
    else:
        axes = tuple(range(z.ndim - 1)) if per_channel else None
    total = functools.partial(jnp.sum, axis=axes, keepdims=per_sample)
    count = total(jnp.broadcast_to(weights, z.shape))
    mean = total(z * weights) / jnp.maximum(count, 1.0)
    var = total(jnp.square(z - mean) * weights) / jnp.maximum(count - 1.0, 1.0)
    # Double-where: sqrt'(0) is inf, and inf * 0 would turn the gradient of a constant input into NaN.
    positive = var > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return mean, std


def robust_scale(z: jax.Array, mask: jax.Array | None = None, width: float = 3.0, per_sample: bool = False,
                 moments: tuple[jax.Array, jax.Array] | None = None, clip: bool = True,
                 per_channel: bool = False) -> jax.Array:
    """RD-FSQ step 2: clip to mean +- width * std and map linearly to [-1, 1].

    One mean and one std over all real rows of the modality (one per channel with `per_channel`, not the
    paper's), recomputed every call and never transmitted; padding rows (mask False) are excluded from the
    statistics (the reference includes them, which lets padding shift the scale; we fix that).

        lo, hi = mu - width * sigma, mu + width * sigma
        u = 2 (clip(z, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1

    Args:
      z: float[..., N, D] continuous codes (the output of in_proj).
      mask: optional bool[..., N], True for real rows.
      width: clip width in standard deviations (3 in the paper).
      per_sample: statistics per sample instead of over the batch (`masked_moments`).
      per_channel: statistics per channel instead of over all channels (`masked_moments`; not the paper's).
      moments: given (mean, std) instead of computing them (e.g. the prompt's, to quantize generated tokens).
      clip: False gives the same affine map without the clip (values outside [-1, 1] past the clip range), the
        input of `distortion_loss`.

    Returns:
      float32[..., N, D] in [-1 + 2e-4 / (hi - lo + 1e-4), 1] (with `clip`).
    """
    z = check_features(z, "z")
    mask = check_mask(mask, z)
    mean, std = masked_moments(z, mask, per_sample, per_channel) if moments is None else moments
    lo, hi = mean - width * std, mean + width * std
    zc = jnp.clip(z.astype(jnp.float32), lo, hi) if clip else z.astype(jnp.float32)
    return 2.0 * (zc - lo + SCALE_EPS) / (hi - lo + SCALE_EPS) - 1.0


def clipped_fraction(z: jax.Array, mask: jax.Array | None = None, width: float = 3.0,
                     moments: tuple[jax.Array, jax.Array] | None = None, per_channel: bool = False) -> jax.Array:
    """Fraction of the real rows' elements outside mean +- width * std (where the clip passes no gradient):
    float32[], a training diagnostic (0.27% for Gaussian features at width 3)."""
    z = check_features(z, "z").astype(jnp.float32)
    mask = check_mask(mask, z)
    mean, std = masked_moments(z, mask, per_channel=per_channel) if moments is None else moments
    outside = (jnp.abs(z - mean) > width * std).astype(jnp.float32)
    return jax.lax.stop_gradient(_row_mean(outside.mean(axis=-1), mask))


def _row_mean(per_row: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of float[..., N] over the real rows (all rows without a mask)."""
    if mask is None:
        return jnp.mean(per_row)
    weights = mask.astype(jnp.float32)
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def quantize_levels(u: jax.Array, bits: int) -> jax.Array:
    """Rounds codes in [-1, 1] to the nearest of d = 2^bits levels on linspace(-1, 1, d).

        idx = round(u * half - offset) + offset + half,   half = (d - 1) / 2, offset = 0.5 (d even)

    `round` is half-to-even (as `torch.round`). With d = 4 the levels are {-1, -1/3, 1/3, 1}.

    Args:
      u: float[...] codes in [-1, 1] (values outside are clamped to the end levels).
      bits: 1..8.

    Returns:
      uint8[...] indices in [0, 2^bits - 1].
    """
    bits = check_bits(bits)
    half, offset = _level_grid(bits)
    idx = jnp.round(u.astype(jnp.float32) * half - offset) + (offset + half)
    return jnp.clip(idx, 0, 2**bits - 1).astype(jnp.uint8)


def dequantize_levels(idx: jax.Array, bits: int) -> jax.Array:
    """Level values of indices: q = idx / half - 1, float32[...] on linspace(-1, 1, 2^bits).

    Computed as (2 idx - (d - 1)) / (d - 1): an exact integer over an exact integer, so each level is the
    correctly rounded float32 of its exact value and the grid is exactly symmetric (-1/3 and 1/3 for d = 4).
    """
    bits = check_bits(bits)
    idx = check_indices(idx)
    top = 2**bits - 1
    return (2.0 * idx.astype(jnp.float32) - top) / top


def _levels_roundtrip(u: jax.Array, bits: int) -> jax.Array:
    return dequantize_levels(quantize_levels(u, bits), bits)


def levels_ste(u: jax.Array, bits: int) -> jax.Array:
    """`dequantize_levels(quantize_levels(u))` with an identity gradient: float32[...] -> float32[...].

    The forward value equals what the server dequantizes from the sent indices, bit for bit.
    """
    bits = check_bits(bits)
    return straight_through(functools.partial(_levels_roundtrip, bits=bits), u.astype(jnp.float32))


def commitment_loss(u: jax.Array, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Cosine commitment loss pulling the code towards its quantized value (SPEC §3.1 step 4).

        L = mean over real rows of 1 - <u, sg(q)> / (|u| |sg(q)| + 1e-3)

    Args:
      u: float[..., N, D] continuous codes.
      q: float[..., N, D] their quantized values (gradient stopped inside).
      mask: optional bool[..., N]; padding rows do not count (the reference averages over them too).

    Returns:
      float32 scalar in [0, 2].
    """
    u = u.astype(jnp.float32)
    q = jax.lax.stop_gradient(q.astype(jnp.float32))
    dot = jnp.sum(u * q, axis=-1)
    norms = jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(q, axis=-1)
    return _row_mean(1.0 - dot / (norms + COSINE_EPS), mask)


def distortion_loss(v: jax.Array, q: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Squared error of the whole scaler + quantizer, clipping included (module docstring; our default).

        L = mean over real rows and channels of (v - sg(q))^2,   v = robust_scale(z, clip=False)

    Inside the clip range this is the rounding error (at most (1 / (2^b - 1))^2 per element); an element past
    the clip adds (|v| - 1)^2, with a gradient that pulls it back inside, so no saturated state makes it small.

    Args:
      v: float[..., N, D] unclipped scaled codes.
      q: float[..., N, D] the levels the server receives (gradient stopped inside).
      mask: optional bool[..., N]; padding rows do not count.

    Returns:
      float32 scalar >= 0.
    """
    v = v.astype(jnp.float32)
    q = jax.lax.stop_gradient(q.astype(jnp.float32))
    return _row_mean(jnp.mean(jnp.square(v - q), axis=-1), mask)


def usage_loss(u: jax.Array, bits: int, mask: jax.Array | None = None, temperature: float | None = None) -> jax.Array:
    """A code-usage term against collapse (MAGVIT-v2's LFQ entropy loss, per channel; optional, weight 0 by
    default): soft assignments of each element to the 2^b levels, p = softmax(-(u - level)^2 / T), then

        L = (mean over real elements of H(p) - mean over channels of H(mean over real rows of p)) / log(2^b)

    Low when each element sits clearly in one bin (first part) and each channel uses all its levels across the
    batch (second part); a channel whose every token falls in the same bin costs up to 1.

    Args:
      u: float[..., N, C] codes in [-1, 1].
      bits: 1..8.
      mask: optional bool[..., N], True for real rows.
      temperature: T; default (level spacing / 2)^2.

    Returns:
      float32 scalar in [-1, 1].
    """
    bits = check_bits(bits)
    d = 2**bits
    levels = jnp.linspace(-1.0, 1.0, d)
    temperature = temperature or (1.0 / (d - 1)) ** 2
    p = jax.nn.softmax(-jnp.square(u.astype(jnp.float32)[..., None] - levels) / temperature, axis=-1)
    weights = jnp.ones(u.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    weights = jnp.broadcast_to(weights, u.shape[:-1])[..., None]  # [..., N, 1]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    entropy = lambda q: -jnp.sum(q * jnp.log(jnp.maximum(q, 1e-12)), axis=-1)
    per_element = jnp.sum(entropy(p) * weights) / (count * u.shape[-1])
    average = jnp.sum((p * weights[..., None]).reshape(-1, u.shape[-1], d), axis=0) / count  # [C, d]
    return (per_element - jnp.mean(entropy(average))) / jnp.log(d)


def loss_term(kind: str, u: jax.Array, q: jax.Array, mask: jax.Array | None = None, z: jax.Array | None = None,
              width: float = 3.0, per_sample: bool = False, moments=None, per_channel: bool = False) -> jax.Array:
    """RD-FSQ's loss term `kind` (one of `LOSSES`) for scaled codes u (`robust_scale` of z) and their levels q:
    "cosine", the paper's `commitment_loss(u, q)`, or "distortion", `distortion_loss` of the *unclipped* scaled z
    (so z, and the moments u was scaled with, are needed)."""
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    if kind == "cosine":
        return commitment_loss(u, q, mask)
    if z is None:
        raise ValueError("the distortion term needs the unclipped input z of robust_scale")
    return distortion_loss(robust_scale(z, mask, width, per_sample, moments, False, per_channel), q, mask)


def rd_fsq(
    z: jax.Array, bits: int, mask: jax.Array | None = None, width: float = 3.0, per_sample: bool = False,
    loss: str = "distortion", per_channel: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RD-FSQ steps 2-4 in one call (no projections), for research code.

    Args:
      z: float[..., N, D] continuous codes.
      bits: 1..8; b bits per element on the wire, nothing else.
      mask: optional bool[..., N], True for real rows.
      width: clip width in standard deviations.
      per_sample: statistics per sample (inference) instead of over the batch (training).
      loss: "distortion" (`distortion_loss`, our default) or "cosine" (`commitment_loss`, the paper's).
      per_channel: statistics per channel (`masked_moments`) instead of the paper's one over all channels.

    Returns:
      (q, idx, loss): float32[..., N, D] quantized values with the straight-through gradient,
      uint8[..., N, D] indices, and the float32 loss term (unweighted; the paper weights it 0.25).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    z = check_features(z, "z")
    moments = masked_moments(z, check_mask(mask, z), per_sample, per_channel)
    u = robust_scale(z, mask, width, per_sample, moments)
    q = levels_ste(u, bits)
    return q, quantize_levels(u, bits), loss_term(loss, u, q, mask, z, width, per_sample, moments)
