"""What the server can read about objects from a trained Shapes-VQA client: linear probes on the image tokens.

For each grid cell that holds an object (the tiny preset has one token per cell), a least-squares linear probe
predicts the object's colour and shape from (a) the connector rows, (b) the compressor's continuous code and
(c) the quantized values the server dequantizes (with the inference statistics, per image). Only validation
images are used (never test): half of their object tokens fit the probe, the other half score it. It also
counts how many distinct quantized codes the object tokens get.

    python -m qtl_jax.probe --workdir W

`W` is the `--workdir` of a `train.py --config configs/finetune.py` run (or its stage folder); the model and
compressors come from the config the run saved.
"""

from __future__ import annotations

import argparse
import os

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

    from qtl_jax import checkpoint, trainer
    from qtl_jax.data import builders, shapes
    from qtl_jax.data.preprocess import load_image, preprocess_image
    from qtl_jax.data.tokenizer import load_tokenizer
    from qtl_jax.evaluate import find_stage
    from qtl_jax.models import tinyllava as T

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    stage_dir = find_stage(args.workdir)
    config = checkpoint.load_config(stage_dir)
    if config.data.dataset != "shapes":
        raise ValueError(f"{stage_dir}: the probe needs a Shapes-VQA run (its scenes say where the objects are)")
    model_cfg = trainer.model_config(config, len(load_tokenizer(trainer.tokenizer_dir(config)))).for_inference()
    if model_cfg.vision.num_tokens != 9:
        raise ValueError("the probe needs the tiny preset's one token per grid cell")
    builder, _ = builders.prepare_shapes(os.path.expanduser(config.data.data_dir), config.data.shapes_config)
    params = checkpoint.final_params(stage_dir)["client"]
    size = model_cfg.vision.image_size

    def features(m, images):
        rows = m.connector(m.vision_tower(images)[0])
        code = m.image_compressor.encode(rows, jax.numpy.ones(rows.shape[:2], bool))
        return rows, code, m.image_compressor.codec.ste(code)

    run = jax.jit(lambda p, im: T.TinyLlavaClient(model_cfg).apply({"params": p}, im, method=features))
    data_config = builders.SHAPES_CONFIGS[config.data.shapes_config]
    feats, colours, kinds = {"rows": [], "code": [], "quantized": []}, [], []
    source = builder.as_data_source()["validation"]  # never the test split: the probe is a diagnostic
    scenes = {s.uid: s.objects for s in builders.split_samples(data_config, "validation")}
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
