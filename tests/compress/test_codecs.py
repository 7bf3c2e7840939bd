"""Codecs and payloads: what crosses the wire, byte for byte."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.compress import COMPRESSORS, Payload, make_codec

CODECS = [make_codec(name, 2) for name in COMPRESSORS] + [
    make_codec("rd_fsq", 1),
    make_codec("rd_fsq", 3),
    make_codec("nf", 4, mins_bits=8),
    make_codec("fsq", levels=(7, 5, 5, 5, 5)),
]
IDS = [f"{c.name}-{c.bits}" for c in CODECS]


def _code(codec, shape, seed=0):
    width = codec.code_width(shape[-1])
    z = jax.random.normal(jax.random.key(seed), (*shape[:-1], width)) * 2
    return codec.encode(z)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_payload_bytes_are_exactly_nbytes_and_round_trip(codec):
    shape = (2, 9, 128)
    code = _code(codec, shape)
    quantized = codec.quantize(code)
    payload = codec.to_payload(quantized)
    wire = payload.to_bytes()
    assert len(wire) == payload.nbytes == codec.payload_nbytes(shape)
    received = payload.from_bytes(wire)
    np.testing.assert_array_equal(codec.dequantize(codec.from_payload(received)), codec.dequantize(quantized))
    # The single-program STE forward equals what the server dequantizes, bit for bit.
    np.testing.assert_array_equal(codec.ste(code), codec.dequantize(codec.from_payload(received)))
    with pytest.raises(ValueError, match="expects"):
        payload.from_bytes(wire + b"\0")


def test_paper_sizes_wire_cost():
    shape = (8, 832, 1280)  # one batch of image + text rows
    fp16 = make_codec("none_fp16").payload_nbytes(shape)
    assert fp16 == 8 * 832 * 1280 * 2
    assert make_codec("none_fp32").payload_nbytes(shape) == 2 * fp16
    for bits in (1, 2, 3, 4):
        nbytes = make_codec("rd_fsq", bits).payload_nbytes(shape)
        assert nbytes == 8 * 832 * 1280 * bits // 8  # b bits per element, nothing else
    assert 1 - make_codec("rd_fsq", 2).payload_nbytes(shape) / fp16 == 0.875  # the paper's 87.5% cut


def test_payload_is_a_pytree_that_jit_and_device_put_move():
    codec = make_codec("nf", 2)
    payload = codec.to_payload(codec.quantize(_code(codec, (4, 64))))
    leaves = jax.tree.leaves(payload)
    assert len(leaves) == 5  # codes + scales_q, scale_lo, scale_hi, mins
    moved = jax.device_put(payload, jax.devices()[3])
    assert moved.codes.devices() == {jax.devices()[3]} and moved.shape == payload.shape
    server = jax.jit(lambda p: codec.dequantize(codec.from_payload(p)))
    # jit may fuse NF's (t + 1) / 2 * s + m into an FMA: equal to eager up to one rounding.
    np.testing.assert_allclose(server(moved), codec.dequantize(codec.from_payload(payload)), rtol=1e-6)


def test_codec_mismatch_is_refused():
    rd, fsq = make_codec("rd_fsq", 2), make_codec("fsq_tanh", 2)
    payload = rd.to_payload(rd.quantize(_code(rd, (2, 8))))
    with pytest.raises(ValueError, match="made by 'rd_fsq' at 2 bits"):
        fsq.from_payload(payload)
    with pytest.raises(ValueError, match="at 2 bits, this codec is 'rd_fsq' at 3 bits"):
        make_codec("rd_fsq", 3).from_payload(payload)


def test_make_codec_errors():
    with pytest.raises(ValueError, match="unknown compressor 'vq'; expected one of rd_fsq"):
        make_codec("vq")
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.8, got 9"):
        make_codec("rd_fsq", 9)
    with pytest.raises(ValueError, match="mins_bits must be 32 or 8"):
        make_codec("nf", 2, mins_bits=16)


def test_identity_payload_is_the_cast_features():
    codec = make_codec("none_bf16")
    x = jnp.linspace(-3, 3, 24).reshape(2, 12)
    payload = codec.to_payload(codec.quantize(codec.encode(x)))
    assert isinstance(payload, Payload) and payload.codes.dtype == jnp.bfloat16 and payload.bits == 16
    np.testing.assert_array_equal(codec.dequantize(codec.from_payload(payload)), x.astype(jnp.bfloat16))
