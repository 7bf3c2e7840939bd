"""TinyLLaVA assembly: splice, loss, and the client/server split equal to the single program."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax.compress import COMPRESSORS, make_codec
from qtl_jax.models import tinyllava as T
from qtl_jax.models.openelm import OpenELM, OpenELMConfig
from qtl_jax.models.siglip import SiglipConfig

# A micro model (fast to compile) that still has every code path: layer-wise heads (4, 8), GQA, token drop,
# D = 64 = one NF block.
MICRO = T.TinyLlavaConfig(
    vision=SiglipConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=32),
    lm=OpenELMConfig(vocab_size=64, model_dim=64, num_transformer_layers=2, head_dim=8, num_gqa_groups=2,
                     ffn_dim_divisor=16, max_context_length=256),
)
N = MICRO.image_tokens  # 15


def micro(name="rd_fsq", transport="quantized_embeddings", bits=2):
    return dataclasses.replace(MICRO, image_codec=make_codec(name, bits), text_codec=make_codec(name, bits),
                               text_transport=transport)


def batch(seed=0):
    ids = np.array([[1, 5, T.IMAGE_TOKEN_INDEX, 7, 8, 9, 2, 0, 0, 0],
                    [1, 4, 4, 6, 7, 8, 9, 10, 2, 0]])  # the second sample is text-only
    mask = ids != 0
    labels = np.where((np.arange(10) >= 4) & mask & (ids > 0), ids, T.IGNORE_INDEX)
    images = np.random.default_rng(seed).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    return images, ids, mask, labels


def init(cfg):
    return nn.meta.unbox(jax.jit(T.TinyLlava(cfg).init)(jax.random.key(1), *batch()))["params"]


def test_splice_hand_case():
    text = jnp.arange(1, 6, dtype=jnp.float32)[None, :, None].repeat(2, 0)  # rows 1..5
    image = -jnp.arange(1, 4, dtype=jnp.float32)[None, :, None].repeat(2, 0)  # rows -1..-3
    labels = jnp.array([[10, 11, 12, 13, 14]] * 2)
    rows, mask, out = T.splice(text, image, jnp.array([1, -1]), jnp.array([4, 3]), labels)
    # Sample 0: text 1, image -1 -2 -3 (replacing text row 2), text 3 4, then padding (length 4 + 3 - 1 = 6).
    np.testing.assert_array_equal(rows[0, :, 0], [1, -1, -2, -3, 3, 4, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(out[0], [10, -100, -100, -100, 12, 13, -100])
    # Sample 1 (no image): its three text rows, then padding.
    np.testing.assert_array_equal(rows[1, :, 0], [1, 2, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1], [10, 11, 12, -100, -100, -100, -100])


def test_cross_entropy_hand_case():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = jnp.array([[-100, 1, 0]])  # position 1 predicted from 0 (p = 0.25), position 2 from 1 (p = 0.1)
    loss, count = T.cross_entropy(logits, labels)
    np.testing.assert_allclose(loss, -(np.log(0.25) + np.log(0.1)) / 2, rtol=1e-6)
    assert int(count) == 2


def test_supervised_positions_hand_case():
    # The splice hand case above: sample 0's labels 10 (j=0, spliced row 0: nothing before it), 11 (j=1, the
    # placeholder), 12, 13 (j=2, 3 -> spliced rows 4, 5, predicted from rows 3, 4); j=4 is padding.
    labels = jnp.array([[10, 11, 12, 13, 14], [10, 11, 12, -100, 14]])
    rows, targets = T.supervised_positions(jnp.array([1, -1]), jnp.array([4, 3]), labels, 3)
    np.testing.assert_array_equal(targets, [[-100, -100, 12, 13, -100], [-100, 11, 12, -100, -100]])
    np.testing.assert_array_equal(rows[0, 2:4], [3, 4])
    np.testing.assert_array_equal(rows[1, 1:3], [0, 1])


@pytest.mark.parametrize("transport", ["quantized_embeddings", "token_ids"])
def test_loss_on_supervised_rows_equals_full_vocabulary_loss(transport):
    """The server's loss (head on the T gathered rows) equals cross-entropy over every spliced row's full
    logits, and so do its gradients w.r.t. the LM and the received values."""
    cfg = micro(transport=transport)
    params = init(cfg)
    images, ids, mask, labels = batch()
    labels = labels.copy()
    labels[0, 1] = 5  # a label on the token before the placeholder, and one on the last real token
    labels[1, 8] = 2
    client = T.client_apply(cfg, params["client"], images, ids, mask, labels)
    up = client.uplink
    text = client.q_text if cfg.quantized_text else jnp.asarray(ids)
    server = T.TinyLlavaServer(cfg)

    def full(p, q_image, text):
        rows, valid, spliced = server.apply({"params": p}, q_image, text, up.image_pos, up.lengths, up.labels,
                                            method=T.TinyLlavaServer.embeds)
        logits, _ = server.apply({"params": p}, inputs_embeds=rows, attention_mask=valid,
                                 method=lambda m, **kw: m.language_model(**kw))
        return T.cross_entropy(logits, spliced)[0]

    def gathered(p, q_image, text):
        return server.apply({"params": p}, q_image, text, up.image_pos, up.lengths, up.labels,
                            method=T.TinyLlavaServer.loss)[0]

    argnums = (0, 1, 2) if cfg.quantized_text else (0, 1)
    ref, g_ref = jax.jit(jax.value_and_grad(full, argnums))(params["server"], client.q_image, text)
    got, g_got = jax.jit(jax.value_and_grad(gathered, argnums))(params["server"], client.q_image, text)
    assert float(ref) > 1.0  # a real loss, not a degenerate zero
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_each_half_holds_only_its_parameters():
    params = init(micro())
    assert sorted(params["client"]) == ["connector", "image_compressor", "text_compressor", "token_embeddings",
                                        "vision_tower"]
    assert sorted(params["server"]) == ["image_compressor", "language_model", "text_compressor"]
    assert sorted(params["client"]["image_compressor"]) == ["in_proj"]
    assert sorted(params["server"]["image_compressor"]) == ["out_proj"]
    token = sorted(init(micro(transport="token_ids"))["client"])
    assert token == ["connector", "image_compressor", "vision_tower"]


CASES = [(name, "quantized_embeddings") for name in COMPRESSORS] + [
    ("rd_fsq", "token_ids"), ("nf", "token_ids"), ("none_fp16", "token_ids")]


@pytest.mark.parametrize(("name", "transport"), CASES)
def test_split_loss_equals_single_program(name, transport):
    cfg = micro(name, transport)
    params = init(cfg)
    images, ids, mask, labels = batch()

    @jax.jit
    def both(params):
        single = T.TinyLlava(cfg).apply({"params": params}, images, ids, mask, labels)
        client = T.client_apply(cfg, params["client"], images, ids, mask, labels)
        ce, _ = T.server_apply(cfg, params["server"], client.uplink)
        return single, ce + client.commitment_loss, client.uplink

    (loss, aux), split_loss, uplink = both(params)
    np.testing.assert_allclose(split_loss, loss, rtol=1e-6)
    assert aux["uplink_bytes"] == uplink.nbytes
    assert int(aux["supervised_tokens"]) == int((labels[:, 1:] != -100).sum())


def _split_grads(cfg, params, images, ids, mask, labels):
    """The split runtime's gradients: server grads at the dequantized payload, client vjp of its STE q."""
    def client_fn(cp):
        res = T.client_apply(cfg, cp, images, ids, mask, labels)
        return (res.q_image, res.q_text), (res.uplink, res.commitment_loss)

    q, client_vjp, (uplink, _) = jax.vjp(client_fn, params["client"], has_aux=True)
    server = T.TinyLlavaServer(cfg)
    q_image, text = server.apply({"params": params["server"]}, uplink, method=T.TinyLlavaServer.dequantize)

    def server_loss(sp, q_image, text):
        return server.apply({"params": sp}, q_image, text, uplink.image_pos, uplink.lengths, uplink.labels,
                            method=T.TinyLlavaServer.loss)[0]

    if cfg.quantized_text:
        g_server, g_qi, g_qt = jax.grad(server_loss, argnums=(0, 1, 2))(params["server"], q_image, text)
    else:
        (g_server, g_qi), g_qt = jax.grad(server_loss, argnums=(0, 1))(params["server"], q_image, text), None
    (g_client,) = client_vjp((g_qi, g_qt))
    g_commit = jax.grad(lambda cp: T.client_apply(cfg, cp, images, ids, mask, labels).commitment_loss)(
        params["client"])
    return {"client": jax.tree.map(jnp.add, g_client, g_commit), "server": g_server}, q_image - q[0]


