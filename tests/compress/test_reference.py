"""Independent reference: RD-FSQ, FSQ-tanh and NF re-implemented in plain NumPy from the SPEC formulas.

Written from SPEC §3.1-3.3 only, in float64. Indices must be identical except where the float64 value lies
within float32 rounding of a decision boundary (a tie that either answer is right for); such elements
must be rare, and values must agree to float32 precision. The gradient of the 3-sigma scaling (which flows
through mean and std) is checked against PyTorch autograd of the paper's `robust_minmax`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.stats import norm

from qtl_jax.compress import (
    commitment_loss,
    dequantize_levels,
    fsq_tanh_quantize,
    nf_dequantize,
    nf_quantize,
    quantize_levels,
    robust_scale,
)

BOUNDARY_TOL = 1e-5  # distance to a rounding boundary inside which float32 and float64 may disagree


def np_robust_scale(z, width=3.0):
    mu, sigma = z.mean(), z.std(ddof=1)
    lo, hi = mu - width * sigma, mu + width * sigma
    return 2 * (np.clip(z, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1


def np_levels(u, bits):
    d = 2**bits
    half, off = (d - 1) / 2, 0.5
    t = u * half - off
    idx = np.round(t) + off + half
    near_tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < BOUNDARY_TOL
    return idx.astype(np.int64), idx / half - 1, near_tie


def np_commitment(u, q):
    cos = (u * q).sum(-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(q, axis=-1) + 1e-3)
    return np.mean(1 - cos)


def np_nf(x, bits, g, mins_bits):
    p = (np.arange(2**bits) + 0.5) / 2**bits
    table = norm.ppf(p) / np.abs(norm.ppf(p)).max()
    rows = x.reshape(-1, x.shape[-1] // g, g)
    m, s = rows.min(-1), rows.max(-1) - rows.min(-1)
    xn = 2 * (rows - m[..., None]) / (s[..., None] + 1e-8) - 1
    dist = np.abs(xn[..., None] - table)
    idx = dist.argmin(-1)
    two = np.sort(dist, -1)[..., :2]
    near_tie = (two[..., 1] - two[..., 0]) < BOUNDARY_TOL

    def dq(v):
        lo, hi = v.min(-1, keepdims=True), v.max(-1, keepdims=True)
        code = np.round((v - lo) / (hi - lo + 1e-8) * 255)
        return lo + code / 255 * (hi - lo)

    s_hat = dq(s)
    m_hat = m if mins_bits == 32 else dq(m)
    x_hat = (table[idx] + 1) / 2 * s_hat[..., None] + m_hat[..., None]
    return idx.reshape(x.shape), x_hat.reshape(x.shape), near_tie.reshape(x.shape)


def _features(seed, shape=(4, 96, 128)):
    rng = np.random.default_rng(seed)
    # Heavy-ish tails and a per-channel offset, so that clipping and uneven blocks both happen.
    return (rng.standard_t(5, size=shape) * 1.5 + rng.normal(size=shape[-1])).astype(np.float32)


def _assert_indices(ours, ref, near_tie):
    ours = np.asarray(ours).astype(np.int64)
    mismatch = ours != ref
    assert not np.any(mismatch & ~near_tie), "indices differ away from a rounding boundary"
    assert mismatch.mean() < 1e-3


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_rd_fsq_against_numpy(bits):
    z = _features(bits)
    u_ref = np_robust_scale(z.astype(np.float64))
    u = robust_scale(z)
    np.testing.assert_allclose(u, u_ref, atol=2e-6)
    idx_ref, q_ref, near_tie = np_levels(u_ref, bits)
    idx = quantize_levels(u, bits)
    _assert_indices(idx, idx_ref, near_tie)
    q = dequantize_levels(idx, bits)
    agree = np.asarray(idx) == idx_ref
    np.testing.assert_allclose(np.asarray(q)[agree], q_ref[agree], atol=1e-7)
    np.testing.assert_allclose(commitment_loss(u, q), np_commitment(u_ref, q_ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_fsq_tanh_against_numpy(bits):
    z = _features(10 + bits) / 2
    idx_ref, _, near_tie = np_levels(np.tanh(z.astype(np.float64)), bits)
    _assert_indices(fsq_tanh_quantize(z, bits), idx_ref, near_tie)


@pytest.mark.parametrize(("bits", "mins_bits"), [(2, 32), (3, 32), (4, 8), (8, 32)])
def test_nf_against_numpy(bits, mins_bits):
    x = _features(20 + bits)
    idx_ref, x_hat_ref, near_tie = np_nf(x.astype(np.float64), bits, 64, mins_bits)
    idx, side = nf_quantize(x, bits, 64, mins_bits)
    _assert_indices(idx, idx_ref, near_tie)
    x_hat = np.asarray(nf_dequantize(idx, side, bits, 64))
    agree = np.asarray(idx) == idx_ref
    np.testing.assert_allclose(x_hat[agree], x_hat_ref[agree], rtol=1e-5, atol=1e-5)


def test_scaling_gradient_matches_torch_autograd_of_the_paper_code():
    """Gradient through clamp, mean and unbiased std, against PyTorch autograd of the reference formula."""
    z = _features(30, (2, 40, 16))
    w = np.random.default_rng(31).normal(size=z.shape).astype(np.float32)

    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    mean, std = zt.mean(), zt.std()
    q_min, q_max = mean - 3 * std, mean + 3 * std
    ut = 2 * (torch.clamp(zt, q_min, q_max) - q_min + 1e-4) / (q_max - q_min + 1e-4) - 1
    (ut * torch.tensor(w, dtype=torch.float64)).sum().backward()

    g = jax.grad(lambda z: jnp.sum(jnp.asarray(w) * robust_scale(z)))(jnp.asarray(z))
    np.testing.assert_allclose(g, zt.grad.numpy(), rtol=1e-4, atol=1e-6)
