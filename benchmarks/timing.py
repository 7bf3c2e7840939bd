"""What the benchmark scripts share to time their peers: the timing loop, and where PyTorch runs and how it
waits for its device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in seconds of `fn()` over `repeats` runs after one warm-up run (which also compiles).

    `fn` must block until its result is ready (e.g. `jax.block_until_ready`, or `synced` for PyTorch)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_device() -> str:
    """Where the PyTorch peers run: "cuda" when JAX runs on a GPU and PyTorch sees one, else "cpu", so that both
    sides of a comparison run on the same chip."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """`fn`, then waiting for `device`'s queued work (CUDA runs PyTorch's kernels asynchronously)."""
    import torch

    def run():
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def autocast(device: str, enabled: bool = True):
    """PyTorch's bf16 autocast on `device` (float32 weights, bf16 compute: how a PyTorch user runs bf16)."""
    import torch

    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)
