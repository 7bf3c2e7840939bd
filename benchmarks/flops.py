"""FLOPs and peaks, for the benchmarks' utilisation figures: what a step computes and what the chip could do.

  * `matmul_flops(fn, *args)`: the matmul FLOPs a traced function performs, read from its jaxpr (every
    `dot_general` and convolution, 2 FLOPs a multiply-add; inside jit, remat, custom-gradient bodies and scans,
    the last times their length). Traced under `jax.grad` it counts the backward the program really runs: no
    input gradient for a frozen tower's output, the weight gradients of what trains. It does not depend on the
    backend (XLA's `cost_analysis()` counts a loop body once and a cuDNN attention call as nothing), so the same
    step gives the same count on a CPU, a GPU and a TPU.
  * `peak_flops(device)`: a chip's dense bf16 peak from its datasheet, by `device.device_kind`, or None.
  * `matmul_rate(dtype)`: the rate this machine's matmuls reach in a run, JAX and PyTorch on the same device,
    the better of the two: the practical peak, measured beside the numbers it divides.

The model-FLOPs utilisation (MFU) of a step is `matmul_flops(step) / seconds / peak`: counted from the program's
own matmuls (attention's scores and weighted sums included, over every key, as they are computed), not from a
parameter-count formula.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 matmul peaks per chip (datasheets), matched in order against `device_kind` (case-insensitive).
PEAKS_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
)


def peak_flops(device=None) -> float | None:
    """Dense bf16 FLOP/s of `device` (default: JAX's first) from `PEAKS_BF16`, None for a chip not listed (a CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((peak for name, peak in PEAKS_BF16 if name.lower() in kind), None)


def matmul_flops(fn, *args) -> int:
    """Matmul FLOPs of `fn(*args)` (args may be `jax.ShapeDtypeStruct`s; nothing runs), from its jaxpr."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
            per_output = math.prod(rhs[d] for d in spec[1:])  # in features (per group) x kernel window
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * per_output
        elif name in ("while", "cond"):
            bodies = (eqn.params["body_jaxpr"], eqn.params["cond_jaxpr"]) if name == "while" else eqn.params["branches"]
            if any(_jaxpr_flops(body.jaxpr) for body in bodies):
                raise ValueError(f"matmul_flops: a {name} with matmuls in its body has no static count")
        else:
            for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
                body = eqn.params.get(key)
                if body is not None:
                    count = _jaxpr_flops(getattr(body, "jaxpr", body))
                    total += count * (eqn.params["length"] if name == "scan" else 1)
                    break
    return total


def matmul_size() -> int:
    """n of the n^3 matmuls that measure a machine's rate: 2048 on a CPU (seconds), 8192 on an accelerator (a
    smaller one does not fill it)."""
    return 2048 if jax.default_backend() == "cpu" else 8192


def matmul_rate(dtype=jnp.float32, n: int | None = None, repeats: int = 5, torch_device: str = "cpu") -> float:
    """FLOP/s of an n^3 matmul in `dtype` (float32 or bfloat16, accumulated in float32), the better of JAX and
    PyTorch on `torch_device` (the device JAX runs on); n defaults to `matmul_size()`."""
    import torch
    from timing import synced, timed

    n = n or matmul_size()
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    t_jax = timed(lambda: mm(a).block_until_ready(), repeats)
    at = torch.from_numpy(np.array(a, np.float32)).to(torch_device, getattr(torch, jnp.dtype(dtype).name))
    t_torch = timed(synced(lambda: at @ at, torch_device), repeats)
    return 2 * n**3 / min(t_jax, t_torch)


def split_step_flops(model_cfg, dtype, batch: dict, trainable) -> int:
    """Model FLOPs of one split training step of `model_cfg` on a batch of these shapes (arrays or
    `jax.ShapeDtypeStruct`s): the frozen parts' forward, the forward and backward of what trains, the optimizer's
    elementwise work not counted. Traced from `SplitTrainer`'s own step (single mode: the same computation the
    meshes split runs), with XLA's attention and no remat, so that each score is counted once: a flash-style
    attention's backward recomputes its scores (the blocked attention's, cuDNN's) and remat recomputes
    activations, and neither is model work. Nothing is allocated or run."""
    import dataclasses

    import optax

    from qtl_jax.models import tinyllava as T
    from qtl_jax.split.runtime import MODEL_KEYS, SplitConfig, SplitTrainer

    cfg = dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision, attention="xla", remat="none"),
                              lm=dataclasses.replace(model_cfg.lm, attention="xla", remat="none"))
    shapes = {k: jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype) for k in MODEL_KEYS}
    boxed = jax.eval_shape(T.TinyLlava(cfg, dtype).init, jax.random.key(0), *shapes.values())["params"]
    tx = optax.sgd(0.0)
    trainer = SplitTrainer(cfg, SplitConfig(mode="single"), tx, tx, boxed, dtype=dtype, trainable=trainable,
                           cast_frozen_once=False)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainer.state)
    return matmul_flops(trainer._single_step, *trainer._single_args(state), shapes)
