"""The split training step, run as one program (`single`) or on two disjoint device meshes (`meshes`).

    meshes mode, one step:
      client mesh   client_forward (jit): vision tower, connector, text embedding, quantize, pack
                      -> Uplink (payloads + metadata), and a vjp of the STE values q w.r.t. client params
      == jax.device_put(uplink, server mesh) ==  (the only crossing client -> server)
      server mesh   server_step (jit): dequantize, splice, OpenELM, CE; grads w.r.t. server params and q;
                      optimizer update; the downlink gradient dL/dq, compressed (fp32 | bf16 | nf8 | nf4)
      == jax.device_put(downlink, client mesh) ==  (the only crossing server -> client)
      client mesh   client_update (jit): decompress dL/dq, pull it back through the vjp (the STE makes
                      this the gradient of the continuous code), add the commitment-loss gradient, update.

Each half's parameters and optimizer state are created on its own mesh and sharded inside it by the
logical rules (`qtl_jax.sharding`); step functions pin their output shardings, so they compile once per
batch shape. Byte counts come from the payloads (`Uplink.nbytes`, `Payload.nbytes`).

`single` runs the same math in one jit (`TinyLlava` with the straight-through quantizer): the reference the
`meshes` gradients are tested against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from qtl_jax import sharding
from qtl_jax.compress import Payload, make_codec
from qtl_jax.models import tinyllava as T

MODES = ("single", "meshes")
DOWNLINKS = ("fp32", "bf16", "nf8", "nf4")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Attributes:
    mode: "single" (one program) or "meshes" (client and server meshes on disjoint devices).
    client_mesh: (data, fsdp, tensor) sizes of the client mesh (meshes mode).
    server_mesh: (data, fsdp, tensor) sizes of the server mesh, on the devices after the client's.
    downlink: how dL/dq travels back: fp32 (the reference), bf16, nf8 or nf4 (NF blocks of 64).
    """

    mode: str = "meshes"
    client_mesh: tuple[int, int, int] = (1, 1, 1)
    server_mesh: tuple[int, int, int] = (1, 1, 1)
    downlink: str = "fp32"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"split mode must be one of {MODES}, got {self.mode!r}")
        if self.downlink not in DOWNLINKS:
            raise ValueError(f"downlink must be one of {DOWNLINKS}, got {self.downlink!r}")
        for name, shape in (("client_mesh", self.client_mesh), ("server_mesh", self.server_mesh)):
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"{name} must be three positive sizes (data, fsdp, tensor), got {shape}")

    @classmethod
    def from_config(cls, split) -> SplitConfig:
        """From a config's `split` section (ml_collections: mesh sizes may come as lists)."""
        return cls(mode=split.mode, client_mesh=tuple(split.client_mesh), server_mesh=tuple(split.server_mesh),
                   downlink=split.downlink)

    @property
    def num_devices(self) -> int:
        """Devices the run needs: the client mesh's, plus the server mesh's in meshes mode."""
        return int(np.prod(self.client_mesh)) + (int(np.prod(self.server_mesh)) if self.mode == "meshes" else 0)

    def check_devices(self, available: int | None = None) -> None:
        """Raises ValueError when the two meshes need more devices than there are (before any compile)."""
        available = len(jax.devices()) if available is None else available
        need = self.num_devices
        if need > available:
            raise ValueError(f"client mesh {self.client_mesh} + server mesh {self.server_mesh} need {need} "
                             f"devices, only {available} available")


def make_meshes(config: SplitConfig):
    """(client mesh, server mesh) on disjoint devices: the client takes the first ones."""
    config.check_devices()
    devices = jax.devices()
    n_client = int(np.prod(config.client_mesh))
    client = sharding.make_mesh(config.client_mesh, devices[:n_client])
    server = sharding.make_mesh(config.server_mesh, devices[n_client:])
    return client, server


# ---------------------------------------------------------------------------------------------- downlink
def downlink_codec(name: str):
    return {"fp32": make_codec("none_fp32"), "bf16": make_codec("none_bf16"),
            "nf8": make_codec("nf", 8), "nf4": make_codec("nf", 4)}[name]


def compress_downlink(name: str, grads: tuple) -> tuple[Payload, ...]:
    """dL/dq arrays -> payloads (None entries stay None)."""
    codec = downlink_codec(name)
    return tuple(None if g is None else codec.to_payload(codec.quantize(g.astype(jnp.float32))) for g in grads)