@pytest.mark.parametrize(("name", "transport"), [("rd_fsq", "quantized_embeddings"), ("rd_fsq", "token_ids"),
                                                 ("nf", "quantized_embeddings"), ("fsq_tanh", "quantized_embeddings"),
                                                 ("none_fp16", "quantized_embeddings")])
def test_split_gradients_equal_single_program(name, transport):
    cfg = micro(name, transport)
    params = init(cfg)
    data = batch()
    expected = jax.jit(jax.grad(lambda p: T.TinyLlava(cfg).apply({"params": p}, *data)[0]))(params)
    got, q_gap = jax.jit(lambda p: _split_grads(cfg, p, *data))(params)
    # The server dequantizes the client's STE values; inside one fused jit XLA may round them differently
    # by one ulp (it rewrites the division differently in the two places).
    np.testing.assert_allclose(q_gap, 0.0, atol=1.2e-7)
    # Some gradients are ~0 in exact arithmetic (e.g. directions the 3-sigma scaling is invariant to), so
    # tolerances are relative to the largest gradient of the model, not of each leaf.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected))
    for path, want in jax.tree_util.tree_leaves_with_path(expected):
        have = got
        for key in path:
            have = have[key.key]
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))


def test_uplink_bytes():
    cfg = micro("rd_fsq", bits=2)
    params = init(cfg)
    images, ids, mask, labels = batch()
    up = jax.jit(lambda p: T.client_apply(cfg, p, images, ids, mask, labels).uplink)(params["client"])
    d = cfg.lm.model_dim
    assert up.image.nbytes == 2 * N * d * 2 // 8 and up.text.nbytes == 2 * 10 * d * 2 // 8
    assert up.nbytes == up.image.nbytes + up.text.nbytes + 4 * 2 + 4 * 2 + 2 * 2 * 10  # uint16 labels
    np.testing.assert_array_equal(up.image_pos, [2, -1])
    np.testing.assert_array_equal(up.lengths, [7, 9])
    tok_cfg = micro(transport="token_ids")
    tok = jax.jit(lambda p: T.client_apply(tok_cfg, p, images, ids, mask, labels).uplink)(init(tok_cfg)["client"])
    assert tok.text.nbytes == 2 * 10 * 2 and tok.text.codes.dtype == jnp.uint16  # 2 bytes a token


