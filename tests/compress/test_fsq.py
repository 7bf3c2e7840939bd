import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.compress import (
    dequantize_levels,
    fsq_bound,
    fsq_codebook,
    fsq_codes_to_indices,
    fsq_indices_to_codes,
    fsq_quantize,
    fsq_tanh,
    fsq_tanh_quantize,
    quantize_levels,
)


def test_fsq_tanh_is_tanh_then_levels():
    z = jax.random.normal(jax.random.key(0), (3, 8)) * 2
    q, idx = fsq_tanh(z, 2)
    np.testing.assert_array_equal(idx, quantize_levels(jnp.tanh(z), 2))
    np.testing.assert_array_equal(idx, fsq_tanh_quantize(z, 2))
    np.testing.assert_array_equal(q, dequantize_levels(idx, 2))
    g = jax.grad(lambda z: jnp.sum(fsq_tanh(z, 2)[0]))(z)
    np.testing.assert_allclose(g, 1 - jnp.tanh(z) ** 2, rtol=1e-5, atol=1e-7)  # STE: only tanh' remains


@pytest.mark.parametrize("level", [4, 6, 8, 16])
def test_even_levels_bound_is_centred_by_arctanh_shift(level):
    # bound(0) = tanh(arctanh(o / h)) * h - o = 0. The published `tan` shift would miss by ~4e-3 at L = 4.
    assert abs(float(fsq_bound(jnp.zeros((1, 1)), [level])[0, 0])) < 1e-6


def test_bound_range_and_code_values():
    levels = (8, 5, 4, 3)
    z = jax.random.normal(jax.random.key(0), (20000, 4)) * 3
    b = fsq_bound(z, levels)
    codes = np.asarray(fsq_quantize(z, levels))
    for c, level in enumerate(levels):
        half = level // 2
        assert float(b[:, c].min()) > -half - 0.5 and float(b[:, c].max()) < level - half - 0.5
        expected = (np.arange(level) - half) / half
        np.testing.assert_array_equal(np.unique(codes[:, c]), expected.astype(np.float32))


def test_codebook_hand_case_and_bijection():
    levels = (3, 4)  # basis [1, 3]; L = 3 -> {-1, 0, 1}, L = 4 -> {-1, -1/2, 0, 1/2}
    book = fsq_codebook(levels)
    expected = [[c0, c1] for c1 in (-1, -0.5, 0, 0.5) for c0 in (-1, 0, 1)]
    np.testing.assert_array_equal(book, expected)
    levels = (8, 5, 5, 5)
    book = fsq_codebook(levels)
    assert book.shape == (math.prod(levels), 4)
    np.testing.assert_array_equal(fsq_codes_to_indices(book, levels), np.arange(math.prod(levels)))
    idx = jnp.array([0, 17, 999])
    np.testing.assert_array_equal(fsq_codes_to_indices(fsq_indices_to_codes(idx, levels), levels), idx)


def test_quantize_gradient_is_bound_derivative_over_half_width():
    levels = (5, 4)
    z = jax.random.normal(jax.random.key(3), (6, 2))
    g = jax.grad(lambda z: jnp.sum(fsq_quantize(z, levels)))(z)
    gb = jax.grad(lambda z: jnp.sum(fsq_bound(z, levels) / jnp.array([2.0, 2.0])))(z)
    np.testing.assert_allclose(g, gb, rtol=1e-6)


def test_bad_levels():
    with pytest.raises(ValueError, match="levels"):
        fsq_bound(jnp.zeros((2, 2)), [1, 4])
    with pytest.raises(ValueError, match="L = 2 has no centred bound"):
        fsq_bound(jnp.zeros((2, 2)), [2, 4])
    with pytest.raises(ValueError, match="3 channels"):
        fsq_quantize(jnp.zeros((2, 2)), [4, 4, 4])
    with pytest.raises(ValueError, match="entries"):
        fsq_codebook([2**13, 2**12])
