"""Bad input raises ValueError saying what was expected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtl_jax.compress as C

X = np.random.default_rng(0).normal(size=(2, 4, 64)).astype(np.float32)
NAN_X = X.copy()
NAN_X[1, 2, 3] = np.nan
INF_X = X.copy()
INF_X[0, 0, 0] = np.inf


@pytest.mark.parametrize("bits", [0, 9, 2.5, "2", None])
@pytest.mark.parametrize(
    "call",
    [
        lambda b: C.quantize_levels(jnp.zeros(3), b),
        lambda b: C.dequantize_levels(jnp.zeros(3, jnp.uint8), b),
        lambda b: C.rd_fsq(X, b),
        lambda b: C.fsq_tanh(X, b),
        lambda b: C.nf_quantize(X, b),
        lambda b: C.nf_table(b),
        lambda b: C.pack(jnp.zeros(3, jnp.uint8), b),
        lambda b: C.index_entropy(np.zeros((2, 2), np.uint8), b),
        lambda b: C.entropy_encode(np.zeros((2, 2), np.uint8), b),
        lambda b: C.make_codec("rd_fsq", b),
        lambda b: C.make_codec("nf", b),
    ],
)
def test_bits_out_of_range(call, bits):
    with pytest.raises(ValueError, match=r"bits must be (an integer )?in 1\.\.8"):
        call(bits)


@pytest.mark.parametrize(
    "call",
    [C.robust_scale, lambda x: C.fsq_tanh_quantize(x, 2), lambda x: C.nf_quantize(x, 2), lambda x: C.rd_fsq(x, 2),
     lambda x: C.identity_quantize(x, jnp.float16), lambda x: C.select_bits(x)],
)
def test_wrong_rank(call):
    with pytest.raises(ValueError, match=r"must have shape \[\.\.\., N, D\] \(rows x features\), got shape \(64,\)"):
        call(X[0, 0])


@pytest.mark.parametrize(
    "call",
    [C.robust_scale, lambda x: C.fsq_tanh_quantize(x, 2), lambda x: C.nf_quantize(x, 2), lambda x: C.rd_fsq(x, 2),
     lambda x: C.nf_ste(x, 2), lambda x: C.identity_quantize(x, jnp.bfloat16), lambda x: C.select_bits(x),
     lambda x: C.kde_entropy(x)],
)
@pytest.mark.parametrize("bad", [NAN_X, INF_X], ids=["nan", "inf"])
def test_non_finite_values(call, bad):
    with pytest.raises(ValueError, match="finite"):
        call(bad)


def test_non_finite_check_is_skipped_under_jit_not_crashing():
    # Under jit the values are unknown at trace time; the static checks still run.
    out = jax.jit(C.robust_scale)(NAN_X)
    assert out.shape == NAN_X.shape
    with pytest.raises(ValueError, match="block_size"):
        jax.jit(lambda x: C.nf_quantize(x, 2, block_size=48))(X)


def test_block_size_must_divide_features():
    with pytest.raises(ValueError, match=r"D = 64 of x .* must be divisible by block_size G = 48"):
        C.nf_quantize(X, 2, block_size=48)
    with pytest.raises(ValueError, match=r"D = 64 of x .* must be divisible by block_size G = 48"):
        C.make_codec("nf", 2, block_size=48).quantize(X)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="floating-point"):
        C.robust_scale(X.astype(np.int32))
    with pytest.raises(ValueError, match=r"mask must have shape x.shape\[:-1\] = \(2, 4\)"):
        C.robust_scale(X, np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="integer array"):
        C.dequantize_levels(jnp.zeros(3), 2)
    with pytest.raises(ValueError, match="mins_bits must be 32 or 8"):
        C.nf_quantize(X, 2, mins_bits=16)
    with pytest.raises(ValueError, match="non-zero spread"):
        C.kde_entropy(np.ones(100))
    with pytest.raises(ValueError, match="scale must be"):
        C.select_bits(X, scale="minmax")
