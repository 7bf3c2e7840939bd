"""Meshes and the one rule table that maps logical axis names to mesh axes (SPEC §2.4).

Every parameter carries logical names (`nn.with_logical_partitioning`): `embed` (model width), `mlp`
(FFN / MLP hidden), `heads` (merged heads x head_dim of a projection), `vocab`, `code` (compressor code
width), `vision_embed`, and axes that are never split (`norm`, `head_dim`, `patch`, `channels`, `position`).
`RULES` maps them to the mesh axes `data`, `fsdp` and `tensor`; each half of the split model applies the same
rules to its own mesh. A logical axis whose size does not divide by its mesh axes, or whose mesh axis is
missing or already used by another dimension of the same array, stays replicated, so a rule table never
makes a model unshardable.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("code", "tensor"),
    ("norm", None),
    ("head_dim", None),
    ("patch", None),
    ("channels", None),
    ("position", None),
    ("layers", None),  # the stacked layer axis of a scanned SigLIP (`SiglipConfig.scan_layers`)
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None,
              axis_names: Sequence[str] = MESH_AXES) -> Mesh:
    """A mesh of `shape` over `devices` (default: the first prod(shape) devices), every axis `AxisType.Auto`.

    Raises ValueError when more devices are asked for than given.
    """
    devices = list(jax.devices() if devices is None else devices)
    need = int(np.prod(shape))
    if need > len(devices):
        raise ValueError(f"mesh {dict(zip(axis_names, shape, strict=True))} needs {need} devices, only "
                         f"{len(devices)} available")
    grid = np.asarray(devices[:need], dtype=object).reshape(tuple(shape))
    return Mesh(grid, tuple(axis_names), axis_types=(AxisType.Auto,) * len(shape))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=RULES) -> P:
    """PartitionSpec of one array from its logical axis names (see the module docstring for fallbacks)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        if axes and size % int(np.prod([mesh.shape[a] for a in axes])) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    while spec and spec[-1] is None:  # canonical form (P("fsdp") not P("fsdp", None)), as jit returns it
        spec.pop()
    return P(*spec)


def param_shardings(boxed_params, mesh: Mesh, rules=RULES):
    """NamedSharding for every leaf of a (possibly `nn.LogicallyPartitioned`-boxed) parameter tree.

    Accepts real arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape(model.init, ...)`); unboxed
    leaves without names are replicated.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, logical_to_spec(leaf.names, value.shape, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def to_host(tree):
    """Host (numpy) copies of a tree of arrays. Arrays that span several processes (a multi-process server,
    `qtl_jax.split.multihost`) are gathered: a collective, which every process calls in the same order."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
