"""The paper-size stage-2 split training step: JAX now, JAX before (an older revision), PyTorch eager and
`torch.compile`, side by side in one script run.

The step (SPEC §4, stage 2): the client's frozen SigLIP so400m (26 layers, 728 tokens) -> connector -> RD-FSQ
2-bit compressor of the image rows and of the text rows (quantized text embeddings); the server's decoder side of
the compressors -> splice -> OpenELM-270M -> cross-entropy; AdamW on the connector, the compressors, the client's
token embedding and the language model (the frozen tower gets no gradient). Batch --batch, --text text tokens
(one of them the image placeholder) -> 728 + text - 1 rows, the last --answer tokens supervised.

  * jax (this checkout) in `single` mode (one program) and in `meshes` mode (client and server on two devices
    with the uplink and downlink crossing between them), each in its own subprocess (its own memory);
  * jax at `--before` (default: the revision before the train-step work of issue 13) in the same two modes, run
    from a `git worktree` of that revision with this same script: the "before" of the ratios;
  * PyTorch eager written as TinyLLaVA runs it: transformers `SiglipVisionModel` under no_grad, the connector
    and the compressor math in torch (straight-through rounding, the paper's cosine commitment), the
    openelm-pytorch layers on the spliced rows, full-vocabulary logits for every row, `loss.backward()`,
    `torch.optim.AdamW`; and the same module under `torch.compile` (the strongest thing a PyTorch user would
    pick; its compile time is reported apart).

Weights are random (the same shapes on both sides, not the same values): this measures time, the loss printed
beside each is only a sanity check (about ln 32000 = 10.4 at random init). fp32 by default; `--dtype bfloat16`
is the paper's bf16 compute with float32 weights, on both sides (PyTorch under `torch.autocast`), the frozen
tower's weights converted to bf16 once on both sides (JAX: `SplitTrainer`'s cast_frozen_once; PyTorch: the tower
held in bf16): on a GPU, and on a CPU with bf16 matmul units (AMX / AVX512-BF16), where both sides' bf16
matmuls run faster than float32.
Median of --repeats steps after one warm-up step (which compiles).

On a GPU both sides run there (PyTorch on CUDA, timed to `torch.cuda.synchronize`), meshes mode only with two
devices or more. Each row also gets its model FLOP/s and its model-FLOPs utilisation (MFU): the step's matmul
FLOPs (`flops.split_step_flops`: read from the JAX step's trace, the same count for every row, so the PyTorch
peer's extra full-vocabulary head is not credited) per second, as a fraction of the chip's datasheet bf16 peak
(`flops.peak_flops`; none for a CPU) and of the matmul rate measured in the same run in the step's dtype.

    python benchmarks/train_step.py [--repeats 3] [--batch 1] [--text 64] [--before REV] [--skip-before]
                                    [--skip-compile] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

# On a GPU the parent process (the PyTorch peers, the matmul rate) and the JAX workers share the chip: JAX must not
# take 75% of its memory up front in any of them. Set before JAX is imported, here and (inherited) in the workers.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

BEFORE = "9ad8bc7"  # the last commit before issue 13's train-step changes
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINABLE = ("connector", "compressors", "token_embeddings", "language_model")


def make_batch(batch: int, text: int, answer: int, vocab: int, image_size: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, text)).astype(np.int32)
    ids[:, 0], ids[:, 1] = 1, -200  # bos, the image placeholder
    labels = np.where(np.arange(text) >= text - answer, ids, -100).astype(np.int32)
    images = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
    return {"images": images, "input_ids": ids, "attention_mask": np.ones_like(ids, bool), "labels": labels}


# ----------------------------------------------------------------------------------------------------- jax
def jax_worker(args) -> None:
    """Runs in a subprocess whose PYTHONPATH holds the qtl_jax to measure; prints one JSON line."""
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from timing import timed

    from qtl_jax.models import tinyllava as T
    from qtl_jax.split.runtime import MODEL_KEYS, SplitConfig, SplitTrainer

    cfg = T.TINYLLAVA_PAPER
    dtype = jnp.dtype(args.dtype)
    data = make_batch(args.batch, args.text, args.answer, cfg.lm.vocab_size, cfg.vision.image_size)
    example = [data[k] for k in MODEL_KEYS]
    model = T.TinyLlava(cfg, dtype)
    boxed = jax.eval_shape(model.init, jax.random.key(0), *example)["params"]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *example))["params"]
    tx = optax.adamw(2e-5, weight_decay=0.0)
    trainer = SplitTrainer(cfg, SplitConfig(mode=args.mode), tx, tx, params, dtype=dtype, boxed_like=boxed,
                           trainable=TRAINABLE)
    del params
    start = time.perf_counter()
    loss = float(trainer.step(data, step=1)["ce_loss"])
    first = time.perf_counter() - start
    seconds = timed(lambda: jax.block_until_ready(trainer.step(data, step=2)["ce_loss"]), args.repeats)
    print(json.dumps({"step_s": seconds, "first_step_s": first, "loss": loss}), flush=True)


def run_jax(args, mode: str, root: str) -> dict:
    # The revision measured first; packages installed outside the environment (device.sh's /tmp/site) after it.
    paths = [root, os.path.join(REPO, "benchmarks"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--mode", mode, "--repeats", str(args.repeats),
           "--batch", str(args.batch), "--text", str(args.text), "--answer", str(args.answer), "--dtype", args.dtype]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"jax worker ({mode}, {root}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- torch
def torch_model(cfg, vocab: int):
    import torch
    from peers import openelm_torch, rd_fsq_scale
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = cfg.vision
    d = cfg.lm.model_dim

    def rd_fsq(z, bits: int = 2, width: float = 3.0):
        """The paper's RD-FSQ in torch: one mean and std over the batch, clip at 3 std, scale to [-1, 1], round to
        2^bits levels with a straight-through gradient; the cosine commitment."""
        u = rd_fsq_scale(z, width)
        half = (2**bits - 1) / 2
        q = torch.round((u + 1) * half) / half - 1
        q = u + (q - u).detach()
        cosine = torch.nn.functional.cosine_similarity(u, q.detach(), dim=-1, eps=1e-3)
        return q, (1 - cosine).mean()

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = SiglipVisionModel(SiglipVisionConfig(
                hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.layers_used,
                num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
                vision_use_head=False)).eval().requires_grad_(False)
            self.connector = torch.nn.Sequential(torch.nn.Linear(v.width, d), torch.nn.GELU(), torch.nn.Linear(d, d))
            self.image_in, self.image_out = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
            self.text_in, self.text_out = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
            self.text_embed = torch.nn.Embedding(vocab, d)
            self.lm, _ = openelm_torch(cfg.lm, with_jax=False)

        def forward(self, pixels, ids, labels):
            with torch.no_grad():
                feats = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
            q_image, l_image = rd_fsq(self.image_in(self.connector(feats)))
            q_text, l_text = rd_fsq(self.text_in(self.text_embed(ids.clamp(min=0))))
            image_rows, text_rows = self.image_out(q_image), self.text_out(q_text)
            x = torch.cat([text_rows[:, :1], image_rows, text_rows[:, 2:]], dim=1)  # placeholder at 1
            for layer in self.lm.layers:  # openelm-pytorch 0.1.0 applies RoPE only with use_kv_cache=True
                x, _ = layer(x, use_kv_cache=True, is_causal=True)
            logits = torch.einsum("bsd,vd->bsv", self.lm.norm(x), self.lm.token_embeddings.weight)
            n = image_rows.shape[1]
            unsupervised = torch.full((labels.shape[0], n), -100, device=labels.device)
            full_labels = torch.cat([labels[:, :1], unsupervised, labels[:, 2:]], dim=1)
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), full_labels[:, 1:].flatten(),
                                                   ignore_index=-100)
            return ce, 0.25 * (l_image + l_text)

    return Step()


def run_torch(args, compiled: bool, device: str) -> dict:
    import torch
    from timing import autocast, synced, timed

    from qtl_jax.models import tinyllava as T

    cfg = T.TINYLLAVA_PAPER
    torch.manual_seed(0)
    model = torch_model(cfg, cfg.lm.vocab_size).to(device)
    data = make_batch(args.batch, args.text, args.answer, cfg.lm.vocab_size, cfg.vision.image_size)
    pixels = torch.from_numpy(data["images"].transpose(0, 3, 1, 2).copy()).to(device)
    ids, labels = (torch.from_numpy(data[k]).long().to(device) for k in ("input_ids", "labels"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
    # bf16 with float32 weights, as a PyTorch user runs it (and as --dtype bfloat16 runs JAX); the
    # frozen tower held in bf16 (it needs no float32 master copy), as the JAX trainer converts it once
    # (`cast_frozen_once`), so neither side converts its weights in every step.
    bf16 = args.dtype == "bfloat16"
    if bf16:
        model.vision.to(torch.bfloat16)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, enabled=bf16):
            ce, commitment = forward(pixels, ids, labels)
        (ce + commitment).backward()
        opt.step()
        return ce

    start = time.perf_counter()
    loss = float(step().detach())  # .item() waits for the device
    first = time.perf_counter() - start
    return {"step_s": timed(synced(step, device), args.repeats), "first_step_s": first, "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--skip-before", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return jax_worker(args)
    import jax
    import jax.numpy as jnp
    import torch
    from flops import matmul_rate, peak_flops, split_step_flops
    from timing import torch_device

    from qtl_jax.models import tinyllava as T

    device = torch_device()
    chip = jax.devices()[0].device_kind
    print(f"{platform.machine()}, {os.cpu_count()} cores, {chip} | jax {jax.__version__} ({jax.default_backend()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), torch "
          f"{torch.__version__} ({device}, {torch.get_num_threads()} threads) | {args.dtype} | batch {args.batch}, "
          f"{args.text} text tokens + 728 image rows, {args.answer} supervised")
    cfg = T.TINYLLAVA_PAPER
    batch = make_batch(args.batch, args.text, args.answer, cfg.lm.vocab_size, cfg.vision.image_size)
    flops = split_step_flops(cfg, jnp.dtype(args.dtype), batch, TRAINABLE)
    # A virtual CPU mesh has devices to spare; an accelerator needs two for the two meshes.
    modes = ("single", "meshes") if jax.default_backend() == "cpu" or jax.device_count() >= 2 else ("single",)
    results = {}
    for mode in modes:
        results[f"jax {mode}"] = run_jax(args, mode, REPO)
    if not args.skip_before:
        with tempfile.TemporaryDirectory() as tmp:
            tree = os.path.join(tmp, "before")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", tree, args.before], check=True)
            try:
                for mode in modes:
                    results[f"jax {mode} before ({args.before})"] = run_jax(args, mode, tree)
            finally:
                subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], check=False)
    results["torch eager"] = run_torch(args, compiled=False, device=device)
    if not args.skip_compile:
        results["torch.compile"] = run_torch(args, compiled=True, device=device)
    rate = matmul_rate(jnp.dtype(args.dtype), torch_device=device)
    peak = peak_flops() if jnp.dtype(args.dtype) == jnp.bfloat16 else None  # the datasheet peaks are bf16's
    print(f"\nmodel FLOPs per step (the JAX step's matmuls, flops.split_step_flops): {flops / 1e12:.3f} TFLOP; "
          f"{args.dtype} matmul rate measured here {rate / 1e12:.2f} TFLOP/s; datasheet bf16 peak of {chip}: "
          + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "- (a CPU, a chip not in flops.PEAKS_BF16, or float32)"))
    print(f"{'step':<32} {'s/step':>8} {'first step s':>13} {'ce loss':>8} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'of measured':>11}")
    for name, r in results.items():
        achieved = flops / r["step_s"]
        mfu = f"{achieved / peak:6.1%}" if peak else f"{'-':>6}"
        print(f"{name:<32} {r['step_s']:8.3f} {r['first_step_s']:13.1f} {r['loss']:8.3f} {achieved / 1e12:8.3f} "
              f"{mfu} {achieved / rate:11.1%}")
    print()
    for name in (f"jax {mode}" for mode in modes):
        for peer in ("torch eager", "torch.compile", f"{name} before ({args.before})"):
            if peer in results:
                print(f"{name} vs {peer}: {results[peer]['step_s'] / results[name]['step_s']:.2f}x faster")


if __name__ == "__main__":
    main()
