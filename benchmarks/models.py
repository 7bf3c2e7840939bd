"""Full-size model step times: JAX (jit) vs PyTorch eager and torch.compile, same weights, same machine, same script.

  * SigLIP so400m/14-384 forward, the 26 layers TinyLLaVA uses, batch 1: qtl_jax `SiglipVisionTower` vs
    transformers `SiglipVisionModel` (num_hidden_layers=26, no pooling head).
  * OpenELM-270M forward + backward (cross-entropy on random targets), batch 1, sequence 728 + 64 = 792:
    qtl_jax `OpenELM` under `jax.value_and_grad` vs the openelm-pytorch model with `loss.backward()`; the
    forward alone too, for the backward / forward ratio; and where JAX's time goes (`--profile`): attention,
    FFN and head + loss timed apart, forward and forward + backward, over all 16 layers.
  * This machine's float32 matmul rate (`flops.matmul_rate`: 2048^3 on a CPU, 8192^3 on an accelerator, the
    better of JAX and PyTorch), measured here too, so that achieved FLOP/s can be read as a fraction of it.

On a GPU the PyTorch peers run there too (`timing.torch_device`; timed to `torch.cuda.synchronize`).

The JAX parameters are converted from the PyTorch models (qtl_jax.models.convert), so both sides compute the
same function; the script prints the largest output difference as a check. Median of --repeats runs after
one warm-up (compilation excluded; torch.compile's compile time is printed apart). fp32 unless --bf16.

JAX runs with each model's default attention (on a CPU the blocked one, `qtl_jax.layers.blocked_attention`) and,
for the before/after, with `attention="xla"` (`jax.nn.dot_product_attention`); `--profile` also times the
attention alone against torch's `scaled_dot_product_attention`. jaxlib 0.10.2 runs XLA:CPU's matmuls as YNNPACK
fusions, 0.7-0.95x PyTorch's rate on the model's shapes here. XNNPACK
(`XLA_FLAGS=--xla_cpu_use_xnnpack=true`, set before JAX starts) is another path: on an idle 2-core run it made
OpenELM's backward faster and SigLIP no faster (README, Performance). Run the script both ways; the header prints
the flags in effect.

`--bf16` adds both models in bf16 compute with float32 weights (the paper preset's dtype): JAX as it is (its
dense layers through `qtl_jax.layers.bf16_matmul` on a CPU), JAX with the dense layers' plain bf16
`lax.dot_general`, JAX in float32, PyTorch eager under `torch.autocast(device, torch.bfloat16)` and in float32,
on the same weights, and the machine's bf16 matmul rates.

    python benchmarks/models.py [--repeats 3] [--skip-siglip] [--skip-openelm] [--skip-compile] [--profile]
                                [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flops import matmul_rate, matmul_size
from peers import openelm_torch
from timing import autocast, synced, timed, torch_device

from qtl_jax import layers
from qtl_jax.models import convert
from qtl_jax.models.openelm import OPENELM_270M, OpenELM
from qtl_jax.models.siglip import SIGLIP_SO400M, SiglipVisionTower, stack_layers
from qtl_jax.models.tinyllava import cross_entropy

DEVICE = "cpu"  # where the PyTorch peers run: main() sets it (timing.torch_device: the GPU when JAX runs on one)


def siglip_flops(cfg, layers: int) -> float:
    n, d, m = cfg.num_patches, cfg.width, cfg.mlp_dim
    per_layer = 2 * n * d * d * 4 + 2 * 2 * n * n * d + 2 * 2 * n * d * m
    patch = 2 * n * d * 3 * cfg.patch_size**2
    return patch + layers * per_layer


def openelm_fwd_flops(cfg, t: int) -> float:
    total = 2 * t * cfg.model_dim * cfg.vocab_size  # tied head
    for n_q, n_kv, ffn in zip(cfg.num_query_heads, cfg.num_kv_heads, cfg.ffn_dims, strict=True):
        q_dim = n_q * cfg.head_dim
        total += 2 * t * cfg.model_dim * (n_q + 2 * n_kv) * cfg.head_dim  # qkv
        total += 2 * 2 * t * t * q_dim  # scores + weighted sum (full, causal not exploited)
        total += 2 * t * q_dim * cfg.model_dim  # out
        total += 2 * t * cfg.model_dim * 3 * ffn  # proj_1 (2I) + proj_2 (I)
    return total


def report(title: str, t_jax: float, t_torch: float, flops: float, peak: float, check: str) -> None:
    print(f"{title}: jax {t_jax:.3f} s, torch {t_torch:.3f} s, jax/torch speed-up {t_torch / t_jax:.2f}x; "
          f"{flops / 1e9:.0f} GFLOP -> jax {flops / t_jax / 1e9:.0f} GFLOP/s = {flops / t_jax / peak:.0%} of matmul "
          f"rate (torch {flops / t_torch / peak:.0%}); {check}")


def compile_seconds(jitted, *args) -> float:
    """Seconds to trace, lower and compile a jitted function for these arguments (nothing runs), from cold caches."""
    import time

    jax.clear_caches()
    start = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - start


def compiled_time(module, run, repeats: int) -> tuple[float, float]:
    """(seconds per run, seconds of the first run, which compiles) of `run(compiled_module)` under torch.compile."""
    import time

    compiled = torch.compile(module)
    start = time.perf_counter()
    synced(lambda: run(compiled), DEVICE)()
    first = time.perf_counter() - start
    return timed(synced(lambda: run(compiled), DEVICE), repeats), first


def siglip_pair(cfg):
    """(transformers SiglipVisionModel, the same weights as qtl_jax params, images NHWC, the same as torch NCHW)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers_used,
        num_attention_heads=cfg.num_heads, patch_size=cfg.patch_size, image_size=cfg.image_size,
        vision_use_head=False)).eval()
    weights = {k.removeprefix("vision_model."): v.numpy() for k, v in hf.state_dict().items()}
    params = jax.device_put(convert._import_siglip(weights, cfg, "transformers SiglipVisionModel"))
    del weights
    images = np.random.default_rng(0).uniform(-1, 1, (1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    return hf.to(DEVICE), params, images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(DEVICE)


def openelm_pair(cfg, seq: int):
    """(openelm-pytorch model, the same weights as qtl_jax params, token ids, targets) at batch 1."""
    tm, params = openelm_torch(cfg)
    rng = np.random.default_rng(0)
    return tm.to(DEVICE), params, rng.integers(0, cfg.vocab_size, (1, seq)), rng.integers(0, cfg.vocab_size, (1, seq))


def openelm_torch_loss(model, ids, labels):
    # use_kv_cache=True: openelm-pytorch 0.1.0's path without it gives other logits (max |diff| 5.5 at 128
    # tokens); the cache path is the one the parity tests check against this port.
    logits = model(torch.from_numpy(ids).to(DEVICE), use_kv_cache=True)["logits"]
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), torch.from_numpy(labels)[0, 1:].to(DEVICE))


