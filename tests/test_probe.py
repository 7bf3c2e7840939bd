"""The linear probe behind `python -m qtl_jax.probe`: exact on separable data, chance on noise."""

import numpy as np

from qtl_jax.probe import linear_probe_accuracy


def test_probe_reads_a_linearly_encoded_label_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 2000)
    x = np.eye(6)[y] @ rng.normal(size=(6, 16)) + 0.05 * rng.normal(size=(2000, 16))
    assert linear_probe_accuracy(x, y) == 1.0
    assert abs(linear_probe_accuracy(rng.normal(size=(2000, 16)), y) - 1 / 6) < 0.05
    # One code for every sample (what 2-bit RD-FSQ sends for every object in the tiny recipe): majority only.
    constant = np.ones((2000, 16))
    assert linear_probe_accuracy(constant, y) == np.mean(y[1000:] == np.bincount(y[:1000]).argmax())
