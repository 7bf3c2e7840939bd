"""SigLIP vision tower (google/siglip-so400m-patch14-384) as a Flax Linen module (SPEC §2.1).

Pre-LN ViT: VALID patch convolution, learned position embedding added before layer 0, no CLS token,
LayerNorm eps 1e-6, q/k/v/out projections with bias, tanh-approximate GELU in the MLP. TinyLLaVA reads
`hidden_states[-2]` (the output of layer 25 of 27, *before* the post-LayerNorm) and drops token 0, which is a
real patch since SigLIP has no CLS token: 728 tokens. That upstream quirk (TinyLLaVA_Factory issue #203) is
what released checkpoints were trained with, so it is the default (`select="drop_first"`); `select="all"`
keeps the 729. Only the layers up to the selected one are built; post-LN and the MAP head never are.

Parameter names mirror the Hugging Face keys (`embeddings/patch_embedding`, `encoder/layers_{i}/self_attn/
q_proj`, ...), so conversion is a transpose per Linear weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qtl_jax.layers import attention, check_attention, check_remat, dense, in_float32, layer_norm, remat

SELECT_MODES = ("drop_first", "all")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """Sizes of the vision tower.

    Attributes:
      width: hidden size D_v.
      depth: number of encoder layers of the full model (27 for so400m).
      num_heads: attention heads (head dim = width / num_heads).
      mlp_dim: MLP hidden size.
      patch_size: square patch side in pixels.
      image_size: square input side in pixels.
      layer_norm_eps: LayerNorm epsilon.
      select_layer: which entry of hidden_states (embeddings, layer 0, ..., layer depth-1) to return; -2 is
        the output of layer depth-2, TinyLLaVA's choice.
      select: "drop_first" (drop token 0: 728 tokens at 384/14) or "all".
    """

    width: int = 1152
    depth: int = 27
    num_heads: int = 16
    mlp_dim: int = 4304
    patch_size: int = 14
    image_size: int = 384
    layer_norm_eps: float = 1e-6
    select_layer: int = -2
    select: str = "drop_first"
    # What each layer keeps for the backward (`qtl_jax.layers.REMAT_POLICIES`): a memory/speed knob, not part of
    # the model (equal towers compare equal whatever it is). A frozen tower has no backward at all.
    remat: str = dataclasses.field(default="none", compare=False)
    # The encoder layers as one `nn.scan` over stacked parameters (`encoder/layers/...` with a leading layer
    # axis) instead of an unrolled loop (`encoder/layers_{i}/...`): compile time independent of depth. The same
    # function; the parameter layout differs (`stack_layers` / `unstack_layers` convert, checkpoint conversion
    # handles both), so the trainer's resume check keeps a run on the layout it started with.
    scan_layers: bool = dataclasses.field(default=False, compare=False)
    # Which attention code runs (`qtl_jax.layers.attention`: auto | xla | blocked); a speed knob, not the model.
    attention: str = dataclasses.field(default="auto", compare=False)

    def __post_init__(self):
        check_remat(self.remat)
        check_attention(self.attention)
        if self.width % self.num_heads:
            raise ValueError(f"SigLIP width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.select not in SELECT_MODES:
            raise ValueError(f"SigLIP select must be one of {SELECT_MODES}, got {self.select!r}")
        if not 0 <= self.layers_used <= self.depth:
            raise ValueError(f"select_layer {self.select_layer} is outside hidden_states of a {self.depth}-layer tower")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens returned per image: 728 for the paper size with drop_first."""
        return self.num_patches - (1 if self.select == "drop_first" else 0)

    @property
    def layers_used(self) -> int:
        """Encoder layers that are built and run: hidden_states has depth + 1 entries."""
        return self.select_layer if self.select_layer >= 0 else self.depth + 1 + self.select_layer


SIGLIP_SO400M = SiglipConfig()
# The CPU preset for the built-in Shapes-VQA data: 48 px images of a 3 x 3 grid of 16 px cells, one 16 px patch
# per cell, so each of the 9 tokens sees exactly one object slot. All 9 are kept: dropping token 0 (TinyLLaVA's
# quirk, which `drop_first` reproduces for the paper size) would blind the model to the top-left cell.
SIGLIP_TINY = SiglipConfig(width=128, depth=4, num_heads=4, mlp_dim=256, patch_size=16, image_size=48, select="all")


