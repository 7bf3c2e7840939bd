"""The split step on two meshes equals the single program; each half stays on its mesh; one compile."""

import dataclasses

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from qtl_jax.models import tinyllava as T
from qtl_jax.split.runtime import (
    SplitConfig,
    SplitTrainer,
    compress_downlink,
    decompress_downlink,
    downlink_nbytes,
    leaves_read_as,
)

from ..models.test_tinyllava import batch, init, micro

CLIENT_MESH, SERVER_MESH = (2, 1, 1), (1, 2, 2)
MICRO_RD = micro("rd_fsq")


def _trainer(cfg, mode, downlink="fp32", lr=0.1):
    boxed = jax.jit(T.TinyLlava(cfg).init)(jax.random.key(1), *batch())["params"]
    split = SplitConfig(mode=mode, client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH, downlink=downlink)
    return SplitTrainer(cfg, split, optax.sgd(lr), optax.sgd(lr), nn.meta.unbox(boxed), boxed_like=boxed)


def _batch():
    images, ids, mask, labels = batch()
    return {"images": images, "input_ids": ids, "attention_mask": mask, "labels": labels}


def _max_rel_diff(a, b):
    scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(b))
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)) / scale


@pytest.mark.parametrize(("name", "transport"), [("rd_fsq", "quantized_embeddings"), ("rd_fsq", "token_ids"),
                                                 ("none_fp16", "quantized_embeddings")])
