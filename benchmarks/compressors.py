"""Compressor throughput: jitted JAX vs the same math in PyTorch eager vs a plain array copy, side by side.

For float32[8, 832, 1280] features (one batch of image and text rows, 34 MB) it times
  client path = quantize + pack           (RD-FSQ 2-bit, NF 2-bit; ANS entropy coding of RD-FSQ indices)
  server path = unpack + dequantize       (and ANS decoding)
in JAX (jit) and in PyTorch written here from the same formulas, eager and under `torch.compile` (the strongest
thing a PyTorch user would pick; its first, compiling call is excluded like JAX's), plus a copy of the float32 input
(NumPy and torch, the machine's memory bandwidth). Throughput is input float32 bytes per second for the
client path and output float32 bytes per second for the server path, so every row is comparable to the
copy. Each timing is the median of several runs after a warm-up (JIT compilation excluded).

    python benchmarks/compressors.py [--repeats 7] [--shape 8,832,1280] [--skip-compile]
"""

from __future__ import annotations

import argparse
import os
import platform

import jax
import numpy as np
import torch
from peers import rd_fsq_scale
from timing import timed

import qtl_jax.compress as C


# ---------------------------------------------------------------------------------------------- PyTorch peers
def torch_pack2(idx: torch.Tensor) -> torch.Tensor:
    """2-bit packing, four indices per byte, index 0 in the low bits (the same layout as qtl_jax.compress.pack)."""
    g = idx.reshape(-1, 4)
    return g[:, 0] | (g[:, 1] << 2) | (g[:, 2] << 4) | (g[:, 3] << 6)


def torch_unpack2(packed: torch.Tensor, shape) -> torch.Tensor:
    cols = [(packed >> s) & 3 for s in (0, 2, 4, 6)]
    return torch.stack(cols, dim=1).reshape(shape)


def torch_rd_fsq_client(x: torch.Tensor) -> torch.Tensor:
    u = rd_fsq_scale(x)
    idx = torch.round(u * 1.5 - 0.5) + 2.0
    return torch_pack2(idx.to(torch.uint8))


def torch_rd_fsq_server(packed: torch.Tensor, shape) -> torch.Tensor:
    return (2.0 * torch_unpack2(packed, shape).to(torch.float32) - 3.0) / 3.0


def torch_double_quantize(v: torch.Tensor):
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    return torch.round((v - lo) / (hi - lo + 1e-8) * 255).to(torch.uint8), lo, hi


