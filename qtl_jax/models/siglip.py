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

from qtl_jax.layers import attention, check_remat, dense, layer_norm, remat

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

    def __post_init__(self):
        check_remat(self.remat)
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
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        head_dim = cfg.width // cfg.num_heads
        proj = lambda name: dense(cfg.width, ("embed", "heads"), name=name, dtype=self.dtype)
        split = lambda t: t.reshape(*t.shape[:-1], cfg.num_heads, head_dim)
        q, k, v = (split(proj(name)(x)) for name in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v).reshape(*x.shape[:-1], cfg.width)
        return dense(cfg.width, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out)


class SiglipEncoderLayer(nn.Module):
    config: SiglipConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1")(x).astype(self.dtype)
        x = x + SiglipAttention(cfg, self.dtype, name="self_attn")(h)
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2")(x).astype(self.dtype)
        h = dense(cfg.mlp_dim, ("embed", "mlp"), name="fc1", dtype=self.dtype)(h)
        h = nn.gelu(h, approximate=True)  # SigLIP: gelu_pytorch_tanh
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


class SiglipEncoder(nn.Module):
    """The first `config.layers_used` encoder layers; returns (input, output of each layer)."""

    config: SiglipConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        hidden = [x]
        for i in range(self.config.layers_used):
            hidden.append(SiglipEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(hidden[-1]))
        return tuple(hidden)


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
          images: float[B, H, W, 3], NHWC, normalised to [-1, 1] ((x / 255 - 0.5) / 0.5), H = W = image_size.
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
        x = SiglipEmbeddings(cfg, self.dtype, name="embeddings")(images.astype(self.dtype))
        hidden = SiglipEncoder(cfg, self.dtype, name="encoder")(x)
        x = hidden[-1]
        features = x[:, 1:] if cfg.select == "drop_first" else x
        return features, ({"hidden_states": tuple(hidden)} if return_hidden_states else {})
