"""Plan the hardware before renting it: per-device memory and FLOPs of the paper-size split training steps.

Compiles ahead of time, from shapes alone (no weights, nothing runs), the paper-size model (SigLIP so400m +
OpenELM-270M, 384 px, bf16 compute, fp32 master weights, RD-FSQ 2-bit) with each stage's trainable parts,
batch and optimizer (`configs/*.py:preset=paper`) on an 8-device virtual CPU mesh split between the halves,
and prints for each step function

  * per-device memory from `compiled.memory_analysis()`: arguments (parameters, optimizer state, the batch
    or the payload), outputs, temporaries, and their sum as the step's peak; the state each device holds
    between steps (parameters + optimizer state + the bf16 copy of the frozen kernels that the steps read,
    `model.cast_frozen_once`, and for the client the vjp residuals it keeps from its forward to its update);
  * FLOPs from `compiled.cost_analysis()` (per device; x devices for the mesh), per micro-batch and per
    optimizer step (x accumulation), and the time an optimizer step would take at 40% of one H100 SXM's
    (989 TFLOP/s) and one TPU v5e's (197 TFLOP/s) dense bf16 peak.

It also compiles stage 1 with every part trainable: the difference is what freezing saves (the frozen SigLIP
and OpenELM get no weight gradients, optimizer state, accumulators or residuals).

    python benchmarks/paper_memory.py [--client-mesh 1,4,1] [--server-mesh 1,4,1] [--text 64,512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flops import PEAKS_BF16  # noqa: E402

from configs.common import training_config  # noqa: E402
from qtl_jax import trainer  # noqa: E402
from qtl_jax.models import tinyllava as T  # noqa: E402
from qtl_jax.split.runtime import SplitConfig, SplitTrainer  # noqa: E402

PEAKS = {"H100 SXM": dict(PEAKS_BF16)["H100"], "TPU v5e": dict(PEAKS_BF16)["TPU v5e"]}  # dense bf16 FLOP/s
UTILISATION = 0.4
GB = 1e9


def _shard_bytes(tree) -> int:
    """Bytes of the largest device's shards of a tree of ShapeDtypeStructs with shardings."""
    per_device = {}
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)


def build(stage: str, split: SplitConfig, text: int, all_trainable: bool = False):
    config = training_config(stage, "paper")
    model_cfg = trainer.model_config(config, T.TINYLLAVA_PAPER.lm.vocab_size)
    dtype = jnp.dtype(config.model.dtype)
    example = trainer._example_batch(model_cfg)
    boxed = jax.eval_shape(T.TinyLlava(model_cfg, dtype).init, jax.random.key(0), *example)["params"]
    tx_client, tx_server = trainer.build_optimizers(config, num_steps=1000)
    parts = None if all_trainable else tuple(config.optim.trainable)
    # Boxed ShapeDtypeStructs: the trainer unboxes them and builds an abstract state (nothing is allocated).
    split_trainer = SplitTrainer(model_cfg, split, tx_client, tx_server, boxed, dtype=dtype, trainable=parts,
                                 cast_frozen_once=config.model.cast_frozen_once)
    size = model_cfg.vision.image_size
    batch = config.optim.batch_size
    shapes = {"images": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
              "input_ids": jax.ShapeDtypeStruct((batch, text), jnp.int32),
              "attention_mask": jax.ShapeDtypeStruct((batch, text), jnp.bool_),
              "labels": jax.ShapeDtypeStruct((batch, text), jnp.int32)}
    return config, split_trainer, shapes


def report(stage: str, split: SplitConfig, text: int, all_trainable: bool = False) -> None:
    start = time.perf_counter()
    config, split_trainer, shapes = build(stage, split, text, all_trainable)
    compiled = split_trainer.compile_steps(shapes)
    seconds = time.perf_counter() - start
    accum = config.optim.accum_steps
    devices = {"client_forward": int(np.prod(split.client_mesh)), "client_update": int(np.prod(split.client_mesh)),
               "server_step": int(np.prod(split.server_mesh))}
    what = "every part trainable" if all_trainable else f"trainable: {', '.join(config.optim.trainable)}"
    print(f"\n== stage {stage} ({what}); micro-batch {config.optim.batch_size} x {text} text tokens + "
          f"{T.TINYLLAVA_PAPER.image_tokens} image rows, accumulation {accum}; compiled in {seconds:.0f} s")
    print(f"{'step':<15} {'devices':>7} {'args GB':>8} {'out GB':>7} {'temp GB':>8} {'peak GB':>8} "
          f"{'TFLOP/micro':>12}")
    total_flops = 0.0
    for name, step in compiled.items():
        mem = step.memory_analysis()
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        flops = step.cost_analysis()["flops"] * devices[name]
        total_flops += flops
        print(f"{name:<15} {devices[name]:>7} {mem.argument_size_in_bytes / GB:>8.2f} "
              f"{mem.output_size_in_bytes / GB:>7.2f} {mem.temp_size_in_bytes / GB:>8.2f} {peak / GB:>8.2f} "
              f"{flops / 1e12:>12.2f}")
    state = split_trainer.state
    residuals = jax.eval_shape(split_trainer._client_forward, state["client"].trainable, state["client"].frozen,
                               {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in shapes.items()})[2]
    parts = []
    copies = split_trainer.frozen_copies()
    for half in ("client", "server"):
        st, copy = state[half], _shard_bytes(copies.get(half, []))
        parts.append(f"{half} {(_shard_bytes(st) + copy) / GB:.2f} GB (params {_shard_bytes(st.trainable) / GB:.2f} "
                     f"trainable + {_shard_bytes(st.frozen) / GB:.2f} frozen + {copy / GB:.2f} its bf16 copy, "
                     f"optimizer {_shard_bytes(st.opt_state) / GB:.2f})")
    residual_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(residuals))
    print(f"state per device: {'; '.join(parts)}; client vjp residuals {residual_bytes / GB:.2f} GB in all")
    step_flops = total_flops * accum
    times = ", ".join(f"{name} {step_flops / (UTILISATION * peak):.2f} s" for name, peak in PEAKS.items())
    print(f"FLOPs per optimizer step: {step_flops / 1e12:.1f} TFLOP -> at {UTILISATION:.0%} of one chip's bf16 peak: "
          f"{times}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client-mesh", default="1,4,1", help="data,fsdp,tensor devices of the client")
    parser.add_argument("--server-mesh", default="1,4,1", help="data,fsdp,tensor devices of the server")
    parser.add_argument("--text", default="64,512", help="padded text tokens of stage 1 and stage 2 batches")
    parser.add_argument("--stages", default="pretrain,finetune,pretrain-all-trainable")
    args = parser.parse_args()
    split = SplitConfig(mode="meshes", client_mesh=tuple(int(x) for x in args.client_mesh.split(",")),
                        server_mesh=tuple(int(x) for x in args.server_mesh.split(",")))
    text = dict(zip(("pretrain", "finetune"), (int(x) for x in args.text.split(",")), strict=True))
    print(f"jax {jax.__version__}, {len(jax.devices())} virtual CPU devices; client mesh {split.client_mesh}, "
          f"server mesh {split.server_mesh} (data, fsdp, tensor)")
    for stage in args.stages.split(","):
        name, _, variant = stage.partition("-")
        report(name, split, text[name], all_trainable=variant == "all-trainable")


if __name__ == "__main__":
    main()