def torch_nf_client(x: torch.Tensor, table: torch.Tensor, block: int = 64):
    blocks = x.reshape(-1, x.shape[-1] // block, block)
    mins, maxs = blocks.amin(-1), blocks.amax(-1)
    scales = maxs - mins
    normed = 2 * (blocks - mins[..., None]) / (scales[..., None] + 1e-8) - 1
    midpoints = (table[1:] + table[:-1]) / 2
    idx = torch.bucketize(normed, midpoints).to(torch.uint8)  # nearest entry of the sorted table
    scales_q, s_lo, s_hi = torch_double_quantize(scales)
    return torch_pack2(idx), scales_q, s_lo, s_hi, mins


def torch_nf_server(packed, scales_q, s_lo, s_hi, mins, table, shape, block: int = 64):
    idx = torch_unpack2(packed, shape).reshape(-1, shape[-1] // block, block).long()
    scales = s_lo + scales_q.to(torch.float32) / 255 * (s_hi - s_lo)
    return ((table[idx] + 1) / 2 * scales[..., None] + mins[..., None]).reshape(shape)


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shape", default="8,832,1280")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile peers")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))

    rng = np.random.default_rng(0)
    x_np = (rng.standard_t(5, size=shape) * 1.5).astype(np.float32)
    nbytes = x_np.nbytes
    x = jax.device_put(x_np)
    x_t = torch.from_numpy(x_np.copy())
    table_t = torch.from_numpy(C.nf_table(2).copy())
    print(f"features float32{list(shape)} = {nbytes / 1e6:.1f} MB | {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores | jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")

    rd = C.make_codec("rd_fsq", 2)
    nf = C.make_codec("nf", 2)
    rd_client = jax.jit(lambda x: rd.to_payload(rd.quantize(rd.encode(x))))
    rd_server = jax.jit(lambda p: rd.dequantize(rd.from_payload(p)))
    nf_client = jax.jit(lambda x: nf.to_payload(nf.quantize(x)))
    nf_server = jax.jit(lambda p: nf.dequantize(nf.from_payload(p)))
    rd_payload = jax.block_until_ready(rd_client(x))
    nf_payload = jax.block_until_ready(nf_client(x))
    rd_idx = np.asarray(rd.from_payload(rd_payload).values)
    ans_payload = C.entropy_encode(rd_idx, 2)

    # The PyTorch peers compute the same packed bytes (up to elements that sit on a rounding boundary, where
    # the two libraries' summation orders for mean/std may differ in the last bit), so the race is fair.
    t_rd = torch_rd_fsq_client(x_t)
    t_nf = torch_nf_client(x_t, table_t)
    for name, ours, theirs in (("rd_fsq", rd_payload.codes, t_rd), ("nf", nf_payload.codes, t_nf[0])):
        same = np.mean(np.asarray(ours) == theirs.numpy())
        assert same > 0.9999, f"torch {name} packs differ from JAX in {1 - same:.3%} of bytes"

    copy_dst = np.empty_like(x_np)
    copy_t = torch.empty_like(x_t)
    r = args.repeats
    times = {
        "copy numpy": timed(lambda: np.copyto(copy_dst, x_np), r),
        "copy torch": timed(lambda: copy_t.copy_(x_t), r),
        "rd_fsq2 client jax": timed(lambda: jax.block_until_ready(rd_client(x)), r),
        "rd_fsq2 client torch": timed(lambda: torch_rd_fsq_client(x_t), r),
        "rd_fsq2 server jax": timed(lambda: jax.block_until_ready(rd_server(rd_payload)), r),
        "rd_fsq2 server torch": timed(lambda: torch_rd_fsq_server(t_rd, shape), r),
        "nf2 client jax": timed(lambda: jax.block_until_ready(nf_client(x)), r),
        "nf2 client torch": timed(lambda: torch_nf_client(x_t, table_t), r),
        "nf2 server jax": timed(lambda: jax.block_until_ready(nf_server(nf_payload)), r),
        "nf2 server torch": timed(lambda: torch_nf_server(*t_nf, table_t, shape), r),
        "ans encode (rd_fsq2 idx)": timed(lambda: C.entropy_encode(rd_idx, 2), max(1, r // 2)),
        "ans decode": timed(lambda: C.entropy_decode(ans_payload), max(1, r // 2)),
    }
    if not args.skip_compile:
        peers = {"rd_fsq2 client": (torch_rd_fsq_client, (x_t,)),
                 "rd_fsq2 server": (torch_rd_fsq_server, (t_rd, shape)),
                 "nf2 client": (torch_nf_client, (x_t, table_t)),
                 "nf2 server": (torch_nf_server, (*t_nf, table_t, shape))}
        for name, (fn, fn_args) in peers.items():
            compiled = torch.compile(fn)
            times[f"{name} torch.compile"] = timed(lambda c=compiled, a=fn_args: c(*a), r)
    copy_rate = nbytes / min(times["copy numpy"], times["copy torch"])

    print(f"\n{'path':<30} {'ms':>9} {'GB/s':>7} {'vs torch':>9} {'vs compile':>11} {'of copy':>8}")
    for name, seconds in times.items():
        rate = nbytes / seconds
        ratios = []
        for suffix, width in ((" torch", 9), (" torch.compile", 11)):
            peer = name.replace(" jax", suffix) if name.endswith(" jax") else None
            ratios.append(f"{times[peer] / seconds:{width - 1}.2f}x" if peer in times else " " * width)
        print(f"{name:<30} {seconds * 1e3:9.2f} {rate / 1e9:7.2f} {ratios[0]} {ratios[1]} {rate / copy_rate:7.0%}")
    print(f"\nwire: rd_fsq2 {rd_payload.nbytes / 1e6:.2f} MB, nf2 {nf_payload.nbytes / 1e6:.2f} MB, "
          f"ans(rd_fsq2) {ans_payload.nbytes / 1e6:.2f} MB ({ans_payload.bits_per_element:.3f} bits/element), "
          f"fp16 {nbytes / 2e6:.2f} MB")


if __name__ == "__main__":
    main()