def bench_siglip(repeats: int, peak: float, compile_torch: bool) -> None:
    cfg = SIGLIP_SO400M
    hf, params, images, pixels = siglip_pair(cfg)
    tower = SiglipVisionTower(cfg)
    forward = jax.jit(lambda p, x: tower.apply({"params": p}, x)[0])
    tower_xla = SiglipVisionTower(dataclasses.replace(cfg, attention="xla"))
    forward_xla = jax.jit(lambda p, x: tower_xla.apply({"params": p}, x)[0])

    def run_torch(model=hf):
        with torch.inference_mode():
            return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]

    diff = float(np.abs(np.asarray(forward(params, images)) - run_torch().cpu().numpy()).max())
    t_jax = timed(lambda: forward(params, images).block_until_ready(), repeats)
    t_torch = timed(synced(run_torch, DEVICE), repeats)
    t_xla = timed(lambda: forward_xla(params, images).block_until_ready(), repeats)
    flops = siglip_flops(cfg, cfg.layers_used)
    report("SigLIP so400m forward (26 layers, batch 1, 729 patches)", t_jax, t_torch, flops, peak,
           f"max |diff| {diff:.2e}")
    print(f"  with XLA's attention instead of the blocked one (attention='xla'): {t_xla:.3f} s, jax/torch "
          f"{t_torch / t_xla:.2f}x")
    if compile_torch:
        t_comp, first = compiled_time(hf, run_torch, repeats)
        print(f"  torch.compile: {t_comp:.3f} s (first run {first:.0f} s), jax/torch.compile speed-up "
              f"{t_comp / t_jax:.2f}x")
    # The layers unrolled (default) vs one nn.scan over stacked parameters: compile time and run time.
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
    stacked = stack_layers(params, cfg)
    scanned = jax.jit(lambda p, x: SiglipVisionTower(scanned_cfg).apply({"params": p}, x)[0])
    compile_s = {name: compile_seconds(fn, p, images) for name, fn, p in
                 (("unrolled", forward, params), ("scan", scanned, stacked))}
    t_scan = timed(lambda: scanned(stacked, images).block_until_ready(), repeats)
    print(f"  layers unrolled vs nn.scan: compile {compile_s['unrolled']:.1f} s vs {compile_s['scan']:.1f} s, "
          f"forward {t_jax:.3f} s vs {t_scan:.3f} s")


