import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.compress import (
    codec_from_dict,
    codec_to_dict,
    commitment_loss,
    dequantize_levels,
    levels_ste,
    make_codec,
    quantize_levels,
    rd_fsq,
    robust_scale,
)
from qtl_jax.compress.rd_fsq import clipped_fraction, distortion_loss, masked_moments, usage_loss


def test_four_levels_are_exactly_thirds():
    q = np.asarray(dequantize_levels(jnp.arange(4), 2))
    np.testing.assert_array_equal(q, np.array([-1, -1 / 3, 1 / 3, 1], np.float32))
    assert q[1] == -q[2]


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_level_maps_to_its_index(bits):
    d = 2**bits
    levels = np.linspace(-1, 1, d, dtype=np.float64)
    idx = quantize_levels(jnp.asarray(levels, jnp.float32), bits)
    np.testing.assert_array_equal(idx, np.arange(d))
    np.testing.assert_allclose(dequantize_levels(idx, bits), levels, atol=1e-7)


def test_hand_rounding_d4():
    # u * 1.5 - 0.5 rounded half-to-even, then + 2: u = 0 sits half-way between -1/3 and 1/3 and goes up.
    u = jnp.array([-1.0, -0.7, -0.5, -0.34, -0.32, 0.0, 0.3, 0.34, 0.66, 0.67, 1.0])
    np.testing.assert_array_equal(quantize_levels(u, 2), [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    # b = 1: levels {-1, 1}, u = 0 maps to 1 (round(-0.5) = -0).
    np.testing.assert_array_equal(quantize_levels(jnp.array([-0.1, 0.0, 0.1]), 1), [0, 1, 1])


def test_robust_scale_hand_case_with_clipping():
    # 99 zeros and one 100: mean 1, unbiased variance (99 * 1 + 99^2) / 99 = 100 -> std 10, lo = -29, hi = 31.
    z = np.zeros((1, 100, 1), np.float32)
    z[0, -1, 0] = 100.0
    u = np.asarray(robust_scale(z))
    np.testing.assert_allclose(u[0, 0, 0], 2 * (29 + 1e-4) / (60 + 1e-4) - 1, rtol=1e-5)
    assert u[0, -1, 0] == 1.0  # clipped to hi


def test_robust_scale_ignores_padding_rows():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(1, 6, 8)).astype(np.float32)
    padded = np.concatenate([real, np.full((1, 4, 8), 1e3, np.float32)], axis=1)
    mask = np.array([[True] * 6 + [False] * 4])
    np.testing.assert_allclose(robust_scale(padded, mask)[:, :6], robust_scale(real), rtol=1e-6)
    # Without the mask the padding would dominate the statistics (the reference's behaviour).
    assert not np.allclose(robust_scale(padded)[:, :6], robust_scale(real), atol=1e-2)


def test_constant_input_gives_finite_values_and_gradient():
    z = jnp.full((2, 3, 4), 0.5)  # mean exactly 0.5, variance exactly 0
    np.testing.assert_array_equal(robust_scale(z), 1.0)  # 2 * 1e-4 / 1e-4 - 1
    for value in (0.5, 0.7):  # 0.7: rounding leaves a variance of ~1e-15, still no NaN
        g = jax.grad(lambda z: jnp.sum(robust_scale(z)))(jnp.full((2, 3, 4), value))
        assert np.isfinite(np.asarray(g)).all()


def test_gradient_flows_through_statistics():
    z = jax.random.normal(jax.random.key(0), (2, 5, 4))
    w = jax.random.normal(jax.random.key(1), z.shape)
    full = jax.grad(lambda z: jnp.sum(w * robust_scale(z)))(z)
    mean, std = jnp.mean(z), jnp.std(z, ddof=1)
    frozen = jax.grad(lambda z: jnp.sum(w * (2 * (z - (mean - 3 * std) + 1e-4) / (6 * std + 1e-4) - 1)))(z)
    assert not np.allclose(full, frozen, atol=1e-4)


def test_commitment_loss_hand_case():
    u = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    q = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    first = 1 - 1 / (1 + 1e-3)
    np.testing.assert_allclose(commitment_loss(u, q), (first + 1.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(commitment_loss(u, q, jnp.array([True, False])), first, atol=1e-7)
    # sg(q): no gradient reaches the quantized values.
    np.testing.assert_array_equal(jax.grad(lambda q: commitment_loss(u, q))(q), 0.0)


def test_distortion_loss_hand_case():
    v = jnp.array([[0.5, 1.5], [-0.2, 0.0]])
    q = jnp.array([[1 / 3, 1.0], [-1 / 3, 1 / 3]])
    first = ((0.5 - 1 / 3) ** 2 + 0.5**2) / 2
    second = ((-0.2 + 1 / 3) ** 2 + (1 / 3) ** 2) / 2
    np.testing.assert_allclose(distortion_loss(v, q), (first + second) / 2, rtol=1e-6)
    np.testing.assert_allclose(distortion_loss(v, q, jnp.array([True, False])), first, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda v: distortion_loss(v, q))(v), (v - q) / 2, rtol=1e-6)
    np.testing.assert_array_equal(jax.grad(lambda q: distortion_loss(v, q))(q), 0.0)


def test_saturation_satisfies_the_cosine_term_but_not_the_distortion_term():
    """The collapse mechanism in one picture: rows pushed past the 3-sigma clip sit exactly on the outer levels,
    so the paper's cosine term is ~0 there and passes no gradient back (the clip blocks it), while the
    distortion term grows with the distance past the clip and pulls the values back."""
    key = jax.random.key(0)
    calm = jax.random.normal(key, (64, 8))
    signs = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, (4, 8)), 1.0, -1.0)
    saturated = signs * 40.0  # far past mean +- 3 std of the batch
    z = jnp.concatenate([calm, saturated])
    only_saturated = jnp.arange(68) >= 64

    def losses(z):
        moments = masked_moments(z, None)
        u = robust_scale(z, moments=moments)
        q = levels_ste(u, 2)
        v = robust_scale(z, moments=moments, clip=False)
        return commitment_loss(u, q, only_saturated), distortion_loss(v, q, only_saturated)

    cosine, distortion = losses(z)
    assert float(cosine) < 1e-3  # saturated rows are "committed" at no cost
    # ... but the distortion term charges them exactly their clipping error, (|v| - 1)^2 per element (here
    # 40 / (3 std ~ 29) ~ 1.37 in scaled units): the further past the clip, the higher.
    v = robust_scale(z, moments=masked_moments(z, None), clip=False)[64:]
    np.testing.assert_allclose(distortion, jnp.mean(jnp.square(jnp.abs(v) - 1)), rtol=1e-5)
    assert float(distortion) > 0.1
    np.testing.assert_allclose(clipped_fraction(z), 32 / (68 * 8), rtol=1e-6)
    # The gradient on the saturated values themselves: none from the cosine term, a pull back from distortion.
    g_cos = jax.grad(lambda z: losses(z)[0])(z)[64:]
    g_dist = jax.grad(lambda z: losses(z)[1])(z)[64:]
    np.testing.assert_allclose(g_cos, 0.0, atol=1e-9)  # (only ~1e-13 through the statistics)
    assert float(jnp.mean(g_dist * signs)) > 0  # descent moves each value towards the clip range


