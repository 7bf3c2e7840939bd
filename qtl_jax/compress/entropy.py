"""Entropy estimates, the paper's bit-width criterion, and lossless entropy coding of indices (SPEC §3.6).

* `kde_entropy(x)`: differential entropy in bits of a 1-D sample, by Gaussian KDE with Scott's rule.
* `index_entropy(idx, bits)`: plug-in entropy of quantized indices, bits/element, overall and per channel.
* `select_bits(features)`: the paper's criterion, the smallest integer b >= H(X).
* `entropy_encode` / `entropy_decode`: an optional lossless stage after quantization that codes the indices
  with a per-channel (or global) categorical model and the `constriction` ANS coder, so the wire cost
  approaches the index entropy instead of b bits. These two run on the host (NumPy), not under `jit`: the
  coded length depends on the data.
"""

from __future__ import annotations

import dataclasses
import math

import constriction
import jax
import jax.numpy as jnp
import numpy as np
from scipy import signal

from qtl_jax.compress.checks import check_bits, check_features, check_indices, check_mask
from qtl_jax.compress.payload import Payload
from qtl_jax.compress.rd_fsq import masked_moments, quantize_levels, robust_scale

KDE_SAMPLES = 100_000  # points in each of the fit and the evaluation subsample
KDE_GRID_STEPS_PER_BANDWIDTH = 32  # grid resolution of the binned KDE
KDE_MAX_GRID = 2**20


