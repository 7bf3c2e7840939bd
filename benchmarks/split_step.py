"""Split step cost: time per training step with the two halves on two meshes vs one program, same devices.

Tiny preset and a mid-size model, random weights, SGD, batch 8, RD-FSQ 2-bit, fp32. Each mode's median
step time after warm-up; the ratio meshes / single is the price of the split (target <= 1.15).

    python benchmarks/split_step.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

jax.config.update("jax_num_cpu_devices", 2)  # client and server meshes on a CPU-only machine

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from timing import timed  # noqa: E402

from qtl_jax.models import tinyllava as T  # noqa: E402
from qtl_jax.models.openelm import OPENELM_TINY, OpenELMConfig  # noqa: E402
from qtl_jax.models.siglip import SIGLIP_TINY, SiglipConfig  # noqa: E402
from qtl_jax.split.runtime import MODEL_KEYS, SplitConfig, SplitTrainer  # noqa: E402

MID = dataclasses.replace(
    T.TINYLLAVA_TINY,
    vision=SiglipConfig(width=384, depth=7, num_heads=6, mlp_dim=1536, patch_size=16, image_size=128),
    lm=OpenELMConfig(vocab_size=1024, model_dim=512, num_transformer_layers=8, head_dim=64, ffn_dim_divisor=64),
)
TINY = dataclasses.replace(T.TINYLLAVA_TINY, vision=SIGLIP_TINY, lm=OPENELM_TINY)


def batch(cfg, size: int, length: int = 48):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.lm.vocab_size, (size, length)).astype(np.int32)
    ids[:, 1] = T.IMAGE_TOKEN_INDEX
    labels = np.where(np.arange(length) > length - 4, ids, -100).astype(np.int32)
    images = rng.uniform(-1, 1, (size, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
    return {"images": images, "input_ids": ids, "attention_mask": np.ones_like(ids, bool), "labels": labels}


def step_time(cfg, mode: str, data, repeats: int) -> float:
    boxed = jax.eval_shape(T.TinyLlava(cfg).init, jax.random.key(0), *(data[k] for k in MODEL_KEYS))["params"]
    params = nn.meta.unbox(jax.jit(T.TinyLlava(cfg).init)(jax.random.key(0), *(data[k] for k in MODEL_KEYS)))["params"]
    trainer = SplitTrainer(cfg, SplitConfig(mode=mode), optax.sgd(1e-3), optax.sgd(1e-3), params, boxed_like=boxed)
    return timed(lambda: jax.block_until_ready(trainer.step(data)["ce_loss"]), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), batch {args.batch}")
    for name, cfg in (("tiny", TINY), ("mid", MID)):
        data = batch(cfg, args.batch)
        single = step_time(cfg, "single", data, args.repeats)
        meshes = step_time(cfg, "meshes", data, args.repeats)
        print(f"{name:>4}: single {single * 1e3:8.1f} ms/step, meshes {meshes * 1e3:8.1f} ms/step, "
              f"meshes/single {meshes / single:.2f}")


if __name__ == "__main__":
    main()
