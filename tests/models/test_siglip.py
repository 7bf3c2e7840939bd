"""SigLIP: parity with transformers' SiglipVisionModel (torch, fp32), sizes, conversion both ways, bad checkpoints."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from qtl_jax.models import convert
from qtl_jax.models.siglip import SIGLIP_SO400M, SIGLIP_TINY, SiglipConfig, SiglipVisionTower, unstack_layers

# A small tower with 64 patches and TinyLLaVA's selection (drop token 0), like the paper size: more patches
# than the 9 of SIGLIP_TINY, so that patch order and the dropped token are checked.
TOWER = SiglipConfig(width=128, depth=4, num_heads=4, mlp_dim=256, patch_size=8, image_size=64)

TINY_HF = dict(hidden_size=TOWER.width, intermediate_size=TOWER.mlp_dim,
               num_hidden_layers=TOWER.depth, num_attention_heads=TOWER.num_heads,
               image_size=TOWER.image_size, patch_size=TOWER.patch_size, num_channels=3)


@pytest.fixture(scope="module")
def hf_tower(tmp_path_factory):
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**TINY_HF)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a swapped scale/bias would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(path)
    return model, str(path)


def _images(seed=0, batch=2):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, 64, 64, 3)).astype(np.float32)


def _hf_hidden(model, images):
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


def test_parity_every_layer_and_selected_features(hf_tower):
    model, path = hf_tower
    config, params = convert.load_siglip(path)
    assert config == TOWER and config.layers_used == 3  # layer -2 of 4: three layers built
    images = _images()
    features, aux = SiglipVisionTower(config).apply({"params": params}, images, return_hidden_states=True)
    hf = _hf_hidden(model, images)
    assert len(aux["hidden_states"]) == 4
    for ours, theirs in zip(aux["hidden_states"], hf[:4], strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert features.shape == (2, 63, 128)  # (64 / 8)^2 = 64 patches, token 0 dropped
    np.testing.assert_allclose(features, hf[-2][:, 1:], atol=1e-5)


def test_select_all_keeps_every_patch(hf_tower):
    model, path = hf_tower
    config, params = convert.load_siglip(path, SiglipConfig(**{**TOWER.__dict__, "select": "all"}))
    features, _ = SiglipVisionTower(config).apply({"params": params}, _images(1))
    np.testing.assert_allclose(features, _hf_hidden(model, _images(1))[-2], atol=1e-5)


def test_vision_model_prefix_layout_loads(hf_tower, tmp_path):
    model, path = hf_tower
    state = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    _, a = convert.load_siglip(path)
    _, b = convert.load_siglip(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_paper_size_parameter_count_without_memory():
    tower = SiglipVisionTower(SIGLIP_SO400M)
    shapes = jax.eval_shape(lambda: tower.init(jax.random.key(0), jnp.zeros((1, 384, 384, 3))))
    assert SIGLIP_SO400M.layers_used == 26 and SIGLIP_SO400M.num_tokens == 728
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes))) == 397_745_440


def test_tiny_preset_sees_one_token_per_grid_cell():
    # Shapes-VQA draws a 3 x 3 grid: at 48 px / patch 16 token r * 3 + c is exactly cell (r, c).
    assert SIGLIP_TINY.num_tokens == 9 and SIGLIP_TINY.image_size // SIGLIP_TINY.patch_size == 3
    image = np.zeros((1, 48, 48, 3), np.float32)
    image[0, 16:32, 32:48] = 1.0  # the middle-right cell only
    tower = SiglipVisionTower(dataclasses.replace(SIGLIP_TINY, depth=1, select_layer=0))  # embeddings only
    params = tower.init(jax.random.key(0), image)
    pos = nn.meta.unbox(params)["params"]["embeddings"]["position_embedding"]["embedding"]
    features, _ = tower.apply(params, image)
    moved = np.abs(np.asarray(features[0]) - np.asarray(pos)).sum(axis=1) > 1e-6
    assert moved.tolist() == [i == 5 for i in range(9)]


def test_export_round_trip_and_transformers_load(hf_tower, tmp_path):
    _, path = hf_tower
    config, params = convert.load_siglip(path)
    convert.export_siglip(params, config, str(tmp_path))
    config2, params2 = convert.load_siglip(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, params2)  # bit-exact
    images = _images(2)
    ours, _ = SiglipVisionTower(config).apply({"params": params}, images)
    ours2, _ = SiglipVisionTower(config2).apply({"params": params2}, images)
    np.testing.assert_array_equal(ours, ours2)
    exported = SiglipVisionModel.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(_hf_hidden(exported, images)[-1][:, 1:], ours, atol=1e-5)


def test_bad_checkpoints_list_every_problem(hf_tower, tmp_path):
    model, _ = hf_tower
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["encoder.layers.1.mlp.fc1.bias"]
    del state["embeddings.patch_embedding.bias"]
    state["encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(128, 64)
    state["encoder.layers.0.extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", **TINY_HF}))
    with pytest.raises(convert.CheckpointError) as err:
        convert.load_siglip(str(tmp_path))
    message = str(err.value)
    assert "2 missing" in message and "encoder.layers.1.mlp.fc1.bias" in message
    assert "embeddings.patch_embedding.bias" in message
    assert "1 unexpected" in message and "encoder.layers.0.extra.weight" in message
    assert "encoder.layers.0.self_attn.q_proj.weight: checkpoint (128, 64), model expects (128, 128)" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_siglip(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "openelm"}))
    with pytest.raises(convert.CheckpointError, match="not a SigLIP vision model"):
        convert.load_siglip(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        convert.read_weights(str(tmp_path))


def test_wrong_image_size_is_refused():
    tower = SiglipVisionTower(TOWER)
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 64, 64, 3\]"):
        tower.init(jax.random.key(0), jnp.zeros((1, 3, 64, 64)))


def test_uint8_pixels_are_normalised_in_the_tower():
    # The training pipeline sends the resized uint8 pixels; the tower rescales and normalises them itself.
    from qtl_jax.data.preprocess import preprocess_image

    pixels = np.random.default_rng(3).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    floats = np.stack([preprocess_image(p, 48) for p in pixels])  # the old host path, still accepted
    # A tower that returns its input: 1 px patches, identity kernel, no position embedding, no layers.
    identity = SiglipVisionTower(SiglipConfig(width=3, depth=1, num_heads=1, mlp_dim=4, patch_size=1,
                                              image_size=48, select_layer=0, select="all"))
    params = nn.meta.unbox(identity.init(jax.random.key(0), pixels))
    params["params"]["embeddings"]["patch_embedding"]["kernel"] = jnp.eye(3).reshape(1, 1, 3, 3)
    params["params"]["embeddings"]["position_embedding"]["embedding"] = jnp.zeros((48 * 48, 3))
    seen = lambda images: np.asarray(jax.jit(identity.apply)(params, images)[0]).reshape(floats.shape)
    np.testing.assert_array_equal(seen(floats), floats)  # float images pass untouched
    # (x / 255 - 0.5) / 0.5 to within one float32 ulp: XLA fuses the rescale into an FMA, the host rounds twice.
    np.testing.assert_allclose(seen(pixels), floats, rtol=0, atol=2**-23)
    tower = SiglipVisionTower(SIGLIP_TINY)
    params = tower.init(jax.random.key(0), pixels)
    features = jax.jit(lambda images: tower.apply(params, images)[0])
    np.testing.assert_allclose(features(pixels), features(floats), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="uint8 pixels or float images"):
        tower.apply(params, pixels.astype(np.int32))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_equal_the_unrolled_tower_and_convert_both_ways(hf_tower, tmp_path, remat):
    """`scan_layers` stacks the layers' parameters and runs one `nn.scan`: the same features, hidden states and
    gradients as the unrolled tower on the same checkpoint; loading and exporting go through the HF layout."""
    _, path = hf_tower
    scanned_cfg = dataclasses.replace(TOWER, scan_layers=True, remat=remat)
    _, params = convert.load_siglip(path, TOWER)
    _, stacked = convert.load_siglip(path, scanned_cfg)
    assert stacked["encoder"]["layers"]["fc1"]["kernel"].shape == (3, TOWER.width, TOWER.mlp_dim)
    assert not any(k.startswith("layers_") for k in stacked["encoder"])
    init = nn.meta.unbox(SiglipVisionTower(scanned_cfg).init(jax.random.key(0), _images()))["params"]
    assert jax.tree.structure(init) == jax.tree.structure(stacked)
    images = _images(1)
    ref, ref_aux = SiglipVisionTower(TOWER).apply({"params": params}, images, return_hidden_states=True)
    got, got_aux = SiglipVisionTower(scanned_cfg).apply({"params": stacked}, images, return_hidden_states=True)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for a, b in zip(got_aux["hidden_states"], ref_aux["hidden_states"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)

    def loss(cfg, p):
        return jnp.sum(jnp.square(SiglipVisionTower(cfg).apply({"params": p}, images)[0]))

    g_ref = jax.grad(lambda p: loss(TOWER, p))(params)
    g_got = unstack_layers(jax.grad(lambda p: loss(scanned_cfg, p))(stacked), scanned_cfg)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_ref))  # float32 rounding of large sums
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    convert.export_siglip(stacked, scanned_cfg, str(tmp_path / "out"))
    _, back = convert.load_siglip(str(tmp_path / "out"), TOWER)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