def kde_entropy(x, max_samples: int = KDE_SAMPLES, seed: int = 0) -> float:
    """Differential entropy (bits) of the distribution a 1-D sample was drawn from.

    A Gaussian KDE with Scott's rule (bandwidth = std * n^(-1/5), the `scipy.stats.gaussian_kde` default) is
    fitted on one random subsample and -log2 p_hat is averaged over a second, disjoint one; scoring held-out
    points avoids the downward bias of scoring each point with its own kernel. The KDE is evaluated in its
    binned form (linear binning on a grid of bandwidth/32 spacing, FFT convolution with the Gaussian kernel,
    linear interpolation; Wand 1994), which matches the exact KDE to ~1e-4 relative but costs O(n) instead
    of O(n^2), so 10^5 points fit in well under a second and the estimate's own noise (~0.005 bit) stays far
    below the 1-bit decisions `select_bits` makes. For N(0, 1) the true value is 0.5 log2(2 pi e) = 2.047.

    Args:
      x: any array; flattened. Needs at least 4 finite values with non-zero spread.
      max_samples: size of each subsample (a smaller sample is split in two halves).
      seed: seed of the subsampling.

    Returns:
      Entropy in bits (a Python float; negative for concentrated distributions).
    """
    x = np.asarray(jax.device_get(x), np.float64).reshape(-1)
    if x.size < 4:
        raise ValueError(f"kde_entropy needs at least 4 values, got {x.size}")
    if not np.isfinite(x).all():
        raise ValueError(f"kde_entropy needs finite values, found {int((~np.isfinite(x)).sum())} NaN/inf")
    rng = np.random.default_rng(seed)
    n = min(max_samples, x.size // 2)
    order = rng.permutation(x.size)[: 2 * n]
    fit, held_out = x[order[:n]], x[order[n:]]
    bandwidth = np.std(fit, ddof=1) * n ** (-1 / 5)  # Scott's rule in 1-D
    if not bandwidth > 0:
        raise ValueError("kde_entropy needs a sample with non-zero spread")
    density = _binned_kde(fit, bandwidth, np.concatenate([[held_out.min()], [held_out.max()]]))
    p = density(held_out)
    return float(-np.mean(np.log2(np.maximum(p, np.finfo(np.float64).tiny))))


def _binned_kde(fit: np.ndarray, bandwidth: float, extra_range: np.ndarray):
    """Gaussian KDE of `fit` on a grid; returns a function evaluating it by linear interpolation."""
    lo = min(fit.min(), extra_range.min()) - 6 * bandwidth
    hi = max(fit.max(), extra_range.max()) + 6 * bandwidth
    size = int(min(KDE_MAX_GRID, np.ceil((hi - lo) / bandwidth * KDE_GRID_STEPS_PER_BANDWIDTH) + 1))
    step = (hi - lo) / (size - 1)
    # Linear binning: each point splits its unit weight between its two neighbouring grid nodes.
    pos = (fit - lo) / step
    left = np.floor(pos).astype(np.int64)
    frac = pos - left
    weights = np.bincount(left, 1 - frac, minlength=size + 1) + np.bincount(left + 1, frac, minlength=size + 1)
    half = int(np.ceil(6 * bandwidth / step))
    offsets = np.arange(-half, half + 1) * step
    kernel = np.exp(-0.5 * (offsets / bandwidth) ** 2) / (np.sqrt(2 * np.pi) * bandwidth)
    grid_density = signal.fftconvolve(weights[:size], kernel, mode="same") / fit.size
    grid = lo + step * np.arange(size)
    return lambda points: np.interp(points, grid, np.maximum(grid_density, 0.0))


def index_entropy(idx, bits: int) -> tuple[float, np.ndarray]:
    """Plug-in entropy of indices in bits per element: overall and per channel (last axis).

    Args:
      idx: int[..., D] indices in [0, 2^bits).
      bits: 1..8.

    Returns:
      (H, H_c): H over all elements, and float64[D] with the entropy of each channel's indices. Both are at
      most `bits`.
    """
    bits = check_bits(bits)
    counts = channel_counts(_host_indices(idx, bits), bits)
    return _entropy(counts.sum(0)), np.array([_entropy(c) for c in counts])


def code_usage(codec, payload: Payload, mask=None) -> dict[str, float]:
    """How many codes a batch's rows use: the collapse diagnostic logged while training.

    Args:
      codec: the `Codec` that made `payload`.
      payload: a payload of features [..., N, C].
      mask: optional bool[..., N], True for the rows to count (e.g. the image rows of image samples).

    Returns:
      {"tokens": real rows, "distinct_codes": distinct rows of transmitted values among them (a collapsed
      quantizer gives every token the same few codes), and for index codecs "code_entropy": the plug-in
      entropy of their indices in bits per element (at most `codec.bits`; low = few levels in use)}.
    """
    values = np.asarray(jax.device_get(codec.from_payload(payload).values))
    rows = values.reshape(-1, values.shape[-1])
    if mask is not None:
        rows = rows[np.broadcast_to(np.asarray(jax.device_get(mask), bool), values.shape[:-1]).reshape(-1)]
    out = {"tokens": len(rows), "distinct_codes": len(np.unique(rows, axis=0)) if len(rows) else 0}
    if rows.dtype == np.uint8 and len(rows):
        out["code_entropy"] = index_entropy(rows, codec.bits)[0]
    return out


def _host_indices(idx, bits: int) -> np.ndarray:
    """Indices as a host int32[rows, D] array; raises unless every value is in [0, 2^bits)."""
    idx = np.asarray(jax.device_get(check_indices(idx)))
    if idx.size and (idx.min() < 0 or idx.max() >= 2**bits):
        raise ValueError(f"indices must be in [0, {2**bits}) for bits={bits}, got range [{idx.min()}, {idx.max()}]")
    return idx.reshape(-1, idx.shape[-1] if idx.ndim else 1).astype(np.int32)


def channel_counts(columns: np.ndarray, bits: int) -> np.ndarray:
    """Histogram of each column of int[rows, D] indices: int64[D, 2^bits]."""
    levels = 2**bits
    keys = np.arange(columns.shape[1], dtype=np.int64) * levels + columns
    return np.bincount(keys.reshape(-1), minlength=columns.shape[1] * levels).reshape(-1, levels)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0


@dataclasses.dataclass(frozen=True)
class BitSelection:
    """Result of `select_bits`.

    Attributes:
      entropy_bits: H(X), KDE differential entropy of the (scaled) features, in bits.
      bits: the selected bit width, the smallest integer b >= H(X), clamped to [min(candidates), max].
      scale: the scale the entropy was measured on ("standardized" or "raw").
      index_entropy: {b: plug-in entropy of the RD-FSQ indices at b bits, bits/element} per candidate.
    """

    entropy_bits: float
    bits: int
    scale: str
    index_entropy: dict[int, float]


def select_bits(
    features,
    mask=None,
    scale: str = "standardized",
    candidates: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8),
    max_samples: int = KDE_SAMPLES,
    seed: int = 0,
) -> BitSelection:
    """The paper's bit-width criterion: estimate H(X) by KDE and pick the smallest integer b >= H(X).

    Differential entropy depends on the scale of X and the paper does not say which it used, so the scale
    is explicit: "standardized" (default) subtracts the mean and divides by the std over the real rows of
    this modality; "raw" takes the values as given. A Gaussian gives 2.047 bits (-> b = 3), a Laplace 1.94
    bits (-> b = 2). The estimator is not tuned to reproduce the paper's b = 2.

    Args:
      features: float[..., N, D], one modality's features.
      mask: optional bool[..., N], True for real rows (padding is left out).
      scale: "standardized" or "raw".
      candidates: bit widths to consider (each in 1..8).
      max_samples, seed: passed to `kde_entropy`.

    Returns:
      A `BitSelection` with H, the chosen b and the RD-FSQ index entropy at each candidate b.
    """
    features = check_features(features, "features")
    mask = check_mask(mask, features)
    if scale not in ("standardized", "raw"):
        raise ValueError(f"scale must be 'standardized' or 'raw', got {scale!r}")
    candidates = tuple(sorted(check_bits(b, "candidates") for b in candidates))
    if not candidates:
        raise ValueError("candidates must name at least one bit width")
    x = features.astype(jnp.float32)
    if scale == "standardized":
        mean, std = masked_moments(x, mask)
        if float(std) == 0:
            raise ValueError("features are constant: their standardized entropy is undefined")
        x = (x - mean) / std
    real = x.reshape(-1, x.shape[-1]) if mask is None else x[np.asarray(mask)]
    h = kde_entropy(real, max_samples=max_samples, seed=seed)
    chosen = min(max(math.ceil(h), candidates[0]), candidates[-1])
    chosen = next(b for b in candidates if b >= chosen)
    u = robust_scale(real[None], None)
    per_bits = {b: index_entropy(quantize_levels(u, b), b)[0] for b in candidates}
    return BitSelection(entropy_bits=h, bits=chosen, scale=scale, index_entropy=per_bits)