def test_clipped_fraction_hand_case():
    z = jnp.concatenate([jnp.zeros(99), jnp.array([100.0])])[None, :, None] * jnp.ones((1, 1, 2))
    # mean 1, unbiased std = sqrt((99 + 99^2) / 199) ~ 9.97: only the 100s are past 1 + 3 std.
    np.testing.assert_allclose(clipped_fraction(z), 0.01, rtol=1e-6)
    mask = jnp.arange(100)[None] < 99  # without the last row nothing is clipped (a constant: std 0)
    np.testing.assert_allclose(clipped_fraction(z, mask), 0.0)


def test_usage_loss_is_highest_for_a_collapsed_channel():
    levels = jnp.array([-1, -1 / 3, 1 / 3, 1.0])
    collapsed = jnp.full((2, 8, 3), 1 / 3)  # every token in the same bin: no usage at all
    spread = jnp.broadcast_to(jnp.tile(levels, 4)[None, :, None], (1, 16, 3))  # every level equally often
    between = jnp.zeros((1, 8, 3))  # on the boundary of two bins: maximally unsure, two bins used
    np.testing.assert_allclose(usage_loss(collapsed, 2), 0.0, atol=1e-6)
    # Spread: mean H of the batch-average = log 4, per-element H of a softmax with logit gaps of 4 and 16
    # (temperature (1/3)^2, levels 2/3 apart).
    logits = -jnp.square(levels[:, None] - levels[None, :]) / (1 / 9)
    p = jax.nn.softmax(logits, axis=-1)
    per_element = -jnp.mean(jnp.sum(p * jnp.log(p), axis=-1))
    average = jnp.mean(p, axis=0)
    expected = (per_element + jnp.sum(average * jnp.log(average))) / jnp.log(4.0)
    np.testing.assert_allclose(usage_loss(spread, 2), expected, rtol=1e-5)
    assert float(usage_loss(spread, 2)) < -0.85
    np.testing.assert_allclose(usage_loss(between, 2), 0.0, atol=1e-5)  # H(p) = H(mean p) = log 2
    # Padding rows do not count: a collapsed batch with real rows spread is a spread batch.
    mixed = jnp.concatenate([spread, jnp.full((1, 16, 3), 1 / 3)], axis=1)
    np.testing.assert_allclose(usage_loss(mixed, 2, jnp.arange(32)[None] < 16), usage_loss(spread, 2), rtol=1e-5)
    # The gradient of a collapsed channel pushes its values apart (towards other bins).
    u = collapsed + jax.random.normal(jax.random.key(0), collapsed.shape) * 0.05
    g = jax.grad(lambda u: usage_loss(u, 2))(u)
    assert float(jnp.corrcoef(-g.ravel(), (u - u.mean(axis=(0, 1))).ravel())[0, 1]) > 0.5


