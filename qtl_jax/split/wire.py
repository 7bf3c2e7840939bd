"""What crosses between the client and the server: array trees to and from typed arrays, their validation, and
the fingerprint of everything both sides must agree on.

A message carries a tree's array leaves only, in tree order, each as (dtype name, shape, raw C-order bytes); the
rest of the tree (which codec, how many bits, the static shapes of `Payload`, the `Uplink`'s fields) is part of
the session's agreed configuration, so both ends rebuild it from the config (`uplink_template`,
`downlink_template`) and never from the message. The receiver checks every array's dtype, shape and byte count
against its own template before it decodes anything (`from_arrays`); nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.models import tinyllava as T
from qtl_jax.split.runtime import compress_downlink

PROTOCOL_VERSION = 1
# A message's size beyond its arrays' bytes (protobuf tags and lengths, session id, dtype names, shapes): what
# the size limit allows on top of the largest legal payload.
FRAMING_ALLOWANCE = 64 * 1024


class WireError(ValueError):
    """A message that does not match what the session agreed on (the server answers INVALID_ARGUMENT)."""


@dataclasses.dataclass(frozen=True)
class WireArray:
    """One array as it travels: numpy dtype name, shape, raw C-order bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


def to_arrays(tree) -> list[WireArray]:
    """The array leaves of a tree (device or host arrays) in tree order; `jax.device_get` is the one explicit
    transfer to the host."""
    out = []
    for leaf in jax.tree.leaves(tree):
        host = np.ascontiguousarray(jax.device_get(leaf))
        out.append(WireArray(host.dtype.name, tuple(int(d) for d in host.shape), host.tobytes()))
    return out


def from_arrays(template, arrays: Sequence[WireArray], what: str = "message"):
    """Rebuilds a tree with `template`'s structure (its leaves `jax.ShapeDtypeStruct`s or arrays) from received
    arrays, as host numpy arrays. Raises `WireError` naming the first array whose count, dtype, shape or byte
    length differs from the template; nothing is decoded before all are checked."""
    leaves, treedef = jax.tree.flatten(template)
    if len(arrays) != len(leaves):
        raise WireError(f"{what}: expected {len(leaves)} arrays, got {len(arrays)}")
    for i, (leaf, array) in enumerate(zip(leaves, arrays, strict=True)):
        dtype, shape = np.dtype(leaf.dtype), tuple(int(d) for d in leaf.shape)
        if array.dtype != dtype.name:
            raise WireError(f"{what}: array {i} has dtype {array.dtype[:32]!r}, expected {dtype.name!r}")
        if tuple(array.shape) != shape:
            got = tuple(array.shape) if len(array.shape) <= 8 else f"{len(array.shape)} dimensions"
            raise WireError(f"{what}: array {i} has shape {got}, expected {shape}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if len(array.data) != expected:
            raise WireError(f"{what}: array {i} ({dtype.name}{list(shape)}) has {len(array.data)} bytes, expected "
                            f"{expected}")
    out = [np.frombuffer(a.data, dtype=np.dtype(leaf.dtype)).reshape(leaf.shape)
           for leaf, a in zip(leaves, arrays, strict=True)]
    return jax.tree.unflatten(treedef, out)


def nbytes(arrays: Sequence[WireArray]) -> int:
    return sum(len(a.data) for a in arrays)


# ------------------------------------------------------------------------------------------------ templates
def _example(config: T.TinyLlavaConfig, batch_size: int, text_length: int):
    size = config.vision.image_size
    return (jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, text_length), jnp.int32),
            jax.ShapeDtypeStruct((batch_size, text_length), jnp.bool_),
            jax.ShapeDtypeStruct((batch_size, text_length), jnp.int32))


@functools.lru_cache(maxsize=64)
def _client_shapes(config: T.TinyLlavaConfig, batch_size: int, text_length: int) -> T.ClientResult:
    client = T.TinyLlavaClient(config)
    example = _example(config, batch_size, text_length)
    # The key inside the traced function: a concrete one would be a host-to-device transfer, which the training
    # step's transfer guard refuses (templates are built lazily, mid-step).
    params = jax.eval_shape(lambda *b: client.init(jax.random.key(0), *b), *example)
    return jax.eval_shape(lambda p, *b: client.apply(p, *b), params, *example)