def test_labels_travel_as_uint16_and_come_back_exactly():
    labels = jnp.array([[-100, 0, 5, 65534, -100]])
    wire = T.labels_to_wire(labels, vocab_size=65535)
    assert wire.dtype == jnp.uint16
    np.testing.assert_array_equal(wire, [[0xFFFF, 0, 5, 65534, 0xFFFF]])
    np.testing.assert_array_equal(T.labels_from_wire(wire), labels)
    big = T.labels_to_wire(labels, vocab_size=65536)  # no spare uint16 value for -100
    assert big.dtype == jnp.int32
    np.testing.assert_array_equal(T.labels_from_wire(big), labels)


def test_server_generation_matches_uncached_decoding():
    cfg = micro("rd_fsq")
    params = init(cfg)
    images, ids, mask, labels = batch()
    up = T.client_apply(cfg, params["client"], images, ids, mask, labels).uplink
    out = T.server_generate(cfg, params["server"], up, max_new_tokens=5, eos_id=-1)
    server = T.TinyLlavaServer(cfg)
    q_image, text = server.apply({"params": params["server"]}, up, method=T.TinyLlavaServer.dequantize)
    rows, valid, _ = server.apply({"params": params["server"]}, q_image, text, up.image_pos, up.lengths,
                                  method=T.TinyLlavaServer.embeds)
    lm = OpenELM(cfg.lm)
    lm_params = params["server"]["language_model"]
    forward = jax.jit(lambda seq, m: lm.apply({"params": lm_params}, inputs_embeds=seq, attention_mask=m)[0])
    for row in range(2):
        length = int(valid[row].sum())
        seq = jnp.zeros((1, length + 5, cfg.lm.model_dim)).at[0, :length].set(rows[row, :length])
        for t in range(5):
            m = jnp.arange(length + 5)[None] < length + t
            token = int(jnp.argmax(forward(seq, m)[0, length + t - 1]))
            assert token == out[row, t]
            embedded = lm.apply({"params": lm_params}, jnp.array([token]), method=OpenELM.embed)
            seq = seq.at[0, length + t].set(embedded[0])