def bench_openelm(repeats: int, peak: float, seq: int, compile_torch: bool, profile: bool) -> None:
    cfg = OPENELM_270M
    tm, params, ids, labels = openelm_pair(cfg, seq)
    model = OpenELM(cfg)

    def loss_fn(p):
        logits, _ = model.apply({"params": p}, jnp.asarray(ids))
        return cross_entropy(logits, jnp.asarray(labels))[0]

    step = jax.jit(jax.value_and_grad(loss_fn))
    forward = jax.jit(loss_fn)
    model_xla = OpenELM(dataclasses.replace(cfg, attention="xla"))
    step_xla = jax.jit(jax.value_and_grad(
        lambda p: cross_entropy(model_xla.apply({"params": p}, jnp.asarray(ids))[0], jnp.asarray(labels))[0]))

    def run_torch(model=tm):
        tm.zero_grad(set_to_none=True)
        loss = openelm_torch_loss(model, ids, labels)
        loss.backward()
        return loss

    def run_torch_forward():
        with torch.no_grad():
            return openelm_torch_loss(tm, ids, labels)

    diff = abs(float(step(params)[0]) - float(run_torch().detach()))
    print(f"  jax compile: forward+backward {compile_seconds(step, params):.1f} s (16 layers unrolled: layer-wise "
          f"scaling gives every layer its own shapes, so nn.scan does not apply)")
    t_jax = timed(lambda: jax.block_until_ready(step(params)), repeats)
    t_torch = timed(synced(run_torch, DEVICE), repeats)
    f_jax = timed(lambda: jax.block_until_ready(forward(params)), repeats)
    f_torch = timed(synced(run_torch_forward, DEVICE), repeats)
    t_xla = timed(lambda: jax.block_until_ready(step_xla(params)), repeats)
    flops = 3 * openelm_fwd_flops(cfg, seq)
    report(f"OpenELM-270M forward+backward (batch 1, {seq} tokens)", t_jax, t_torch, flops, peak,
           f"|loss diff| {diff:.2e}")
    print(f"  with XLA's attention instead of the blocked one (attention='xla'): {t_xla:.3f} s, jax/torch "
          f"{t_torch / t_xla:.2f}x")
    print(f"  forward alone: jax {f_jax:.3f} s, torch {f_torch:.3f} s (jax/torch {f_torch / f_jax:.2f}x); "
          f"backward / forward: jax {(t_jax - f_jax) / f_jax:.2f}, torch {(t_torch - f_torch) / f_torch:.2f} "
          f"(2 is the FLOP ratio)")
    if compile_torch:
        t_comp, first = compiled_time(tm, run_torch, repeats)
        print(f"  torch.compile forward+backward: {t_comp:.3f} s (first run {first:.0f} s), jax/torch.compile "
              f"speed-up {t_comp / t_jax:.2f}x")
    if profile:
        openelm_profile(cfg, params, seq, repeats, t_jax, f_jax)


