"""TinyLLaVA assembly and its functional split into a client half and a server half (SPEC §1, §2.4).

    client (data owner)                                        server (model owner)
    images -> SigLIP -> connector -> image rows [B, N, D]
    input_ids -> client token embedding -> text rows [B, T, D]
    rows -> compressor client side (in_proj, quantize, pack) ==Uplink==> compressor server side (unpack,
                                                                       dequantize, out_proj) -> splice
                                                                       -> OpenELM -> cross-entropy

`TinyLlava` is the single program (the reference): the same two halves with the quantizer's straight-through
path in between. Its parameters are {"client": ..., "server": ...}, so `params["client"]` and
`params["server"]` are exactly what each side holds, and `client_apply` / `server_apply` run the halves as
pure functions of their own parameters.

Static shapes: the prompt holds one image placeholder (IMAGE_TOKEN_INDEX = -200) in a right-padded row of T
tokens; the server splices the N image rows in its place, giving T + N - 1 rows for every batch of the same
T, so a run compiles once per length bucket. Labels are -100 on the image rows and on padding.

Text transport (`text_transport`): "quantized_embeddings" (the paper: the client embeds the text with its own
copy of the token embedding, initialised from the checkpoint and then trained separately from the server's
tied output head, and sends compressed rows) or "token_ids" (the client sends the ids, 2 bytes a token, and
the server embeds them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.compress import Codec, Compressor, Payload, make_codec
from qtl_jax.models.connector import Connector
from qtl_jax.models.openelm import OPENELM_270M, OPENELM_TINY, OpenELM, OpenELMConfig
from qtl_jax.models.siglip import SIGLIP_SO400M, SIGLIP_TINY, SiglipConfig, SiglipVisionTower

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
TEXT_TRANSPORTS = ("quantized_embeddings", "token_ids")


@dataclasses.dataclass(frozen=True)
class TinyLlavaConfig:
    """The whole model.

    Attributes:
      vision: SigLIP sizes.
      lm: OpenELM sizes.
      image_codec: compressor of the image rows.
      text_codec: compressor of the text rows (used with text_transport="quantized_embeddings").
      text_transport: "quantized_embeddings" or "token_ids".
      commitment_weight: alpha, the weight of each modality's commitment loss (0.25 in the paper).
    """

    vision: SiglipConfig = SIGLIP_SO400M
    lm: OpenELMConfig = OPENELM_270M
    image_codec: Codec = dataclasses.field(default_factory=lambda: make_codec("rd_fsq", 2))
    text_codec: Codec = dataclasses.field(default_factory=lambda: make_codec("rd_fsq", 2))
    text_transport: str = "quantized_embeddings"
    commitment_weight: float = 0.25

    def __post_init__(self):
        if self.text_transport not in TEXT_TRANSPORTS:
            raise ValueError(f"text_transport must be one of {TEXT_TRANSPORTS}, got {self.text_transport!r}")

    @property
    def image_tokens(self) -> int:
        return self.vision.num_tokens

    @property
    def quantized_text(self) -> bool:
        return self.text_transport == "quantized_embeddings"

    def for_inference(self) -> TinyLlavaConfig:
        """The config evaluation and generation run: each codec's inference variant (RD-FSQ statistics per
        sample, over that sample's real rows: an answer does not depend on the rest of its batch)."""
        return dataclasses.replace(self, image_codec=self.image_codec.for_inference(),
                                   text_codec=self.text_codec.for_inference())


# The model's parts, by the top-level parameter names of each half (what `optim.trainable` names).
PARTS = ("vision_tower", "connector", "compressors", "token_embeddings", "language_model")


def part_of(path: tuple[str, ...]) -> str:
    """The part (one of PARTS) a parameter belongs to, from its path inside params["client"] or ["server"]."""
    top = path[0]
    part = "compressors" if top in ("image_compressor", "text_compressor") else top
    if part not in PARTS:
        raise ValueError(f"parameter {'/'.join(path)} belongs to no known part {PARTS}")
    return part


