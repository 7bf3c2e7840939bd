"""Generation drivers: the on-device loop equals the host loop and a decode without a cache, stops on the device,
and compiles once per shape whatever the parameter values."""

import contextlib
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.compress import make_codec
from qtl_jax.models import tinyllava as T
from qtl_jax.models.generate import _generate_on_device, generate
from qtl_jax.models.openelm import OpenELM, OpenELMConfig

from .test_tinyllava import batch, init, micro

CONFIG = OpenELMConfig(vocab_size=64, model_dim=64, num_transformer_layers=2, head_dim=8, num_gqa_groups=2,
                       ffn_dim_divisor=16, max_context_length=256)
LENGTHS = np.array([7, 4, 5])


@contextlib.contextmanager
def compilations():
    """Names of the functions compiled inside the block, one per executable built (an in-memory jit cache miss;
    a persistent-cache hit counts too, since it still builds an executable)."""
    names = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":  # fun_name: "jit(f)" on jax 0.10
            names.append(re.sub(r"^p?jit\((.*)\)$", r"\1", str(kwargs.get("fun_name", "?"))))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


@pytest.fixture(scope="module")
def lm():
    """A micro OpenELM with unit-scale random weights (the default init's small embeddings make every row
    repeat one token), its params on the device, and right-padded prompts."""
    model = OpenELM(CONFIG)
    ids = np.random.default_rng(26).integers(3, CONFIG.vocab_size, (3, 7))
    ids = np.where(np.arange(7)[None] < LENGTHS[:, None], ids, 0)

    @jax.jit
    def draw(key):
        leaves, tree = jax.tree.flatten(nn.meta.unbox(model.init(key, jnp.asarray(ids)))["params"])
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * (1.0 if x.ndim == 1 else x.shape[0] ** -0.5)
                                         for k, x in zip(keys, leaves, strict=True)])

    return model, draw(jax.random.key(1)), jnp.asarray(ids)


def _table(model, params):
    return lambda tokens: model.apply({"params": params}, tokens, method=OpenELM.embed)


def _uncached_greedy(model, params, ids, lengths, steps):
    """Reference: the whole sequence recomputed for every new token, no cache (one jitted forward over a fixed
    buffer with a padding mask, so it compiles once)."""
    forward = jax.jit(lambda seq, mask: model.apply({"params": params}, seq, attention_mask=mask)[0])
    size = ids.shape[1] + steps
    seq = np.zeros((len(lengths), size), np.int32)
    seq[:, :ids.shape[1]] = ids
    for t in range(steps):
        logits = forward(seq, np.arange(size)[None] < (lengths + t)[:, None])
        seq[np.arange(len(lengths)), lengths + t] = np.argmax(np.asarray(logits)[np.arange(len(lengths)),
                                                                                 lengths + t - 1], axis=-1)
    return np.stack([seq[i, length:length + steps] for i, length in enumerate(lengths)])


def test_on_device_greedy_equals_host_loop_and_uncached_decoding(lm):
    model, params, ids = lm
    on_device = generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=10, eos_id=-1)
    host = generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=10, eos_id=-1,
                    embed=_table(model, params))
    assert isinstance(on_device, np.ndarray) and on_device.dtype == np.int32
    np.testing.assert_array_equal(on_device, host)
    assert len(set(on_device.ravel().tolist())) > 5  # not one repeated token
    np.testing.assert_array_equal(on_device, _uncached_greedy(model, params, np.asarray(ids), LENGTHS, 10))


def test_blocked_attention_generates_the_same_tokens(lm, monkeypatch):
    """The prefill (the cache's mask) and the uncached reference (padding lengths) through the blocked attention,
    as they run at paper size on a CPU: the same tokens as with XLA's attention."""
    from qtl_jax import layers

    model, params, ids = lm
    ref = generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=10, eos_id=-1)
    monkeypatch.setattr(layers, "ATTENTION_BLOCK", 2)
    _generate_on_device.clear_cache()  # compiled with the other attention
    try:
        np.testing.assert_array_equal(
            generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=10, eos_id=-1), ref)
        np.testing.assert_array_equal(_uncached_greedy(model, params, np.asarray(ids), LENGTHS, 10), ref)
    finally:
        _generate_on_device.clear_cache()


def test_eos_stops_rows_and_the_loop_on_the_device(lm):
    model, params, ids = lm
    free = generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=12, eos_id=-1)
    # An eos every row emits before the end, at different steps: rows stop one by one, then the loop.
    eos = next(t for t in range(CONFIG.vocab_size) if all(t in row[:-1] for row in free.tolist())
               and len({row.index(t) for row in free.tolist()}) > 1)
    first = [row.index(eos) for row in free.tolist()]
    calls = []

    def embed_fn(params, tokens):  # the LM's table, counting the loop's iterations on the host (test only)
        jax.debug.callback(lambda: calls.append(1))
        return model.apply({"params": params}, tokens, method=OpenELM.embed)

    out = generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=12, eos_id=eos, pad_id=0,
                   embed_fn=embed_fn, embed_params=params)
    host_calls = []
    host = generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=12, eos_id=eos, pad_id=0,
                    embed=lambda t: host_calls.append(1) or _table(model, params)(t))
    np.testing.assert_array_equal(out, host)
    for row, stop in enumerate(first):
        assert out[row, :stop + 1].tolist() == free[row, :stop + 1].tolist()
        assert (out[row, stop + 1:] == 0).all()
    # Token t is emitted after t decode steps: the loop ran max(first) steps, not 11.
    assert len(calls) == len(host_calls) == max(first) < 11