def openelm_profile(cfg, params, seq: int, repeats: int, total: float, total_forward: float) -> None:
    """Where JAX's OpenELM forward + backward time goes: each kind of sublayer over all layers, timed apart
    (forward, and forward + backward w.r.t. its parameters and input), and the head with its loss."""
    from qtl_jax.models.openelm import OpenELMAttention, OpenELMFFN

    x = jax.random.normal(jax.random.key(0), (1, seq, cfg.model_dim)) * 0.1
    positions = jnp.arange(seq)[None]
    parts = {
        "attention (qkv, rope, softmax, out)": lambda p, x: sum(
            jnp.sum(OpenELMAttention(cfg, i).apply({"params": p[f"layers_{i}"]["attn"]}, x, positions, None)[0])
            for i in range(cfg.num_transformer_layers)),
        "ffn (SwiGLU)": lambda p, x: sum(
            jnp.sum(OpenELMFFN(cfg, i).apply({"params": p[f"layers_{i}"]["ffn"]}, x))
            for i in range(cfg.num_transformer_layers)),
        "head + loss (32k vocab, every row)": lambda p, x: cross_entropy(
            OpenELM(cfg).apply({"params": p}, x, method=OpenELM.logits),
            jnp.zeros((1, seq), jnp.int32))[0],
    }
    print(f"  where jax's time goes ({cfg.num_transformer_layers} layers, {seq} tokens; forward / forward+backward "
          f"seconds, share of the whole model's):")
    summed = [0.0, 0.0]
    for name, fn in parts.items():
        fwd = jax.jit(fn)
        both = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        f = timed(lambda fwd=fwd: jax.block_until_ready(fwd(params, x)), repeats)
        b = timed(lambda both=both: jax.block_until_ready(both(params, x)), repeats)
        summed[0] += f
        summed[1] += b
        print(f"    {name:<36} {f:7.3f} / {b:7.3f} s  ({f / total_forward:4.0%} / {b / total:4.0%}), "
              f"backward/forward {(b - f) / f:.2f}")
    rest = (total_forward - summed[0], total - summed[1])
    print(f"    {'the rest (norms, embedding, glue)':<36} {rest[0]:7.3f} / {rest[1]:7.3f} s")
    attention_kernels(cfg, seq, repeats)


def attention_kernels(cfg, seq: int, repeats: int) -> None:
    """The attention alone (softmax(q k^T / sqrt(d)) v, causal, grouped-query) over OpenELM's 16 layers' head
    counts, forward + backward w.r.t. q, k, v: qtl_jax's blocked and XLA implementations and PyTorch's
    `scaled_dot_product_attention` (its CPU flash kernel)."""
    from qtl_jax.layers import attention

    shapes = list(zip(cfg.num_query_heads, cfg.num_kv_heads, strict=True))
    rng = np.random.default_rng(0)
    inputs = [[rng.standard_normal((1, seq, h, cfg.head_dim)).astype(np.float32) for h in (n_q, n_kv, n_kv)]
              for n_q, n_kv in shapes]
    arrays = [[jnp.asarray(x) for x in qkv] for qkv in inputs]
    times = {}
    for impl in ("blocked", "xla"):
        loss = lambda q, k, v, impl=impl: jnp.sum(attention(q, k, v, causal=True, implementation=impl))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        times[impl] = timed(lambda grad=grad: jax.block_until_ready([grad(*qkv) for qkv in arrays]), repeats)
    tensors = [[torch.from_numpy(x).transpose(1, 2).contiguous().to(DEVICE).requires_grad_() for x in qkv]
               for qkv in inputs]

    def run_torch():
        for q, k, v in tensors:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

    times["torch"] = timed(synced(run_torch, DEVICE), repeats)
    blocked, xla, sdpa = times["blocked"], times["xla"], times["torch"]
    print(f"  attention alone, forward + backward over the 16 layers: jax blocked {blocked:.3f} s, XLA {xla:.3f} s, "
          f"torch SDPA {sdpa:.3f} s (blocked vs torch {sdpa / blocked:.2f}x, blocked vs XLA {xla / blocked:.2f}x)")


def matmul_rates_bf16(n: int | None = None, repeats: int = 5) -> str:
    """bf16 n^3 matmul rates (2048 on a CPU, 8192 on an accelerator): JAX bf16 x bf16 -> f32 (what
    `layers.bf16_matmul` asks for), JAX bf16 -> bf16 (a plain bf16 dot), torch bf16."""
    n = n or matmul_size()
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    rates = {}
    for name, out in (("jax bf16->f32", jnp.float32), ("jax bf16->bf16", None)):
        mm = jax.jit(lambda a, out=out: jnp.dot(a, a, preferred_element_type=out))
        rates[name] = 2 * n**3 / timed(lambda mm=mm: mm(a).block_until_ready(), repeats)
    at = torch.randn(n, n, dtype=torch.bfloat16, device=DEVICE)
    rates["torch bf16"] = 2 * n**3 / timed(synced(lambda: at @ at, DEVICE), repeats)
    return ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items()) + " GFLOP/s"


@contextlib.contextmanager
def plain_bf16_dense():
    """Trace the models with `layers.dense`'s layers on `nn.Dense`'s plain `lax.dot_general` (as before
    `layers.bf16_matmul`; OpenELM's head, which calls `dense_dot_general` itself, keeps it)."""
    saved = layers.dense_dot_general
    layers.dense_dot_general = jax.lax.dot_general
    try:
        yield
    finally:
        layers.dense_dot_general = saved


