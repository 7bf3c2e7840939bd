"""What the server can recover of a client's images from the uplink: a black-box feature-inversion attack.

Threat model (He et al. 2019, "black-box inverse network"): the attacker is the server. For every image it
sees exactly the uplink's image rows, dequantized (`Compressor.dequantize` of the payload; for `none_fp16`
the fp16-cast features), float32[B, N, C] with N = grid * grid tokens. It can query the client on images of
its own (here: the run's training images), so it trains a decoder (`Inverter`) on (uplink, image) pairs and
then reconstructs images it never saw (the validation images, disjoint by content) from their uplink alone.

    uplink [B, N, C] -> Inverter -> images [B, S, S, 3] in [-1, 1]  ->  PSNR / SSIM against the originals

Scores are dm-pix's PSNR and SSIM on images mapped to [0, 1], next to the floor any attack must beat:
predicting the attacker's mean training image for every evaluated image (`mean_image_baseline`). A linear
probe (`qtl_jax.probe.linear_probe_accuracy`) says what semantic content the uplink carries: per object
token colour and shape on Shapes-VQA, the image label on LLaVA-format data whose records carry an integer
"label" (the built-in digits dataset does); the same probe on the connector rows (before the compressor, never sent)
shows how much the compressor removed.

    python -m qtl_jax.privacy --runs fp16=/tmp/run_fp16,rd2=/tmp/run_rd2 --out /tmp/privacy

Each WORKDIR is a `train.py` workdir (its finetune stage) or a stage folder; the model, compressor and data
come from the config the run saved. Writes OUT/privacy.csv, OUT/privacy.md and OUT/privacy_grid.png
(originals, then each run's reconstructions of the same validation images).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import dm_pix
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtl_jax import files
from qtl_jax.models import tinyllava as T
from qtl_jax.probe import linear_probe_accuracy

# A perfect reconstruction has mse 0 and PSNR inf: per-image PSNRs are capped here so that means and standard
# deviations stay finite (float32 images in [0, 1] that differ at all score well below it).
PSNR_CAP = 100.0


# ------------------------------------------------------------------------------------------ the uplink
def _uplink(module: T.TinyLlavaClient, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(dequantized uplink float32[B, N, C], connector rows float[B, N, D]) of a client module."""
    rows = module.connector(module.vision_tower(images)[0])
    out = module.image_compressor.client(rows, jnp.ones(rows.shape[:2], bool))
    # From the payload, as the server receives it: not `out.q`, which equals it in value but is the client's.
    return module.image_compressor.dequantize(out.payload), rows


@functools.lru_cache(maxsize=16)
def _uplink_fn(model_cfg: T.TinyLlavaConfig, dtype):
    client = T.TinyLlavaClient(model_cfg, dtype)
    return jax.jit(lambda params, images: client.apply({"params": params}, images, method=_uplink))


def uplink_features(model_cfg: T.TinyLlavaConfig, client_params: dict, images: np.ndarray, dtype=jnp.float32, *,
                    batch_size: int = 128, with_rows: bool = False):
    """The image features the server sees, computed as evaluation does (`model_cfg.for_inference()`: RD-FSQ
    statistics per image, so an image's uplink does not depend on its batch).

    Args:
      model_cfg: the model as trained.
      client_params: `params["client"]`.
      images: float32[B, S, S, 3] preprocessed images in [-1, 1].
      dtype: the client's compute dtype.
      batch_size: images per call (the last batch is padded; one compilation per config and batch size).
      with_rows: also return the connector rows (before the compressor; never sent).

    Returns:
      float32[B, N, C] dequantized uplink (C = the code width: D for RD-FSQ and the identity baselines), or
      (that, float32[B, N, D] connector rows) with `with_rows`.
    """
    images = np.asarray(images, np.float32)
    fn = _uplink_fn(model_cfg.for_inference(), dtype)
    batch = max(1, min(batch_size, len(images)))
    features, rows = [], []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), np.float32)])
        q, r = fn(client_params, padded)
        features.append(np.asarray(q, np.float32)[:len(chunk)])
        rows.append(np.asarray(r, np.float32)[:len(chunk)])
    features = np.concatenate(features)
    return (features, np.concatenate(rows)) if with_rows else features


