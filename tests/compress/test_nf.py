import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from qtl_jax.compress import make_codec, nf_bits_per_element, nf_dequantize, nf_quantize, nf_ste, nf_table


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_table_is_normalised_normal_quantiles(bits):
    q = stats.norm.ppf((np.arange(2**bits) + 0.5) / 2**bits)
    np.testing.assert_allclose(nf_table(bits), q / np.abs(q).max(), rtol=1e-6)


def test_table_hand_values():
    np.testing.assert_allclose(nf_table(2), [-1, -0.2770, 0.2770, 1], atol=1e-4)
    # Phi^-1(1/16) / Phi^-1(15/16) = -0.88715 / 1.53412 = -0.57828 (the reference's float16 table has -0.5781).
    np.testing.assert_allclose(
        nf_table(3), [-1, -0.57828, -0.31860, -0.10254, 0.10254, 0.31860, 0.57828, 1], atol=2e-5
    )
    t = nf_table(4)
    assert t[0] == -1 and t[-1] == 1 and 0.0 not in t and np.all(np.diff(t) > 0)


def test_hand_case_two_blocks():
    # Block 1: m = 0, s = 3, xn = [-1, -1/3, 1/3, 1] -> nearest of [-1, -.277, .277, 1] = [0, 1, 2, 3].
    # Block 2: m = 10, s = 4, xn = [-1, -1, -1, 1] -> [0, 0, 0, 3].
    x = jnp.array([[0.0, 1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 14.0]])
    idx, side = nf_quantize(x, 2, block_size=4)
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 0, 0, 0, 3]])
    # Scales [3, 4] double-quantized between 3 and 4: codes 0 and 255, so both come back exactly.
    np.testing.assert_array_equal(side["scales_q"], [[0, 255]])
    np.testing.assert_array_equal(side["scale_lo"], [3.0])
    np.testing.assert_array_equal(side["scale_hi"], [4.0])
    np.testing.assert_array_equal(side["mins"], [[0.0, 10.0]])
    t = nf_table(2)
    expected = np.concatenate([(t + 1) / 2 * 3, (t[[0, 0, 0, 3]] + 1) / 2 * 4 + 10])
    np.testing.assert_allclose(nf_dequantize(idx, side, 2, 4), expected[None], rtol=1e-6)


def test_argmin_semantics_on_table_points_and_midpoints():
    t = nf_table(3)
    mids = (t[:-1] + t[1:]) / 2
    values = jnp.asarray(np.concatenate([t, mids, [-1.5, 1.5]]), jnp.float32)
    from qtl_jax.compress.nf import nearest_entry

    brute = np.argmin(np.abs(np.asarray(values)[:, None] - t[None]), axis=1)
    np.testing.assert_array_equal(nearest_entry(values, t), brute)


@pytest.mark.parametrize("bits", range(1, 9))
def test_argmin_matches_brute_force_every_bits(bits):
    from qtl_jax.compress.nf import nearest_entry

    values = np.random.default_rng(bits).uniform(-1.2, 1.2, 20000).astype(np.float32)
    t = nf_table(bits)
    brute = np.argmin(np.abs(values[:, None] - t[None]), axis=1)
    np.testing.assert_array_equal(nearest_entry(jnp.asarray(values), t), brute)


def test_error_falls_with_bits_and_mins8_costs_less():
    x = jax.random.normal(jax.random.key(0), (16, 256))
    errors = []
    for bits in (2, 4, 8):
        idx, side = nf_quantize(x, bits)
        errors.append(float(jnp.mean((nf_dequantize(idx, side, bits) - x) ** 2)))
    assert errors[0] > 4 * errors[1] > 16 * errors[2]
    idx8, side8 = nf_quantize(x, 2, mins_bits=8)
    assert "mins" not in side8 and side8["mins_q"].dtype == jnp.uint8
    err8 = float(jnp.mean((nf_dequantize(idx8, side8, 2) - x) ** 2))
    assert err8 < 1.2 * errors[0]


@pytest.mark.parametrize("mins_bits", [32, 8])
def test_wire_cost_matches_spec_formula(mins_bits):
    codec = make_codec("nf", 2, mins_bits=mins_bits)
    shape = (3, 832, 1280)
    nbytes = codec.payload_nbytes(shape)
    per_element = 8 * nbytes / np.prod(shape)
    np.testing.assert_allclose(per_element, nf_bits_per_element(2, 64, 1280, mins_bits), rtol=1e-12)
    if mins_bits == 32:  # SPEC §3.3: 2 + 8/64 + 32/64 + 64/D
        np.testing.assert_allclose(per_element, 2 + 8 / 64 + 32 / 64 + 64 / 1280, rtol=1e-12)


def test_ste_identity_gradient_and_value():
    x = jax.random.normal(jax.random.key(0), (4, 128))
    idx, side = nf_quantize(x, 3)
    np.testing.assert_array_equal(nf_ste(x, 3), nf_dequantize(idx, side, 3))
    w = jax.random.normal(jax.random.key(1), x.shape)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(w * nf_ste(x, 3)))(x), w)