TINYLLAVA_PAPER = TinyLlavaConfig()
TINYLLAVA_TINY = TinyLlavaConfig(vision=SIGLIP_TINY, lm=OPENELM_TINY)


@flax.struct.dataclass
class Uplink:
    """Everything the client sends for one batch; `nbytes` counts all of it.

    Attributes:
      image: Payload of the image rows [B, N, D].
      text: Payload of the text rows [B, T, D] (quantized embeddings), or of the token ids uint16/int32[B, T]
        (codec "token_ids").
      image_pos: int32[B] position of the image placeholder in the prompt, -1 for text-only samples.
      lengths: int32[B] number of real prompt tokens (placeholder included), right padding after.
      labels: uint16[B, T] target ids with 0xFFFF where not supervised (int32 with -100 when the vocabulary
        needs it): `labels_to_wire` / `labels_from_wire`; the server computes the loss.
    """

    image: Payload
    text: Payload
    image_pos: jax.Array
    lengths: jax.Array
    labels: jax.Array

    @property
    def nbytes(self) -> int:
        metadata = (self.image_pos, self.lengths, self.labels)
        meta = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in metadata)
        return self.image.nbytes + self.text.nbytes + meta


def prompt_layout(input_ids: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(image_pos int32[B], -1 without image; lengths int32[B]) of right-padded prompts int[B, T]."""
    is_image = jnp.asarray(input_ids) == IMAGE_TOKEN_INDEX
    image_pos = jnp.where(is_image.any(axis=1), jnp.argmax(is_image, axis=1), -1).astype(jnp.int32)
    return image_pos, jnp.asarray(attention_mask).astype(jnp.int32).sum(axis=1, dtype=jnp.int32)


def splice(
    text_rows: jax.Array, image_rows: jax.Array, image_pos: jax.Array, lengths: jax.Array, labels: jax.Array | None
):
    """Puts the N image rows in place of the placeholder, with static shapes.

    Args:
      text_rows: float[B, T, D] one row per prompt token (the placeholder's row is dropped).
      image_rows: float[B, N, D].
      image_pos: int32[B] placeholder position, -1 for text-only samples (their image rows are dropped).
      lengths: int32[B] real prompt tokens.
      labels: int[B, T] or None.

    Returns:
      (rows float[B, T + N - 1, D] with zero padding, mask bool[B, T + N - 1], labels int32[B, T + N - 1]
      with -100 on image rows and padding, or None).
    """
    t = text_rows.shape[1]
    n = image_rows.shape[1]
    out = jnp.arange(t + n - 1)[None, :]
    pos = image_pos[:, None]
    has = pos >= 0
    in_image = has & (out >= pos) & (out < pos + n)
    text_src = jnp.clip(jnp.where(has & (out >= pos + n), out - n + 1, out), 0, t - 1)
    image_src = jnp.clip(out - pos, 0, n - 1)
    valid = out < jnp.where(has[:, 0], lengths + n - 1, lengths)[:, None]
    gather = lambda rows, src: jnp.take_along_axis(rows, src[..., None], axis=1)
    rows = jnp.where(in_image[..., None], gather(image_rows, image_src), gather(text_rows, text_src))
    rows = jnp.where(valid[..., None], rows, 0).astype(text_rows.dtype)
    if labels is None:
        return rows, valid, None
    out_labels = jnp.take_along_axis(labels.astype(jnp.int32), text_src, axis=1)
    return rows, valid, jnp.where(in_image | ~valid, IGNORE_INDEX, out_labels)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shifted next-token cross-entropy, mean over labels != -100.

    Args:
      logits: float[B, L, V].
      labels: int[B, L] (label of position t is predicted from position t - 1).

    Returns:
      (mean loss float32[], number of supervised tokens int32[]).
    """
    return gathered_cross_entropy(logits[:, :-1], labels[:, 1:])


def supervised_positions(image_pos: jax.Array, lengths: jax.Array, labels: jax.Array, num_image_rows: int):
    """Where each text label is predicted in the spliced sequence, without building the spliced labels.

    Text token j of a prompt (j != the placeholder) sits at spliced row `j` before the image and `j + N - 1`
    after it; its label is predicted from the row before. Image rows and padding are never supervised, so at
    most T positions per sample carry a loss, against the T + N - 1 rows the LM runs over (N = 728 image rows
    at paper size: the head and log-softmax need not run on them).

    Args:
      image_pos, lengths: int32[B] as in `splice`.
      labels: int32[B, T] with -100 where not supervised (`labels_from_wire`).
      num_image_rows: N.

    Returns:
      (rows int32[B, T]: the spliced row whose logits predict label j (0 where unsupervised), targets int32[B, T]:
      label j, or -100 where it is not supervised). Exactly the (row, label) pairs of `cross_entropy` on the
      spliced sequence with `splice`'s labels.
    """
    t = labels.shape[1]
    j = jnp.arange(t)[None, :]
    pos = image_pos[:, None]
    has = pos >= 0
    out = jnp.where(has & (j > pos), j + num_image_rows - 1, j)
    valid = (labels != IGNORE_INDEX) & (j < lengths[:, None]) & ~(has & (j == pos)) & (out >= 1)
    return jnp.where(valid, out - 1, 0).astype(jnp.int32), jnp.where(valid, labels, IGNORE_INDEX)


def gathered_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of logits float[B, K, V] against targets int[B, K] (-100 = none), no shift: the rows
    were gathered where each target is predicted (`supervised_positions`). Returns (loss, count)."""
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    count = valid.sum()
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1), count


@flax.struct.dataclass
class ClientResult:
    """The client half's output.

    Attributes:
      uplink: what is sent.
      q_image: float32[B, N, C] the image rows' dequantized values as the server sees them (STE-differentiable).
      q_text: float32[B, T, C] the same for text rows, or None with token_ids transport.
      commitment_loss: float32[] alpha * (L_img + L_txt), the client's own loss term.
      text_moments: the text compressor's statistics (RD-FSQ: mean and std; float32[B, 1, 1] each with the
        inference config), which generated tokens are quantized with; None when there are none. Never sent.
      stats: the compressors' training diagnostics as {"image_clipped": float32[], ...} (`Codec.stats`, keys
        prefixed by modality); never sent.
    """

    uplink: Uplink
    q_image: jax.Array
    q_text: jax.Array | None
    commitment_loss: jax.Array
    text_moments: Any = None
    stats: Any = None


def _id_dtype(vocab_size: int, reserved: int = 0):
    """The narrowest integer type for token ids below vocab_size (+ `reserved` spare values) on the wire."""
    return jnp.uint16 if vocab_size + reserved <= 2**16 else jnp.int32


def labels_to_wire(labels: jax.Array, vocab_size: int) -> jax.Array:
    """int[B, T] labels (-100 = not supervised) -> uint16 with -100 as 0xFFFF when the vocabulary allows
    (half the bytes of int32), else int32 unchanged. `labels_from_wire` inverts it."""
    dtype = _id_dtype(vocab_size, reserved=1)
    if dtype == jnp.int32:
        return jnp.asarray(labels, jnp.int32)
    return jnp.where(labels == IGNORE_INDEX, jnp.iinfo(dtype).max, labels).astype(dtype)


def labels_from_wire(labels: jax.Array) -> jax.Array:
    """Received labels (uint16 or int32) -> int32 with -100 where not supervised."""
    if jnp.issubdtype(labels.dtype, jnp.unsignedinteger):
        return jnp.where(labels == jnp.iinfo(labels.dtype).max, IGNORE_INDEX, labels.astype(jnp.int32))
    return labels.astype(jnp.int32)


def _token_ids_payload(input_ids: jax.Array, vocab_size: int) -> Payload:
    # The placeholder travels as image_pos; on the wire its slot holds 0 (the pad id).
    dtype = _id_dtype(vocab_size)
    codes = jnp.where(input_ids == IMAGE_TOKEN_INDEX, 0, input_ids).astype(dtype)
    return Payload(codes=codes, side={}, codec="token_ids", bits=8 * jnp.dtype(dtype).itemsize,
                   shape=tuple(input_ids.shape))


class TinyLlavaClient(nn.Module):
    """The data owner's half: vision tower, connector, text embedding (quantized_embeddings), compressors."""

    config: TinyLlavaConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.vision_tower = SiglipVisionTower(cfg.vision, self.dtype)
        self.connector = Connector(cfg.lm.model_dim, self.dtype)
        self.image_compressor = Compressor(cfg.image_codec, cfg.lm.model_dim, self.dtype)
        if cfg.quantized_text:
            self.token_embeddings = nn.Embed(
                cfg.lm.vocab_size, cfg.lm.model_dim, dtype=self.dtype,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            )
            self.text_compressor = Compressor(cfg.text_codec, cfg.lm.model_dim, self.dtype)

    def rows(self, images, input_ids, attention_mask):
        """(image rows float[B, N, D], text rows float[B, T, D] or None, image_pos, lengths)."""
        image_pos, lengths = prompt_layout(input_ids, attention_mask)
        image_rows = self.connector(self.vision_tower(images)[0])
        text_rows = None
        if self.config.quantized_text:
            text_rows = self.token_embeddings(jnp.maximum(input_ids, 0))
        return image_rows, text_rows, image_pos, lengths

    def __call__(self, images, input_ids, attention_mask, labels) -> ClientResult:
        """Args: images uint8[B, H, W, 3] pixels (or float in [-1, 1]: `SiglipVisionTower`); input_ids int[B, T]
        with one -200 per image sample; attention_mask bool[B, T]; labels int[B, T]. Returns a `ClientResult`."""
        cfg = self.config
        image_rows, text_rows, image_pos, lengths = self.rows(images, input_ids, attention_mask)
        image_mask = jnp.broadcast_to((image_pos >= 0)[:, None], image_rows.shape[:2])
        image_out = self.image_compressor.client(image_rows, image_mask)
        loss = image_out.loss
        stats = {f"image_{k}": v for k, v in image_out.stats.items()}
        text_moments = None
        if cfg.quantized_text:
            text_mask = attention_mask.astype(bool) & (input_ids != IMAGE_TOKEN_INDEX)
            text_out = self.text_compressor.client(text_rows, text_mask)
            text_payload, q_text, loss = text_out.payload, text_out.q, loss + text_out.loss
            text_moments = text_out.moments
            stats.update({f"text_{k}": v for k, v in text_out.stats.items()})
        else:
            text_payload, q_text = _token_ids_payload(input_ids, cfg.lm.vocab_size), None
        uplink = Uplink(image=image_out.payload, text=text_payload, image_pos=image_pos, lengths=lengths,
                        labels=labels_to_wire(labels, cfg.lm.vocab_size))
        return ClientResult(uplink=uplink, q_image=image_out.q, q_text=q_text,
                            commitment_loss=cfg.commitment_weight * loss, text_moments=text_moments, stats=stats)


    def token_payload(self, ids, moments=None) -> Payload:
        """Quantized text embeddings: the text payload of token ids int[B, L] (generated tokens, sent to the
        server during generation), coded with `moments` (the prompt's) or, when None, the rows' own."""
        rows = self.token_embeddings(jnp.maximum(ids, 0))
        return self.text_compressor.client(rows, jnp.ones(ids.shape, bool), moments).payload


