"""Flax modules: client and server halves compose to the single-program path; STE gradients."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import qtl_jax.compress as C

# The package exports functions named like some of its modules (`rd_fsq`), so fetch the modules themselves.
QUANTIZER_MODULES = [
    importlib.import_module(f"qtl_jax.compress.{name}") for name in ("ste", "rd_fsq", "nf", "identity", "codecs")
]

D = 64
CODECS = [C.make_codec(name, 2) for name in C.COMPRESSORS] + [C.make_codec("fsq", levels=(5, 5, 4))]
IDS = [c.name for c in CODECS]


def _setup(codec, seed=0):
    module = C.Compressor(codec, D)
    x = jax.random.normal(jax.random.key(seed), (2, 12, D)) * 3
    mask = jnp.arange(12)[None, :] < jnp.array([[12], [9]])
    params = module.init(jax.random.key(1), x, mask).get("params", {})
    return module, nn.meta.unbox(params), x, mask


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_client_then_server_equals_single_program(codec):
    module, params, x, mask = _setup(codec)
    client_params, server_params = C.split_params(params)
    assert set(client_params) == ({"in_proj"} if codec.projected else set())
    assert set(server_params) == ({"out_proj"} if codec.projected else set())
    client = jax.jit(C.client_apply, static_argnums=0)
    server = jax.jit(C.server_apply, static_argnums=0)
    out = client(module, client_params, x, mask)
    x_hat = server(module, server_params, out.payload)
    single, aux = jax.jit(module.apply)({"params": params}, x, mask)
    np.testing.assert_allclose(x_hat, single, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.loss, aux["commitment_loss"], rtol=1e-6)
    assert out.payload.nbytes == codec.payload_nbytes(x.shape)
    if codec.name == "rd_fsq":
        assert float(out.loss) > 0
        assert out.payload.nbytes == x.size * 2 // 8


def _without_rounding(monkeypatch):
    """Replaces every quantizer's straight-through map by the identity: 'rounding replaced by identity'."""
    for module in QUANTIZER_MODULES:
        monkeypatch.setattr(module, "straight_through", lambda fn, x: x)


@pytest.mark.parametrize("codec", CODECS, ids=IDS)
def test_ste_gradient_equals_gradient_without_rounding(codec, monkeypatch):
    module, params, x, mask = _setup(codec)
    w = jax.random.normal(jax.random.key(7), x.shape)

    def loss(params, x):
        # Linear in the output, so dL/dx_hat does not depend on where the forward value lands.
        x_hat, _ = module.apply({"params": params}, x, mask)
        return jnp.sum(w * x_hat)

    g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, x)
    _without_rounding(monkeypatch)
    r_params, r_x = jax.grad(loss, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(g_x, r_x, rtol=1e-5, atol=1e-6)
    if codec.projected:
        np.testing.assert_allclose(g_params["in_proj"]["kernel"], r_params["in_proj"]["kernel"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_params["in_proj"]["bias"], r_params["in_proj"]["bias"], rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(g_x, w)  # no projections: the whole compressor is the identity backwards


def test_split_gradient_through_payload_equals_single_program():
    """Client vjp of q with the server's dL/dq equals jax.grad of the single program (the split contract)."""
    module, params, x, mask = _setup(C.make_codec("rd_fsq", 2))
    client_params, server_params = C.split_params(params)
    w = jax.random.normal(jax.random.key(3), x.shape)
    alpha = 0.25

    def single(params):
        x_hat, aux = module.apply({"params": params}, x, mask)
        return jnp.sum(w * jnp.tanh(x_hat)) + alpha * aux["commitment_loss"]

    expected = jax.grad(single)(params)

    def client_fn(client_params):
        out = C.client_apply(module, client_params, x, mask)
        return out.q, (out.payload, out.loss)

    def server_loss(server_params, q):
        return jnp.sum(w * jnp.tanh(module.apply({"params": server_params}, q, method=C.Compressor.decode)))

    q, client_vjp, (payload, _) = jax.vjp(client_fn, client_params, has_aux=True)
    q_server = module.apply({"params": server_params}, payload, method=C.Compressor.dequantize)
    np.testing.assert_array_equal(q_server, q)
    g_server, g_q = jax.grad(server_loss, argnums=(0, 1))(server_params, q_server)
    (g_client,) = client_vjp(g_q)
    g_commit = jax.grad(lambda cp: alpha * C.client_apply(module, cp, x, mask).loss)(client_params)
    g_client = jax.tree.map(jnp.add, g_client, g_commit)
    for half, got in (("in_proj", g_client), ("out_proj", g_server)):
        for name in ("kernel", "bias"):
            want = expected[half][name]
            # Same math, different summation order (two vjps added vs one): float32 noise only.
            atol = 1e-6 * float(jnp.abs(want).max())
            np.testing.assert_allclose(got[half][name], want, rtol=1e-5, atol=atol)


def test_params_carry_logical_axis_names():
    module = C.Compressor(C.make_codec("rd_fsq", 2), D)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 4, D)))
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["in_proj"]["kernel"] == P("embed", "code")
    assert specs["out_proj"]["kernel"] == P("code", "embed")
    assert specs["out_proj"]["bias"] == P("embed")
    kernel = nn.meta.unbox(variables)["params"]["in_proj"]["kernel"]
    assert abs(float(jnp.std(kernel)) - 0.02) < 0.003


def test_sharded_batch_uses_global_statistics():
    """Rows sharded over 8 devices: RD-FSQ's mean/std stay global, so the result equals one device's."""
    module, params, _, _ = _setup(C.make_codec("rd_fsq", 2))
    x = jax.random.normal(jax.random.key(4), (8, 12, D)) * jnp.arange(1, 9.0)[:, None, None]
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    apply = jax.jit(lambda p, x: C.client_apply(module, p, x))
    client_params, _ = C.split_params(params)
    sharded, single = apply(client_params, xs), apply(client_params, x)
    assert len(xs.sharding.device_set) == 8
    np.testing.assert_array_equal(
        C.unpack(sharded.payload.codes, 2, x.shape), C.unpack(single.payload.codes, 2, x.shape)
    )


def test_wrong_feature_width_is_refused():
    module = C.Compressor(C.make_codec("rd_fsq", 2), D)
    with pytest.raises(ValueError, match=r"expects features of shape \[..., N, 64\], got \(1, 4, 32\)"):
        module.init(jax.random.key(0), jnp.zeros((1, 4, 32)))
    with pytest.raises(ValueError, match="unexpected compressor parameters"):
        C.split_params({"in_proj": {}, "codebook": {}})
