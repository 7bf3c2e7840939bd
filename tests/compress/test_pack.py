import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtl_jax.compress import pack, packed_nbytes, unpack


def reference_pack(values, bits):
    """Independent reference: one Python integer holding index i at bits [i*b, (i+1)*b), little-endian."""
    total = 0
    for i, v in enumerate(values):
        total |= int(v) << (bits * i)
    return total.to_bytes(math.ceil(len(values) * bits / 8), "little")


def test_hand_cases():
    np.testing.assert_array_equal(pack(np.array([1, 2, 3, 0]), 2), [1 | 2 << 2 | 3 << 4])
    np.testing.assert_array_equal(pack(np.array([1, 2, 15]), 4), [0x21, 0x0F])
    # b = 3: eight indices fill exactly three bytes; 1 + 2*8 + 3*64 + ... + 7*8^6 = 0x1F58D1.
    np.testing.assert_array_equal(pack(np.arange(1, 9) % 8, 3), [0xD1, 0x58, 0x1F])
    np.testing.assert_array_equal(pack(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1), [0b1101, 1])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=70))))
def test_pack_matches_reference_and_round_trips(case):
    bits, values = case
    idx = np.asarray(values, np.uint8)
    packed = np.asarray(pack(idx, bits))
    assert packed.dtype == np.uint8
    assert packed.tobytes() == reference_pack(values, bits)
    assert len(packed.tobytes()) == packed_nbytes(len(values), bits) == math.ceil(len(values) * bits / 8)
    np.testing.assert_array_equal(unpack(packed, bits, len(values)), idx)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (2, 8), (4, 1, 13)])
def test_round_trip_shapes_under_jit(bits, shape):
    idx = np.random.default_rng(bits).integers(0, 2**bits, size=shape).astype(np.uint8)
    packed = jax.jit(pack, static_argnums=1)(idx, bits)
    assert packed.shape == (packed_nbytes(idx.size, bits),)
    out = jax.jit(unpack, static_argnums=(1, 2))(packed, bits, shape)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, idx)


def test_high_bits_are_masked_not_spilled():
    np.testing.assert_array_equal(pack(np.array([7, 0, 0, 0]), 2), [3])


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(np.array([0, 1]), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack(np.zeros(1, np.uint8), bits, 2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="integer array"):
        pack(np.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match=r"expected ceil\(10 \* 3 / 8\) = 4"):
        unpack(np.zeros(3, np.uint8), 3, (10,))
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack(np.zeros(4, np.int32), 3, (10,))