class SiglipAttention(nn.Module):
    config: SiglipConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None = None) -> jax.Array:
        """x: float[B, L, width]; kv_lengths: int32[B] or None: keys at index >= the row's length are masked
        (right-padded text in `qtl_jax.tower`; the vision tower has no padding)."""
        cfg = self.config
        head_dim = cfg.width // cfg.num_heads
        proj = lambda name: dense(cfg.width, ("embed", "heads"), name=name, dtype=self.dtype)
        split = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, head_dim)
        q, k, v = (split(proj(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, kv_lengths=kv_lengths, implementation=cfg.attention).reshape(*x.shape[:-1], cfg.width)
        return dense(cfg.width, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out)


class SiglipEncoderLayer(nn.Module):
    config: SiglipConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1")(x).astype(self.dtype)
        x = x + SiglipAttention(cfg, self.dtype, name="self_attn")(h, kv_lengths)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2")(x).astype(self.dtype)
        h = dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype)(h)
        h = in_float32(nn.gelu, h, approximate=True)  # SigLIP: gelu_pytorch_tanh
        return x + dense(cfg.width, ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)


class SiglipEmbeddings(nn.Module):
    config: SiglipConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        patches = nn.Conv(
            cfg.width, (cfg.patch_size, cfg.patch_size), strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID", dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("patch", "patch", "channels", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embedding",
        )(images)
        x = patches.reshape(patches.shape[0], -1, cfg.width)  # row-major over the patch grid, as HF
        position = nn.Embed(
            cfg.num_patches, cfg.width, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.width**-0.5), ("position", "embed")),
            name="position_embedding",
        )
        return x + position.embedding[None].astype(x.dtype)


class _ScannedLayer(SiglipEncoderLayer):
    """An encoder layer in `nn.scan`'s shape: (carry, unused) -> (carry, the layer output or None)."""

    keep: bool = False

    def __call__(self, x: jax.Array, _=None):
        y = super().__call__(x)
        return y, (y if self.keep else None)


class SiglipEncoder(nn.Module):
    """The first `config.layers_used` encoder layers; returns (input, output of each layer) — with
    `config.scan_layers` and `keep_hidden=False` only (input, last output): nothing else is materialised."""

    config: SiglipConfig
    dtype: Any = jnp.float32
    keep_hidden: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        cfg = self.config
        if cfg.scan_layers:
            scan = nn.scan(remat(_ScannedLayer, cfg.remat), variable_axes={"params": 0}, split_rngs={"params": True},
                           length=cfg.layers_used, metadata_params={nn.PARTITION_NAME: "layers"})
            last, each = scan(cfg, self.dtype, keep=self.keep_hidden, name="layers")(x, None)
            return (x, *each) if self.keep_hidden else (x, last)
        hidden = [x]
        layer_cls = remat(SiglipEncoderLayer, cfg.remat)
        for i in range(cfg.layers_used):
            hidden.append(layer_cls(cfg, self.dtype, name=f"layers_{i}")(hidden[-1]))
        return tuple(hidden)


def stack_layers(params: dict, config: SiglipConfig) -> dict:
    """Tower parameters with `encoder/layers_{i}` (unrolled) -> `encoder/layers` stacked on a leading axis."""
    encoder = dict(params["encoder"])
    layers = [encoder.pop(f"layers_{i}") for i in range(config.layers_used)]
    encoder["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**params, "encoder": encoder}


def unstack_layers(params: dict, config: SiglipConfig) -> dict:
    """The inverse of `stack_layers`."""
    encoder = dict(params["encoder"])
    stacked = encoder.pop("layers")
    for i in range(config.layers_used):
        encoder[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "encoder": encoder}


class SiglipVisionTower(nn.Module):
    """Images -> the selected layer's patch features.

    Attributes:
      config: sizes (`SIGLIP_SO400M`, `SIGLIP_TINY`).
      dtype: compute dtype (LayerNorm statistics and the softmax stay float32).
    """

    config: SiglipConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, return_hidden_states: bool = False):
        """Args:
          images: NHWC, H = W = image_size: either uint8[B, H, W, 3] pixels as resized on the host
            (`qtl_jax.data.preprocess.resize_image`; the training pipeline's batches), normalised here, or
            float[B, H, W, 3] already normalised to [-1, 1] ((x / 255 - 0.5) / 0.5; `preprocess_image`).
          return_hidden_states: also return every hidden state that was computed.

        Returns:
          (features float[B, num_tokens, width], aux) where aux["hidden_states"] is the tuple (embeddings,
          layer 0 output, ..., selected layer output), each float[B, num_patches, width], when requested.
        """
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, 3)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"SigLIP expects images of shape [B, {', '.join(map(str, expected))}] (NHWC), "
                             f"got {tuple(images.shape)}")
        if images.dtype == jnp.uint8:
            # SigLIP's rescale and normalisation on the device, in float32 (then the compute dtype): the batch
            # crosses host -> device as uint8, a quarter of the float32 bytes. Equal to the host's float path to
            # float32 rounding (<= 1.5e-7: XLA turns the divisions into multiplications).
            images = (images.astype(jnp.float32) / 255 - 0.5) / 0.5
        elif not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"SigLIP expects uint8 pixels or float images in [-1, 1], got {images.dtype}")
        x = SiglipEmbeddings(cfg, self.dtype, name="embeddings")(images.astype(self.dtype))
        hidden = SiglipEncoder(cfg, self.dtype, keep_hidden=return_hidden_states, name="encoder")(x)
        x = hidden[-1]
        features = x[:, 1:] if cfg.select == "drop_first" else x
        return features, ({"hidden_states": tuple(hidden)} if return_hidden_states else {})