def test_meshes_steps_equal_single_program(name, transport):
    cfg = micro(name, transport)
    single, meshes = _trainer(cfg, "single"), _trainer(cfg, "meshes")
    for _ in range(2):
        m_single, m_meshes = single.step(_batch()), meshes.step(_batch())
        np.testing.assert_allclose(float(m_meshes["ce_loss"]), float(m_single["ce_loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m_meshes["commitment_loss"]), float(m_single["commitment_loss"]),
                                   rtol=1e-5, atol=1e-7)
        assert m_meshes["uplink_bytes"] == m_single["uplink_bytes"] > 0
    assert _max_rel_diff(meshes.params(), single.params()) < 1e-5
    # Each half's state lives only on its own mesh, and each step function compiled once.
    client_devices = {d.id for d in meshes.meshes["client"].devices.flat}
    server_devices = {d.id for d in meshes.meshes["server"].devices.flat}
    assert not client_devices & server_devices
    for half, devices in (("client", client_devices), ("server", server_devices)):
        for leaf in jax.tree.leaves((meshes.state[half].params, meshes.state[half].opt_state)):
            assert {d.id for d in leaf.devices()} <= devices
    assert meshes._client_forward._cache_size() == 1
    assert meshes._server_step._cache_size() == 1
    assert meshes._client_update._cache_size() == 1
    assert meshes._client_update_keep_params._cache_size() == 0  # no residual aliased a parameter


def test_both_halves_states_are_donated():
    """Each step reuses the state's buffers: the arrays that went in are deleted (no second copy of the
    parameters and optimizer state lives through a step), on the client as on the server."""
    meshes = _trainer(MICRO_RD, "meshes")
    meshes.step(_batch())
    before = {h: jax.tree.leaves((meshes.state[h].trainable, meshes.state[h].opt_state)) for h in ("client", "server")}
    frozen = jax.tree.leaves(meshes.state["client"].frozen)
    meshes.step(_batch())
    for half, leaves in before.items():
        assert leaves and all(leaf.is_deleted() for leaf in leaves), half
    assert not any(leaf.is_deleted() for leaf in frozen)


def test_downlink_codecs_bytes_and_error():
    rng = np.random.default_rng(0)
    grads = (rng.normal(size=(2, 15, 64)).astype(np.float32) * 1e-3, rng.normal(size=(2, 10, 64)).astype(np.float32))
    n = (2 * 15 + 2 * 10) * 64
    sizes, errors = {}, {}
    for name in ("fp32", "bf16", "nf8", "nf4"):
        payloads = compress_downlink(name, grads)
        sizes[name] = downlink_nbytes(payloads)
        back = decompress_downlink(name, payloads)
        errors[name] = max(float(np.sqrt(np.mean((b - g) ** 2) / np.mean(g**2))) for b, g in
                           zip(back, grads, strict=True))  # relative RMS error
    assert sizes["fp32"] == 4 * n and sizes["bf16"] == 2 * n
    # NF b-bit blocks of 64: b + 8/64 + 32/64 bits per element + 64 bits per row (8 bytes).
    assert sizes["nf8"] == n * 8 // 8 + n // 64 + 4 * n // 64 + 8 * 50
    assert sizes["nf4"] == n * 4 // 8 + n // 64 + 4 * n // 64 + 8 * 50
    assert errors["fp32"] == 0 and errors["bf16"] < 5e-3 and errors["nf8"] < 2.5e-2 < errors["nf4"] < 0.2, errors
    assert compress_downlink("fp32", (grads[0], None))[1] is None  # token_ids transport: no text gradient


def test_compressed_downlink_step():
    trainer = _trainer(micro("rd_fsq"), "meshes", "nf4")
    metrics = trainer.step(_batch())
    assert np.isfinite(float(metrics["ce_loss"]))
    assert metrics["downlink_bytes"] == (2 * 15 + 2 * 10) * 64 * (4 / 8 + 1 / 64 + 4 / 64) + 8 * 50


def test_bad_split_configs_fail_before_compiling():
    with pytest.raises(ValueError, match=r"need 16 devices, only 8 available"):
        SplitConfig(client_mesh=(2, 2, 2), server_mesh=(2, 2, 2)).check_devices()
    with pytest.raises(ValueError, match="split mode must be one of"):
        SplitConfig(mode="network")
    with pytest.raises(ValueError, match="downlink must be one of"):
        SplitConfig(downlink="int8")


# ---------------------------------------------------------------------------------------------- frozen parts
def _array_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if np.ndim(x))


def _partial_trainer(cfg, mode, trainable, tx, params=None):
    boxed = jax.jit(T.TinyLlava(cfg).init)(jax.random.key(1), *batch())["params"]
    split = SplitConfig(mode=mode, client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH)
    plain = nn.meta.unbox(boxed) if params is None else params
    return SplitTrainer(cfg, split, tx, tx, plain, boxed_like=boxed, trainable=trainable)


@pytest.mark.parametrize("mode", ["meshes", "single"])
def test_frozen_parts_get_no_optimizer_state_and_never_move(mode):
    cfg = micro("rd_fsq")
    trainer = _partial_trainer(cfg, mode, ("connector", "compressors"), optax.MultiSteps(optax.adam(1e-2), 2))
    start = jax.tree.map(np.asarray, trainer.params())
    for half in ("client", "server"):
        state = trainer.state[half]
        parts = {T.part_of((k,)) for k in state.frozen}
        assert parts == ({"vision_tower", "token_embeddings"} if half == "client" else {"language_model"})
        # Adam's two moments and MultiSteps' accumulator: three copies of the trainable parameters, none of
        # the frozen ones.
        assert _count(state.opt_state) == 3 * _count(state.trainable)
    for _ in range(2):  # two micro-batches: one optimizer update
        trainer.step(_batch())
    end = jax.tree.map(np.asarray, trainer.params())
    for half in ("client", "server"):
        frozen = trainer.state[half].frozen
        jax.tree.map(np.testing.assert_array_equal, {k: end[half][k] for k in frozen},
                     {k: start[half][k] for k in frozen})
    assert not np.array_equal(end["client"]["connector"]["linear_0"]["kernel"],
                              start["client"]["connector"]["linear_0"]["kernel"])


def test_partially_frozen_meshes_steps_equal_single_program():
    cfg = micro("rd_fsq")
    parts = ("connector", "compressors", "language_model")
    single = _partial_trainer(cfg, "single", parts, optax.sgd(0.1))
    meshes = _partial_trainer(cfg, "meshes", parts, optax.sgd(0.1))
    for _ in range(2):
        np.testing.assert_allclose(float(meshes.step(_batch())["ce_loss"]), float(single.step(_batch())["ce_loss"]),
                                   rtol=1e-5)
    assert _max_rel_diff(meshes.params(), single.params()) < 1e-5


def _vjp_residual_bytes(cfg, trainable):
    trainer = _partial_trainer(cfg, "meshes", trainable, optax.sgd(0.1))
    client = trainer.state["client"]
    data = {k: v for k, v in _batch().items()}
    _, _, vjp, _ = jax.eval_shape(trainer._client_forward, client.trainable, client.frozen, data)
    return _array_bytes(vjp)


def test_a_frozen_vision_tower_leaves_no_residuals_in_the_clients_vjp():
    deep = dataclasses.replace(MICRO_RD, vision=dataclasses.replace(MICRO_RD.vision, depth=6))
    frozen = ("connector", "compressors", "token_embeddings", "language_model")
    # What the client keeps between its forward and its update does not depend on a frozen tower's depth ...
    assert _vjp_residual_bytes(MICRO_RD, frozen) == _vjp_residual_bytes(deep, frozen)
    # ... while a trainable tower keeps every layer's activations.
    assert _vjp_residual_bytes(deep, None) > _vjp_residual_bytes(MICRO_RD, None) > _vjp_residual_bytes(deep, frozen)


def test_a_frozen_language_model_costs_no_weight_gradients():
    flops = {}
    for name, parts in (("trainable", None), ("frozen", ("vision_tower", "connector", "compressors",
                                                          "token_embeddings"))):
        trainer = _partial_trainer(MICRO_RD, "meshes", parts, optax.adam(1e-3))
        compiled = trainer.compile_steps(_batch())["server_step"]
        flops[name] = compiled.cost_analysis()["flops"]
    # The server still back-propagates through the LM to dL/dq, but computes no LM weight gradient.
    assert flops["frozen"] < 0.8 * flops["trainable"], flops


def test_steps_compile_from_shapes_alone():
    boxed = jax.eval_shape(T.TinyLlava(MICRO_RD).init, jax.random.key(1), *batch())["params"]
    split = SplitConfig(mode="meshes", client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH)
    trainer = SplitTrainer(MICRO_RD, split, optax.adam(1e-3), optax.adam(1e-3), nn.meta.unbox(boxed),
                           boxed_like=boxed, trainable=("connector", "compressors"))
    compiled = trainer.compile_steps({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _batch().items()})
    assert set(compiled) == {"client_forward", "server_step", "client_update"}
    for step in compiled.values():
        assert step.memory_analysis().argument_size_in_bytes > 0
    with pytest.raises(RuntimeError, match="built from shapes only"):
        trainer.step(_batch())


# ------------------------------------------------------------------------------------ accumulation, bf16
def test_k_accumulated_micro_batches_equal_one_batch_k_times_the_size():
    """MultiSteps averages the micro-batches' gradients: equal to one big batch when each micro-batch has as
    many supervised tokens (the CE is a mean over them) and the codec is row-wise (RD-FSQ's batch statistics
    would differ between a micro-batch and the big batch)."""
    cfg = micro("none_fp32")
    micro_batches = [dict(_batch(), images=batch(seed)[0]) for seed in (0, 1)]
    big = {k: np.concatenate([b[k] for b in micro_batches]) for k in micro_batches[0]}
    accumulated = _partial_trainer(cfg, "meshes", None, optax.MultiSteps(optax.sgd(0.5), 2))
    start = jax.tree.map(np.asarray, accumulated.params())
    for b in micro_batches:
        accumulated.step(b)
    once = _partial_trainer(cfg, "meshes", None, optax.sgd(0.5))
    once.step(big)
    assert _max_rel_diff(accumulated.params(), once.params()) < 1e-6
    assert _max_rel_diff(once.params(), start) > 1e-3  # not vacuous: the step changed the parameters


@pytest.mark.parametrize(("name", "bound"), [("rd_fsq", 1e-2), ("none_fp32", 1e-3)])
def test_bf16_compute_stays_close_to_fp32(name, bound):
    """Same fp32 parameters, bf16 compute (the paper preset's): the loss within 1% of fp32's with 2-bit codes
    (measured 0.25%: bf16 moves a few values across a bin edge) and within 0.1% uncompressed (measured
    0.003%); a training step in bf16 stays finite and keeps fp32 master weights."""
    cfg = micro(name)
    params = init(cfg)
    losses = {dtype: float(jax.jit(lambda p, d=dtype: T.TinyLlava(cfg, d).apply({"params": p}, *batch())[0])(params))
              for dtype in (jnp.float32, jnp.bfloat16)}
    assert abs(losses[jnp.bfloat16] - losses[jnp.float32]) < bound * losses[jnp.float32], losses
    if name != "rd_fsq":
        return
    boxed = jax.jit(T.TinyLlava(cfg).init)(jax.random.key(1), *batch())["params"]
    split = SplitConfig(mode="meshes", client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH)
    trainer = SplitTrainer(cfg, split, optax.adam(1e-3), optax.adam(1e-3), params, dtype=jnp.bfloat16,
                           boxed_like=boxed)
    metrics = trainer.step(_batch())
    assert np.isfinite(float(metrics["ce_loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.params()))  # fp32 master weights
    for half in ("client", "server"):  # and fp32 optimizer moments
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state[half].opt_state)
                   if jnp.issubdtype(x.dtype, jnp.floating))
    # The matmuls run in bf16: nearly all of the loss's forward and backward matmul FLOPs (measured 98.2% on
    # this micro model; nothing forces float32 matmuls into the hot path).
    share = _bf16_dot_share(lambda p: T.TinyLlava(cfg, jnp.bfloat16).apply({"params": p}, *batch())[0], params)
    assert share > 0.95, share


def test_leaves_read_as_finds_the_leaves_only_ever_converted():
    """Exact small case: a leaf qualifies when every use, also inside nested jit / scan / remat / custom_vjp
    bodies, converts it to the dtype; one float32 use, a cast to another dtype, a while loop (not understood),
    being returned, not being used, or already being bf16 disqualifies it."""
    @jax.custom_vjp
    def ste(x):
        return x

    ste.defvjp(lambda x: (x, None), lambda _, g: (g,))

    def fn(p, x):
        y = x @ p["dense"].astype(jnp.bfloat16) + p["mixed"].astype(jnp.bfloat16) @ p["mixed"]
        y = y + jax.jit(lambda w: jax.checkpoint(lambda w: w.astype(jnp.bfloat16))(w))(p["nested"])
        y = y + jax.lax.scan(lambda c, w: (c + w.astype(jnp.bfloat16), None), y * 0, p["stacked"])[0]
        y = y + ste(p["custom"].astype(jnp.bfloat16))
        y = y + p["fp16"].astype(jnp.float16).astype(jnp.bfloat16)
        y = y + jax.lax.while_loop(lambda c: c[1] < 1, lambda c: (c[0] + c[2].astype(jnp.bfloat16), c[1] + 1, c[2]),
                                   (y, 0, p["loop"]))[0]
        return y + p["bf16"], p["returned"].astype(jnp.bfloat16), p["returned"]

    w = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    params = {k: w for k in ("dense", "mixed", "nested", "custom", "fp16", "loop", "returned", "unused")}
    params |= {"stacked": jax.ShapeDtypeStruct((3, 4, 4), jnp.float32),
               "bf16": jax.ShapeDtypeStruct((4, 4), jnp.bfloat16)}
    x = jax.ShapeDtypeStruct((4, 4), jnp.bfloat16)
    (mask,) = leaves_read_as(fn, (params, x), [0], jnp.bfloat16)
    assert {k for k, m in mask.items() if m} == {"dense", "nested", "stacked", "custom"}
    (mask,) = leaves_read_as(fn, (params, x), [0], jnp.float16)  # the dtype matters
    assert {k for k, m in mask.items() if m} == {"fp16"}


def test_frozen_parameters_converted_once_give_the_same_steps():
    """bf16 compute with a frozen tower (client) and a frozen language model (server): the steps with the
    frozen kernels converted once equal, bit for bit, the steps converting the float32 originals each time
    (single and meshes); the state keeps the float32 originals; a restore (new frozen values) is followed."""
    boxed = jax.jit(T.TinyLlava(MICRO_RD).init)(jax.random.key(1), *batch())["params"]
    plain = nn.meta.unbox(boxed)

    def make(mode, once):
        split = SplitConfig(mode=mode, client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH)
        return SplitTrainer(MICRO_RD, split, optax.adam(1e-3), optax.adam(1e-3), jax.tree.map(np.array, plain),
                            dtype=jnp.bfloat16, boxed_like=boxed, trainable=("connector", "compressors"),
                            cast_frozen_once=once)

    def run(trainer, steps=2):
        losses = [float(trainer.step(_batch(), step=k + 1)["ce_loss"]) for k in range(steps)]
        return losses, jax.tree.map(np.asarray, trainer.params())

    for mode in ("single", "meshes"):
        once, each = make(mode, True), make(mode, False)
        (l_once, p_once), (l_each, p_each) = run(once), run(each)
        assert l_once == l_each
        jax.tree.map(np.testing.assert_array_equal, p_once, p_each)
        assert not each._frozen_copy
        for half, part in (("client", "vision_tower"), ("server", "language_model")):
            source, converted = once._frozen_copy[half]
            assert source is once.state[half].frozen  # the float32 originals stay in the state
            assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(source))
            flat = traverse_util.flatten_dict(converted[part])
            # The Dense kernels arrive converted; SigLIP's LayerNorm parameters, read in float32, do not.
            assert all(v.dtype == jnp.bfloat16 for k, v in flat.items() if k[-1] == "kernel")
            assert all(v.dtype == jnp.float32 for k, v in flat.items() if k[-2].startswith("layer_norm"))
    # A restore replaces the frozen trees: the next step converts the new values (a stale copy would give
    # the old loss, the trainer converting each time the new one).
    other = jax.tree.map(lambda a: a * 1.5, plain)
    for trainer in (once, each):
        for half in ("client", "server"):
            frozen = {k: other[half][k] for k in trainer.state[half].frozen}
            frozen = jax.device_put(frozen, trainer.state_shardings[half].frozen)
            trainer.state[half] = trainer.state[half].replace(frozen=frozen)
    assert float(once.step(_batch(), step=3)["ce_loss"]) == float(each.step(_batch(), step=3)["ce_loss"])


def _bf16_dot_share(fn, *args) -> float:
    """The fraction of the matmul FLOPs of fn's forward and backward (jaxpr, before XLA) whose operands are bf16."""
    flops = {"bf16": 0.0, "other": 0.0}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval
                n = 2 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs.shape[d] for d in lhs_contract])
                kind = "bf16" if all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars) else "other"
                flops[kind] += float(n)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(jax.grad(fn))(*args).jaxpr)
    return flops["bf16"] / (flops["bf16"] + flops["other"])


def test_optimizer_state_is_sharded_like_its_parameters():
    """On an FSDP/tensor mesh each Adam moment and accumulator lives where its parameter does (not replicated)."""
    trainer = _partial_trainer(MICRO_RD, "meshes", None, optax.MultiSteps(optax.adam(1e-3), 2))
    state = trainer.state["server"]
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.trainable)[0]:
        specs[tuple(k.key for k in path)] = leaf.sharding
    mirrored = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        if keys in specs:
            assert leaf.sharding == specs[keys], keys
            mirrored += 1
        else:
            assert leaf.ndim == 0  # step counters
    assert mirrored == 3 * len(specs)  # mu, nu and the accumulator of every parameter
    kernel = state.trainable["language_model"]["layers_1"]["ffn"]["proj_1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