class TinyLlavaServer(nn.Module):
    """The model owner's half: compressor server sides, splice, OpenELM, loss."""

    config: TinyLlavaConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.image_compressor = Compressor(cfg.image_codec, cfg.lm.model_dim, self.dtype)
        if cfg.quantized_text:
            self.text_compressor = Compressor(cfg.text_codec, cfg.lm.model_dim, self.dtype)
        self.language_model = OpenELM(cfg.lm, self.dtype)

    def embeds(self, q_image, text, image_pos, lengths, labels=None):
        """Decodes the dequantized rows (or embeds token ids) and splices: see `splice`.

        `text` is float32[B, T, C] dequantized text rows (quantized_embeddings) or int[B, T] ids (token_ids);
        `labels` as they arrive (`labels_from_wire`) or int32 with -100.
        """
        image_rows = self.image_compressor.decode(q_image)
        if self.config.quantized_text:
            text_rows = self.text_compressor.decode(text)
        else:
            text_rows = self.language_model.embed(jnp.maximum(text.astype(jnp.int32), 0))
        labels = None if labels is None else labels_from_wire(labels)
        return splice(text_rows.astype(image_rows.dtype), image_rows, image_pos, lengths, labels)

    def loss(self, q_image, text, image_pos, lengths, labels):
        """Cross-entropy of the LM on the spliced rows. Returns (loss float32[], aux dict).

        The head (logits over the vocabulary, log-softmax) runs only on the T rows that can predict a label
        (`supervised_positions`), not on all T + N - 1: the same loss as `cross_entropy` on every row's logits
        (to float rounding), for a fraction of the head's FLOPs and memory."""
        rows, mask, _ = self.embeds(q_image, text, image_pos, lengths)
        hidden, _ = self.language_model.hidden(inputs_embeds=rows, attention_mask=mask)
        where, targets = supervised_positions(image_pos, lengths, labels_from_wire(labels), q_image.shape[1])
        picked = jnp.take_along_axis(hidden, where[..., None], axis=1)
        loss, count = gathered_cross_entropy(self.language_model.logits(picked), targets)
        return loss, {"ce_loss": loss, "supervised_tokens": count}

    def dequantize(self, uplink: Uplink):
        """(q_image float32[B, N, C], text rows or ids) from the received payloads."""
        q_image = self.image_compressor.dequantize(uplink.image)
        if self.config.quantized_text:
            return q_image, self.text_compressor.dequantize(uplink.text)
        return q_image, uplink.text.codes.astype(jnp.int32)

    def token_rows(self, payload: Payload):
        """Quantized text embeddings: a received token payload (`TinyLlavaClient.token_payload`) -> the rows
        float[B, L, D] the LM reads."""
        return self.text_compressor.decode(self.text_compressor.dequantize(payload))

    def __call__(self, uplink: Uplink):
        """Server half on a received uplink: (ce loss, aux)."""
        q_image, text = self.dequantize(uplink)
        return self.loss(q_image, text, uplink.image_pos, uplink.lengths, uplink.labels)