FREQ_TOTAL = 2**16 - 1  # frequency tables are sent as uint16 counts scaled to this total


def _frequency_table(counts: np.ndarray) -> np.ndarray:
    """uint16 frequencies proportional to `counts` (rows), every observed symbol at least 1."""
    total = np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    freqs = np.floor(counts / total * FREQ_TOTAL).astype(np.int64)
    freqs = np.where(counts > 0, np.maximum(freqs, 1), 0)
    freqs[counts.sum(axis=-1) == 0] = 1  # an empty column still needs a valid (uniform) model
    return freqs.astype(np.uint16)


def _categorical(freqs: np.ndarray):
    # Both ends build the model from the same uint16 table: identical float64 input, identical fixed-point
    # model (constriction quantizes deterministically; `perfect=False` is its recommended fast setting and
    # still gives every symbol, even a zero-frequency one, a non-zero probability).
    return constriction.stream.model.Categorical(freqs.astype(np.float64), perfect=False)


def entropy_encode(idx, bits: int, model: str = "channel") -> Payload:
    """Losslessly codes indices with a categorical model and ANS (`constriction`), on the host.

    Args:
      idx: int[..., D] indices in [0, 2^bits).
      bits: 1..8.
      model: "channel" (one frequency table per channel of the last axis, sent as uint16[D, 2^b]) or
        "global" (one table, uint16[1, 2^b]).

    Returns:
      Payload(codec="ans-" + model) whose `codes` are the ANS words as uint8 bytes and `side["freqs"]` the
      frequency tables; `nbytes` is the coded size plus the tables.
    """
    bits = check_bits(bits)
    if model not in ("channel", "global"):
        raise ValueError(f"model must be 'channel' or 'global', got {model!r}")
    shape = tuple(np.shape(idx))
    columns = _host_indices(idx, bits)
    if model == "global":
        columns = columns.reshape(-1, 1)
    freqs = _frequency_table(channel_counts(columns, bits))
    coder = constriction.stream.stack.AnsCoder()
    # ANS is a stack: encode the last channel first so that decoding runs channel 0, 1, ...
    for c in range(columns.shape[1] - 1, -1, -1):
        coder.encode_reverse(columns[:, c], _categorical(freqs[c]))
    words = np.ascontiguousarray(coder.get_compressed().astype("<u4"))
    return Payload(codes=words.view(np.uint8), side={"freqs": freqs}, codec=f"ans-{model}", bits=bits,
                   shape=shape)


def entropy_decode(payload: Payload) -> np.ndarray:
    """Inverts `entropy_encode` bit-exactly: returns uint8[payload.shape] indices (host NumPy)."""
    if not payload.codec.startswith("ans-"):
        raise ValueError(f"entropy_decode needs an 'ans-*' payload, got codec {payload.codec!r}")
    codes = np.asarray(payload.codes, np.uint8)
    if codes.size % 4:
        raise ValueError(f"ANS payload must hold whole 32-bit words, got {codes.size} bytes")
    freqs = np.asarray(payload.side["freqs"])
    n = math.prod(payload.shape)
    rows = n // freqs.shape[0] if freqs.shape[0] else 0
    coder = constriction.stream.stack.AnsCoder(codes.view("<u4").astype(np.uint32))
    columns = [np.asarray(coder.decode(_categorical(freqs[c]), rows)) for c in range(freqs.shape[0])]
    return np.stack(columns, axis=1).astype(np.uint8).reshape(payload.shape)
