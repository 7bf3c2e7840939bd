"""KV-cached generation with OpenELM: greedy or temperature sampling, stop at eos, `max_new_tokens` (SPEC §2.3).

The prompt (token ids, or input embeddings such as TinyLLaVA's spliced image + text rows) is right-padded
to a common length P. One jitted prefill writes its keys/values into a cache of P + max_new_tokens slots,
then one jitted decode step per token: row i's t-th new token sits at absolute position length_i + t,
overwriting that row's padding slots in order, so "keys at positions <= the query's" is exactly the row's
real history. Both functions are compiled once per (batch, P, max_new_tokens); the Python loop only stops
early when every row has emitted eos.

Generated tokens are embedded by the LM's own input table by default, as in the reference (there the client's
text embedding is a copy of that table). Where the LM was trained on other text rows, such as TinyLLaVA
trained from scratch with quantized text embeddings, pass `embed`: the rows the server would receive for the
new tokens (`qtl_jax.models.tinyllava.server_generate` does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.models.openelm import OpenELM, init_cache


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(model: OpenELM, params, embeds, lengths, max_len: int):
    batch, prompt_len = embeds.shape[:2]
    cache = init_cache(model.config, batch, max_len, model.dtype)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    logits, cache = model.apply({"params": params}, inputs_embeds=embeds, positions=positions, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return last, cache


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_step(model: OpenELM, params, cache, embeds, positions):
    logits, cache = model.apply({"params": params}, inputs_embeds=embeds, positions=positions[:, None], cache=cache)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0,))
def _decode_tokens(model: OpenELM, params, cache, tokens, positions):
    """`_decode_step` on tokens embedded by the LM's own table, in one dispatch."""
    embeds = model.apply({"params": params}, tokens, method=OpenELM.embed)
    return _decode_step(model, params, cache, embeds, positions)


def _choose(logits: jax.Array, temperature: float, rng: jax.Array | None) -> jax.Array:
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def generate(
    model: OpenELM,
    params: Any,
    *,
    input_ids: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    lengths: jax.Array | None = None,
    max_new_tokens: int = 32,
    eos_id: int = 2,
    pad_id: int = 0,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    embed: Callable[[jax.Array], jax.Array] | None = None,
) -> np.ndarray:
    """Generates continuations of right-padded prompts.

    Args:
      model: the OpenELM module; params: its parameters.
      input_ids: int[B, P] prompts, or
      inputs_embeds: float[B, P, D] prompt embeddings (exactly one of the two).
      lengths: int[B] real prompt lengths (default: P for every row).
      max_new_tokens: most tokens to generate per row.
      eos_id: generation of a row stops after it emits this id; later slots hold `pad_id`.
      temperature: 0 for greedy (argmax), > 0 samples from softmax(logits / temperature).
      rng: a PRNG key, required when temperature > 0.
      embed: int32[B, 1] new tokens -> float[B, 1, D] input rows; default the LM's own embedding table.

    Returns:
      int32[B, max_new_tokens] host array of generated ids (eos included, pad after it).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate takes exactly one of input_ids and inputs_embeds")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("temperature sampling needs an rng key")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    embeds = inputs_embeds if input_ids is None else model.apply({"params": params}, input_ids, method=OpenELM.embed)
    batch, prompt_len = embeds.shape[:2]
    lengths = jnp.full((batch,), prompt_len, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    max_len = prompt_len + max_new_tokens
    if max_len > model.config.max_context_length * 2:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the RoPE range "
                         f"{2 * model.config.max_context_length}")

    logits, cache = _prefill(model, params, embeds, lengths, max_len)
    out = np.full((batch, max_new_tokens), pad_id, np.int32)
    done = np.zeros(batch, bool)
    for t in range(max_new_tokens):
        key = None if rng is None else jax.random.fold_in(rng, t)
        tokens = np.asarray(_choose(logits, temperature, key))
        out[:, t] = np.where(done, pad_id, tokens)
        done |= tokens == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        tokens = jnp.asarray(out[:, t:t + 1])
        if embed is None:
            logits, cache = _decode_tokens(model, params, cache, tokens, lengths + t)
        else:
            logits, cache = _decode_step(model, params, cache, embed(tokens), lengths + t)
    return out
