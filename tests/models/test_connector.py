import flax.linen as nn
import jax
import numpy as np
from scipy.special import erf

from qtl_jax.models.connector import Connector


def test_mlp2x_gelu_uses_the_exact_erf_gelu():
    x = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32) * 3
    module = Connector(16)
    params = nn.meta.unbox(module.init(jax.random.key(0), x))["params"]
    w0, b0 = (np.asarray(params["linear_0"][k], np.float64) for k in ("kernel", "bias"))
    w2, b2 = (np.asarray(params["linear_2"][k], np.float64) for k in ("kernel", "bias"))
    h = x @ w0 + b0
    expected = (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ w2 + b2  # PyTorch nn.GELU() default
    np.testing.assert_allclose(module.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)
    tanh_gelu = (0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))) @ w2 + b2
    assert not np.allclose(module.apply({"params": params}, x), tanh_gelu, rtol=1e-5, atol=1e-6)
    assert params["linear_0"]["kernel"].shape == (12, 16) and float(np.abs(b0).max()) == 0.0