def decompress_downlink(name: str, payloads: tuple) -> tuple:
    codec = downlink_codec(name)
    return tuple(None if p is None else codec.dequantize(codec.from_payload(p)) for p in payloads)


def downlink_nbytes(payloads) -> int:
    return sum(p.nbytes for p in payloads if p is not None)


# ------------------------------------------------------------------------------------------------- state
@flax.struct.dataclass
class HalfState:
    """One half's parameters and optimizer state (on its mesh)."""

    params: Any
    opt_state: Any


def _batch_spec(mesh, x) -> NamedSharding:
    """Leading (batch) axis over the mesh's data axes when it divides; scalars replicated."""
    names = ("batch",) + (None,) * (np.ndim(x) - 1) if np.ndim(x) else ()
    return NamedSharding(mesh, sharding.logical_to_spec(names, np.shape(x), mesh))


def to_mesh(tree, mesh):
    """Moves a pytree (host batch, uplink, downlink) onto `mesh`: the only way data crosses between halves."""
    return jax.tree.map(lambda a: jax.device_put(a, _batch_spec(mesh, a)), tree)


MODEL_KEYS = ("images", "input_ids", "attention_mask", "labels")


class SplitTrainer:
    """Holds both halves' states and runs steps in `single` or `meshes` mode.

    Args:
      model_config: the TinyLLaVA config.
      split: the split config.
      tx_client, tx_server: optax optimizers of each half (masks for frozen parts live inside them).
      params: initial {"client", "server"} parameters (e.g. from `TinyLlava.init` and checkpoints); boxed
        (logically partitioned) or plain.
      dtype: compute dtype.
    """

    def __init__(self, model_config, split: SplitConfig, tx_client, tx_server, params, dtype=jnp.float32,
                 boxed_like=None):
        """`boxed_like`: a logically-partitioned tree with the structure of `params` (e.g. the output of
        `jax.eval_shape(model.init, ...)`) when `params` themselves are plain arrays."""
        self.model_config, self.split, self.dtype = model_config, split, dtype
        self.tx = {"client": tx_client, "server": tx_server}
        split.check_devices()
        boxed_like = boxed_like if boxed_like is not None else params
        plain = nn.meta.unbox(params)
        if split.mode == "meshes":
            self.meshes = dict(zip(("client", "server"), make_meshes(split), strict=True))
        else:
            mesh = sharding.make_mesh(split.client_mesh)
            self.meshes = {"client": mesh, "server": mesh}
        self.param_shardings = {half: sharding.param_shardings(boxed_like[half], self.meshes[half])
                                for half in ("client", "server")}
        self.state, self.state_shardings = {}, {}
        for half in ("client", "server"):
            with jax.set_mesh(self.meshes[half]):
                p = jax.device_put(plain[half], self.param_shardings[half])
                opt = jax.jit(self.tx[half].init)(p)
                self.state[half] = HalfState(p, opt)
                self.state_shardings[half] = jax.tree.map(lambda a: a.sharding, self.state[half])
        self._build()

    def _pin(self, half: str, state: HalfState) -> HalfState:
        # Pin each updated state to the shardings it started with: otherwise the first step may return
        # e.g. P() where P(None, None) went in, and every step function would compile a second time.
        return jax.lax.with_sharding_constraint(state, self.state_shardings[half])

    # -- step functions --------------------------------------------------------------------------------
    def _client_fn(self, params, batch):
        res = T.client_apply(self.model_config, params, *(batch[k] for k in MODEL_KEYS), dtype=self.dtype)
        return (res.q_image, res.q_text, res.commitment_loss), res.uplink

    def _server_loss(self, params, q_image, q_text, uplink):
        server = T.TinyLlavaServer(self.model_config, self.dtype)
        text = q_text if self.model_config.quantized_text else uplink.text.codes.astype(jnp.int32)
        loss, aux = server.apply({"params": params}, q_image, text, uplink.image_pos, uplink.lengths,
                                 uplink.labels, method=T.TinyLlavaServer.loss)
        return loss, aux

    def _build(self):
        cfg = self.model_config
        downlink = self.split.downlink

        def client_forward(params, batch):
            (q, vjp, uplink) = jax.vjp(lambda p: self._client_fn(p, batch), params, has_aux=True)
            return uplink, q[2], vjp

        def server_step(state_params, opt_state, uplink):
            server = T.TinyLlavaServer(cfg, self.dtype)
            q_image, text = server.apply({"params": state_params}, uplink, method=T.TinyLlavaServer.dequantize)
            q_text = text if cfg.quantized_text else None
            grad_fn = jax.value_and_grad(self._server_loss, argnums=(0, 1, 2), has_aux=True)
            (loss, aux), (g_params, g_image, g_text) = grad_fn(state_params, q_image, q_text, uplink)
            updates, opt_state = self.tx["server"].update(g_params, opt_state, state_params)
            new = self._pin("server", HalfState(optax.apply_updates(state_params, updates), opt_state))
            return new.params, new.opt_state, loss, aux, compress_downlink(downlink, (g_image, g_text))

        def client_update(params, opt_state, vjp, downlink_payloads):
            g_image, g_text = decompress_downlink(downlink, downlink_payloads)
            (grads,) = vjp((g_image, g_text, jnp.ones((), jnp.float32)))
            updates, opt_state = self.tx["client"].update(grads, opt_state, params)
            new = self._pin("client", HalfState(optax.apply_updates(params, updates), opt_state))
            return new.params, new.opt_state

        def single_step(client, server, batch):
            def total(c, s):
                loss, aux = T.TinyLlava(cfg, self.dtype).apply({"params": {"client": c, "server": s}},
                                                               *(batch[k] for k in MODEL_KEYS))
                return loss, aux

            (loss, aux), (g_client, g_server) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
                client.params, server.params)
            new = {}
            for half, g, st in (("client", g_client, client), ("server", g_server, server)):
                updates, opt = self.tx[half].update(g, st.opt_state, st.params)
                new[half] = self._pin(half, HalfState(optax.apply_updates(st.params, updates), opt))
            return new["client"], new["server"], loss - aux["commitment_loss"], aux

        self._client_forward = jax.jit(client_forward)
        self._server_step = jax.jit(server_step, donate_argnums=(0, 1))
        # No donation here: the vjp's residuals may alias the client parameters.
        self._client_update = jax.jit(client_update)
        self._single_step = jax.jit(single_step, donate_argnums=(0, 1))

    def step(self, batch: dict) -> dict:
        """One training step on a host batch (numpy). Returns metrics: ce_loss, commitment_loss,
        uplink_bytes, downlink_bytes (exact, from the payloads), as device scalars / Python ints."""
        model_batch = {k: batch[k] for k in MODEL_KEYS}
        if self.split.mode == "single":
            data = to_mesh(model_batch, self.meshes["client"])
            with jax.set_mesh(self.meshes["client"]):
                c, s, ce, aux = self._single_step(self.state["client"], self.state["server"], data)
            self.state = {"client": c, "server": s}
            return {"ce_loss": ce, "commitment_loss": aux["commitment_loss"],
                    "uplink_bytes": int(aux["uplink_bytes"]), "downlink_bytes": 0}
        client, server = self.state["client"], self.state["server"]
        data = to_mesh(model_batch, self.meshes["client"])
        with jax.transfer_guard("disallow"):
            with jax.set_mesh(self.meshes["client"]):
                uplink, commitment, vjp = self._client_forward(client.params, data)
            uplink_server = to_mesh(uplink, self.meshes["server"])
            with jax.set_mesh(self.meshes["server"]):
                s_params, s_opt, ce, aux, downlink = self._server_step(server.params, server.opt_state,
                                                                       uplink_server)
            downlink_client = to_mesh(downlink, self.meshes["client"])
            with jax.set_mesh(self.meshes["client"]):
                c_params, c_opt = self._client_update(client.params, client.opt_state, vjp, downlink_client)
        self.state = {"client": HalfState(c_params, c_opt), "server": HalfState(s_params, s_opt)}
        return {"ce_loss": ce, "commitment_loss": commitment, "uplink_bytes": uplink.nbytes,
                "downlink_bytes": downlink_nbytes(downlink)}

    def params(self) -> dict:
        """{"client", "server"} parameters, each on its own mesh."""
        return {"client": self.state["client"].params, "server": self.state["server"].params}

