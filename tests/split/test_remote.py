"""The networked split (`remote`) against its reference (`meshes`) over a real gRPC server on loopback: the same
losses and parameters, the same generated tokens; the checked-in messages; stage changes with several clients.
(Sessions, exactly-once steps, security and fuzzing: test_remote_server.py.)"""

import json

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from qtl_jax.models import tinyllava as T
from qtl_jax.split import wire
from qtl_jax.split.remote import protocol_pb2 as pb
from qtl_jax.split.remote.client import ConnectConfig, RemoteClient, RemoteCrossing
from qtl_jax.split.remote.server import ParamStages, SplitServer, make_grpc_server
from qtl_jax.split.runtime import SplitConfig, SplitTrainer

from ..models.test_tinyllava import batch, micro

CLIENT_MESH, SERVER_MESH = (2, 1, 1), (1, 2, 2)
TOKENS = {"alice": "a" * 32, "bob": "b" * 32}


def _batch(seed=0):
    images, ids, mask, labels = batch(seed)
    return {"images": images, "input_ids": ids, "attention_mask": mask, "labels": labels}


def _params(cfg):
    boxed = jax.jit(T.TinyLlava(cfg).init)(jax.random.key(1), *batch())["params"]
    return nn.meta.unbox(boxed), boxed


def _fingerprint(cfg, downlink):
    return wire.fingerprint(cfg, stage="finetune", downlink=downlink, buckets=(10,), batch_size=2, max_length=10,
                            dtype="float32")


class Served:
    """A SplitServer for `cfg` behind gRPC on 127.0.0.1 (plaintext unless `credentials`), stopped by `stop`."""

    def __init__(self, cfg, downlink="fp32", tx=None, credentials=None, workdir=None, params=None):
        plain, boxed = params or _params(cfg)
        split = SplitConfig(mode="meshes", client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH, downlink=downlink)
        stages = ParamStages(cfg, split, tx or optax.adam(1e-2), plain, boxed_like=boxed, batch_size=2,
                             buckets=(10,), workdir=workdir)
        self.core = SplitServer(stages, TOKENS, log=lambda _: None)
        limit = wire.max_message_bytes(cfg, downlink, 2, 10)
        self.grpc, self.port = make_grpc_server(self.core, "127.0.0.1:0", credentials=credentials,
                                                max_message_bytes=limit)
        self.address = f"127.0.0.1:{self.port}"

    def stop(self):
        self.grpc.stop(grace=None).wait(10)
        self.core.close()


def _connect(address, client_id="alice", token=None, **kw):
    return ConnectConfig(server=address, client_id=client_id, token=token or TOKENS[client_id],
                         insecure=not kw.get("tls_ca"), deadline_s=30, wait_s=5, **kw)


def _remote_trainer(cfg, address, downlink="fp32", tx=None, client_id="alice", params=None, num_steps=100):
    plain, boxed = params or _params(cfg)
    crossing = RemoteCrossing(RemoteClient(_connect(address, client_id)), cfg, _fingerprint(cfg, downlink),
                              stage="finetune", vocab_size=cfg.lm.vocab_size, num_steps=num_steps,
                              downlink=downlink)
    split = SplitConfig(mode="remote", client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH, downlink=downlink)
    trainer = SplitTrainer(cfg, split, tx or optax.adam(1e-2), None, plain, boxed_like=boxed, crossing=crossing)
    assert crossing.open(0, ()) == 0
    return trainer, crossing


def _meshes_trainer(cfg, downlink="fp32"):
    plain, boxed = _params(cfg)
    split = SplitConfig(mode="meshes", client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH, downlink=downlink)
    return SplitTrainer(cfg, split, optax.adam(1e-2), optax.adam(1e-2), plain, boxed_like=boxed)


def _assert_params_close(a, b, rtol=1e-6):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        scale = max(float(np.abs(y).max()), 1e-30)
        assert float(np.abs(np.asarray(x) - np.asarray(y)).max()) / scale <= rtol


CASES = [("rd_fsq", "quantized_embeddings", "fp32"), ("rd_fsq", "token_ids", "bf16"),
         ("none_fp16", "quantized_embeddings", "nf8"), ("rd_fsq", "quantized_embeddings", "nf4")]


@pytest.mark.parametrize(("name", "transport", "downlink"), CASES)
def test_remote_equals_meshes(name, transport, downlink):
    """20 steps: the same loss every step and the same parameters on both sides (<= 1e-6 relative, per leaf)."""
    cfg = micro(name, transport)
    served = Served(cfg, downlink)
    try:
        remote, crossing = _remote_trainer(cfg, served.address, downlink)
        meshes = _meshes_trainer(cfg, downlink)
        for step in range(1, 21):
            b = _batch(step)
            m_remote, m_meshes = remote.step(b, step), meshes.step(b, step)
            assert float(m_remote["ce_loss"]) == pytest.approx(float(m_meshes["ce_loss"]), rel=1e-6)
            assert m_remote["uplink_bytes"] == m_meshes["uplink_bytes"]
            assert m_remote["downlink_bytes"] == m_meshes["downlink_bytes"]
            # The serialized messages: the payload plus a little framing.
            assert m_remote["uplink_bytes"] < m_remote["wire_up_bytes"] < m_remote["uplink_bytes"] + 1000
        _assert_params_close(remote.params()["client"], meshes.params()["client"])
        _assert_params_close(served.core.half.trainer.params()["server"], meshes.params()["server"])
        crossing.client.close()
    finally:
        served.stop()


