"""Flax Linen wrappers: a codec between its projections, with the client and server halves apart.

    client (data owner):  x -> in_proj -> codec.encode -> codec.quantize -> pack      => Payload
    server (model owner): Payload -> unpack -> codec.dequantize -> out_proj           => x_hat
    single program:       x -> in_proj -> codec.encode -> codec.ste -> out_proj       => x_hat (STE gradient)

in_proj (D -> C) and out_proj (C -> D) are square (C = D) for RD-FSQ and FSQ-tanh, as in the paper (no
dimension reduction; the compression is all in the bits), and D -> len(levels) -> D for canonical FSQ. NF and
the identity baselines have no parameters. Projections are initialised N(0, 0.02) with zero bias, like the
reference's centralized path, and carry logical axis names (`embed` for the feature width D, `code` for the
code width C) for the sharding rules.

The client half only reads `params["in_proj"]`, the server half only `params["out_proj"]`:
`split_params` cuts a parameter tree in two, and `client_apply` / `server_apply` run each half from its own
parameters, as pure functions.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from qtl_jax.compress.codecs import Codec
from qtl_jax.compress.payload import Payload
from qtl_jax.layers import dense


@flax.struct.dataclass
class ClientOutput:
    """What the client half computes for one modality.

    Attributes:
      payload: the `Payload` to send (packed codes + side information).
      q: float32[..., N, C] the dequantized values as the server will see them, differentiable through the
        straight-through estimator: the client pulls the server's gradient dL/dq back through this.
      loss: float32[] commitment loss (unweighted; 0 for codecs without one).
      moments: the statistics the codes were made with (RD-FSQ's mean and std), None for row-wise codecs;
        never sent.
      stats: the codec's training diagnostics (`Codec.stats`, e.g. RD-FSQ's clipped fraction); never sent.
    """

    payload: Payload
    q: jax.Array
    loss: jax.Array
    moments: Any = None
    stats: Any = None


class Compressor(nn.Module):
    """A codec with its projections.

    Attributes:
      codec: the compressor math (`qtl_jax.compress.make_codec`).
      features: D, the width of the features to compress (the LM width; 1280 for OpenELM-270M).
      dtype: compute dtype of the projections (the codec itself always runs in float32).
      param_dtype: parameter dtype.
    """

    codec: Codec
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        if self.codec.projected:
            width = self.codec.code_width(self.features)
            kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
            self.in_proj = dense(width, ("embed", "code"), name="in_proj", **kw)
            self.out_proj = dense(self.features, ("code", "embed"), name="out_proj", **kw)

    def _check(self, x: jax.Array) -> None:
        if x.ndim < 2 or x.shape[-1] != self.features:
            raise ValueError(
                f"{self.codec.name} compressor expects features of shape [..., N, {self.features}], "
                f"got {tuple(x.shape)}"
            )

    def encode(self, x: jax.Array, mask: jax.Array | None = None, moments: Any = None) -> jax.Array:
        """Client: float[..., N, D] -> float32[..., N, C] continuous code (in_proj, then the codec's bound)."""
        return self._encode(x, mask, moments)[0]

    def _encode(self, x, mask=None, moments=None):
        """(code, the moments it was made with, z = in_proj(x)): given `moments`, else the codec's own over
        `mask`'s rows."""
        self._check(x)
        z = (self.in_proj(x) if self.codec.projected else x).astype(jnp.float32)
        moments = self.codec.moments(z, mask) if moments is None else moments
        return self.codec.encode(z, mask, moments), moments, z

    def decode(self, q: jax.Array) -> jax.Array:
        """Server: float32[..., N, C] dequantized values -> float[..., N, D] (out_proj)."""
        return self.out_proj(q) if self.codec.projected else q

    def client(self, x: jax.Array, mask: jax.Array | None = None, moments: Any = None) -> ClientOutput:
        """Client half: encode, quantize and pack float[..., N, D] features; see `ClientOutput`. `moments`
        (e.g. a prompt's, for generated tokens) replaces the statistics of `x` itself."""
        code, moments, z = self._encode(x, mask, moments)
        q = self.codec.ste(code)
        payload = self.codec.to_payload(self.codec.quantize(code))
        return ClientOutput(payload=payload, q=q, loss=self.codec.loss(code, q, mask, z, moments), moments=moments,
                            stats=self.codec.stats(z, mask, moments))

    def server(self, payload: Payload) -> jax.Array:
        """Server half: unpack, dequantize and decode a payload -> float[..., N, D]."""
        return self.decode(self.dequantize(payload))

    def dequantize(self, payload: Payload) -> jax.Array:
        """Server: Payload -> float32[..., N, C] dequantized values (before out_proj)."""
        return self.codec.dequantize(self.codec.from_payload(payload))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Single-program path: float[..., N, D] -> (x_hat float[..., N, D], {"commitment_loss": float32[]}).

        Equals `server(client(x).payload)` in value; gradients pass the quantizer straight through.
        """
        code, moments, z = self._encode(x, mask)
        q = self.codec.ste(code)
        return self.decode(q), {"commitment_loss": self.codec.loss(code, q, mask, z, moments)}


CLIENT_PARAMS = ("in_proj",)
SERVER_PARAMS = ("out_proj",)


def split_params(params: dict) -> tuple[dict, dict]:
    """Cuts a `Compressor` parameter tree ({"in_proj", "out_proj"} or empty) into (client, server) trees."""
    unknown = set(params) - set(CLIENT_PARAMS) - set(SERVER_PARAMS)
    if unknown:
        raise ValueError(f"unexpected compressor parameters {sorted(unknown)}; expected in_proj and out_proj")
    client = {k: v for k, v in params.items() if k in CLIENT_PARAMS}
    server = {k: v for k, v in params.items() if k in SERVER_PARAMS}
    return client, server


def client_apply(module: Compressor, client_params: dict, x: jax.Array, mask=None) -> ClientOutput:
    """Runs the client half from the client's parameters only (`split_params(...)[0]`)."""
    return module.apply({"params": client_params}, x, mask, method=Compressor.client)


def server_apply(module: Compressor, server_params: dict, payload: Payload) -> jax.Array:
    """Runs the server half from the server's parameters only (`split_params(...)[1]`)."""
    return module.apply({"params": server_params}, payload, method=Compressor.server)
