"""What the server can read about objects from a trained Shapes-VQA client: linear probes on the image tokens.

For each grid cell that holds an object (the tiny preset has one token per cell), a least-squares linear probe
predicts the object's colour and shape from (a) the connector rows, (b) the compressor's continuous code and
(c) the quantized values the server dequantizes. Half of the tokens fit the probe, the other half score it.
It also counts how many distinct quantized codes the object tokens get.

    python -m qtl_jax.probe --workdir W                                   # a default (RD-FSQ 2-bit) run
    python -m qtl_jax.probe --workdir W --image none_fp16 --text none_fp16

`W` is the `--workdir` of a `train.py --config configs/finetune.py` run; pass the compressor flags it used.
"""

from __future__ import annotations

import argparse

import numpy as np


def linear_probe_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares one-vs-all linear probe with a bias: fit on the first half of (x [n, d], y int [n]),
    return the accuracy on the second half."""
    x = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
    onehot = np.eye(int(y.max()) + 1)[y]
    half = len(y) // 2
    w = np.linalg.lstsq(x[:half], onehot[:half], rcond=None)[0]
    return float(np.mean(np.argmax(x[half:] @ w, axis=1) == y[half:]))


def main(argv=None) -> None:
    import jax

    from configs.finetune import get_config
    from qtl_jax import trainer
    from qtl_jax.data import builders, shapes
    from qtl_jax.data.preprocess import load_image, preprocess_image
    from qtl_jax.data.tokenizer import load_tokenizer
    from qtl_jax.models import tinyllava as T
    from qtl_jax.split.runtime import SplitConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--image", default="rd_fsq")
    parser.add_argument("--text", default="rd_fsq")
    parser.add_argument("--bits", type=int, default=2)
    args = parser.parse_args(argv)
    config = get_config()
    config.compressor.image, config.compressor.text, config.compressor.bits = args.image, args.text, args.bits
    # The checkpoint is restored onto as many devices as the default run's meshes had (as train.py sets them).
    jax.config.update("jax_num_cpu_devices", SplitConfig.from_config(config.split).num_devices)
    _, evals, tokenizer_dir = trainer.prepare_data(config)
    model_cfg = trainer.model_config(config, len(load_tokenizer(tokenizer_dir)))
    if model_cfg.vision.num_tokens != 9:
        raise ValueError("the probe needs the tiny preset's one token per grid cell")
    params = jax.device_get(trainer.final_params(f"{args.workdir}/finetune"))["client"]
    size = model_cfg.vision.image_size

    def features(m, images):
        rows = m.connector(m.vision_tower(images)[0])
        code = m.image_compressor.encode(rows)
        return rows, code, m.image_compressor.codec.ste(code)

    run = jax.jit(lambda p, im: T.TinyLlavaClient(model_cfg).apply({"params": p}, im, method=features))
    data_config = builders.SHAPES_CONFIGS[config.data.shapes_config]
    feats, colours, kinds = {"rows": [], "code": [], "quantized": []}, [], []
    for split, source in evals.items():
        scenes = {s.uid: s.objects for s in builders.split_samples(data_config, split)}
        for start in range(0, len(source), 100):
            records = [source[i] for i in range(start, min(start + 100, len(source)))]
            images = np.stack([preprocess_image(load_image(bytes(r["image"])), size) for r in records])
            out = [np.asarray(a) for a in run(params, images)]
            for k, r in enumerate(records):
                uid = r["id"].decode() if isinstance(r["id"], bytes) else r["id"]
                for o in scenes[uid]:
                    token = o.row * 3 + o.col
                    for name, a in zip(feats, out, strict=True):
                        feats[name].append(a[k, token])
                    colours.append(list(shapes.COLORS).index(o.color))
                    kinds.append(shapes.SHAPES.index(o.shape))
    colours, kinds = np.array(colours), np.array(kinds)
    chance = f"colour {1 / len(shapes.COLORS):.3f}, shape {1 / len(shapes.SHAPES):.3f}"
    print(f"{len(colours)} object tokens; chance: {chance}")
    for name, x in feats.items():
        x = np.stack(x)
        print(f"{name:>9}: colour {linear_probe_accuracy(x, colours):.3f}  shape {linear_probe_accuracy(x, kinds):.3f}"
              f"  distinct codes {len({row.tobytes() for row in x})}")


if __name__ == "__main__":
    main()
