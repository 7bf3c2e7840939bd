"""qtl_jax.layers.attention: the blocked implementation equals jax.nn.dot_product_attention's XLA path (values and
gradients, every mask, grouped-query heads, ragged blocks, bf16, sharded, under remat), and which one runs."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import finetune
from qtl_jax import layers
from qtl_jax.layers import attention, blocked_attention
from qtl_jax.models.openelm import OPENELM_TINY, OpenELM
from qtl_jax.models.siglip import SIGLIP_TINY, SiglipVisionTower
from qtl_jax.trainer import model_config


def _qkv(batch=2, lq=13, lk=13, hq=4, hkv=2, dh=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, lq, hq, dh)).astype(np.float32)
    k = rng.standard_normal((batch, lk, hkv, dh)).astype(np.float32)
    v = rng.standard_normal((batch, lk, hkv, dh)).astype(np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _value_and_grads(fn, q, k, v):
    # A loss that weighs every output element differently, so that a wrong row, head or position shows.
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * weights)
    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return out, grads


def _assert_same(fn_ref, fn, q, k, v, tol=2e-6):
    (out_ref, g_ref), (out, g) = _value_and_grads(fn_ref, q, k, v), _value_and_grads(fn, q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_ref, np.float32), atol=tol, rtol=tol)
    for name, a, b in zip("qkv", g, g_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol, rtol=tol,
                                   err_msg=f"d{name}")


def _mask(batch, hq, lq, lk, seed=2):
    mask = np.random.default_rng(seed).random((batch, hq, lq, lk)) < 0.6
    mask[0, -1, 3] = False  # a fully masked row: both average every value (no NaN)
    return mask


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "kv_lengths": {"kv_lengths": np.array([13, 5])},
    "causal_kv_lengths_empty_row": {"causal": True, "kv_lengths": np.array([0, 9])},
    "mask": {"mask": _mask(2, 4, 13, 13)},
    "mask_broadcast_heads_causal": {"mask": _mask(2, 1, 13, 13), "causal": True},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", [5, 64])  # ragged last block; one block larger than all rows
def test_blocked_equals_xla(case, block):
    q, k, v = _qkv()
    kw = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x for name, x in CASES[case].items()}
    _assert_same(lambda q, k, v: attention(q, k, v, implementation="xla", **kw),
                 lambda q, k, v: blocked_attention(q, k, v, block=block, **kw), q, k, v)


@pytest.mark.parametrize("hq,hkv", [(6, 6), (6, 1), (6, 3)])
def test_blocked_equals_xla_heads_and_lengths(hq, hkv):
    """Multi-head, multi-query and grouped-query; fewer queries than keys (a prompt against a longer cache)."""
    q, k, v = _qkv(batch=1, lq=5, lk=11, hq=hq, hkv=hkv, dh=4, seed=3)
    mask = jnp.arange(11)[None, None, None, :] <= (jnp.arange(5) + 4)[None, None, :, None]  # the cache's mask
    _assert_same(lambda q, k, v: attention(q, k, v, mask=mask, implementation="xla"),
                 lambda q, k, v: blocked_attention(q, k, v, mask=mask, block=4), q, k, v)


def test_blocked_bf16_matches_xla_to_bf16_rounding():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    out = blocked_attention(q, k, v, causal=True, block=8)
    assert out.dtype == jnp.bfloat16
    ref = attention(q, k, v, causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
    exact = attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True, implementation="xla")
    err_blocked = np.abs(np.asarray(out, np.float32) - np.asarray(exact)).max()
    err_xla = np.abs(np.asarray(ref, np.float32) - np.asarray(exact)).max()
    assert err_blocked <= 1.5 * err_xla, (err_blocked, err_xla)  # no less accurate than XLA's own bf16 path


def test_blocked_under_remat_and_sharded():
    """Inside jax.checkpoint (the models' remat) and with batch and heads sharded over a 2 x 4 mesh."""
    q, k, v = _qkv(batch=2, hq=8, hkv=4)
    ref = lambda q, k, v: attention(q, k, v, causal=True, implementation="xla")
    _assert_same(ref, jax.checkpoint(lambda q, k, v: blocked_attention(q, k, v, causal=True, block=8)), q, k, v)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    shard = NamedSharding(mesh, P("data", None, "tensor", None))
    sharded = [jax.device_put(x, shard) for x in (q, k, v)]
    _assert_same(ref, lambda q, k, v: blocked_attention(q, k, v, causal=True, block=8), *sharded)


def _uses_blocked(q, k, v) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, causal=True))(q, k, v))


def test_attention_picks_blocked_on_cpu_when_rows_fill_two_blocks(monkeypatch):
    assert jax.default_backend() == "cpu"
    q, k, v = _qkv(lq=13, hq=4, hkv=2)  # 2 query heads per kv head x 13 positions = 26 rows
    monkeypatch.setattr(layers, "ATTENTION_BLOCK", 13)
    assert _uses_blocked(q, k, v)
    monkeypatch.setattr(layers, "ATTENTION_BLOCK", 14)
    assert not _uses_blocked(q, k, v)


