"""OpenELM decoder (apple/OpenELM-270M(-Instruct)) as a Flax Linen module (SPEC §2.3).

Layer-wise scaling: every layer has its own number of query heads and FFN width, computed from the config's
multipliers exactly as the reference code does (not hard-coded), so the layers are an unrolled loop: no two
layers have the same parameter shapes, so they cannot be stacked under `nn.scan` without padding every layer
to the widest (which would change the FLOPs and the checkpoint layout). What the backward keeps is set per
layer by `OpenELMConfig.remat` (`qtl_jax.layers.REMAT_POLICIES`). Each
block is pre-norm: fused `qkv_proj` laid out [q heads | k heads | v heads] (head-major, head_dim contiguous),
per-head RMSNorm on q and k, RoPE (rotate-half, float32, positions 0..L-1), grouped-query attention where
query head j reads kv head j // group (`repeat`, not tiling), SwiGLU FFN whose first half is the gate, no
biases anywhere, RMSNorm eps 1e-6 in float32, and a tied output head (logits = h @ token_embeddings.T).

Attention (`qtl_jax.layers.attention`, `OpenELMConfig.attention`: cuDNN flash on a GPU in bf16, the blocked
attention on a CPU for long sequences, `jax.nn.dot_product_attention` elsewhere): without
a cache, causal plus the right-padding key lengths; with a KV cache (generation), keys
are valid when their absolute position is <= the query's, which holds for right-padded prompts because each
row's generated tokens overwrite its own padding slots in order (see `qtl_jax.models.generate`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.layers import RMSNorm, attention, check_attention, check_remat, dense, dense_dot_general, in_float32, remat


def make_divisible(value: float, divisor: int) -> int:
    """OpenELM's rounding: nearest multiple of `divisor` (at least `divisor`), bumped up if it lost > 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


def _multipliers(spec: Sequence[float], layers: int) -> list[float]:
    """A (start, end) pair expands to round(linspace(start, end, layers), 2); a per-layer list is kept."""
    spec = [float(v) for v in spec]
    if len(spec) == 2 and layers != 2:
        return [round(float(v), 2) for v in np.linspace(spec[0], spec[1], layers)]
    if len(spec) != layers:
        raise ValueError(f"multipliers must have 2 or {layers} (= num_layers) entries, got {len(spec)}")
    return spec


