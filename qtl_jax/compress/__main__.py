"""`python -m qtl_jax.compress`: every compressor on one batch of synthetic features, as a table.

Until the training job lands this is the project's main job: it shows what each compressor sends (bytes per
sample and the ratio to fp16, from `Payload.nbytes`), how well the dequantized values stand for the input
features (signal-to-noise ratio in dB after the best affine rescale, which the server's out_proj can learn;
no projections are trained here, so RD-FSQ and FSQ quantize the raw features), the plug-in entropy of the indices and
what the lossless entropy coder makes of them, and the paper's entropy criterion for the bit width.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.compress import entropy_encode, index_entropy, make_codec, select_bits


def synthetic_features(batch: int, rows: int, width: int, seed: int) -> jax.Array:
    """float32[batch, rows, width] with heavy tails and per-channel offsets and scales, like connector outputs."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.t(k1, 5.0, (batch, rows, width))
    return x * jnp.exp(0.5 * jax.random.normal(k2, (width,))) + jax.random.normal(k3, (width,))


def affine_snr_db(x: jax.Array, q: jax.Array) -> str:
    """SNR of q as a stand-in for the features x after the best affine rescale (what a linear out_proj can
    learn): -10 log10(1 - rho^2), rho the correlation over all elements. "exact" when q reproduces x."""
    x, q = np.asarray(x, np.float64).ravel(), np.asarray(q, np.float64).ravel()
    rho = np.corrcoef(x, q)[0, 1]
    return "exact" if rho >= 1.0 else f"{-10 * np.log10(1 - rho**2):.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rows", type=int, default=832, help="image + text rows per sample")
    parser.add_argument("--width", type=int, default=1280, help="feature width D (OpenELM-270M: 1280)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    x = synthetic_features(args.batch, args.rows, args.width, args.seed)
    fp16_bytes = make_codec("none_fp16").payload_nbytes(x.shape) / args.batch
    rows = []
    for name, bits in [("none_fp32", 32), ("none_fp16", 16), ("rd_fsq", 4), ("rd_fsq", 2), ("rd_fsq", 1),
                       ("fsq_tanh", 2), ("nf", 4), ("nf", 2)]:
        codec = make_codec(name, min(bits, 8))
        code = jax.jit(codec.encode)(x)
        quantized = jax.jit(codec.quantize)(code)
        payload = jax.jit(codec.to_payload)(quantized)
        q = jax.jit(codec.dequantize)(codec.from_payload(payload))
        snr = affine_snr_db(x, q)
        if codec.bits <= 8:
            h, _ = index_entropy(quantized.values, codec.bits)
            coded = entropy_encode(quantized.values, codec.bits).bits_per_element
            entropy_cols = f"{h:8.3f} {coded:8.3f}"
        else:
            entropy_cols = f"{'-':>8} {'-':>8}"
        per_sample = payload.nbytes / args.batch
        rows.append(f"{name:<10} {codec.bits:>4} {per_sample / 1024:>10.1f} {payload.bits_per_element:>8.3f} "
                    f"{fp16_bytes / per_sample:>8.2f} {snr:>8} {entropy_cols}")

    print(f"features: float32{list(x.shape)} (synthetic, heavy-tailed), D = {args.width}\n")
    print(f"{'codec':<10} {'bits':>4} {'KiB/sample':>10} {'bits/elt':>8} {'x fp16':>8} {'SNR dB':>8} "
          f"{'H(idx)':>8} {'ANS b/e':>8}")
    print("\n".join(rows))
    choice = select_bits(x)
    print(f"\nselect_bits (standardized features): H(X) = {choice.entropy_bits:.3f} bits -> b = {choice.bits}")
    print("RD-FSQ index entropy per candidate b: "
          + ", ".join(f"{b}: {h:.2f}" for b, h in choice.index_entropy.items()))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