class TinyLlava(nn.Module):
    """Single program: client half -> straight-through quantizer -> server half. Params {"client", "server"}."""

    config: TinyLlavaConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.client = TinyLlavaClient(self.config, self.dtype)
        self.server = TinyLlavaServer(self.config, self.dtype)

    def __call__(self, images, input_ids, attention_mask, labels):
        """Returns (total loss = CE + alpha (L_img + L_txt), aux with ce_loss, commitment_loss, uplink_bytes,
        stats (the client's diagnostics) and uplink (what the client sends))."""
        client = self.client(images, input_ids, attention_mask, labels)
        text = client.q_text if self.config.quantized_text else input_ids
        up = client.uplink
        ce, aux = self.server.loss(client.q_image, text, up.image_pos, up.lengths, up.labels)
        return ce + client.commitment_loss, {**aux, "commitment_loss": client.commitment_loss,
                                             "uplink_bytes": up.nbytes, "stats": client.stats, "uplink": up}


def client_apply(config: TinyLlavaConfig, client_params, images, input_ids, attention_mask, labels,
                 dtype=jnp.float32) -> ClientResult:
    """The client half as a pure function of the client's parameters (`params["client"]`)."""
    return TinyLlavaClient(config, dtype).apply({"params": client_params}, images, input_ids, attention_mask, labels)