def test_attention_rejects_bad_arguments():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attention must be one of"):
        attention(q, k, v, implementation="flash")
    for cfg in (OPENELM_TINY, SIGLIP_TINY):
        with pytest.raises(ValueError, match=r"attention must be one of \('auto', 'xla', 'blocked'\), got 'fast'"):
            dataclasses.replace(cfg, attention="fast")
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
        blocked_attention(q, jnp.zeros((2, 13, 3, 8)), jnp.zeros((2, 13, 3, 8)))


def test_models_through_blocked_attention(monkeypatch):
    """OpenELM (right padding, grouped-query heads) and SigLIP give the same outputs and gradients with
    `attention="blocked"` as with "xla" (blocks of 4 rows; generation: tests/models/test_generate); the trainer
    takes the field from `config.model.attention`."""
    config = finetune.get_config()
    config.model.attention = "blocked"
    built = model_config(config, OPENELM_TINY.vocab_size)
    assert built.lm.attention == built.vision.attention == "blocked"
    monkeypatch.setattr(layers, "ATTENTION_BLOCK", 4)
    cfg = OPENELM_TINY
    ids = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)))
    valid = jnp.arange(12)[None, :] < jnp.asarray([12, 7])[:, None]
    lm_params = jax.jit(OpenELM(cfg).init)(jax.random.key(0), ids)["params"]
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, SIGLIP_TINY.image_size,
                                                                      SIGLIP_TINY.image_size, 3)), jnp.float32)
    tower_params = jax.jit(SiglipVisionTower(SIGLIP_TINY).init)(jax.random.key(1), images)["params"]

    def run(implementation):
        lm = OpenELM(dataclasses.replace(cfg, attention=implementation))
        tower = SiglipVisionTower(dataclasses.replace(SIGLIP_TINY, attention=implementation))

        def lm_loss(p):
            logits, _ = lm.apply({"params": p}, ids, attention_mask=valid)
            return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2) / 1e3
        loss, grads = jax.jit(jax.value_and_grad(lm_loss))(lm_params)
        features = jax.jit(lambda p: tower.apply({"params": p}, images)[0])(tower_params)
        return loss, grads, features

    ref, got = run("xla"), run("blocked")
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(got[2], ref[2], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ bf16 matmul
_ULP = 2.0**-7  # one bf16 unit in the last place, relative to the value (at most)


def _bf16(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.bfloat16)


def _f32(x):
    return np.asarray(x, np.float32)


@pytest.mark.parametrize("batch", [3, 4, 0])  # 15 rows (padded to even for the kernel's gradient), 20, none
def test_bf16_matmul_is_float32_accumulation_rounded_once(batch):
    """Values: x @ kernel computed in float32 from the bf16 inputs, rounded once to bf16 (half an ulp at most),
    and within one ulp of the plain bf16 `lax.dot_general`; with float32 out, not rounded. Gradients (a bf16-exact
    cotangent): dx = g @ kernel.T and dkernel = x.T @ g, each in float32 rounded once; the batch axes of x fold
    into the kernel's gradient."""
    x, kernel = _bf16((batch, 5, 96), 0), _bf16((96, 40), 1)
    exact = np.einsum("bsk,kn->bsn", _f32(x), _f32(kernel))
    out = jax.jit(layers.bf16_matmul)(x, kernel)
    assert out.dtype == jnp.bfloat16 and out.shape == (batch, 5, 40)
    np.testing.assert_allclose(_f32(out), exact, rtol=_ULP / 2, atol=1e-6)
    plain = jax.lax.dot_general(x, kernel, (((2,), (0,)), ((), ())))
    np.testing.assert_allclose(_f32(out), _f32(plain), rtol=_ULP, atol=1e-6)

    g = _f32(_bf16((batch, 5, 40), 2))
    loss = lambda x, kernel: jnp.sum(layers.bf16_matmul(x, kernel).astype(jnp.float32) * g)
    dx, dkernel = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
    assert dx.dtype == dkernel.dtype == jnp.bfloat16
    np.testing.assert_allclose(_f32(dx), np.einsum("bsn,kn->bsk", g, _f32(kernel)), rtol=_ULP / 2, atol=1e-6)
    np.testing.assert_allclose(_f32(dkernel), np.einsum("bsk,bsn->kn", _f32(x), g), rtol=_ULP / 2, atol=1e-6)

    # float32 out (a model head's logits): not rounded; the float32 cotangent is rounded to bf16 (exact here)
    out32 = jax.jit(layers.bf16_matmul, static_argnums=2)(x, kernel, jnp.float32)
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(out32, exact, rtol=1e-5, atol=1e-5)
    loss32 = lambda x, kernel: jnp.sum(layers.bf16_matmul(x, kernel, jnp.float32) * g)
    grads32 = jax.jit(jax.grad(loss32, argnums=(0, 1)))(x, kernel)
    for a, b in zip(grads32, (dx, dkernel), strict=True):
        np.testing.assert_array_equal(_f32(a), _f32(b))


def test_bf16_matmul_kernel_gradient_keeps_its_transposed_copy_after_xla():
    """The kernel gradient x.T @ g reaches XLA:CPU's compiled program as a bf16 matmul whose left operand is
    contracted on its last axis (the form XLA:CPU's bf16 kernels take): XLA's simplifier did not fold the
    transposed copy back into the matmul (jax 0.11's XLA folded the earlier trick, and the program then failed
    to run)."""
    x, g = _bf16((16, 96), 0), _bf16((16, 40), 1)
    grad = jax.jit(jax.grad(lambda kernel: jnp.sum(layers.bf16_matmul(x, kernel).astype(jnp.float32) * g)))
    hlo = grad.lower(_bf16((96, 40), 2)).compile().as_text()
    dots = re.findall(r"= f32\[96,40\]\{1,0\} dot\(([^)]*)\), lhs_contracting_dims=\{(\d)\}", hlo)
    assert dots, hlo
    for operands, contracted in dots:
        assert contracted == "1", hlo
        lhs = operands.split(",")[0].strip().lstrip("%")
        assert re.search(rf"%{re.escape(lhs)} = bf16\[96,16\]", hlo), hlo
    np.testing.assert_allclose(_f32(grad(_bf16((96, 40), 2))), _f32(x).T @ _f32(g), rtol=_ULP / 2, atol=1e-6)


def test_dense_takes_bf16_matmul_on_cpu_in_bf16_only():
    """`layers.dense` in bf16 on a CPU runs `bf16_matmul` (a custom_vjp in its jaxpr) and gives the plain
    `nn.Dense`'s output and gradients to bf16 rounding, also under remat and with its input sharded; float32,
    an explicit precision or other dimension numbers keep `lax.dot_general`."""
    import flax.linen as nn

    assert jax.default_backend() == "cpu"
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6, 32)), jnp.float32)
    ours, plain = layers.dense(24, ("embed", "mlp"), name="d", dtype=jnp.bfloat16), nn.Dense(24, dtype=jnp.bfloat16)
    params = nn.unbox(ours.init(jax.random.key(0), x))
    assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p: ours.apply(p, x))(params))
    f32 = layers.dense(24, ("embed", "mlp"), name="d")
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda p: f32.apply(p, x))(params))
    bf = jnp.bfloat16
    for kwargs, takes in (({}, True), ({"precision": jax.lax.Precision.HIGHEST}, False),
                          ({"preferred_element_type": jnp.float32}, True),
                          ({"preferred_element_type": jnp.int32}, False)):
        jaxpr = jax.make_jaxpr(lambda a, b, kw=kwargs: layers.dense_dot_general(a, b, (((2,), (0,)), ((), ())), **kw))
        assert ("custom_vjp_call" in str(jaxpr(x.astype(bf), jnp.zeros((32, 8), bf)))) == takes, kwargs
    transposed = jax.make_jaxpr(lambda a, b: layers.dense_dot_general(a, b, (((0,), (0,)), ((), ()))))
    assert "custom_vjp_call" not in str(transposed(jnp.zeros((32, 6), bf), jnp.zeros((32, 8), bf)))

    weights = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6, 24)), jnp.float32)

    def value_and_grads(module, x):
        loss = lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * weights)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (ref, ref_grads) = value_and_grads(plain, x)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor")))
    rematted = nn.remat(nn.Dense, policy=jax.checkpoint_policies.checkpoint_dots)(
        24, dtype=jnp.bfloat16, dot_general=layers.dense_dot_general)
    for module, inputs in ((ours, x), (ours, sharded), (rematted, x)):
        got, grads = value_and_grads(module, inputs)
        np.testing.assert_allclose(got, ref, rtol=1e-2)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(_f32(a), _f32(b), rtol=2 * _ULP, atol=2 * _ULP * float(np.abs(_f32(b)).max()))


def test_in_float32_rounds_an_activation_once():
    """bf16 in, bf16 out, computed in float32: equal to the float32 activation of the same values rounded once
    (XLA's bf16 arithmetic would round after each of the tanh GELU's operations and differ on some inputs)."""
    import flax.linen as nn

    x = _bf16((64, 257), 3) * 3
    got = layers.in_float32(nn.gelu, x, approximate=True)
    assert got.dtype == jnp.bfloat16
    once = nn.gelu(_f32(x), approximate=True).astype(jnp.bfloat16)
    np.testing.assert_array_equal(_f32(got), _f32(once))
    per_op = jax.jit(lambda x: nn.gelu(x, approximate=True))(x)
    assert np.mean(_f32(per_op) != _f32(got)) > 0.01  # not vacuous: rounding per operation differs
    swiglu = layers.in_float32(lambda a, b: nn.silu(a) * b, x, x[::-1])
    np.testing.assert_array_equal(_f32(swiglu), _f32((nn.silu(_f32(x)) * _f32(x[::-1])).astype(jnp.bfloat16)))