# ------------------------------------------------------------------------------------------ the decoder
def upsample_sizes(grid: int, image_size: int) -> list[int]:
    """Side of each upsampling stage: doubling from `grid`, the last one clipped to `image_size`."""
    sizes, size = [], grid
    while size < image_size:
        size = min(2 * size, image_size)
        sizes.append(size)
    return sizes


def _upsample(x: jax.Array, size: int) -> jax.Array:
    """Nearest-neighbour resize of float[B, s, s, ch] to [B, size, size, ch]; doubling by repetition (a cheap
    gradient on CPU), other factors by `jax.image.resize`."""
    if size == 2 * x.shape[1]:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "nearest")


class Inverter(nn.Module):
    """The attacker's decoder: uplink tokens -> image.

    tokens [B, g*g, C] -> dense per token -> [B, g, g, width] -> 3x3 conv -> stages of (nearest 2x resize,
    3x3 conv) to S -> 3x3 conv to RGB + a per-pixel image bias -> tanh. Resize-then-convolve rather than
    transposed convolutions: no checkerboard artefacts. Stage i has max(width >> i, min_width) channels;
    grid 3 -> 48 px is 4 stages (6, 12, 24, 48).

    Attributes:
      image_size: S, the side of the reconstructed images.
      width: channels at the token grid.
      min_width: fewest channels of an upsampling stage.
    """

    image_size: int
    width: int = 64
    min_width: int = 16

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """float[B, N, C] (N a square) -> float32[B, S, S, 3] in [-1, 1]."""
        batch, n, _ = tokens.shape
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"the uplink's {n} tokens do not form a square grid")
        x = nn.gelu(nn.Dense(self.width, name="token_dense")(tokens)).reshape(batch, grid, grid, self.width)
        x = nn.gelu(nn.Conv(self.width, (3, 3), name="grid_conv")(x))
        for i, size in enumerate(upsample_sizes(grid, self.image_size)):
            x = _upsample(x, size)
            x = nn.gelu(nn.Conv(max(self.width >> i, self.min_width), (3, 3), name=f"up_{i}")(x))
        bias = self.param("image_bias", nn.initializers.zeros, (self.image_size, self.image_size, 3))
        return jnp.tanh(nn.Conv(3, (3, 3), name="to_pixels")(x) + bias)


@flax.struct.dataclass
class InverterParams:
    """A trained attack: the decoder's parameters with its (static) architecture and input normalisation.

    Attributes:
      inverter: the decoder (static).
      params: its parameters.
      feature_mean: float32[N, C] mean of the attacker's training uplinks, per token and channel.
      feature_scale: float32[] their standard deviation over all tokens and channels. One scale, not one per
        channel: a quantized channel that is constant over the attacker's images would otherwise divide by
        ~0 the first time an evaluated image sets it.
    """

    inverter: Inverter = flax.struct.field(pytree_node=False)
    params: Any
    feature_mean: jax.Array
    feature_scale: jax.Array


@functools.partial(jax.jit, static_argnums=0)
def _init(inverter: Inverter, key, tokens):
    return inverter.init(key, tokens)["params"]


# Module level, with the settings static: every attack of the same shapes and batch size shares one compilation
# (the learning rate of each step comes in as an argument, from a host-side schedule).
@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _train_step(inverter: Inverter, batch_size: int, params, adam_state, inputs, targets, data_key, number, lr):
    index = jax.random.randint(jax.random.fold_in(data_key, number), (batch_size,), 0, len(inputs))

    def loss_fn(p):
        return jnp.mean(jnp.square(inverter.apply({"params": p}, inputs[index]) - targets[index]))

    grads = jax.grad(loss_fn)(params)
    updates, adam_state = optax.scale_by_adam().update(grads, adam_state, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, updates), adam_state