def test_codec_loss_terms_and_stats():
    z = jax.random.normal(jax.random.key(2), (2, 5, 16)) * 3 + 0.5
    mask = jnp.ones((2, 5), bool).at[1, 3:].set(False)
    default, paper = make_codec("rd_fsq", 2), make_codec("rd_fsq", 2, commitment="cosine")
    assert default.commitment == "distortion"
    moments = default.moments(z, mask)
    code = default.encode(z, mask, moments)
    q = default.ste(code)
    np.testing.assert_allclose(paper.loss(code, q, mask), commitment_loss(code, q, mask), rtol=1e-6)
    v = robust_scale(z, mask, moments=moments, clip=False)
    np.testing.assert_allclose(default.loss(code, q, mask, z, moments), distortion_loss(v, q, mask), rtol=1e-6)
    np.testing.assert_allclose(default.stats(z, mask, moments)["clipped"], clipped_fraction(z, mask), rtol=1e-6)
    assert make_codec("fsq_tanh", 2).stats(z, mask) == {}
    with_usage = make_codec("rd_fsq", 2, usage_weight=0.5)
    np.testing.assert_allclose(with_usage.loss(code, q, mask, z, moments),
                               distortion_loss(v, q, mask) + 0.5 * usage_loss(code, 2, mask), rtol=1e-6)
    assert codec_from_dict(codec_to_dict(paper)) == paper
    with pytest.raises(ValueError, match="commitment must be one of"):
        make_codec("rd_fsq", 2, commitment="l1")


def test_levels_ste_value_equals_server_and_gradient_is_identity():
    u = jax.random.uniform(jax.random.key(0), (4, 16), minval=-1, maxval=1)
    for bits in (1, 2, 3, 4, 8):
        np.testing.assert_array_equal(levels_ste(u, bits), dequantize_levels(quantize_levels(u, bits), bits))
        grad = jax.grad(lambda u, b=bits: jnp.sum(levels_ste(u, b) * 3.0))(u)
        np.testing.assert_array_equal(grad, 3.0)