def test_sampling_equals_host_loop_and_is_reproducible(lm):
    model, params, ids = lm
    key = jax.random.key(3)
    options = {"input_ids": ids, "lengths": LENGTHS, "max_new_tokens": 10, "eos_id": -1, "temperature": 1.5,
               "rng": key}
    a = generate(model, params, **options)
    np.testing.assert_array_equal(a, generate(model, params, **options))
    np.testing.assert_array_equal(a, generate(model, params, embed=_table(model, params), **options))
    greedy = generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=10, eos_id=-1)
    assert (a != greedy).any()
    with pytest.raises(ValueError, match="at most one of embed"):
        generate(model, params, input_ids=ids, embed=_table(model, params), embed_fn=lambda p, t: t)


def test_compiled_once_per_shape_whatever_the_parameter_values(lm):
    model, params, ids = lm
    jax.clear_caches()  # counts below must not depend on what earlier tests of the session compiled
    before = _generate_on_device._cache_size()
    with compilations() as first:
        generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=5, eos_id=-1)
    other, other_ids = jax.tree.map(lambda x: x * 1.5, params), ids + 1  # new values, same shapes
    with compilations() as again:
        generate(model, other, input_ids=other_ids, lengths=LENGTHS - 1, max_new_tokens=5, eos_id=-1)
    assert first.count("_generate_on_device") == 1 and again == []
    with compilations() as longer:
        generate(model, params, input_ids=ids, lengths=LENGTHS, max_new_tokens=6, eos_id=-1)
    assert longer == ["_generate_on_device"]
    assert _generate_on_device._cache_size() - before == 2


def test_quantized_text_rows_on_device_equal_the_host_loop():
    """TinyLLaVA with quantized text embeddings: new tokens' rows computed in the loop (`TokenRows`) give the
    tokens of the host loop fed by `token_rows_fn` (what the networked server gets from the client)."""
    cfg = micro("rd_fsq").for_inference()
    params = jax.device_put(init(cfg))
    images, ids, mask, labels = batch()
    jax.clear_caches()  # counts below must not depend on what earlier tests of the session compiled
    out = jax.jit(T.client_apply, static_argnums=0)(cfg, params["client"], images, ids, mask, labels)
    rows = T.token_rows_fn(cfg, params)
    options = {"max_new_tokens": 6, "eos_id": -1}
    host = T.server_generate(cfg, params["server"], out.uplink, embed=lambda t: rows(t, out.text_moments),
                             **options)
    with compilations() as first:  # the prompt's splice, compiled by the call above, is reused
        on_device = T.server_generate(cfg, params["server"], out.uplink, embed_fn=T.TokenRows(cfg),
                                      embed_params=(params, out.text_moments), **options)
    np.testing.assert_array_equal(on_device, host)
    assert len(set(host.ravel().tolist())) > 1
    # An equal config built again, new arrays: both compilations (the prompt's and the loop's) are reused.
    again_cfg, other = micro("rd_fsq").for_inference(), jax.tree.map(jnp.copy, params)
    with compilations() as again:
        T.server_generate(again_cfg, other["server"], out.uplink, embed_fn=T.TokenRows(again_cfg),
                          embed_params=(other, out.text_moments), **options)
    assert first == ["_generate_on_device"] and again == []


def test_quantized_text_rows_with_per_channel_statistics():
    """RD-FSQ with statistics per channel: the prompt's moments are per sample and channel, and generated
    tokens are quantized with them, on the device as on the host."""
    codec = make_codec("rd_fsq", 2, scale="channel")
    cfg = dataclasses.replace(micro("rd_fsq"), image_codec=codec, text_codec=codec).for_inference()
    params = jax.device_put(init(cfg))
    images, ids, mask, labels = batch()
    out = jax.jit(T.client_apply, static_argnums=0)(cfg, params["client"], images, ids, mask, labels)
    width = params["client"]["text_compressor"]["in_proj"]["kernel"].shape[-1]
    assert [m.shape for m in out.text_moments] == [(2, 1, width)] * 2
    assert not np.allclose(out.text_moments[1], out.text_moments[1][..., :1])  # one std per channel
    rows = T.token_rows_fn(cfg, params)
    options = {"max_new_tokens": 4, "eos_id": -1}
    host = T.server_generate(cfg, params["server"], out.uplink, embed=lambda t: rows(t, out.text_moments),
                             **options)
    on_device = T.server_generate(cfg, params["server"], out.uplink, embed_fn=T.TokenRows(cfg),
                                  embed_params=(params, out.text_moments), **options)
    np.testing.assert_array_equal(on_device, host)