def uplink_template(config: T.TinyLlavaConfig, batch_size: int, text_length: int) -> T.Uplink:
    """The `Uplink` (leaves `jax.ShapeDtypeStruct`) of a [batch_size, text_length] batch under `config`."""
    return _client_shapes(config, batch_size, text_length).uplink


@functools.lru_cache(maxsize=64)  # the client looks it up every step: trace compress_downlink once per shape
def downlink_template(config: T.TinyLlavaConfig, downlink: str, batch_size: int, text_length: int) -> tuple:
    """The downlink payloads (dL/dq of the image rows, of the text rows or None) for such a batch."""
    out = _client_shapes(config, batch_size, text_length)
    grads = (out.q_image, out.q_text)
    return jax.eval_shape(lambda g: compress_downlink(downlink, g), grads)


@functools.lru_cache(maxsize=64)
def token_rows_template(config: T.TinyLlavaConfig, batch_size: int):
    """The text payload of one generated token per sample (`tinyllava.token_payload_fn`), quantized embeddings."""
    client = T.TinyLlavaClient(config)
    ids = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32)
    params = jax.eval_shape(lambda *b: client.init(jax.random.key(0), *b), *_example(config, batch_size, 8))

    def payload(p, ids):
        return client.apply(p, ids, None, method=T.TinyLlavaClient.token_payload)

    return jax.eval_shape(payload, params, ids)


def max_message_bytes(config: T.TinyLlavaConfig, downlink: str, batch_size: int, text_length: int) -> int:
    """The size limit of messages: the largest legal uplink or downlink (a full batch at the longest bucket)
    plus `FRAMING_ALLOWANCE`. Pass a config whose vocabulary needs int32 ids for a bound that holds whatever
    tokenizer a client brings."""
    size = lambda tree: sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
                            for x in jax.tree.leaves(tree))
    return max(size(uplink_template(config, batch_size, text_length)),
               size(downlink_template(config, downlink, batch_size, text_length))) + FRAMING_ALLOWANCE


# --------------------------------------------------------------------------------------------- fingerprint
def _fields(prefix: str, value) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for field in dataclasses.fields(value):
            if not field.compare:  # a speed/memory knob (e.g. remat), not part of the model: each side its own
                continue
            out.update(_fields(f"{prefix}.{field.name}", getattr(value, field.name)))
        return out
    if isinstance(value, tuple | list):
        return {prefix: [v if isinstance(v, int | float | str | bool) else repr(v) for v in value]}
    return {prefix: value if isinstance(value, int | float | str | bool) or value is None else repr(value)}


def fingerprint(model_config: T.TinyLlavaConfig, *, stage: str, downlink: str, buckets: Sequence[int],
                batch_size: int, max_length: int, dtype: str) -> dict:
    """Everything both sides must agree on, as a flat {field: JSON value}: the protocol version, the stage, the
    model's sizes (SigLIP, OpenELM, vocabulary), both codecs (name, bits and options), the text transport, the
    downlink codec, the batch size and length buckets, and the compute dtype."""
    out = {"protocol_version": PROTOCOL_VERSION, "stage": stage, "downlink": downlink,
           "buckets": [int(b) for b in buckets], "batch_size": int(batch_size), "max_length": int(max_length),
           "dtype": str(jnp.dtype(dtype))}
    for name in ("vision", "lm", "image_codec", "text_codec", "text_transport"):
        out.update(_fields(f"model.{name}", getattr(model_config, name)))
    return json.loads(json.dumps(out))


def _short(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def fingerprint_differences(server: dict, client: dict, most: int = 20) -> list[str]:
    """'field: server X, client Y' for every field that differs (an empty list when they agree); at most `most`
    of them, then how many more (each value cut to 100 characters: the client's side may be anything)."""
    keys = [k for k in sorted(set(server) | set(client), key=str) if server.get(k) != client.get(k)]
    out = [f"{str(k)[:100]}: server {_short(server.get(k, '(absent)'))}, client {_short(client.get(k, '(absent)'))}"
           for k in keys[:most]]
    return out + ([f"and {len(keys) - most} more"] if len(keys) > most else [])
