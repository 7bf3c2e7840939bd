"""Stage 0: the client pretrains its vision tower on the stage-1 image-caption pairs with SigLIP's sigmoid loss
(Zhai et al. 2023), on its own, before any split training.

Why: the paper starts from SigLIP so400m, pretrained on WebLI, and freezes it in both stages. The tiny preset has
no pretrained tower; trained from random weights inside the split recipe, its 2-bit codes collapse unless the
client waits and then moves at a tenth of the learning rate (README "Code collapse"), a workaround tuned on
Shapes-VQA. Stage 0 follows the paper's recipe at small scale instead: a tower pretrained contrastively on the
data owner's own image-caption pairs, then frozen. Nothing crosses the network in stage 0 (the images and the
captions are the data owner's), and everything but the tower (the text tower, the pooling head, the projections,
the temperature and bias) is dropped after it.

The model: the vision tower as the split model builds it (its parameters are the client's `vision_tower`
subtree, layer for layer), SigLIP's attention-pooling head over the features the connector reads, and a small
text transformer (SigLIP's encoder layers, right-padded captions masked out) pooled by the mean over the
caption's tokens. Captions come from the stage-1 batches: the supervised label tokens of the `pretrain`
template. Two pairs whose captions are equal are both positives (digits' captions repeat: "a handwritten
seven"), so the loss does not push apart images that the text cannot tell apart.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtl_jax.data.templates import IGNORE_INDEX
from qtl_jax.layers import INIT_STD, attention, dense, layer_norm
from qtl_jax.models.siglip import SiglipConfig, SiglipEncoderLayer, SiglipVisionTower


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Sizes of the stage-0 model.

    Attributes:
      vision: the split model's vision tower (its parameters are what stage 0 hands on).
      vocab_size: the tokenizer's vocabulary (the captions' token ids).
      max_text_len: captions are cut to this many tokens.
      text_depth: encoder layers of the text tower (width, heads and MLP as the vision tower's).
      embed_dim: the shared embedding both towers project to.
    """

    vision: SiglipConfig
    vocab_size: int
    max_text_len: int = 64
    text_depth: int = 2
    embed_dim: int = 128

    @property
    def text(self) -> SiglipConfig:
        return dataclasses.replace(self.vision, depth=self.text_depth, select_layer=-1, remat="none",
                                   scan_layers=False)


class AttentionPool(nn.Module):
    """SigLIP's multihead attention pooling head ("MAP"): a learned probe attends over the tokens, then a
    residual MLP. float[B, N, width] -> float[B, width]."""

    config: SiglipConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        head_dim = cfg.width // cfg.num_heads
        probe = self.param("probe", nn.initializers.normal(INIT_STD), (1, 1, cfg.width))
        split = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, head_dim)
        proj = lambda name: dense(cfg.width, ("embed", "heads"), name=name)
        q = split(proj("q_proj")(jnp.broadcast_to(probe, (x.shape[0], 1, cfg.width))))
        k, v = split(proj("k_proj")(x)), split(proj("v_proj")(x))
        pooled = dense(cfg.width, ("heads", "embed"), name="out_proj")(
            attention(q, k, v, implementation=cfg.attention).reshape(x.shape[0], cfg.width))
        h = layer_norm(cfg.layer_norm_eps, "layer_norm")(pooled)
        h = nn.gelu(dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1")(h), approximate=True)
        return pooled + dense(cfg.width, ("mlp", "embed"), name="fc2")(h)


class TextTower(nn.Module):
    """Right-padded caption tokens -> the mean of the final layer over each caption's tokens.

    Args: ids int32[B, L] (L <= max_text_len), lengths int32[B] (tokens of each row; the rest is padding that no
    token attends to and the mean leaves out). Returns float[B, width]; a row of length 0 gives zeros."""

    config: SiglipConfig
    vocab_size: int
    max_text_len: int

    @nn.compact
    def __call__(self, ids: jax.Array, lengths: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Embed(self.vocab_size, cfg.width, embedding_init=nn.initializers.normal(INIT_STD),
                     name="token_embedding")(ids)
        position = self.param("position_embedding", nn.initializers.normal(cfg.width**-0.5),
                              (self.max_text_len, cfg.width))
        x = x + position[: ids.shape[1]]
        for i in range(cfg.depth):
            x = SiglipEncoderLayer(cfg, name=f"layers_{i}")(x, lengths)
        x = layer_norm(cfg.layer_norm_eps, "final_layer_norm")(x)
        mask = (jnp.arange(ids.shape[1]) < lengths[:, None])[..., None]
        return jnp.sum(jnp.where(mask, x, 0.0), axis=1) / jnp.maximum(lengths, 1)[:, None]


class TowerModel(nn.Module):
    """(images, caption ids, lengths) -> (image embeddings, text embeddings, logit scale, logit bias); the
    embeddings are float32[B, embed_dim] of unit norm (zeros for an empty caption)."""

    config: TowerConfig

    @nn.compact
    def __call__(self, images: jax.Array, ids: jax.Array, lengths: jax.Array):
        cfg = self.config
        features, _ = SiglipVisionTower(cfg.vision, name="vision_tower")(images)
        image = dense(cfg.embed_dim, ("embed", "mlp"), name="image_projection")(
            AttentionPool(cfg.vision, name="image_head")(features))
        text = dense(cfg.embed_dim, ("embed", "mlp"), name="text_projection")(
            TextTower(cfg.text, cfg.vocab_size, cfg.max_text_len, name="text_tower")(ids, lengths))
        # SigLIP's initialisation: t' = log 10, b = -10 (the many negatives start out at small probability).
        logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(10.0)), ())
        logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), ())
        unit = lambda z: z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))
        return unit(image), unit(text), logit_scale, logit_bias


