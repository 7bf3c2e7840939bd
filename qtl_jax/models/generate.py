"""KV-cached generation with OpenELM: greedy or temperature sampling, stop at eos, `max_new_tokens` (SPEC §2.3).

The prompt (token ids, or input embeddings such as TinyLLaVA's spliced image + text rows) is right-padded
to a common length P. A prefill writes its keys/values into a cache of P + max_new_tokens slots, then one
decode step per token: row i's t-th new token sits at absolute position length_i + t, overwriting that row's
padding slots in order, so "keys at positions <= the query's" is exactly the row's real history.

Two drivers, with the same outputs:

* **On device** (the default): prefill and a `jax.lax.while_loop` over the new tokens, carrying the cache,
  the token buffer and the per-row done mask, in one jitted call; the loop ends when every row has emitted
  eos or after max_new_tokens, and the host reads the tokens once at the end. It is compiled once per
  (model, embed_fn, batch, P, max_new_tokens, eos/pad ids, temperature): parameters are traced arguments.
* **Host loop** (`embed` given): one jitted decode step per token and one host sync per token, for callers
  whose new-token rows come from outside the program (the networked server: each row is a round trip to the
  client). The two drivers feed the same tokens (pad after a row's eos) at the same positions.

Generated tokens are embedded by the LM's own input table by default, as in the reference (there the client's
text embedding is a copy of that table). Where the LM was trained on other text rows, such as TinyLLaVA
trained from scratch with quantized text embeddings, pass the rows the server would receive for the new
tokens: `embed_fn` (a hashable pure function, static under jit) with its `embed_params` (traced) on device,
or `embed` (any Python callable) for the host loop (`qtl_jax.models.tinyllava.server_generate` does either).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax.models.openelm import OpenELM, init_cache
from qtl_jax.sharding import to_host


def _embed_tokens(model: OpenELM, params, embed_fn, embed_params, tokens):
    """int32[B, 1] new tokens -> float[B, 1, D]: `embed_fn(embed_params, tokens)`, or the LM's own table."""
    if embed_fn is None:
        return model.apply({"params": params}, tokens, method=OpenELM.embed)
    return embed_fn(embed_params, tokens)


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


def _choose(logits: jax.Array, temperature: float, rng: jax.Array | None) -> jax.Array:
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "embed_fn", "max_new_tokens", "eos_id", "pad_id",
                                             "temperature"))
def _generate_on_device(model: OpenELM, params, prompt, lengths, rng, embed_params, *, embed_fn,
                        max_new_tokens: int, eos_id: int, pad_id: int, temperature: float) -> jax.Array:
    """Prefill, then a while loop over the new tokens; int32[B, max_new_tokens] on the device.

    `prompt` is int[B, P] ids (embedded by the LM's table) or float[B, P, D] rows. The loop state after step t
    holds token t: the loop runs while a row is not done and t + 1 < max_new_tokens, so, as in the host loop,
    no decode step runs after the last token or once every row has emitted eos."""
    if jnp.issubdtype(prompt.dtype, jnp.integer):
        prompt = model.apply({"params": params}, prompt, method=OpenELM.embed)
    batch, prompt_len = prompt.shape[:2]
    logits, cache = _prefill(model, params, prompt, lengths, prompt_len + max_new_tokens)

    def emit(t, logits, out, done):
        tokens = _choose(logits, temperature, None if rng is None else jax.random.fold_in(rng, t))
        tokens_out = jnp.where(done, pad_id, tokens)  # a finished row only pads
        return tokens_out, out.at[:, t].set(tokens_out), done | (tokens == eos_id)

    def cond(state):
        t, _, _, _, done = state
        return (t + 1 < max_new_tokens) & ~done.all()

    def body(state):
        t, last, cache, out, done = state
        rows = _embed_tokens(model, params, embed_fn, embed_params, last[:, None])
        logits, cache = _decode_step(model, params, cache, rows, lengths + t)  # the host loop's step, inlined
        last, out, done = emit(t + 1, logits, out, done)
        return t + 1, last, cache, out, done

    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    last, out, done = emit(0, logits, out, jnp.zeros(batch, bool))
    return jax.lax.while_loop(cond, body, (jnp.int32(0), last, cache, out, done))[3]


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
    embed_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
    embed_params: Any = None,
    embed: Callable[[jax.Array], jax.Array] | None = None,
) -> np.ndarray:
    """Generates continuations of right-padded prompts.

    Args:
      model: the OpenELM module; params: its parameters (keep them on the device: `jax.device_put`).
      input_ids: int[B, P] prompts, or
      inputs_embeds: float[B, P, D] prompt embeddings (exactly one of the two).
      lengths: int[B] real prompt lengths (default: P for every row).
      max_new_tokens: most tokens to generate per row.
      eos_id: generation of a row stops after it emits this id; later slots hold `pad_id`.
      temperature: 0 for greedy (argmax), > 0 samples from softmax(logits / temperature).
      rng: a PRNG key, required when temperature > 0; token t is drawn with `fold_in(rng, t)`.
      embed_fn: (embed_params, int32[B, 1] new tokens) -> float[B, 1, D] input rows, traced on the device; it
        is a static argument of the compiled loop, so it must be hashable and equal across calls (a
        module-level function or a frozen dataclass, not a fresh lambda) to reuse the compilation.
      embed_params: the pytree `embed_fn` reads (traced: new values do not recompile).
      embed: int32[B, 1] new tokens -> float[B, 1, D], any Python callable (it may do I/O): decodes with the
        host loop, one host round trip per token. Default (no embed_fn, no embed): the LM's own table.

    Returns:
      int32[B, max_new_tokens] host array of generated ids (eos included, pad after it).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("generate takes exactly one of input_ids and inputs_embeds")
    if embed is not None and embed_fn is not None:
        raise ValueError("generate takes at most one of embed (host loop) and embed_fn (on device)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("temperature sampling needs an rng key")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt = inputs_embeds if input_ids is None else input_ids
    batch, prompt_len = prompt.shape[:2]
    lengths = jnp.full((batch,), prompt_len, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    if prompt_len + max_new_tokens > model.config.max_context_length * 2:
        raise ValueError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the RoPE range "
                         f"{2 * model.config.max_context_length}")
    if embed is None:
        out = _generate_on_device(model, params, prompt, lengths, rng, embed_params, embed_fn=embed_fn,
                                  max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                  temperature=float(temperature))
        return to_host(out)
    if input_ids is not None:
        prompt = model.apply({"params": params}, input_ids, method=OpenELM.embed)
    return _host_loop(model, params, prompt, lengths, embed, max_new_tokens, eos_id, pad_id, temperature, rng)


def _host_loop(model: OpenELM, params, embeds, lengths, embed, max_new_tokens: int, eos_id: int, pad_id: int,
               temperature: float, rng) -> np.ndarray:
    """The host-loop driver: the same tokens as `_generate_on_device`, one host sync and one `embed` call per
    token (but the last)."""
    batch, prompt_len = embeds.shape[:2]
    logits, cache = _prefill(model, params, embeds, lengths, prompt_len + max_new_tokens)
    out = np.full((batch, max_new_tokens), pad_id, np.int32)
    done = np.zeros(batch, bool)
    for t in range(max_new_tokens):
        key = None if rng is None else jax.random.fold_in(rng, t)
        tokens = to_host(_choose(logits, temperature, key))  # gathered from every process of a server mesh
        out[:, t] = np.where(done, pad_id, tokens)
        done |= tokens == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        logits, cache = _decode_step(model, params, cache, embed(jnp.asarray(out[:, t:t + 1])), lengths + t)
    return out
