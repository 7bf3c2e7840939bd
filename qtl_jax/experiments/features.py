"""What a trained client puts on the wire, measured on held-out data: the paper's entropy criterion (SPEC §3.6)
and the quality of every codec without training (the paper's "first experiment" for choosing a method).

    feats = client_features(stage_dir)            # validation split: the rows, codes and indices of each modality
    entropy_report(feats, codec)                  # KDE entropy, selected b, index entropy, ANS bits/element
    quality_table(feats)                          # each codec at 1-4 bits: NMSE, cosine, bits/element sent

Only validation data is used (never test): these are diagnostics.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.compress import make_codec
from qtl_jax.compress.entropy import entropy_encode, index_entropy, select_bits

MODALITIES = ("image", "text")


@dataclasses.dataclass
class ModalityFeatures:
    """One modality's real rows over the evaluated samples (host arrays).

    Attributes:
      x: float32[R, D] the features the compressor receives (connector rows; client token embeddings).
      z: float32[R, C] in_proj(x), the code's input (x itself for codecs without projections).
      idx: uint8[R, C] the transmitted indices (None for the uncompressed baselines).
    """

    x: np.ndarray
    z: np.ndarray
    idx: np.ndarray | None


def client_features(stage_dir: str, split: str = "validation", max_samples: int = 512,
                    batch_size: int = 64) -> dict[str, ModalityFeatures]:
    """The trained client's features on `split` of its run's evaluation data (inference codecs: RD-FSQ
    statistics per sample), {"image": ..., "text": ...} (text only with quantized text embeddings)."""
    from qtl_jax import checkpoint, evaluate, trainer
    from qtl_jax.data.preprocess import load_image, preprocess_image
    from qtl_jax.data.templates import inference_prompt
    from qtl_jax.data.tokenizer import load_tokenizer
    from qtl_jax.models import tinyllava as T

    config = checkpoint.load_config(stage_dir)
    tokenizer = load_tokenizer(trainer.tokenizer_dir(config))
    cfg = trainer.model_config(config, len(tokenizer)).for_inference()
    params = jax.device_put(checkpoint.final_params(stage_dir)["client"])
    sources = evaluate.eval_sources(config, log=lambda *_: None)
    if split not in sources:
        raise ValueError(f"{stage_dir}: no {split!r} evaluation split; it has {sorted(sources)}")
    source = sources[split]
    size, length = cfg.vision.image_size, max(config.data.buckets)

    def run(m, images, ids, mask):
        image_rows, text_rows, image_pos, _ = m.rows(images, ids, mask)
        out = {}
        pairs = [("image", image_rows, jnp.broadcast_to((image_pos >= 0)[:, None], image_rows.shape[:2]),
                  m.image_compressor)]
        if cfg.quantized_text:
            pairs.append(("text", text_rows, mask & (ids != T.IMAGE_TOKEN_INDEX), m.text_compressor))
        for name, rows, row_mask, comp in pairs:
            code, _, z = comp._encode(rows, row_mask)
            quantized = comp.codec.quantize(code)
            out[name] = (rows, z, quantized.values, row_mask)
        return out

    apply = jax.jit(lambda p, *b: T.TinyLlavaClient(cfg).apply({"params": p}, *b, method=run))
    collected = {}
    n = min(len(source), max_samples)
    for start in range(0, n, batch_size):
        records = [source[i] for i in range(start, min(start + batch_size, n))]
        images = np.stack([preprocess_image(load_image(bytes(r["image"])), size) if len(r["image"])
                           else np.zeros((size, size, 3), np.float32) for r in records])
        ids = np.full((len(records), length), tokenizer.pad_id, np.int32)
        mask = np.zeros((len(records), length), bool)
        for i, r in enumerate(records):
            conv = json.loads(r["conversations"])
            prompt = inference_prompt(conv, tokenizer, config.data.template)[:length]
            ids[i, :len(prompt)], mask[i, :len(prompt)] = prompt, True
        for name, arrays in apply(params, images, ids, mask).items():
            rows, z, values, row_mask = (np.asarray(a) for a in arrays)
            keep = row_mask.reshape(-1)
            collected.setdefault(name, []).append(tuple(a.reshape(-1, a.shape[-1])[keep] for a in (rows, z, values)))
    out = {}
    for name, parts in collected.items():
        x, z, values = (np.concatenate(p) for p in zip(*parts, strict=True))
        out[name] = ModalityFeatures(x.astype(np.float32), z.astype(np.float32),
                                     values if values.dtype == np.uint8 else None)
    return out


def entropy_report(feats: dict[str, ModalityFeatures], bits: int | None = None) -> dict[str, float]:
    """The paper's entropy criterion on a run's held-out features, per modality m:

      kde_entropy_m      KDE differential entropy (bits) of the standardized compressor input z (Scott's rule)
      selected_bits_m    the smallest integer b >= that entropy (`select_bits`)
    and for the image rows of a run that sends indices (`bits` per element on the wire with plain packing):
      index_entropy_image        plug-in entropy of its indices, bits/element
      entropy_coded_bits_image   bits/element the ANS coder (`entropy_encode`, one table per channel, tables
                                 counted) actually spends on them
      distinct_codes_image, tokens_image   distinct transmitted rows among the held-out image tokens
    """
    out = {}
    for name, f in feats.items():
        selection = select_bits(f.z[None])
        out[f"kde_entropy_{name}"] = selection.entropy_bits
        out[f"selected_bits_{name}"] = selection.bits
    image = feats["image"]
    out["tokens_image"] = len(image.z)
    if image.idx is not None and bits is not None:
        out["index_entropy_image"] = index_entropy(image.idx, bits)[0]
        out["entropy_coded_bits_image"] = entropy_encode(image.idx, bits).nbytes * 8 / image.idx.size
        out["distinct_codes_image"] = len(np.unique(image.idx, axis=0))
    return out


def _fit_affine(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares affine decoder [C + 1, D] from dequantized values to features (a converged out_proj)."""
    q1 = np.concatenate([q, np.ones((len(q), 1))], axis=1).astype(np.float64)
    return np.linalg.lstsq(q1, x.astype(np.float64), rcond=None)[0]


def _affine(q: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.concatenate([q, np.ones((len(q), 1))], axis=1) @ w


def reconstruction_quality(x: np.ndarray, codec_name: str, bits: int) -> dict[str, float]:
    """One codec on features x [R, D] without training: the first half of the rows fits the decoder, the
    second half is scored.

    RD-FSQ and FSQ-tanh run with identity projections (in_proj = I) and a least-squares affine decoder in
    place of out_proj; NF dequantizes to the features itself. RD-FSQ takes its statistics per sample; here
    a "sample" is the scored half as one batch. Returns {"nmse": mean squared error / feature variance,
    "cosine": mean cosine similarity of rows, "bits_per_element": bytes on the wire * 8 / elements}.
    """
    codec = make_codec(codec_name, bits)
    half = len(x) // 2
    fit, test = x[:half], x[half:]

    def dequantized(rows):
        z = jnp.asarray(rows)[None]
        code = codec.encode(z, None, codec.moments(z, None))
        quantized = codec.quantize(code)
        return np.asarray(codec.dequantize(quantized))[0], codec.to_payload(quantized).nbytes

    q_test, nbytes = dequantized(test)
    if codec.projected:
        x_hat = _affine(q_test, _fit_affine(dequantized(fit)[0], fit))
    else:
        x_hat = q_test
    err = np.mean((x_hat - test) ** 2) / np.var(test)
    cos = np.sum(x_hat * test, 1) / (np.linalg.norm(x_hat, axis=1) * np.linalg.norm(test, axis=1) + 1e-12)
    return {"nmse": float(err), "cosine": float(np.mean(cos)), "bits_per_element": nbytes * 8 / test.size}


def quality_table(feats: dict[str, ModalityFeatures], codecs=("rd_fsq", "fsq_tanh", "nf"),
                  bits=(1, 2, 3, 4)) -> list[dict]:
    """`reconstruction_quality` of every codec and bit width on each modality's features x: rows of
    {"modality", "codec", "bits", "nmse", "cosine", "bits_per_element"}."""
    rows = []
    for name, f in feats.items():
        for codec in codecs:
            for b in bits:
                rows.append({"modality": name, "codec": codec, "bits": b,
                             **reconstruction_quality(f.x, codec, b)})
    return rows