def test_rd_fsq_bundle_matches_pieces():
    z = jax.random.normal(jax.random.key(0), (2, 7, 16)) * 4 + 1
    mask = jnp.arange(7)[None, :] < jnp.array([[7], [5]])
    q, idx, loss = jax.jit(rd_fsq, static_argnums=1)(z, 2, mask)
    u = robust_scale(z, mask)
    np.testing.assert_array_equal(idx, quantize_levels(u, 2))
    np.testing.assert_array_equal(q, dequantize_levels(idx, 2))
    np.testing.assert_allclose(loss, distortion_loss(robust_scale(z, mask, clip=False), q, mask), rtol=1e-6)
    assert idx.dtype == jnp.uint8 and int(idx.max()) <= 3
    _, _, cosine = rd_fsq(z, 2, mask, loss="cosine")
    np.testing.assert_allclose(cosine, commitment_loss(u, q, mask), rtol=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        rd_fsq(z, 2, mask, loss="l2")


def test_per_sample_statistics_are_each_sample_alone():
    rng = np.random.default_rng(3)
    z = (rng.normal(size=(3, 5, 8)) * np.array([1.0, 10.0, 0.1])[:, None, None]).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    u = np.asarray(robust_scale(z, mask, per_sample=True))
    for i in range(3):  # each sample scaled by its own real rows, as if it were alone in the batch
        alone = np.asarray(robust_scale(z[i:i + 1, mask[i]]))
        np.testing.assert_allclose(u[i, mask[i]], alone[0], rtol=1e-6, atol=1e-6)
    # Batch statistics mix the samples: sample 2 (std 0.1) lands in the middle bins of sample 1's range.
    assert not np.allclose(np.asarray(robust_scale(z, mask))[2, :2], u[2, :2], atol=0.1)
    # A sample without real rows gets std 0: finite codes, no NaN.
    empty = np.zeros_like(mask)
    empty[0] = True
    assert np.isfinite(np.asarray(robust_scale(z, empty, per_sample=True))).all()


def test_given_moments_replace_the_codes_own():
    rng = np.random.default_rng(4)
    prompt, new = rng.normal(size=(2, 6, 8)).astype(np.float32), rng.normal(size=(2, 1, 8)).astype(np.float32) * 5
    moments = masked_moments(prompt, None, per_sample=True)
    assert moments[0].shape == (2, 1, 1)
    mean, std = np.asarray(moments[0])[:, 0, 0], np.asarray(moments[1])[:, 0, 0]
    lo, hi = mean - 3 * std, mean + 3 * std
    expected = 2 * (np.clip(new, lo[:, None, None], hi[:, None, None]) - lo[:, None, None] + 1e-4) / (
        (hi - lo)[:, None, None] + 1e-4) - 1
    np.testing.assert_allclose(robust_scale(new, moments=moments), expected, rtol=1e-5, atol=1e-6)


def test_inference_codec_and_settings_round_trip():
    codec = make_codec("rd_fsq", 3)
    inference = codec.for_inference()
    assert (codec.statistics, inference.statistics) == ("batch", "sample") and inference.bits == 3
    for c in (codec, inference, make_codec("fsq_tanh", 2), make_codec("fsq", levels=(8, 5, 5)),
              make_codec("nf", 4, mins_bits=8), make_codec("none_bf16")):
        assert codec_from_dict(json.loads(json.dumps(codec_to_dict(c)))) == c
        if c.name != "rd_fsq":
            assert c.for_inference() is c  # row-wise codecs do not depend on the batch
    with pytest.raises(ValueError, match="statistics must be one of"):
        make_codec("rd_fsq", 2, statistics="ema")


def test_per_channel_statistics_hand_case_and_reference():
    # Two channels: one with a large constant offset, one with a small spread. One range for both (the paper)
    # spends every level on the offset; per channel, each channel's spread uses its own range.
    z = np.array([[[100.0, -1.0], [100.0, 0.0], [100.0, 1.0], [100.0, 2.0]]], np.float32)
    moments = masked_moments(z, None, per_channel=True)
    assert moments[0].shape == (2,)
    np.testing.assert_allclose(moments[0], [100.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(moments[1], [0.0, np.std([-1, 0, 1, 2], ddof=1)], rtol=1e-6)
    per_tensor = np.asarray(quantize_levels(robust_scale(z), 2))
    per_channel = np.asarray(quantize_levels(robust_scale(z, per_channel=True), 2))
    assert len(np.unique(per_tensor[0, :, 1])) == 1  # the small channel collapses to one code
    np.testing.assert_array_equal(per_channel[0, :, 1], [1, 1, 2, 2])  # u = -0.39, -0.13, 0.13, 0.39 -> 1 1 2 2
    # Against numpy, with padding and per sample: each sample's real rows, channel by channel.
    rng = np.random.default_rng(5)
    z = (rng.normal(size=(3, 6, 4)) * [1.0, 5.0, 0.2, 3.0] + [0.0, 10.0, -3.0, 1.0]).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 0, 0, 0]], bool)
    mean, std = (np.asarray(m) for m in masked_moments(z, mask, per_sample=True, per_channel=True))
    assert mean.shape == std.shape == (3, 1, 4)
    for i in range(3):
        rows = z[i, mask[i]]
        np.testing.assert_allclose(mean[i, 0], rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(std[i, 0], rows.std(0, ddof=1), rtol=1e-5)
    mean, std = (np.asarray(m) for m in masked_moments(z, mask, per_channel=True))
    np.testing.assert_allclose(mean, z[mask].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, z[mask].std(0, ddof=1), rtol=1e-5)
    # The codec: scale="channel" uses these statistics in encode, the loss term and the clipped fraction.
    codec = make_codec("rd_fsq", 2, scale="channel")
    lo, hi = mean - 3 * std, mean + 3 * std
    expected = 2 * (np.clip(z, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1
    code = codec.encode(z, mask)
    np.testing.assert_allclose(np.asarray(code)[mask], expected[mask], rtol=1e-5, atol=1e-5)
    v = 2 * (z - lo + 1e-4) / (hi - lo + 1e-4) - 1
    q = codec.ste(code)
    np.testing.assert_allclose(codec.loss(code, q, mask, z),
                               np.mean(np.square(v - np.asarray(q))[mask]), rtol=1e-5)
    np.testing.assert_allclose(codec.stats(z, mask)["clipped"], np.mean((np.abs(z - mean) > 3 * std)[mask]))
    assert codec_from_dict(json.loads(json.dumps(codec_to_dict(codec)))) == codec
    assert codec.for_inference().scale == "channel"
    with pytest.raises(ValueError, match="scale must be one of"):
        make_codec("rd_fsq", 2, scale="row")