def bench_bf16(repeats: int, seq: int) -> None:
    """Both models in bf16 compute with float32 weights (the paper preset's dtype): JAX with `layers.dense` as it
    is (bf16 x bf16 -> f32 matmuls, `layers.bf16_matmul`), JAX with its dense layers on plain bf16 dots, JAX in
    float32, and PyTorch eager under `torch.autocast(device, torch.bfloat16)` (how a PyTorch user runs bf16 with
    float32 weights) and in float32, on the same weights."""
    print(f"bf16 matmul rates: {matmul_rates_bf16()}")
    cfg = SIGLIP_SO400M
    hf, params, images, pixels = siglip_pair(cfg)

    def siglip_jax(dtype):
        tower = SiglipVisionTower(cfg, dtype=dtype)
        forward = jax.jit(lambda p, x: tower.apply({"params": p}, x)[0])
        return lambda: forward(params, images).block_until_ready()

    def siglip_torch(context, hf=hf):
        with torch.inference_mode(), context():
            return hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]

    bf16_report("SigLIP so400m forward (26 layers, batch 1)", bf16_times(siglip_jax, siglip_torch, repeats))
    del hf, params

    cfg = OPENELM_270M
    tm, params, ids, labels = openelm_pair(cfg, seq)

    def openelm_jax(dtype):
        model = OpenELM(cfg, dtype=dtype)
        step = jax.jit(jax.value_and_grad(
            lambda p: cross_entropy(model.apply({"params": p}, jnp.asarray(ids))[0], jnp.asarray(labels))[0]))
        return lambda: jax.block_until_ready(step(params))

    def openelm_torch_step(context):
        tm.zero_grad(set_to_none=True)
        with context():
            loss = openelm_torch_loss(tm, ids, labels)
        loss.backward()

    bf16_report(f"OpenELM-270M forward+backward (batch 1, {seq} tokens)",
                bf16_times(openelm_jax, openelm_torch_step, repeats))


def bf16_times(make_jax, run_torch, repeats: int) -> dict[str, float]:
    """Seconds per run of each peer: `make_jax(dtype)` builds a blocking JAX run (traced and timed in bf16, in bf16
    with plain dense dots, in float32), `run_torch(context)` runs PyTorch under bf16 autocast and in float32."""
    times = {}
    for name, dtype in (("jax bf16", jnp.bfloat16), ("jax bf16, plain dense dots", jnp.bfloat16),
                        ("jax fp32", jnp.float32)):
        with plain_bf16_dense() if "plain" in name else contextlib.nullcontext():
            times[name] = timed(make_jax(dtype), repeats)
    for name, context in (("torch bf16 autocast", lambda: autocast(DEVICE)), ("torch fp32", contextlib.nullcontext)):
        times[name] = timed(synced(lambda context=context: run_torch(context), DEVICE), repeats)
    return times


def bf16_report(title: str, times: dict[str, float]) -> None:
    ours = times["jax bf16"]
    print(f"{title}, seconds (and jax bf16's speed-up against each):")
    print("    " + ", ".join(f"{k} {v:.3f} s ({v / ours:.2f}x)" for k, v in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq", type=int, default=728 + 64)
    parser.add_argument("--skip-siglip", action="store_true")
    parser.add_argument("--skip-openelm", action="store_true")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile peers")
    parser.add_argument("--profile", action="store_true", help="OpenELM: time attention, FFN and head apart")
    parser.add_argument("--bf16", action="store_true",
                        help="also both models in bf16 compute: JAX (and on plain bf16 dots) vs torch autocast")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch_device()
    print(f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind} | jax {jax.__version__} "
          f"({jax.default_backend()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), "
          f"torch {torch.__version__} ({DEVICE}, {torch.get_num_threads()} threads) | fp32")
    peak = matmul_rate(torch_device=DEVICE)
    print(f"fp32 matmul rate (best of jax/torch): {peak / 1e9:.0f} GFLOP/s")
    if not args.skip_siglip:
        bench_siglip(args.repeats, peak, not args.skip_compile)
    if not args.skip_openelm:
        bench_openelm(args.repeats, peak, args.seq, not args.skip_compile, args.profile)
    if args.bf16:
        bench_bf16(args.repeats, args.seq)


if __name__ == "__main__":
    main()