@dataclasses.dataclass(frozen=True)
class OpenELMConfig:
    """Sizes of the decoder; per-layer heads and FFN widths are derived (`num_query_heads`, `ffn_dims`).

    Attributes mirror the Hugging Face `config.json` fields: model_dim, num_transformer_layers, head_dim,
    num_gqa_groups, qkv_multipliers, ffn_multipliers, ffn_dim_divisor, vocab_size, rope_freq_constant,
    max_context_length; norm_eps is 1e-6 in every released checkpoint.
    """

    vocab_size: int = 32000
    model_dim: int = 1280
    num_transformer_layers: int = 16
    head_dim: int = 64
    num_gqa_groups: int = 4
    qkv_multipliers: tuple[float, ...] = (0.5, 1.0)
    ffn_multipliers: tuple[float, ...] = (0.5, 4.0)
    ffn_dim_divisor: int = 256
    rope_freq_constant: float = 10000.0
    max_context_length: int = 2048
    norm_eps: float = 1e-6
    # What each layer keeps for the backward (`qtl_jax.layers.REMAT_POLICIES`); a memory/speed knob, not part
    # of the model: equal models compare equal whatever it is.
    remat: str = dataclasses.field(default="none", compare=False)
    # Which attention code runs (`qtl_jax.layers.attention`: auto | xla | blocked); a speed knob, not the model.
    attention: str = dataclasses.field(default="auto", compare=False)

    def __post_init__(self):
        check_remat(self.remat)
        check_attention(self.attention)
        # As the reference: qkv_multipliers is always a (start, end) pair; ffn_multipliers may be the pair or
        # the expanded per-layer list (released config.json files store the list). Store the expanded list,
        # so that equal models have equal configs.
        if len(self.qkv_multipliers) != 2:
            raise ValueError(f"qkv_multipliers must be a (start, end) pair, got {self.qkv_multipliers}")
        object.__setattr__(self, "qkv_multipliers", tuple(float(v) for v in self.qkv_multipliers))
        object.__setattr__(self, "ffn_multipliers",
                           tuple(_multipliers(self.ffn_multipliers, self.num_transformer_layers)))

    @property
    def num_query_heads(self) -> tuple[int, ...]:
        divisor = self.head_dim * self.num_gqa_groups
        qkv = [round(float(v), 2) for v in np.linspace(*self.qkv_multipliers, self.num_transformer_layers)]
        dims = [make_divisible(self.model_dim * m, divisor) for m in qkv]
        return tuple(d // self.head_dim for d in dims)

    @property
    def num_kv_heads(self) -> tuple[int, ...]:
        return tuple(h // self.num_gqa_groups for h in self.num_query_heads)

    @property
    def ffn_dims(self) -> tuple[int, ...]:
        return tuple(make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> OpenELMConfig:
        """Reads an OpenELM Hugging Face `config.json` dict; raises on variants this port does not implement."""
        required = ("model_dim", "num_transformer_layers", "head_dim", "num_gqa_groups", "qkv_multipliers",
                    "ffn_multipliers", "vocab_size")
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"{source}: not an OpenELM config, missing fields {missing}")
        expected = {"normalize_qk_projections": True, "share_input_output_layers": True, "ffn_with_glu": True,
                    "activation_fn_name": "swish", "normalization_layer_name": "rms_norm"}
        unsupported = {k: hf[k] for k, v in expected.items() if k in hf and hf[k] != v}
        if unsupported:
            raise ValueError(f"{source}: unsupported OpenELM variant {unsupported}; expected {expected}")
        return cls(
            vocab_size=int(hf["vocab_size"]), model_dim=int(hf["model_dim"]),
            num_transformer_layers=int(hf["num_transformer_layers"]), head_dim=int(hf["head_dim"]),
            num_gqa_groups=int(hf["num_gqa_groups"]), qkv_multipliers=tuple(hf["qkv_multipliers"]),
            ffn_multipliers=tuple(hf["ffn_multipliers"]), ffn_dim_divisor=int(hf.get("ffn_dim_divisor", 256)),
            rope_freq_constant=float(hf.get("rope_freq_constant", 10000)),
            max_context_length=int(hf.get("max_context_length", 2048)),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` fields of this config (OpenELM remote-code layout)."""
        return {
            "architectures": ["OpenELMForCausalLM"], "model_type": "openelm",
            "vocab_size": self.vocab_size, "model_dim": self.model_dim,
            "num_transformer_layers": self.num_transformer_layers, "head_dim": self.head_dim,
            "num_gqa_groups": self.num_gqa_groups, "qkv_multipliers": list(self.qkv_multipliers),
            "ffn_multipliers": list(self.ffn_multipliers),
            "num_query_heads": list(self.num_query_heads), "num_kv_heads": list(self.num_kv_heads),
            "ffn_dim_divisor": self.ffn_dim_divisor, "rope_freq_constant": int(self.rope_freq_constant),
            "rope_max_length": 2 * self.max_context_length, "max_context_length": self.max_context_length,
            "normalize_qk_projections": True, "share_input_output_layers": True, "ffn_with_glu": True,
            "activation_fn_name": "swish", "normalization_layer_name": "rms_norm",
            "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_hf(), indent=2)


OPENELM_270M = OpenELMConfig()
# Tiny keeps layer-wise scaling: query heads (4, 8, 8, 8), FFN widths (64, 224, 352, 512).
OPENELM_TINY = OpenELMConfig(vocab_size=256, model_dim=128, num_transformer_layers=4, head_dim=16,
                             ffn_dim_divisor=32, max_context_length=1024)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding, rotate-half (non-interleaved) layout, computed in float32.

    Args:
      x: float[B, L, H, Dh].
      positions: int[B, L] absolute positions.
      base: frequency base (10000).

    Returns:
      float[B, L, H, Dh] in x's dtype.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / base ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1])
    theta = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, half]
    cos, sin = jnp.cos(theta)[:, :, None], jnp.sin(theta)[:, :, None]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class OpenELMAttention(nn.Module):
    config: OpenELMConfig
    layer: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, lengths, cache=None):
        """x float[B, L, D]; positions int[B, L]; lengths int32[B] real keys (right padding; no cache) or None."""
        cfg = self.config
        n_q, n_kv, dh = cfg.num_query_heads[self.layer], cfg.num_kv_heads[self.layer], cfg.head_dim
        qkv = dense((n_q + 2 * n_kv) * dh, ("embed", "heads"), name="qkv_proj", use_bias=False,
                    dtype=self.dtype)(x)
        qkv = qkv.reshape(*x.shape[:2], n_q + 2 * n_kv, dh)
        q, k, v = qkv[:, :, :n_q], qkv[:, :, n_q:n_q + n_kv], qkv[:, :, n_q + n_kv:]
        q = RMSNorm(cfg.norm_eps, "head_dim", name="q_norm")(q)
        k = RMSNorm(cfg.norm_eps, "head_dim", name="k_norm")(k)
        q, k = rope(q, positions, cfg.rope_freq_constant), rope(k, positions, cfg.rope_freq_constant)
        if cache is not None:
            # Write this step's keys/values at each row's absolute positions; attend over the whole cache.
            write = jax.vmap(lambda buf, new, pos: buf.at[pos].set(new))
            cache = {"k": write(cache["k"], k.astype(cache["k"].dtype), positions),
                     "v": write(cache["v"], v.astype(cache["v"].dtype), positions)}
            k, v = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
            mask = jnp.arange(k.shape[1])[None, None, None, :] <= positions[:, None, :, None]
            out = attention(q, k, v, mask=mask, implementation=cfg.attention)
        else:
            out = attention(q, k, v, causal=True, kv_lengths=lengths, implementation=cfg.attention)
        out = out.reshape(*x.shape[:2], n_q * dh)
        return dense(cfg.model_dim, ("heads", "embed"), name="out_proj", use_bias=False, dtype=self.dtype)(out), cache


class OpenELMFFN(nn.Module):
    config: OpenELMConfig
    layer: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = self.config.ffn_dims[self.layer]
        y = dense(2 * width, ("embed", "mlp"), name="proj_1", use_bias=False, dtype=self.dtype)(x)
        gate, up = y[..., :width], y[..., width:]
        return dense(self.config.model_dim, ("mlp", "embed"), name="proj_2", use_bias=False,
                     dtype=self.dtype)(in_float32(lambda gate, up: nn.silu(gate) * up, gate, up))


class OpenELMLayer(nn.Module):
    config: OpenELMConfig
    layer: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, lengths, cache=None):
        eps = self.config.norm_eps
        h, cache = OpenELMAttention(self.config, self.layer, self.dtype, name="attn")(
            RMSNorm(eps, name="attn_norm")(x), positions, lengths, cache)
        x = x + h
        return x + OpenELMFFN(self.config, self.layer, self.dtype, name="ffn")(RMSNorm(eps, name="ffn_norm")(x)), cache


class OpenELM(nn.Module):
    """The decoder with its tied head.

    Attributes:
      config: sizes (`OPENELM_270M`, `OPENELM_TINY`).
      dtype: compute dtype (norms, RoPE and softmax run in float32; logits are float32).
    """

    config: OpenELMConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.token_embeddings = nn.Embed(
            cfg.vocab_size, cfg.model_dim, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        layer_cls = remat(OpenELMLayer, cfg.remat)
        self.layers = [layer_cls(cfg, i, self.dtype) for i in range(cfg.num_transformer_layers)]
        self.norm = RMSNorm(cfg.norm_eps)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, L] token ids -> float[B, L, D] input embeddings."""
        return self.token_embeddings(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states float[..., D] (from `hidden`) -> float32[..., vocab] logits of the tied head.

        The matmul runs in the compute dtype and accumulates straight into the float32 logits (in bf16 on a CPU
        through `layers.bf16_matmul`, whose backward rounds the logits' gradient to bf16 as torch.autocast does)."""
        embedding = self.token_embeddings.embedding.astype(self.dtype)
        return dense_dot_general(hidden.astype(self.dtype), embedding.T, (((hidden.ndim - 1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: dict | None = None,
    ):
        """Runs the decoder on token ids or on input embeddings (exactly one of them).

        Args:
          input_ids: int[B, L].
          inputs_embeds: float[B, L, D] (TinyLLaVA: text embeddings with the image rows spliced in).
          attention_mask: bool[B, L], True for real tokens, which come first (right padding: only the number of
            True entries of a row is read). Ignored with a cache.
          positions: int[B, L] absolute positions; default 0..L-1 (OpenELM ignores position ids upstream).
          cache: from `init_cache`, for incremental decoding; keys at positions <= each query's are attended.

        Returns:
          (logits float32[B, L, vocab], cache or None).
        """
        hidden, cache = self.hidden(input_ids, inputs_embeds, attention_mask, positions, cache)
        return self.logits(hidden), cache

    def hidden(self, input_ids=None, inputs_embeds=None, attention_mask=None, positions=None, cache=None):
        """`__call__` without the head: (final-norm hidden states float[B, L, D], cache or None). A loss that
        reads only some positions gathers them first and runs `logits` on those alone."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("OpenELM takes exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        batch, length = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        lengths = None
        if cache is None and attention_mask is not None:
            lengths = attention_mask.astype(jnp.int32).sum(axis=1, dtype=jnp.int32)
        new_cache = {} if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, lengths, None if cache is None else cache[f"layers_{i}"])
            if cache is not None:
                new_cache[f"layers_{i}"] = layer_cache
        return self.norm(x), new_cache


def init_cache(config: OpenELMConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> dict:
    """Zeroed KV cache: {"layers_i": {"k", "v": float[batch, max_len, n_kv_i, head_dim]}}."""
    return {
        f"layers_{i}": {
            "k": jnp.zeros((batch, max_len, n_kv, config.head_dim), dtype),
            "v": jnp.zeros((batch, max_len, n_kv, config.head_dim), dtype),
        }
        for i, n_kv in enumerate(config.num_kv_heads)
    }