def test_checked_in_messages_are_generated_from_the_proto(tmp_path):
    """protocol_pb2.py is what protoc makes of protocol.proto (regenerate it with the command in the .proto)."""
    import os

    from grpc_tools import protoc

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    proto = "qtl_jax/split/remote/protocol.proto"
    assert protoc.main(["protoc", f"-I{root}", f"--python_out={tmp_path}", os.path.join(root, proto)]) == 0
    generated = (tmp_path / proto.replace(".proto", "_pb2.py")).read_text()
    with open(os.path.join(root, proto.replace(".proto", "_pb2.py"))) as f:
        checked_in = f.read()
    # The descriptor (what the messages are) must match; the header names protoc's version.
    descriptor = lambda text: next(line for line in text.splitlines() if "AddSerializedFile" in line)
    assert descriptor(generated) == descriptor(checked_in)


@pytest.mark.parametrize("transport", ["quantized_embeddings", "token_ids"])
def test_generation_over_the_network_equals_local_generation(transport):
    """The server generates from the prompt's uplink; with quantized text rows each new token's row comes from the
    client (one round trip per token). The tokens equal generation with both halves in one process."""
    cfg = micro("rd_fsq", transport)
    inference = cfg.for_inference()
    plain, _ = _params(cfg)
    served = Served(cfg)
    try:
        crossing = _remote_trainer(cfg, served.address)[1]
        images, ids, mask, labels = batch()
        out = T.client_apply(inference, plain["client"], images, ids, mask, labels)
        embed = payload = None
        round_trips = []
        if transport == "quantized_embeddings":
            rows = T.token_rows_fn(inference, plain)
            embed = lambda t: rows(t, out.text_moments)

            def payload(tokens):
                round_trips.append(np.asarray(tokens))
                return T.TinyLlavaClient(inference).apply({"params": plain["client"]}, tokens, out.text_moments,
                                                          method=T.TinyLlavaClient.token_payload)

        options = {"max_new_tokens": 5, "eos_id": -1, "pad_id": 0}
        expected = T.server_generate(inference, plain["server"], out.uplink, embed=embed, **options)
        got = crossing.generate(out.uplink, token_payload=payload, **options)
        np.testing.assert_array_equal(got, expected)
        # Quantized rows: one round trip per generated token but the last (whose row nothing reads), carrying it.
        if transport == "quantized_embeddings":
            assert len(round_trips) == 4
            np.testing.assert_array_equal(np.concatenate(round_trips, axis=1), np.asarray(expected)[:, :4])
        crossing.client.close()
    finally:
        served.stop()


def test_a_client_ahead_waits_for_the_others_to_finish_the_stage():
    """Several clients: the server moves to stage 2 when no other client is still in stage 1; until then a client
    that is done gets UNAVAILABLE, which it retries like a server that is not up yet."""
    import grpc

    from qtl_jax.split.remote.server import RpcFailure, StageHalf, Stages

    class TwoStages(Stages):
        names = ("pretrain", "finetune")

        def fingerprint(self, stage, vocab_size):
            return {"stage": stage}

        def build(self, stage, vocab_size, num_steps):
            return StageHalf(stage, None, self.fingerprint(stage, vocab_size), vocab_size, num_steps, 2, (10,), 2,
                             accum_steps=2)

    core = SplitServer(TwoStages(), TOKENS, log=lambda _: None)

    def open_session(client_id, stage):
        request = pb.OpenSessionRequest(protocol_version=wire.PROTOCOL_VERSION, client_id=client_id, stage=stage,
                                        fingerprint=json.dumps({"stage": stage}), vocab_size=50, num_steps=3)
        return core.open_session(client_id, request).session_id

    alice, bob = open_session("alice", "pretrain"), open_session("bob", "pretrain")
    core.sessions[alice].last_step = 6  # 3 optimizer steps x 2 micro-batches: alice is done
    core.sessions[bob].last_step = 5
    with pytest.raises(RpcFailure) as refused:
        open_session("alice", "finetune")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "['bob']" in refused.value.message
    assert core.half.stage == "pretrain"
    core.sessions[bob].last_step = 6
    open_session("alice", "finetune")
    assert core.half.stage == "finetune" and bob not in core.sessions  # bob's stage-1 session is over
    open_session("bob", "finetune")
    assert sorted(s.client_id for s in core.sessions.values()) == ["alice", "bob"]