def train_inverter(features: np.ndarray, images: np.ndarray, *, steps: int = 1500, batch_size: int = 64,
                   lr: float = 1e-3, seed: int = 0, width: int = 64, min_width: int = 16) -> InverterParams:
    """Trains an `Inverter` on (uplink, image) pairs: Adam with a cosine-decayed learning rate, pixel MSE.

    The features are centred per token and channel and scaled by one standard deviation, with the statistics
    of the attacker's own features (see `InverterParams`). The decoder's image bias starts at atanh of the
    mean training image: training starts from the mean-image baseline and learns what the features add.

    Args:
      features: float32[B, N, C] uplinks of the attacker's images.
      images: float32[B, S, S, 3] those images in [-1, 1].
      steps: optimizer steps (one jitted step each, batches drawn with replacement).
      batch_size: pairs per step.
      lr: peak learning rate.
      seed: initialisation and batch order.
      width, min_width: see `Inverter`.

    Returns:
      the trained `InverterParams`; `reconstruct` applies it.
    """
    features, images = np.asarray(features, np.float32), np.asarray(images, np.float32)
    if features.ndim != 3 or images.ndim != 4 or len(features) != len(images):
        raise ValueError(f"expected features [B, N, C] and images [B, S, S, 3] of the same B, got "
                         f"{features.shape} and {images.shape}")
    mean = features.mean(axis=0)
    scale = np.float32(max(float((features - mean).std()), 1e-6))
    inverter = Inverter(images.shape[1], width, min_width)
    # "rbg" keys: XLA's own random bit generator compiles in a fraction of threefry's time on CPU (seconds
    # for this small decoder's initialisation), and the attack needs no cross-platform reproducibility.
    init_key, data_key = jax.random.split(jax.random.key(seed, impl="rbg"))
    params = _init(inverter, init_key, (features[:1] - mean) / scale)
    params["image_bias"] = jnp.arctanh(jnp.clip(images.mean(axis=0), -0.99, 0.99))
    rates = np.asarray(optax.cosine_decay_schedule(lr, max(steps, 1))(np.arange(steps)), np.float32)
    adam_state = optax.scale_by_adam().init(params)
    inputs, targets = jax.device_put((features - mean) / scale), jax.device_put(images)
    for number in range(steps):
        params, adam_state = _train_step(inverter, batch_size, params, adam_state, inputs, targets, data_key, number,
                                         rates[number])
    return InverterParams(inverter=inverter, params=params, feature_mean=jnp.asarray(mean),
                          feature_scale=jnp.asarray(scale))


@functools.partial(jax.jit, static_argnames="inverter")
def _decode(inverter: Inverter, params, mean, scale, features):
    return inverter.apply({"params": params}, (features - mean) / scale)


