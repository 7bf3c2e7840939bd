"""Logical axis rules (pure logic) and a sharded forward on an 8-device CPU mesh equal to the unsharded one."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qtl_jax import sharding
from qtl_jax.models import tinyllava as T

from .models.test_tinyllava import batch, micro


def test_rules_map_logical_names_with_fallbacks():
    mesh = sharding.make_mesh((2, 2, 2))
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed"), (64, 64), mesh) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("embed", "mlp"), (63, 128), mesh) == P(None, "tensor")  # 63 % 2 != 0
    assert sharding.logical_to_spec(("norm",), (64,), mesh) == P()
    assert sharding.logical_to_spec(("mlp", "heads"), (64, 64), mesh) == P("tensor")  # tensor used once
    assert sharding.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"))
    small = sharding.make_mesh((4,), axis_names=("data",))
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 64), small) == P()  # axes absent


def test_make_mesh_refuses_too_many_devices():
    with pytest.raises(ValueError, match="needs 16 devices, only 8 available"):
        sharding.make_mesh((4, 2, 2))
    mesh = sharding.make_mesh((2, 2), devices=jax.devices()[4:], axis_names=("data", "tensor"))
    assert sorted(d.id for d in mesh.devices.flat) == [4, 5, 6, 7]
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_sharded_forward_equals_unsharded():
    cfg = micro("rd_fsq")
    model = T.TinyLlava(cfg)
    data = batch()
    boxed = jax.jit(model.init)(jax.random.key(1), *data)["params"]
    params = nn.meta.unbox(boxed)
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.param_shardings(boxed, mesh)
    sharded = jax.device_put(params, shardings)
    kernel = sharded["server"]["language_model"]["layers_1"]["ffn"]["proj_1"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor") and len(kernel.sharding.device_set) == 8
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    data_sharded = [jax.device_put(np.concatenate([x] * 2), batch_sharding) for x in data]
    apply = jax.jit(lambda p, *d: model.apply({"params": p}, *d)[0])
    expected = apply(params, *[np.concatenate([x] * 2) for x in data])
    got = apply(sharded, *data_sharded)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