def sigmoid_loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array,
                 positives: jax.Array, valid: jax.Array) -> jax.Array:
    """SigLIP's loss: every (image i, caption j) pair is a binary problem, z_ij = 1 for a positive pair and -1
    otherwise, loss = -sum_ij log sigmoid(z_ij (exp(t') <x_i, y_j> + b)) / n over the n valid rows.

    image, text: float[B, E] (unit rows); positives: bool[B, B]; valid: bool[B] (an invalid row, e.g. a skipped
    sample, takes part in no pair)."""
    logits = image @ text.T * jnp.exp(logit_scale) + logit_bias
    signs = jnp.where(positives, 1.0, -1.0)
    pairs = valid[:, None] & valid[None, :]
    total = jnp.sum(jnp.where(pairs, jax.nn.log_sigmoid(signs * logits), 0.0))
    return -total / jnp.maximum(jnp.sum(valid), 1)


def captions(labels: np.ndarray, max_text_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The supervised label tokens of each row of a stage-1 batch, left-aligned: (ids int32[B, max_text_len],
    lengths int32[B], positives bool[B, B]); a caption longer than max_text_len is cut. Row pairs whose (cut)
    captions are equal are positives; an empty row (a skipped sample) is no one's positive, not even its own."""
    batch = labels.shape[0]
    ids = np.zeros((batch, max_text_len), np.int32)
    lengths = np.zeros((batch,), np.int32)
    for i, row in enumerate(labels):
        tokens = row[row != IGNORE_INDEX][:max_text_len]
        ids[i, : len(tokens)], lengths[i] = tokens, len(tokens)
    positives = (ids[:, None, :] == ids[None, :, :]).all(-1) & (lengths[:, None] == lengths[None, :])
    positives &= (lengths > 0)[:, None]
    return ids, lengths, positives


def init(config: TowerConfig, seed: int) -> dict:
    """Plain (unboxed) parameters of the stage-0 model."""
    size = config.vision.image_size
    example = (np.zeros((1, size, size, 3), np.uint8), np.zeros((1, config.max_text_len), np.int32),
               np.ones((1,), np.int32))
    return nn.meta.unbox(jax.jit(TowerModel(config).init)(jax.random.key(seed), *example)["params"])


def make_step(config: TowerConfig, tx: optax.GradientTransformation):
    """The jitted step: (params, opt_state, images uint8[B, H, W, 3], ids, lengths, positives) ->
    (params, opt_state, metrics {loss, retrieval: image->caption top-1 accuracy on the batch}). The state
    buffers are donated."""
    model = TowerModel(config)

    def loss_fn(params, images, ids, lengths, positives):
        image, text, scale, bias = model.apply({"params": params}, images, ids, lengths)
        valid = lengths > 0
        loss = sigmoid_loss(image, text, scale, bias, positives, valid)
        best = jnp.argmax(jnp.where(valid[None, :], image @ text.T, -jnp.inf), axis=1)
        hit = jnp.take_along_axis(positives, best[:, None], axis=1)[:, 0]
        retrieval = jnp.sum(hit & valid) / jnp.maximum(jnp.sum(valid), 1)
        return loss, {"retrieval": retrieval, "temperature": jnp.exp(scale), "bias": bias}

    def step(params, opt_state, images, ids, lengths, positives):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, ids, lengths, positives)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

    return jax.jit(step, donate_argnums=(0, 1))


def vision_tower(params: dict[str, Any]) -> dict[str, Any]:
    """What stage 0 hands on: the client's `vision_tower` subtree."""
    return {"client": {"vision_tower": params["vision_tower"]}}