def server_apply(config: TinyLlavaConfig, server_params, uplink: Uplink, dtype=jnp.float32):
    """The server half as a pure function of the server's parameters (`params["server"]`): (loss, aux)."""
    return TinyLlavaServer(config, dtype).apply({"params": server_params}, uplink)


@dataclasses.dataclass(frozen=True)
class TokenRows:
    """With quantized text embeddings: the rows the server's LM receives for tokens (client embedding -> text
    compressor -> payload -> server dequantize and decode: exactly what crosses in a split deployment), as a
    pure function ((params {"client", "server"}, moments), int[B, L] ids) -> float[B, L, D].

    `moments` are the statistics to quantize with: the prompt's (`ClientResult.text_moments`, per sample with
    the inference config), so that a sample's new tokens are coded as its prompt was; None takes those of the
    L new rows themselves. Hashable by (config, dtype), so it is the `embed_fn` of on-device generation
    (`generate(embed_fn=TokenRows(cfg), embed_params=(params, moments))`): a static argument, compiled once
    per model and shapes, with the parameters traced."""

    config: TinyLlavaConfig
    dtype: Any = jnp.float32

    def __call__(self, params_and_moments, ids: jax.Array) -> jax.Array:
        params, moments = params_and_moments
        payload = TinyLlavaClient(self.config, self.dtype).apply({"params": params["client"]}, ids, moments,
                                                                 method=TinyLlavaClient.token_payload)
        return TinyLlavaServer(self.config, self.dtype).apply({"params": params["server"]}, payload,
                                                              method=TinyLlavaServer.token_rows)


