"""The split training step, run as one program (`single`), on two disjoint device meshes (`meshes`), or as two
processes over the network (`remote`: this process holds the client half, `qtl_jax.split.remote` the crossing).

    meshes mode, one step:
      client mesh   client_forward (jit): vision tower, connector, text embedding, quantize, pack
                      -> Uplink (payloads + metadata), and a vjp of the STE values q w.r.t. the client's
                      trainable params
      == jax.device_put(uplink, server mesh) ==  (the only crossing client -> server)
      server mesh   server_step (jit): dequantize, splice, OpenELM, CE; grads w.r.t. the server's trainable
                      params and q; optimizer update; the downlink gradient dL/dq, compressed (fp32 | bf16 |
                      nf8 | nf4)
      == jax.device_put(downlink, client mesh) ==  (the only crossing server -> client)
      client mesh   client_update (jit): decompress dL/dq, pull it back through the vjp (the STE makes
                      this the gradient of the continuous code), add the commitment-loss gradient, update.

Frozen parts cost nothing. Each half's parameters are partitioned once into `trainable` and `frozen`
(`HalfState`); the steps differentiate w.r.t. the trainable ones only and take the frozen ones as constants.
So a frozen part gets no gradient (XLA computes no weight gradient for it), no optimizer state and no
gradient accumulator (the optimizer only ever sees the trainable tree), and a frozen SigLIP is not
linearised at all: the client's vjp keeps no residuals of it, only its output. Which parts train is
`trainable` (names from `tinyllava.PARTS`; the trainer passes `config.optim.trainable`).

Each half's state is created on its own mesh and sharded inside it by the logical rules
(`qtl_jax.sharding`); step functions pin their output shardings, so they compile once per batch shape. Byte
counts come from the payloads (`Uplink.nbytes`, `Payload.nbytes`). `compile_steps` compiles the steps ahead
of time from shapes alone (params may be `jax.ShapeDtypeStruct`s), for memory and FLOP estimates of models
that do not fit the machine (`benchmarks/paper_memory.py`).

The crossing is one small interface (`Crossing.exchange`: an uplink and its step id in, the server's loss and
downlink out): `LocalCrossing` is the `device_put` onto the server mesh and back, `remote.client.RemoteCrossing`
serializes, sends over gRPC, validates and deserializes. Both call the same three step functions, so `meshes`
stays the reference that `remote` is tested against. A process holds the halves it runs (`halves`): both in
`single` and `meshes`, the client's in `remote`, the server's in the server process (`qtl_jax.split.serve`).

`single` runs the same math in one jit (`TinyLlava` with the straight-through quantizer): the reference the
`meshes` gradients are tested against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding

from qtl_jax import sharding
from qtl_jax.compress import Payload, make_codec
from qtl_jax.models import tinyllava as T

MODES = ("single", "meshes", "remote")
DOWNLINKS = ("fp32", "bf16", "nf8", "nf4")
HALVES = ("client", "server")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Attributes:
    mode: "single" (one program), "meshes" (client and server meshes on disjoint devices) or "remote" (this
      process is the client; the server half runs in another process, `qtl_jax.split.serve`).
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
        """Devices the process needs: the client mesh's, plus the server mesh's in meshes mode."""
        return int(np.prod(self.client_mesh)) + (int(np.prod(self.server_mesh)) if self.mode == "meshes" else 0)

    def check_devices(self, available: int | None = None) -> None:
        """Raises ValueError when the two meshes need more devices than there are (before any compile)."""
        available = len(jax.devices()) if available is None else available
        need = self.num_devices
        if need > available:
            raise ValueError(f"client mesh {self.client_mesh} + server mesh {self.server_mesh} need {need} "
                             f"devices, only {available} available")


def make_meshes(config: SplitConfig, halves: Sequence[str] = HALVES) -> dict:
    """{half: mesh} for the halves this process holds, on disjoint devices: the first half takes the first
    ones (the client in `meshes` mode; the server alone in the server process). `single` mode: one mesh."""
    if config.mode == "single":
        mesh = sharding.make_mesh(config.client_mesh)
        return {"client": mesh, "server": mesh}
    shapes = {"client": config.client_mesh, "server": config.server_mesh}
    need = sum(int(np.prod(shapes[h])) for h in halves)
    devices = jax.devices()
    if need > len(devices):
        raise ValueError(f"{' + '.join(f'{h} mesh {shapes[h]}' for h in halves)} need {need} devices, only "
                         f"{len(devices)} available")
    meshes, start = {}, 0
    for half in halves:
        n = int(np.prod(shapes[half]))
        meshes[half] = sharding.make_mesh(shapes[half], devices[start:start + n])
        start += n
    return meshes


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
def partition(params: dict, is_trainable: Callable[[tuple[str, ...]], bool]) -> tuple[dict, dict]:
    """Splits a nested parameter dict into (trainable, frozen) nested dicts by each leaf's path."""
    flat = traverse_util.flatten_dict(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(trainable: dict, frozen: dict) -> dict:
    """The inverse of `partition`: one nested dict with the leaves of both."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trainable),
                                         **traverse_util.flatten_dict(frozen)})


def leaves_read_as(fn: Callable, args: Sequence, argnums: Sequence[int], dtype) -> list:
    """For each `args[i]` (i in `argnums`), a pytree of bools: True for a floating leaf that `fn(*args)` uses, and
    only ever converted to `dtype`: every use, also inside nested jit, scan, remat and custom-gradient bodies, is a
    `convert_element_type` to `dtype` (e.g. a Dense kernel or an embedding under bf16 compute; not a norm's scale,
    which the norm reads in float32). Such a leaf can be passed already converted: `fn` then computes the same
    values bit for bit, without the conversion. Traces `fn` (args may be `jax.ShapeDtypeStruct`s); runs nothing."""
    dtype = jnp.dtype(dtype)
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    flat = [jax.tree.leaves(a) for a in args]
    masks = []
    for i in argnums:
        start = sum(len(leaves) for leaves in flat[:i])
        marks = [jnp.issubdtype(leaf.dtype, jnp.floating) and jnp.dtype(leaf.dtype) != dtype
                 and _only_converted(jaxpr, jaxpr.invars[start + j], dtype) for j, leaf in enumerate(flat[i])]
        masks.append(jax.tree.unflatten(jax.tree.structure(args[i]), marks))
    return masks


def _only_converted(jaxpr, var, dtype) -> bool:
    """Whether `var` is used in `jaxpr` and each use converts it to `dtype` (conservative: False for anything
    not understood, e.g. a while loop or a cond, whose bodies do not take the operands one for one)."""
    if any(v is var for v in jaxpr.outvars):
        return False
    used = False
    for eqn in jaxpr.eqns:
        for i, v in enumerate(eqn.invars):
            if v is not var:
                continue
            used = True
            if eqn.primitive is jax.lax.convert_element_type_p:
                if jnp.dtype(eqn.params["new_dtype"]) != dtype:
                    return False
                continue
            body = next((eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params), None)
            body = getattr(body, "jaxpr", body)  # a ClosedJaxpr's jaxpr, or a Jaxpr
            if body is None or len(body.invars) != len(eqn.invars) or not _only_converted(body, body.invars[i], dtype):
                return False
    return used


@flax.struct.dataclass
class HalfState:
    """One half's state on its mesh.

    Attributes:
      trainable: the parameters that train (get gradients and an optimizer state).
      frozen: the others: constants of the step, no gradient, no optimizer state.
      opt_state: the optimizer's state, over `trainable` only.
    """

    trainable: Any
    frozen: Any
    opt_state: Any

    @property
    def params(self) -> dict:
        return combine(self.trainable, self.frozen)


def optimizer_state_shardings(opt_shapes, params, param_shardings, mesh):
    """Shardings for an optimizer state: each leaf that mirrors a parameter (Adam's moments, MultiSteps'
    accumulator: same dict path and shape) is sharded like that parameter, anything else (step counts) is
    replicated. Left to XLA, `jax.jit(tx.init)` replicates the moments on every device: zeros depend on no
    input, so no sharding propagates to them, and an FSDP mesh would hold the whole optimizer state everywhere."""
    by_path = {}
    for (path, leaf), sharding_ in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                       jax.tree.leaves(param_shardings), strict=True):
        by_path[tuple(k.key for k in path)] = (tuple(leaf.shape), sharding_)

    def one(path, leaf):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        shape, sharding_ = by_path.get(keys, (None, None))
        return sharding_ if shape == tuple(leaf.shape) else NamedSharding(mesh, jax.sharding.PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, opt_shapes)


def _batch_spec(mesh, x) -> NamedSharding:
    """Leading (batch) axis over the mesh's data axes when it divides; scalars replicated."""
    names = ("batch",) + (None,) * (np.ndim(x) - 1) if np.ndim(x) else ()
    return NamedSharding(mesh, sharding.logical_to_spec(names, np.shape(x), mesh))


def to_mesh(tree, mesh):
    """Moves a pytree (host batch, uplink, downlink) onto `mesh`: the only way data crosses between halves.

    A mesh over several processes (a multi-process server, `qtl_jax.split.multihost`) takes host arrays through
    `jax.make_array_from_process_local_data`: every process passes the same whole arrays (it received the whole
    uplink) and keeps its own devices' shards, with no cross-process traffic; `jax.device_put` would first compare
    every array across the processes (a collective per leaf)."""
    def one(a):
        target = _batch_spec(mesh, a)
        if target.is_fully_addressable or isinstance(a, jax.Array):
            return jax.device_put(a, target)
        # As explicit as a device_put, but the transfer guard does not know it: allowed here, only here.
        with jax.transfer_guard_host_to_device("allow"):
            return jax.make_array_from_process_local_data(target, np.asarray(a), np.shape(a))

    return jax.tree.map(one, tree)


def _abstract_on(tree, mesh):
    """ShapeDtypeStructs of a pytree as `to_mesh` would place it (ahead-of-time compilation)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=_batch_spec(mesh, a)), tree)


def _is_abstract(tree) -> bool:
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


MODEL_KEYS = ("images", "input_ids", "attention_mask", "labels")
SINGLE_FROZEN = {"client": 1, "server": 4}  # where `single_step` takes each half's frozen parameters


def _buffers(tree) -> set[int]:
    return {shard.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)
            for shard in leaf.addressable_shards}


def _share_buffers(a, b) -> bool:
    """Whether two pytrees of device arrays hold a buffer in common (then one must not be donated)."""
    return not _buffers(a).isdisjoint(_buffers(b))


@dataclasses.dataclass
class ServerReply:
    """What comes back for one uplink.

    Attributes:
      ce_loss: float32[] the server's cross-entropy (a device scalar locally, a host float over the network).
      downlink: the dL/dq payloads (image, text or None), as `compress_downlink` makes them.
      wire: bytes of the serialized request and reply at the transport ({"up", "down"}; empty locally).
    """

    ce_loss: Any
    downlink: tuple
    wire: dict = dataclasses.field(default_factory=dict)


class Resync(Exception):  # an instruction to the training loop rather than an error
    """The server lost steps (it restarted from a checkpoint): the client continues from `step`, which it must
    restore from its own checkpoints first."""

    def __init__(self, step: int):
        super().__init__(f"the server resumed at step {step}: restore the client's checkpoint of step {step}")
        self.step = step


class Crossing:
    """Carries a step's uplink to the server half and its reply back: the only thing `meshes` and `remote`
    do differently. `step` is the step's id (1, 2, ...: the micro-step it applies); `checkpoint` asks the server
    to save its half after applying it (before it replies), so both sides hold the same steps."""

    def exchange(self, step: int, uplink, checkpoint: bool = False) -> ServerReply:
        raise NotImplementedError


class LocalCrossing(Crossing):
    """The crossing inside one process: `device_put` onto the server's mesh, the server step, and back."""

    def __init__(self, trainer: SplitTrainer):
        self.trainer = trainer

    def exchange(self, step: int, uplink, checkpoint: bool = False) -> ServerReply:
        ce, _, downlink = self.trainer.server_step(uplink)
        return ServerReply(ce, downlink)


class SplitTrainer:
    """Holds the states of the halves this process runs and runs steps in `single`, `meshes` or `remote` mode.

    Args:
      model_config: the TinyLLaVA config.
      split: the split config.
      tx_client, tx_server: optax optimizers of each half; they see only the trainable parameters (None for a
        half this process does not hold).
      params: initial {"client", "server"} parameters (e.g. from `TinyLlava.init` and checkpoints); boxed
        (logically partitioned) or plain; `jax.ShapeDtypeStruct` leaves give an abstract trainer that can
        only `compile_steps`. Only the held halves are read.
      dtype: compute dtype.
      boxed_like: a logically-partitioned tree with the structure of `params` (e.g. the output of
        `jax.eval_shape(model.init, ...)`) when `params` themselves are plain arrays.
      trainable: the parts that train (names from `tinyllava.PARTS`); None = every part.
      halves: the halves this process holds: both (single, meshes), ("client",) in remote mode (default
        there), ("server",) in the server process.
      crossing: how uplinks reach the server half (remote mode: a `remote.client.RemoteCrossing`); default
        `LocalCrossing` in meshes mode.
      cast_frozen_once: with a compute dtype other than float32, give the step functions each frozen parameter
        that they only read converted to it (Dense kernels, embeddings; `leaves_read_as`) already converted,
        once, rather than converting the float32 originals in every step: the same values bit for bit. The
        state keeps the float32 originals (`params()`, checkpoints); the converted copy costs half their bytes
        again (a frozen SigLIP so400m: 0.8 GB beside 1.6 GB). It is made at the first step, and again after
        the frozen parameters are replaced (a restore).
    """

    def __init__(self, model_config, split: SplitConfig, tx_client, tx_server, params, dtype=jnp.float32,
                 boxed_like=None, trainable: Sequence[str] | None = None, halves: Sequence[str] | None = None,
                 crossing: Crossing | None = None, cast_frozen_once: bool = True):
        self.model_config, self.split, self.dtype = model_config, split, dtype
        self.cast_frozen_once = cast_frozen_once and jnp.dtype(dtype) != jnp.float32
        self._frozen_masks = {}  # half -> which frozen leaves the steps only read converted (`leaves_read_as`)
        self._frozen_copy = {}  # half -> (the state's frozen tree, its copy with those leaves converted)
        self.tx = {"client": tx_client, "server": tx_server}
        self.halves = tuple(halves or (("client",) if split.mode == "remote" else HALVES))
        if split.mode == "single" and self.halves != HALVES:
            raise ValueError("single mode runs both halves in one program")
        if split.mode == "remote" and "client" in self.halves and crossing is None:
            raise ValueError("remote mode needs a crossing (qtl_jax.split.remote.client.RemoteCrossing)")
        unknown = set(trainable or ()) - set(T.PARTS)
        if unknown:
            raise ValueError(f"trainable: unknown parts {sorted(unknown)}; expected some of {T.PARTS}")
        self.trainable_parts = tuple(T.PARTS if trainable is None else trainable)
        self.is_trainable = lambda path: T.part_of(path) in self.trainable_parts
        boxed_like = boxed_like if boxed_like is not None else params
        plain = nn.meta.unbox(params)
        self.meshes = make_meshes(split, self.halves)
        self.abstract = _is_abstract(plain)
        self.state, self.state_shardings = {}, {}
        for half in self.halves:
            shardings = sharding.param_shardings(boxed_like[half], self.meshes[half])
            trainable_sh, frozen_sh = partition(shardings, self.is_trainable)
            trainable_p, frozen_p = partition(plain[half], self.is_trainable)
            with jax.set_mesh(self.meshes[half]):
                opt_shapes = jax.eval_shape(self.tx[half].init, trainable_p)
                opt_sh = optimizer_state_shardings(opt_shapes, trainable_p, trainable_sh, self.meshes[half])
                if self.abstract:
                    place = lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s)
                    trainable_p = jax.tree.map(place, trainable_p, trainable_sh)
                    frozen_p = jax.tree.map(place, frozen_p, frozen_sh)
                    opt = jax.tree.map(place, opt_shapes, opt_sh)
                else:
                    trainable_p = jax.device_put(trainable_p, trainable_sh)
                    frozen_p = jax.device_put(frozen_p, frozen_sh)
                    opt = jax.jit(self.tx[half].init, out_shardings=opt_sh)(trainable_p)
            self.state[half] = HalfState(trainable_p, frozen_p, opt)
            self.state_shardings[half] = jax.tree.map(lambda a: a.sharding, self.state[half])
        self.crossing = crossing or (LocalCrossing(self) if split.mode == "meshes" else None)
        self._build()

    def _pin(self, half: str, trainable, opt_state):
        # Pin each updated state to the shardings it started with: otherwise the first step may return
        # e.g. P() where P(None, None) went in, and every step function would compile a second time.
        target = self.state_shardings[half]
        return (jax.lax.with_sharding_constraint(trainable, target.trainable),
                jax.lax.with_sharding_constraint(opt_state, target.opt_state))

    # -- step functions --------------------------------------------------------------------------------
    def _client_fn(self, params, batch):
        res = T.client_apply(self.model_config, params, *(batch[k] for k in MODEL_KEYS), dtype=self.dtype)
        return (res.q_image, res.q_text, res.commitment_loss), (res.uplink, res.stats)

    def _server_loss(self, params, q_image, q_text, uplink):
        server = T.TinyLlavaServer(self.model_config, self.dtype)
        text = q_text if self.model_config.quantized_text else uplink.text.codes.astype(jnp.int32)
        loss, aux = server.apply({"params": params}, q_image, text, uplink.image_pos, uplink.lengths,
                                 uplink.labels, method=T.TinyLlavaServer.loss)
        return loss, aux

    def _update(self, half: str, grads, trainable, opt_state):
        updates, opt_state = self.tx[half].update(grads, opt_state, trainable)
        return self._pin(half, optax.apply_updates(trainable, updates), opt_state)

    def _build(self):
        cfg = self.model_config
        downlink = self.split.downlink

        def client_forward(trainable, frozen, batch):
            client_fn = lambda t: self._client_fn(combine(t, frozen), batch)
            (q, vjp, (uplink, stats)) = jax.vjp(client_fn, trainable, has_aux=True)
            return uplink, q[2], vjp, stats

        def server_step(trainable, frozen, opt_state, uplink):
            server = T.TinyLlavaServer(cfg, self.dtype)
            params = combine(trainable, frozen)
            q_image, text = server.apply({"params": params}, uplink, method=T.TinyLlavaServer.dequantize)
            q_text = text if cfg.quantized_text else None
            loss_fn = lambda t, qi, qt: self._server_loss(combine(t, frozen), qi, qt, uplink)
            grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)
            (loss, aux), (g_params, g_image, g_text) = grad_fn(trainable, q_image, q_text)
            trainable, opt_state = self._update("server", g_params, trainable, opt_state)
            return trainable, opt_state, loss, aux, compress_downlink(downlink, (g_image, g_text))

        def client_update(trainable, opt_state, vjp, downlink_payloads):
            g_image, g_text = decompress_downlink(downlink, downlink_payloads)
            (grads,) = vjp((g_image, g_text, jnp.ones((), jnp.float32)))
            return self._update("client", grads, trainable, opt_state)

        def single_step(client_trainable, client_frozen, client_opt, server_trainable, server_frozen, server_opt,
                        batch):
            def total(c, s):
                params = {"client": combine(c, client_frozen), "server": combine(s, server_frozen)}
                return T.TinyLlava(cfg, self.dtype).apply({"params": params}, *(batch[k] for k in MODEL_KEYS))

            (loss, aux), (g_client, g_server) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
                client_trainable, server_trainable)
            client = self._update("client", g_client, client_trainable, client_opt)
            server = self._update("server", g_server, server_trainable, server_opt)
            return *client, *server, loss - aux["commitment_loss"], aux

        self._client_forward = jax.jit(client_forward)
        self._server_step = jax.jit(server_step, donate_argnums=(0, 2))
        # The client's state is donated too (its buffers are reused for the updated state), except that a vjp
        # residual may be a parameter itself (a jit output forwarded from its input: whether that happens depends
        # on the JAX version): then donating the parameters would free a buffer the same call reads, so
        # `step` picks the variant that donates only the optimizer state.
        self._client_update = jax.jit(client_update, donate_argnums=(0, 1))
        self._client_update_keep_params = jax.jit(client_update, donate_argnums=(1,))
        self._single_step = jax.jit(single_step, donate_argnums=(0, 2, 3, 5))

    def _single_args(self, state=None) -> tuple:
        client, server = (state or self.state)["client"], (state or self.state)["server"]
        return (client.trainable, client.frozen, client.opt_state, server.trainable, server.frozen, server.opt_state)

    def _frozen_args(self, fn, args: tuple, frozen_at: dict[str, int]) -> tuple:
        """`args` of the step function `fn`, with `args[i]`, the frozen parameters of half `h` for each h: i in
        `frozen_at`, replaced by their converted copy (`cast_frozen_once`). Concrete trees are converted once
        and kept while the state holds the same frozen tree; abstract ones (`compile_steps`) get the converted
        shapes."""
        if not self.cast_frozen_once:
            return args
        args = list(args)
        todo = [h for h in frozen_at if h not in self._frozen_masks]
        if todo:  # which leaves: decided once per half, from a trace of the step function that reads them
            self._frozen_masks.update(zip(todo, leaves_read_as(fn, args, [frozen_at[h] for h in todo], self.dtype),
                                          strict=True))
        for half, i in frozen_at.items():
            mask = self._frozen_masks[half]
            if _is_abstract(args[i]):
                args[i] = jax.tree.map(lambda m, a: jax.ShapeDtypeStruct(a.shape, self.dtype if m else a.dtype,
                                                                         sharding=a.sharding), mask, args[i])
                continue
            if half not in self._frozen_copy or self._frozen_copy[half][0] is not args[i]:
                # First step, or the state's frozen tree was replaced (a restore): the old copy goes first.
                self._frozen_copy.pop(half, None)
                self._frozen_copy[half] = (args[i], self._converted(half, mask, args[i]))
            args[i] = self._frozen_copy[half][1]
        return tuple(args)

    def _converted(self, half: str, mask, frozen):
        """`frozen` with the leaves `mask` marks converted to the compute dtype, on the state's shardings."""
        leaves, treedef = jax.tree.flatten(frozen)
        shardings = jax.tree.leaves(self.state_shardings[half].frozen)
        chosen = [j for j, m in enumerate(jax.tree.leaves(mask)) if m]
        with jax.set_mesh(self.meshes[half]):
            cast = jax.jit(lambda xs: [x.astype(self.dtype) for x in xs],
                           out_shardings=[shardings[j] for j in chosen])([leaves[j] for j in chosen])
        for j, x in zip(chosen, cast, strict=True):
            leaves[j] = x
        return jax.tree.unflatten(treedef, leaves)

    def _check_runnable(self) -> None:
        if self.abstract:
            raise RuntimeError("this trainer was built from shapes only (jax.ShapeDtypeStruct): it can "
                               "compile_steps but not run them")

    def server_step(self, uplink) -> tuple[jax.Array, dict, tuple]:
        """The server half on one uplink (device arrays on any mesh, or host arrays from the wire): moves it onto
        the server's mesh, steps, and returns (ce_loss, aux, downlink payloads on the server's mesh)."""
        self._check_runnable()
        server = self.state["server"]
        with jax.transfer_guard("disallow"):
            uplink = to_mesh(uplink, self.meshes["server"])
            with jax.set_mesh(self.meshes["server"]):
                args = self._frozen_args(self._server_step, (server.trainable, server.frozen, server.opt_state,
                                                             uplink), {"server": 1})
                s_train, s_opt, ce, aux, downlink = self._server_step(*args)
        self.state["server"] = HalfState(s_train, server.frozen, s_opt)
        return ce, aux, downlink

    def step(self, batch: dict, step: int = 0, checkpoint: bool = False) -> dict:
        """One training step on a host batch (numpy). Returns metrics: ce_loss, commitment_loss,
        uplink_bytes, downlink_bytes (exact, from the payloads), as device scalars / Python ints; the client's
        diagnostics `stats` ({"image_clipped": ...}, device scalars); the `uplink` itself (on the client's
        devices) for code-usage statistics (`qtl_jax.compress.entropy.code_usage`); and over the network
        `wire_up_bytes` / `wire_down_bytes`, the serialized messages' sizes.

        `step` is the step's id (the micro-step this is, from 1) and `checkpoint` whether both halves save after
        it: they travel with the uplink, so that a server in another process applies each step once and saves
        the same steps as the client (`Crossing.exchange`)."""
        self._check_runnable()
        model_batch = {k: batch[k] for k in MODEL_KEYS}
        client = self.state["client"]
        if self.split.mode == "single":
            server = self.state["server"]
            data = to_mesh(model_batch, self.meshes["client"])
            with jax.set_mesh(self.meshes["client"]):
                args = self._frozen_args(self._single_step, (*self._single_args(), data), SINGLE_FROZEN)
                c_train, c_opt, s_train, s_opt, ce, aux = self._single_step(*args)
            self.state = {"client": HalfState(c_train, client.frozen, c_opt),
                          "server": HalfState(s_train, server.frozen, s_opt)}
            return {"ce_loss": ce, "commitment_loss": aux["commitment_loss"],
                    "uplink_bytes": int(aux["uplink_bytes"]), "downlink_bytes": 0, "stats": aux["stats"],
                    "uplink": aux["uplink"]}
        data = to_mesh(model_batch, self.meshes["client"])
        with jax.transfer_guard("disallow"):
            with jax.set_mesh(self.meshes["client"]):
                args = self._frozen_args(self._client_forward, (client.trainable, client.frozen, data), {"client": 1})
                uplink, commitment, vjp, stats = self._client_forward(*args)
            reply = self.crossing.exchange(step, uplink, checkpoint)
            downlink_client = to_mesh(reply.downlink, self.meshes["client"])
            update = self._client_update_keep_params if _share_buffers(vjp, client.trainable) else self._client_update
            with jax.set_mesh(self.meshes["client"]):
                c_train, c_opt = update(client.trainable, client.opt_state, vjp, downlink_client)
        self.state["client"] = HalfState(c_train, client.frozen, c_opt)
        return {"ce_loss": reply.ce_loss, "commitment_loss": commitment, "uplink_bytes": uplink.nbytes,
                "downlink_bytes": downlink_nbytes(reply.downlink), "stats": stats, "uplink": uplink,
                **{f"wire_{k}_bytes": v for k, v in reply.wire.items()}}

    def compile_steps(self, batch: dict) -> dict[str, Any]:
        """Ahead-of-time compiled step functions for a batch of this shape (arrays or ShapeDtypeStructs):
        {"client_forward", "server_step", "client_update"} in meshes mode, {"single_step"} in single mode.
        Their `memory_analysis()` and `cost_analysis()` give per-device bytes and FLOPs; nothing runs."""
        model_batch = {k: jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype) for k in MODEL_KEYS}
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), self.state)
        client, server = state["client"], state["server"]
        data = _abstract_on(model_batch, self.meshes["client"])
        if self.split.mode == "single":
            with jax.set_mesh(self.meshes["client"]):
                args = self._frozen_args(self._single_step, (*self._single_args(state), data), SINGLE_FROZEN)
                return {"single_step": self._single_step.lower(*args).compile()}
        with jax.set_mesh(self.meshes["client"]):
            args = self._frozen_args(self._client_forward, (client.trainable, client.frozen, data), {"client": 1})
            forward = self._client_forward.lower(*args).compile()
        out_shapes = jax.eval_shape(self._client_forward, *args)
        # By leaves: the vjp's static part (its jaxpr) differs between two traces of the same function.
        placed = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh) for s, sh in
                  zip(jax.tree.leaves(out_shapes), jax.tree.leaves(forward.output_shardings), strict=True)]
        uplink, _, vjp, _ = jax.tree.unflatten(jax.tree.structure(out_shapes), placed)
        with jax.set_mesh(self.meshes["server"]):
            server_args = self._frozen_args(self._server_step, (server.trainable, server.frozen, server.opt_state,
                                                                _abstract_on(uplink, self.meshes["server"])),
                                            {"server": 1})
            step = self._server_step.lower(*server_args).compile()
        downlink = jax.eval_shape(self._server_step, *server_args)[4]
        with jax.set_mesh(self.meshes["client"]):
            update = self._client_update.lower(client.trainable, client.opt_state, vjp,
                                               _abstract_on(downlink, self.meshes["client"])).compile()
        return {"client_forward": forward, "server_step": step, "client_update": update}

    def frozen_copies(self) -> dict:
        """{half: the bf16 copies of frozen parameters the steps read (`cast_frozen_once`), as a list of
        `jax.ShapeDtypeStruct`s with their shardings}: memory held besides the state. Known once the steps have
        run or compiled (empty before, and without cast_frozen_once)."""
        out = {}
        for half, mask in self._frozen_masks.items():
            frozen = self.state[half].frozen
            out[half] = [jax.ShapeDtypeStruct(x.shape, self.dtype, sharding=x.sharding)
                         for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(frozen), strict=True) if m]
        return out

    def params(self) -> dict:
        """{half: parameters} of the halves this process holds, each on its own mesh."""
        return {half: self.state[half].params for half in self.halves}