def test_token_rows_are_the_rows_the_server_decodes():
    cfg = micro("rd_fsq")
    params = init(cfg)
    ids = np.array([[3, 9, 4], [7, 7, 12]])
    rows = T.token_rows_fn(cfg, params)(ids)
    images = np.zeros((2, 32, 32, 3), np.float32)
    client = T.client_apply(cfg, params["client"], images, ids, np.ones_like(ids, bool), np.full_like(ids, -100))
    server = T.TinyLlavaServer(cfg)
    expected = server.apply({"params": params["server"]}, client.q_text,
                            method=lambda m, q: m.text_compressor.decode(q))
    np.testing.assert_allclose(rows, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="quantized_embeddings"):
        T.token_rows_fn(micro(transport="token_ids"), params)


def test_generation_with_quantized_text_feeds_new_tokens_like_training():
    # Exact codec: greedy generation must equal the argmax of the single program run on prompt + answer.
    cfg = micro("none_fp32")
    params = init(cfg)
    # An LM input table unlike the client's (as after training from scratch): generation must not use it.
    params["server"]["language_model"]["token_embeddings"]["embedding"] *= -3.0
    images, ids, mask, _ = batch()
    up = T.client_apply(cfg, params["client"], images, ids, mask, np.full_like(ids, -100)).uplink
    out = T.server_generate(cfg, params["server"], up, max_new_tokens=4, eos_id=-1,
                            embed=T.token_rows_fn(cfg, params))
    model = T.TinyLlava(cfg)

    def logits(m, images, ids, mask):
        client = m.client(images, ids, mask, np.full_like(ids, -100))
        rows, valid, _ = m.server.embeds(client.q_image, client.q_text, client.uplink.image_pos,
                                         client.uplink.lengths)
        return m.server.language_model(inputs_embeds=rows, attention_mask=valid)[0]

    for row in range(2):
        length = int(mask[row].sum())
        seq = np.concatenate([ids[row, :length], out[row]])[None]
        full = model.apply({"params": params}, images[row:row + 1], seq, np.ones_like(seq, bool), method=logits)
        shift = N - 1 if row == 0 else 0  # image rows before the answer
        predicted = np.argmax(np.asarray(full[0, shift + length - 1:shift + length + 3]), axis=-1)
        np.testing.assert_array_equal(predicted, out[row])
