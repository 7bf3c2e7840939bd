import numpy as np
import pytest
from scipy import stats

from qtl_jax.compress import entropy_decode, entropy_encode, index_entropy, kde_entropy, select_bits

GAUSSIAN_BITS = 0.5 * np.log2(2 * np.pi * np.e)  # 2.047


def test_kde_entropy_of_standard_normal():
    x = np.random.default_rng(0).normal(size=200_000)
    assert abs(kde_entropy(x) - GAUSSIAN_BITS) < 0.05
    # Differential entropy is scale dependent: doubling the std adds exactly one bit.
    assert abs(kde_entropy(2 * x) - (GAUSSIAN_BITS + 1)) < 0.05


def test_kde_entropy_of_unit_variance_laplace():
    x = np.random.default_rng(1).laplace(scale=1 / np.sqrt(2), size=200_000)
    assert abs(kde_entropy(x) - np.log2(2 * np.e / np.sqrt(2))) < 0.05  # 1.942 bits


def test_binned_kde_matches_scipy_gaussian_kde():
    from qtl_jax.compress.entropy import _binned_kde

    rng = np.random.default_rng(5)
    fit, points = rng.standard_t(4, size=3000), rng.standard_t(4, size=500)
    bandwidth = np.std(fit, ddof=1) * fit.size ** (-1 / 5)
    exact = stats.gaussian_kde(fit, bw_method="scott")(points)
    np.testing.assert_allclose(_binned_kde(fit, bandwidth, points)(points), exact, rtol=1e-3)


def test_index_entropy_hand_case():
    idx = np.array([[0, 0], [1, 0], [2, 0], [3, 0]])
    overall, per_channel = index_entropy(idx, 2)
    np.testing.assert_allclose(per_channel, [2.0, 0.0])
    # Overall counts {0: 5, 1: 1, 2: 1, 3: 1} of 8.
    expected = -(5 / 8 * np.log2(5 / 8) + 3 / 8 * np.log2(1 / 8))
    np.testing.assert_allclose(overall, expected)


def test_select_bits_gaussian_and_laplace():
    rng = np.random.default_rng(2)
    gauss = select_bits(rng.normal(3.0, 5.0, size=(256, 512)).astype(np.float32))
    assert gauss.bits == 3 and abs(gauss.entropy_bits - GAUSSIAN_BITS) < 0.05  # standardized: scale-free
    laplace = select_bits(rng.laplace(size=(256, 512)).astype(np.float32))
    assert laplace.bits == 2 and abs(laplace.entropy_bits - 1.942) < 0.03
    assert set(gauss.index_entropy) == set(range(1, 9))
    assert all(h <= b for b, h in gauss.index_entropy.items())
    raw = select_bits(rng.normal(0.0, 4.0, size=(64, 256)).astype(np.float32), scale="raw")
    assert raw.bits == 5 and raw.scale == "raw"  # 2.047 + log2(4) = 4.05 bits


def test_select_bits_ignores_padding_rows():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(1, 40, 128)).astype(np.float32)
    padded = np.concatenate([real, np.full((1, 24, 128), 50.0, np.float32)], axis=1)
    mask = np.arange(64)[None] < 40
    a, b = select_bits(real), select_bits(padded, mask)
    assert a.entropy_bits == b.entropy_bits and a.index_entropy == b.index_entropy


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("model", ["channel", "global"])
def test_entropy_coder_round_trips_bit_exactly(bits, model):
    rng = np.random.default_rng(bits)
    idx = rng.integers(0, 2**bits, size=(3, 50, 24)).astype(np.uint8)
    payload = entropy_encode(idx, bits, model=model)
    out = entropy_decode(payload)
    assert out.dtype == np.uint8 and out.shape == idx.shape
    np.testing.assert_array_equal(out, idx)
    assert len(payload.to_bytes()) == payload.nbytes
    np.testing.assert_array_equal(entropy_decode(payload.from_bytes(payload.to_bytes())), idx)


def test_entropy_coder_beats_b_bits_on_skewed_indices():
    rng = np.random.default_rng(0)
    probs = [0.85, 0.1, 0.04, 0.01]
    idx = rng.choice(4, p=probs, size=(16, 832, 64)).astype(np.uint8)
    h, _ = index_entropy(idx, 2)
    for model in ("global", "channel"):
        payload = entropy_encode(idx, 2, model=model)
        np.testing.assert_array_equal(entropy_decode(payload), idx)
        assert payload.bits_per_element < 2
        # Within 1% of the plug-in entropy, frequency tables included.
        assert payload.bits_per_element < 1.01 * h


def test_entropy_coder_rejects_bad_input():
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\)"):
        entropy_encode(np.array([[0, 4]]), 2)
    with pytest.raises(ValueError, match="model"):
        entropy_encode(np.array([[0, 1]]), 2, model="adaptive")
