"""The PyTorch peers the benchmark scripts share: openelm-pytorch as it must be called, and its weights in JAX;
RD-FSQ's scaling as the paper's code computes it."""

from __future__ import annotations

import jax
import torch

from qtl_jax.models import convert


def rd_fsq_scale(z: torch.Tensor, width: float = 3.0) -> torch.Tensor:
    """RD-FSQ's scaler in torch, as the paper's code: one mean and std over the whole batch, clip at `width` std,
    map to [-1, 1] (with its 1e-4 offsets)."""
    mean, std = z.mean(), z.std()
    lo, hi = mean - width * std, mean + width * std
    return 2 * (torch.clamp(z, lo, hi) - lo + 1e-4) / (hi - lo + 1e-4) - 1


def openelm_torch(cfg, seed: int = 0, with_jax: bool = True):
    """(openelm-pytorch OpenELM with OpenELM's own init, the same weights as qtl_jax `OpenELM` params on the device,
    or None without `with_jax`).

    Two quirks of openelm-pytorch 0.1.0 handled here and in the callers: its RoPE calls .view on non-contiguous
    q/k, which current torch refuses (patched to make them contiguous), and it applies RoPE only with
    `use_kv_cache=True` (call it that way, even without a cache); `from_config` leaves torch's default N(0, 1)
    embeddings, so `reset_parameters` gives the model its own init."""
    from openelm_pytorch import openelm as module
    from openelm_pytorch.config import ModelConfig

    if not getattr(module.RoPE, "_contiguous_patch", False):
        rope_forward = module.RoPE.forward
        module.RoPE.forward = lambda self, x, offset=0: rope_forward(self, x.contiguous(), offset)
        module.RoPE._contiguous_patch = True
    torch.manual_seed(seed)
    model = module.OpenELM.from_config(ModelConfig.from_name("OpenELM-270M", vocab_size=cfg.vocab_size))
    model.reset_parameters()
    assert tuple(layer.ffn.proj_2.in_features for layer in model.layers) == cfg.ffn_dims
    if not with_jax:
        return model, None
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, jax.device_put(convert._import_openelm(weights, cfg, "openelm-pytorch"))
