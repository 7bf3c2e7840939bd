"""The split step on two meshes equals the single program; each half stays on its mesh; one compile."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from qtl_jax.models import tinyllava as T
from qtl_jax.split.runtime import (
    SplitConfig,
    SplitTrainer,
    compress_downlink,
    decompress_downlink,
    downlink_nbytes,
)

from ..models.test_tinyllava import batch, micro

CLIENT_MESH, SERVER_MESH = (2, 1, 1), (1, 2, 2)


def _trainer(cfg, mode, downlink="fp32", lr=0.1):
    boxed = jax.jit(T.TinyLlava(cfg).init)(jax.random.key(1), *batch())["params"]
    split = SplitConfig(mode=mode, client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH, downlink=downlink)
    return SplitTrainer(cfg, split, optax.sgd(lr), optax.sgd(lr), nn.meta.unbox(boxed), boxed_like=boxed)


def _batch():
    images, ids, mask, labels = batch()
    return {"images": images, "input_ids": ids, "attention_mask": mask, "labels": labels}


def _max_rel_diff(a, b):
    scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(b))
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)) / scale


@pytest.mark.parametrize(("name", "transport"), [("rd_fsq", "quantized_embeddings"), ("rd_fsq", "token_ids"),
                                                 ("none_fp16", "quantized_embeddings")])
def test_meshes_steps_equal_single_program(name, transport):
    cfg = micro(name, transport)
    single, meshes = _trainer(cfg, "single"), _trainer(cfg, "meshes")
    for _ in range(2):
        m_single, m_meshes = single.step(_batch()), meshes.step(_batch())
        np.testing.assert_allclose(float(m_meshes["ce_loss"]), float(m_single["ce_loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m_meshes["commitment_loss"]), float(m_single["commitment_loss"]),
                                   rtol=1e-5, atol=1e-7)
        assert m_meshes["uplink_bytes"] == m_single["uplink_bytes"] > 0
    assert _max_rel_diff(meshes.params(), single.params()) < 1e-5
    # Each half's state lives only on its own mesh, and each step function compiled once.
    client_devices = {d.id for d in meshes.meshes["client"].devices.flat}
    server_devices = {d.id for d in meshes.meshes["server"].devices.flat}
    assert not client_devices & server_devices
    for half, devices in (("client", client_devices), ("server", server_devices)):
        for leaf in jax.tree.leaves((meshes.state[half].params, meshes.state[half].opt_state)):
            assert {d.id for d in leaf.devices()} <= devices
    assert meshes._client_forward._cache_size() == 1
    assert meshes._server_step._cache_size() == 1
    assert meshes._client_update._cache_size() == 1


def test_downlink_codecs_bytes_and_error():
    rng = np.random.default_rng(0)
    grads = (rng.normal(size=(2, 15, 64)).astype(np.float32) * 1e-3, rng.normal(size=(2, 10, 64)).astype(np.float32))
    n = (2 * 15 + 2 * 10) * 64
    sizes, errors = {}, {}
    for name in ("fp32", "bf16", "nf8", "nf4"):
        payloads = compress_downlink(name, grads)
        sizes[name] = downlink_nbytes(payloads)
        back = decompress_downlink(name, payloads)
        errors[name] = max(float(np.sqrt(np.mean((b - g) ** 2) / np.mean(g**2))) for b, g in
                           zip(back, grads, strict=True))  # relative RMS error
    assert sizes["fp32"] == 4 * n and sizes["bf16"] == 2 * n
    # NF b-bit blocks of 64: b + 8/64 + 32/64 bits per element + 64 bits per row (8 bytes).
    assert sizes["nf8"] == n * 8 // 8 + n // 64 + 4 * n // 64 + 8 * 50
    assert sizes["nf4"] == n * 4 // 8 + n // 64 + 4 * n // 64 + 8 * 50
    assert errors["fp32"] == 0 and errors["bf16"] < 5e-3 and errors["nf8"] < 2.5e-2 < errors["nf4"] < 0.2, errors
    assert compress_downlink("fp32", (grads[0], None))[1] is None  # token_ids transport: no text gradient


def test_compressed_downlink_step():
    trainer = _trainer(micro("rd_fsq"), "meshes", "nf4")
    metrics = trainer.step(_batch())
    assert np.isfinite(float(metrics["ce_loss"]))
    assert metrics["downlink_bytes"] == (2 * 15 + 2 * 10) * 64 * (4 / 8 + 1 / 64 + 4 / 64) + 8 * 50


def test_bad_split_configs_fail_before_compiling():
    with pytest.raises(ValueError, match=r"need 16 devices, only 8 available"):
        SplitConfig(client_mesh=(2, 2, 2), server_mesh=(2, 2, 2)).check_devices()
    with pytest.raises(ValueError, match="split mode must be one of"):
        SplitConfig(mode="network")
    with pytest.raises(ValueError, match="downlink must be one of"):
        SplitConfig(downlink="int8")
