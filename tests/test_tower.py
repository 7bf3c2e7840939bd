"""Stage 0 (`qtl_jax.tower`): the sigmoid loss on hand cases, captions from stage-1 labels, padding that no token
sees, the tower's parameters in the split model's layout, and a step that learns to match images to captions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qtl_jax import tower
from qtl_jax.models import tinyllava as T
from qtl_jax.models.siglip import SIGLIP_TINY


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def test_sigmoid_loss_by_hand():
    image = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    text = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    scale, bias = np.log(2.0), -1.0
    positives = np.array([[1, 0, 0], [0, 1, 1], [0, 1, 1]], bool)  # rows 1 and 2: the same caption
    valid = np.array([True, True, True])
    logits = image @ text.T * 2.0 - 1.0
    signs = np.where(positives, 1.0, -1.0)
    expected = -_log_sigmoid(signs * logits).sum() / 3
    got = tower.sigmoid_loss(image, text, scale, bias, positives, valid)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # An invalid row takes part in no pair, as image or as caption; the mean is over the valid rows.
    valid = np.array([True, False, True])
    keep = np.ix_([0, 2], [0, 2])
    expected = -_log_sigmoid((signs * logits)[keep]).sum() / 2
    np.testing.assert_allclose(tower.sigmoid_loss(image, text, scale, bias, positives, valid), expected, rtol=1e-6)


def test_captions_from_stage_one_labels():
    ignore = tower.IGNORE_INDEX
    labels = np.array([[ignore, ignore, 5, 6, 7, 2],
                       [ignore, 5, 6, 7, 2, ignore],  # the same caption as row 0, elsewhere in the row
                       [ignore, ignore, ignore, ignore, ignore, ignore],  # a skipped sample
                       [ignore, 9, 8, 7, 6, 5]])  # longer than max_text_len: cut
    ids, lengths, positives = tower.captions(labels, max_text_len=4)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 2], [5, 6, 7, 2], [0, 0, 0, 0], [9, 8, 7, 6]])
    np.testing.assert_array_equal(lengths, [4, 4, 0, 4])
    np.testing.assert_array_equal(positives, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    ids, lengths, positives = tower.captions(labels[:2, :5], max_text_len=6)
    np.testing.assert_array_equal(lengths, [3, 4])  # [5, 6, 7] and [5, 6, 7, 2] differ
    np.testing.assert_array_equal(positives, np.eye(2, dtype=bool))


def _config():
    return tower.TowerConfig(SIGLIP_TINY, vocab_size=32, max_text_len=8, text_depth=1, embed_dim=16)


def test_text_tower_ignores_padding():
    cfg = _config()
    model = tower.TextTower(cfg.text, cfg.vocab_size, cfg.max_text_len)
    ids = np.array([[3, 4, 5, 0, 0, 0], [7, 8, 0, 0, 0, 0]], np.int32)
    lengths = np.array([3, 2], np.int32)
    params = model.init(jax.random.key(0), ids, lengths)
    out = model.apply(params, ids, lengths)
    noisy = ids.copy()
    noisy[0, 3:], noisy[1, 2:] = 9, 11  # other tokens in the padding
    np.testing.assert_allclose(model.apply(params, noisy, lengths), out, atol=1e-6)
    np.testing.assert_allclose(model.apply(params, ids[:, :3], lengths), out, atol=1e-6)  # shorter padding
    changed = ids.copy()
    changed[0, 1] = 9  # a token inside the caption
    assert not np.allclose(model.apply(params, changed, lengths)[0], out[0], atol=1e-4)
    np.testing.assert_allclose(model.apply(params, changed, lengths)[1], out[1], atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_stage_zero_hands_on_the_split_models_tower(scan_layers):
    vision = dataclasses.replace(SIGLIP_TINY, scan_layers=scan_layers)
    params = tower.init(dataclasses.replace(_config(), vision=vision), seed=0)
    handed = tower.vision_tower(params)
    assert set(handed) == {"client"} and set(handed["client"]) == {"vision_tower"}
    from qtl_jax.compress import make_codec
    from qtl_jax.models.openelm import OPENELM_TINY

    model_cfg = T.TinyLlavaConfig(vision=vision, lm=OPENELM_TINY, image_codec=make_codec("rd_fsq", 2),
                                  text_codec=make_codec("rd_fsq", 2))
    size = vision.image_size
    ids = np.array([[1, T.IMAGE_TOKEN_INDEX, 3, 4]], np.int32)
    split = jax.eval_shape(T.TinyLlava(model_cfg).init, jax.random.key(0), np.zeros((1, size, size, 3), np.uint8),
                           ids, np.ones_like(ids, bool), np.full_like(ids, -100))["params"]
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    split_tower = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, split["client"]["vision_tower"],
                               is_leaf=lambda x: hasattr(x, "value"))
    assert shapes(handed["client"]["vision_tower"]) == shapes(split_tower)


def test_a_step_learns_to_match_images_and_captions():
    """Eight images of distinct colours, each with its own caption: the batch retrieval reaches 1 and the loss
    falls to a small fraction of its start."""
    cfg = _config()
    colours = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], np.uint8)
    size = cfg.vision.image_size
    images = np.broadcast_to(colours[:, None, None, :], (8, size, size, 3)).copy()
    labels = np.full((8, 5), tower.IGNORE_INDEX, np.int64)
    labels[:, 1:4] = np.stack([np.arange(8) % 2 + 3, np.arange(8) // 2 % 2 + 5, np.arange(8) // 4 + 7], 1)
    ids, lengths, positives = tower.captions(labels, cfg.max_text_len)
    np.testing.assert_array_equal(positives, np.eye(8, dtype=bool))
    params = tower.init(cfg, seed=0)
    tx = optax.adam(1e-3)  # SigLIP's lr; at 3e-3 and above this batch falls into a two-cluster minimum
    opt_state = tx.init(params)
    step = tower.make_step(cfg, tx)
    losses, retrieval = [], 0.0
    for _ in range(60):
        params, opt_state, metrics = step(params, opt_state, images, ids, lengths, positives)
        losses.append(float(metrics["loss"]))
        retrieval = float(metrics["retrieval"])
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    assert retrieval == 1.0
    assert np.isfinite(losses).all() and jnp.ndim(metrics["temperature"]) == 0