# Module-level jits with the config static: compiled once per (config, dtype, shapes), whoever calls them.
_token_rows = jax.jit(lambda rows, params_and_moments, ids: rows(params_and_moments, ids), static_argnums=0)


def token_rows_fn(config: TinyLlavaConfig, params, dtype=jnp.float32):
    """With quantized text embeddings: a jitted (int[B, L] ids, moments=None) -> float[B, L, D], `TokenRows` of
    `params` ({"client", "server"}; keep them on the device), for generation driven from the host.

    In a split deployment this is one small round trip per generated token: the server sends the token id,
    the client answers with its quantized row. The function is compiled once per (config, dtype, shapes), not
    once per call of token_rows_fn."""
    if not config.quantized_text:
        raise ValueError("token_rows_fn is for text_transport='quantized_embeddings'")
    rows = TokenRows(config, dtype)
    return lambda ids, moments=None: _token_rows(rows, (params, moments), ids)


def _prompt_rows(config: TinyLlavaConfig, dtype, server_params, uplink: Uplink):
    """(rows float[B, T + N - 1, D], lengths int32[B]): the spliced prompt the LM reads, from a prompt uplink."""
    server = TinyLlavaServer(config, dtype)
    q_image, text = server.apply({"params": server_params}, uplink, method=TinyLlavaServer.dequantize)
    rows, mask, _ = server.apply({"params": server_params}, q_image, text, uplink.image_pos, uplink.lengths,
                                 method=TinyLlavaServer.embeds)
    return rows, mask.sum(axis=1).astype(jnp.int32)


_prompt_rows_jit = jax.jit(_prompt_rows, static_argnums=(0, 1))


def server_generate(config: TinyLlavaConfig, server_params, uplink: Uplink, dtype=jnp.float32, **kwargs):
    """Answers for a prompt uplink (its labels are ignored): the server dequantizes and splices the prompt
    rows, then decodes with the KV cache (`qtl_jax.models.generate.generate`; kwargs: max_new_tokens, eos_id,
    pad_id, temperature, rng, and the rows of the new tokens). With quantized text embeddings those must reach
    the LM as they did in training: `embed_fn=TokenRows(config, dtype), embed_params=(params, moments)`
    decodes on the device in one call; `embed=token_rows_fn(...)` or any Python callable (the networked server:
    a round trip to the client) decodes with a host loop. Compiled once per (config, dtype, shapes); keep
    `server_params` on the device. Returns int32[B, max_new_tokens] on the host."""
    from qtl_jax.models.generate import generate

    rows, lengths = _prompt_rows_jit(config, dtype, server_params, uplink)
    lm = OpenELM(config.lm, dtype)
    return generate(lm, server_params["language_model"], inputs_embeds=rows, lengths=lengths, **kwargs)