def reconstruct(attack: InverterParams, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The attacker's reconstructions: float32[B, N, C] uplinks -> float32[B, S, S, 3] images in [-1, 1]."""
    features = np.asarray(features, np.float32)
    out = [_decode(attack.inverter, attack.params, attack.feature_mean, attack.feature_scale,
                   features[start:start + batch_size]) for start in range(0, len(features), batch_size)]
    return np.concatenate([np.asarray(o, np.float32) for o in out])


# ------------------------------------------------------------------------------------------------ scores
def _unit(images) -> jax.Array:
    return jnp.clip((jnp.asarray(images, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


@jax.jit
def _psnr_ssim(reconstructions, images):
    a, b = _unit(reconstructions), _unit(images)
    return dm_pix.psnr(a, b), dm_pix.ssim(a, b)


def inversion_scores(reconstructions: np.ndarray, images: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of reconstructions against the originals, both float[B, S, S, 3] in [-1, 1].

    Images are mapped to [0, 1] (dynamic range 1) and scored per image by `dm_pix.psnr` and `dm_pix.ssim`
    (Gaussian window 11, sigma 1.5); per-image PSNR is capped at `PSNR_CAP` (an identical image scores the
    cap, not inf).

    Returns:
      {"psnr", "psnr_std", "ssim", "ssim_std"}: means and standard deviations over the B images.
    """
    psnr, ssim = (np.asarray(v, np.float64) for v in _psnr_ssim(reconstructions, images))
    psnr = np.minimum(psnr, PSNR_CAP)
    return {"psnr": float(psnr.mean()), "psnr_std": float(psnr.std()),
            "ssim": float(ssim.mean()), "ssim_std": float(ssim.std())}


def mean_image_baseline(train_images: np.ndarray, eval_images: np.ndarray) -> dict[str, float]:
    """`inversion_scores` of predicting the mean of the attacker's training images for every evaluated image:
    what an attack scores without reading the uplink at all."""
    mean = np.asarray(train_images, np.float32).mean(axis=0)
    return inversion_scores(np.broadcast_to(mean, np.shape(eval_images)), eval_images)


def uplink_probe(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What a least-squares linear probe (`linear_probe_accuracy`: fit on the first half of the samples,
    scored on the second) reads from image features.

    Image-level labels int[B] are probed from the mean over tokens of features float[B, N, C]; per-token
    labels int[B, N] (-1 where a token has none) from each labelled token's features.

    Returns:
      {"accuracy": the probe's, "majority": predicting the most frequent label of the first half}.
    """
    x, y = np.asarray(features, np.float32), np.asarray(labels)
    if y.ndim == 1:
        x = x.mean(axis=1)
    else:
        keep = y >= 0
        x, y = x[keep], y[keep]
    y = y.astype(np.int64)
    half = len(y) // 2
    majority = float(np.mean(y[half:] == np.bincount(y[:half]).argmax()))
    return {"accuracy": linear_probe_accuracy(x, y), "majority": majority}


# ------------------------------------------------------------------------------------------------ picture
def picture_grid(path: str, originals: np.ndarray, reconstructions: dict[str, np.ndarray], n: int = 8) -> None:
    """A PNG of the first n originals (top row) and, one row each, every attack's reconstructions of them.

    Args:
      path: the PNG to write (via a temporary file, then an atomic rename).
      originals: float[B, S, S, 3] in [-1, 1].
      reconstructions: {row name: float[B, S, S, 3] in [-1, 1]}, the same images in the same order.
      n: columns (images shown).
    """
    from matplotlib.figure import Figure

    n = min(n, len(originals))
    rows = {"original": originals, **reconstructions}
    fig = Figure(figsize=(1.1 * n + 1.4, 1.1 * len(rows)), dpi=100)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        pixels = np.asarray(_unit(np.asarray(images[:n])))
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(pixels[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=1.3 / (1.1 * n + 1.4), right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    with files.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")


# -------------------------------------------------------------------------------------------- a trained run
def _image_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


def _collect(items, load, n: int, seed: int, exclude: frozenset = frozenset()):
    """Up to n distinct images of `items` in a seeded random order, leaving out the hashes in `exclude`.

    Returns (images float32[n, S, S, 3], the chosen items, their hashes, how many excluded images were met).
    """
    images, chosen, hashes, dropped = [], [], [], 0
    for i in np.random.default_rng(seed).permutation(len(items)):
        if len(images) == n:
            break
        image = load(items[i])
        key = _image_hash(image)
        if key in exclude:
            dropped += 1
            continue
        if key in hashes:
            continue
        images.append(image)
        chosen.append(items[i])
        hashes.append(key)
    if not images:
        raise ValueError("no image to use")
    return np.stack(images), chosen, hashes, dropped


def _shapes_data(config, size: int, attack_images: int, eval_images: int, seed: int) -> dict:
    """The attacker's images (the train split) and the evaluated ones (validation), with per-token colour and
    shape labels int[B, 9] (-1 for empty cells) when the grid is 3 x 3."""
    from qtl_jax.data import builders, shapes
    from qtl_jax.data.preprocess import load_image, preprocess_image

    builder, _ = builders.prepare_shapes(os.path.expanduser(config.data.data_dir), config.data.shapes_config)
    splits = builder.as_data_source()
    data_config = builders.SHAPES_CONFIGS[config.data.shapes_config]

    def load(item):
        source, index = item
        return preprocess_image(load_image(bytes(source[index]["image"])), size)

    def labels(split, items):
        scenes = {s.uid: s.objects for s in builders.split_samples(data_config, split)}
        colour, kind = np.full((len(items), 9), -1), np.full((len(items), 9), -1)
        for k, (source, index) in enumerate(items):
            uid = source[index]["id"]
            for o in scenes[uid.decode() if isinstance(uid, bytes) else uid]:
                colour[k, o.row * 3 + o.col] = list(shapes.COLORS).index(o.color)
                kind[k, o.row * 3 + o.col] = shapes.SHAPES.index(o.shape)
        return {"colour": colour, "shape": kind}

    val = splits["validation"]
    eval_x, eval_items, eval_hashes, _ = _collect([(val, i) for i in range(len(val))], load, eval_images, seed)
    train = splits["train"]
    train_x, train_items, _, dropped = _collect([(train, i) for i in range(len(train))], load, attack_images,
                                                seed + 1, frozenset(eval_hashes))
    return {"train_images": train_x, "eval_images": eval_x, "eval_hashes": eval_hashes, "overlap_dropped": dropped,
            "train_labels": labels("train", train_items), "eval_labels": labels("validation", eval_items)}


def _llava_images(annotation_file: str, image_root: str) -> tuple[list[str], dict[str, int] | None]:
    """(unique image paths of a LLaVA-format file in file order, {path: its "label"} or None when any image
    has no integer "label")."""
    from qtl_jax.data.annotations import iter_annotations

    paths, labels = {}, {}
    for annotation in iter_annotations(annotation_file):
        record = annotation.record
        if annotation.error or not record.get("image"):
            continue
        path = os.path.join(image_root, record["image"])
        paths.setdefault(path, None)
        if isinstance(record.get("label"), int) and not isinstance(record["label"], bool):
            labels.setdefault(path, record["label"])
    return list(paths), (labels if paths and len(labels) == len(paths) else None)


def _llava_files(config) -> tuple[str, str, str, str]:
    """(training file, its image folder, validation file, its image folder) of a LLaVA-format or digits run."""
    if config.data.dataset == "digits":
        from qtl_jax.data import digits

        folder = digits.build(os.path.join(os.path.expanduser(config.data.data_dir), "digits"))
        return os.path.join(folder, "train.json"), folder, os.path.join(folder, "validation.json"), folder
    from qtl_jax.evaluate import eval_image_root, parse_eval_files

    eval_files = parse_eval_files(config.data.eval_files)
    if "validation" not in eval_files:
        raise ValueError(f"config.data.eval_files names no 'validation' file to attack ({config.data.eval_files!r})")
    file = eval_files["validation"]
    return (os.path.expanduser(config.data.annotation_file), os.path.expanduser(config.data.image_root),
            os.path.expanduser(file), eval_image_root(config, file))


def _llava_data(config, size: int, attack_images: int, eval_images: int, seed: int) -> dict:
    """The attacker's images (the run's training file) and the evaluated ones (its validation file), with
    image labels int[B] when every record has an integer "label"."""
    from qtl_jax.data.preprocess import load_image, preprocess_image

    train_file, train_root, eval_file, eval_root = _llava_files(config)
    eval_paths, eval_labels = _llava_images(eval_file, eval_root)
    train_paths, train_labels = _llava_images(train_file, train_root)
    load = lambda path: preprocess_image(load_image(path, path), size)
    eval_x, eval_chosen, eval_hashes, _ = _collect(eval_paths, load, eval_images, seed)
    train_x, train_chosen, _, dropped = _collect(train_paths, load, attack_images, seed + 1, frozenset(eval_hashes))
    labelled = eval_labels is not None and train_labels is not None
    return {"train_images": train_x, "eval_images": eval_x, "eval_hashes": eval_hashes, "overlap_dropped": dropped,
            "train_labels": {"label": np.array([train_labels[p] for p in train_chosen])} if labelled else {},
            "eval_labels": {"label": np.array([eval_labels[p] for p in eval_chosen])} if labelled else {}}


def attack_run(workdir: str, *, steps: int = 1500, attack_images: int = 2000, eval_images: int = 200,
               seed: int = 0, batch_size: int = 64, lr: float = 1e-3, log=print) -> dict:
    """The attack on one trained run: train the inverter on the run's training images, reconstruct its
    validation images (disjoint by content hash), score them, probe the uplink.

    Images: Shapes-VQA's "train" and "validation" splits; the digits dataset's train.json and validation.json;
    for LLaVA-format data the unique images of `data.annotation_file` (under `data.image_root`) and of the
    `data.eval_files` entry named "validation" (under `evaluate.eval_image_root`). Each set is drawn in a
    seeded random order; attacker images whose content hash is also evaluated are dropped and counted.

    Args:
      workdir: a `train.py` workdir (its finetune stage) or a stage folder.
      steps, batch_size, lr: the inverter's training (`train_inverter`).
      attack_images: most distinct training images the attacker queries.
      eval_images: most distinct validation images evaluated.
      seed: image choice, initialisation and batch order.
      log: progress messages.

    Returns:
      {"workdir", "compressor", "bits", "attack_images", "eval_images", "overlap_dropped" (attacker images left
      out because they are also evaluated), "psnr", "psnr_std", "ssim", "ssim_std", "baseline_psnr",
      "baseline_psnr_std", "baseline_ssim", "baseline_ssim_std", "probes": {label name: {"uplink", "rows",
      "majority"}} (probe accuracies on the uplink and on the connector rows, and the majority label's, over
      the attacker's then the evaluated images: `uplink_probe`), "originals" and "reconstructions":
      float32[eval_images, S, S, 3] in [-1, 1], "eval_hashes": the evaluated images' content hashes, in order}.
    """
    from qtl_jax import checkpoint, trainer
    from qtl_jax.data.tokenizer import load_tokenizer
    from qtl_jax.evaluate import find_stage

    stage_dir = find_stage(workdir)
    config = checkpoint.load_config(stage_dir)
    model_cfg = trainer.model_config(config, len(load_tokenizer(trainer.tokenizer_dir(config))))
    dtype = jnp.dtype(config.model.dtype)
    client_params = checkpoint.final_params(stage_dir)["client"]
    size = model_cfg.vision.image_size
    if config.data.dataset == "shapes":
        data = _shapes_data(config, size, attack_images, eval_images, seed)
        if model_cfg.vision.num_tokens != 9:
            data["train_labels"] = data["eval_labels"] = {}  # the scene cells are tokens only on a 3 x 3 grid
    else:
        data = _llava_data(config, size, attack_images, eval_images, seed)
    codec = model_cfg.image_codec
    log(f"{stage_dir}: {codec.name} {codec.bits}-bit; attacker images {len(data['train_images'])}, evaluated "
        f"{len(data['eval_images'])} ({data['overlap_dropped']} attacker images dropped as also evaluated)")
    train_q, train_rows = uplink_features(model_cfg, client_params, data["train_images"], dtype, with_rows=True)
    eval_q, eval_rows = uplink_features(model_cfg, client_params, data["eval_images"], dtype, with_rows=True)
    attack = train_inverter(train_q, data["train_images"], steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    reconstructions = reconstruct(attack, eval_q)
    scores = inversion_scores(reconstructions, data["eval_images"])
    baseline = mean_image_baseline(data["train_images"], data["eval_images"])
    # The probe needs more samples than feature dimensions: it runs over all the attacked images, the attacker's
    # then the evaluated ones (fit on the first half, scored on the second).
    probes = {}
    for name, labels in data["eval_labels"].items():
        labels = np.concatenate([data["train_labels"][name], labels])
        uplink = uplink_probe(np.concatenate([train_q, eval_q]), labels)
        rows = uplink_probe(np.concatenate([train_rows, eval_rows]), labels)
        probes[name] = {"uplink": uplink["accuracy"], "rows": rows["accuracy"], "majority": uplink["majority"]}
    log(f"  PSNR {scores['psnr']:.2f} dB (mean image {baseline['psnr']:.2f}), SSIM {scores['ssim']:.3f} "
        f"(mean image {baseline['ssim']:.3f})" + "".join(f"; probe {k} {v['uplink']:.3f}" for k, v in probes.items()))
    return {"workdir": workdir, "compressor": codec.name, "bits": codec.bits,
            "attack_images": len(data["train_images"]), "eval_images": len(data["eval_images"]),
            "overlap_dropped": data["overlap_dropped"], **scores,
            **{f"baseline_{k}": v for k, v in baseline.items()}, "probes": probes,
            "originals": data["eval_images"], "reconstructions": reconstructions, "eval_hashes": data["eval_hashes"]}


# --------------------------------------------------------------------------------------------------- CLI
def _flat_row(name: str, result: dict) -> dict:
    row = {"run": name, **{k: v for k, v in result.items()
                           if k not in ("probes", "originals", "reconstructions", "eval_hashes")}}
    for label, probe in result["probes"].items():
        row.update({f"probe_{label}_{k}": v for k, v in probe.items()})
    return row


def write_report(out_dir: str, results: dict[str, dict], grid_images: int = 8) -> None:
    """OUT/privacy.csv (one row per run), OUT/privacy.md (a table) and the picture grids: privacy_grid.png for
    the runs evaluated on the same images as the first run, privacy_grid_2.png, ... for other image sets."""
    import io

    os.makedirs(out_dir, exist_ok=True)
    rows = [_flat_row(name, r) for name, r in results.items()]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(os.path.join(out_dir, "privacy.csv"), buffer.getvalue(), newline="")

    lines = ["| run | compressor | bits | PSNR (dB) | SSIM | mean-image PSNR | mean-image SSIM | "
             "probe accuracy: uplink / connector rows / majority | images (attacker / evaluated) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        probes = "; ".join(f"{k} {p['uplink']:.3f} / {p['rows']:.3f} / {p['majority']:.3f}"
                           for k, p in r["probes"].items()) or "-"
        lines.append(f"| {name} | {r['compressor']} | {r['bits']} | {r['psnr']:.2f} ± {r['psnr_std']:.2f} | "
                     f"{r['ssim']:.3f} ± {r['ssim_std']:.3f} | {r['baseline_psnr']:.2f} | {r['baseline_ssim']:.3f} | "
                     f"{probes} | {r['attack_images']} / {r['eval_images']} |")
    dropped = {name: r["overlap_dropped"] for name, r in results.items() if r["overlap_dropped"]}
    notes = ["", "Black-box inverse network (He et al. 2019) trained by the server on (dequantized uplink, image) "
             "pairs of the run's training images, scored on validation images it never saw (dm-pix PSNR/SSIM, "
             "images in [0, 1]). Mean image: predicting the attacker's mean training image.",
             f"Attacker images dropped because they are also evaluated: {dropped or 'none'}."]
    files.write_text(os.path.join(out_dir, "privacy.md"), "\n".join(lines + notes) + "\n")

    groups: dict[tuple, dict[str, dict]] = {}
    for name, r in results.items():
        groups.setdefault(tuple(r["eval_hashes"][:grid_images]), {})[name] = r
    for k, group in enumerate(groups.values()):
        first = next(iter(group.values()))
        picture_grid(os.path.join(out_dir, "privacy_grid.png" if k == 0 else f"privacy_grid_{k + 1}.png"),
                     first["originals"], {f"{name} ({r['compressor']} {r['bits']}b)": r["reconstructions"]
                                          for name, r in group.items()}, n=grid_images)


def main(argv: Sequence[str] | None = None) -> None:
    from qtl_jax.evaluate import parse_eval_files

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="NAME=WORKDIR[,NAME=WORKDIR...] of trained runs")
    parser.add_argument("--out", required=True, help="folder for privacy.csv, privacy.md, privacy_grid.png")
    parser.add_argument("--steps", type=int, default=1500, help="inverter training steps")
    parser.add_argument("--attack-images", type=int, default=2000, help="most training images the attacker uses")
    parser.add_argument("--eval-images", type=int, default=200, help="most validation images evaluated")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs = parse_eval_files(args.runs, field="--runs")
    results = {name: attack_run(workdir, steps=args.steps, attack_images=args.attack_images,
                                eval_images=args.eval_images, seed=args.seed) for name, workdir in runs.items()}
    write_report(args.out, results)
    print(f"wrote {args.out}/privacy.csv, privacy.md, privacy_grid.png")


if __name__ == "__main__":
    main()
