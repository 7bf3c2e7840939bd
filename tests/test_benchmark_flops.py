"""`benchmarks/flops.py`: the matmul FLOPs the benchmarks divide by time (MFU), counted from a function's trace,
and the chips' datasheet peaks."""

import dataclasses
import os
import sys
import types

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import flops
import train_step

from qtl_jax import layers
from qtl_jax.models import tinyllava as T
from qtl_jax.models.siglip import SiglipVisionTower


def test_matmul_flops_counts_each_matmul_as_two_flops_per_multiply_add():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
    assert flops.matmul_flops(lambda x, w: x @ w, x, w) == 2 * 8 * 16 * 32
    a, b = jnp.ones((3, 5, 7)), jnp.ones((3, 7, 2))
    assert flops.matmul_flops(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b) == 2 * 3 * 5 * 7 * 2
    # Abstract arguments: nothing runs.
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((4, 6), (6, 10))]
    assert flops.matmul_flops(jnp.matmul, *shapes) == 2 * 4 * 6 * 10


def test_matmul_flops_counts_only_the_backward_that_runs():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
    forward = 2 * 8 * 16 * 32
    loss = lambda w, x: jnp.sum(jnp.tanh(x @ w))
    assert flops.matmul_flops(jax.grad(loss), w, x) == 2 * forward  # forward + dW: x gets no gradient
    assert flops.matmul_flops(jax.grad(loss, argnums=(0, 1)), w, x) == 3 * forward  # + dx
    w2 = jnp.ones((32, 4))
    two = lambda w2, w, x: jnp.sum(jnp.tanh(x @ w) @ w2)
    # Only w2 trains: the first matmul runs forward alone, the second forward and dW.
    assert flops.matmul_flops(jax.grad(two), w2, w, x) == forward + 2 * (2 * 8 * 32 * 4)


def test_matmul_flops_convolutions_scans_remat_and_custom_gradients():
    image, kernel = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 4, 8))
    conv = lambda image, kernel, groups=1: jax.lax.conv_general_dilated(
        image, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    assert flops.matmul_flops(conv, image, kernel) == 2 * (2 * 7 * 7 * 8) * (3 * 3 * 4)
    grouped = jnp.ones((3, 3, 2, 8))
    assert flops.matmul_flops(lambda i, k: conv(i, k, 2), image, grouped) == 2 * (2 * 7 * 7 * 8) * (3 * 3 * 2)

    x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
    one = 2 * 8 * 16 * 16
    scanned = lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0]
    assert flops.matmul_flops(scanned, x, w) == 5 * one
    assert flops.matmul_flops(jax.jit(jax.checkpoint(lambda x, w: x @ w)), x, w) == one

    @jax.custom_vjp
    def f(x, w):
        return x @ w

    f.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g @ jnp.eye(16)))
    # forward, then the custom backward's three matmuls (the last one [16, 16] x [16, 16]).
    assert flops.matmul_flops(jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)), x, w) == (
        3 * one + 2 * 16 * 16 * 16)


def test_matmul_flops_refuses_a_loop_of_unknown_length_with_matmuls():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
    with_matmul = lambda x, w: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]
    with pytest.raises(ValueError, match="while"):
        flops.matmul_flops(with_matmul, x, w)
    without = lambda x, w: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] * 2, c[1] + 1), (x, 0))[0] @ w
    assert flops.matmul_flops(without, x, w) == 2 * 8 * 16 * 16


def test_the_blocked_attention_backward_recomputes_its_scores():
    """Flash-style: 7 matmuls of a score block's size per block (2 forward, 5 backward: the scores again, dV,
    dP, dQ, dK) where XLA's attention has 6: what `split_step_flops` must not count as model work."""
    q = jnp.ones((1, 256, 4, 16))
    grad = lambda impl: jax.grad(lambda q, k, v: jnp.sum(layers.attention(q, k, v, causal=True, implementation=impl)),
                                 argnums=(0, 1, 2))
    one = 2 * 4 * 256 * 256 * 16
    assert flops.matmul_flops(grad("xla"), q, q, q) == 6 * one
    assert flops.matmul_flops(grad("blocked"), q, q, q) == 7 * one


def test_peak_flops_by_device_kind():
    kind = lambda name: types.SimpleNamespace(device_kind=name)
    assert flops.peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops(kind("NVIDIA H100 PCIe")) == 756e12
    assert flops.peak_flops(kind("NVIDIA H200")) == 989e12
    assert flops.peak_flops(kind("TPU v5 lite")) == 197e12
    assert flops.peak_flops(kind("TPU v5")) == 459e12
    assert flops.peak_flops(kind("TPU v6 lite")) == 918e12
    assert flops.peak_flops(kind("cpu")) is None
    assert flops.peak_flops() is None  # this test machine's CPU


def test_split_step_flops_counts_the_head_on_the_text_rows_and_is_the_same_for_any_attention_and_remat():
    parts = train_step.TRAINABLE
    cfg = T.TINYLLAVA_TINY
    batch, text = 2, 12
    batch = train_step.make_batch(batch, text, 3, cfg.lm.vocab_size, cfg.vision.image_size)
    base = flops.split_step_flops(cfg, jnp.float32, batch, parts)
    # 64 more vocabulary entries change only the tied head: its forward, input gradient and weight gradient on
    # the T text rows of each of the 2 samples (`supervised_positions`), not on the T + N - 1 rows the LM runs.
    wider = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=cfg.lm.vocab_size + 64))
    assert flops.split_step_flops(wider, jnp.float32, batch, parts) - base == 3 * 2 * (2 * text) * cfg.lm.model_dim * 64
    # The model's attention implementation and remat do not change the count (they change what runs).
    variant = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, attention="blocked", remat="full"),
                                  lm=dataclasses.replace(cfg.lm, attention="blocked", remat="full"))
    assert flops.split_step_flops(variant, jnp.float32, batch, parts) == base
    # A trainable tower adds at least its weight gradients (as many FLOPs as its forward's matmuls).
    trained_tower = flops.split_step_flops(cfg, jnp.float32, batch, ("vision_tower", *parts))
    tower = SiglipVisionTower(cfg.vision)
    images = jax.ShapeDtypeStruct(batch["images"].shape, jnp.float32)
    params = jax.eval_shape(tower.init, jax.random.key(0), images)
    forward = flops.matmul_flops(lambda p, x: tower.apply(p, x), params, images)
    assert trained_tower - base >= forward > 0
