"""The server half across two JAX processes: `python -m qtl_jax.split.serve --coordinator ...` started twice, 4 CPU
devices each, one server mesh (data, fsdp, tensor) = (1, 4, 2) over all 8, so the fsdp axis crosses the processes
(gloo collectives over loopback). A client here trains 6 steps of stage 1 of the tiny preset over it, and over the
same server in this one process (8 devices, the same mesh). On the way, the two-process server refuses two bad
requests (which its other process never sees) and goes back to its step-2 checkpoint for a client that went back
to its own (an orbax restore on both processes); the replayed steps repeat the first ones bit for bit. At the end
the client generates through it, each new token's quantized rows a round trip, and gets the tokens its final
parameters generate in one process. A second group, started with the token-ids text transport, generates in one
on-device loop on both processes what its initial parameters generate here.

Tolerance. The two runs compile the same program for the same mesh; what differs is who sums across the fsdp
axis: gloo between the processes, XLA's in-process collectives here. float32 addition is not associative, so a
cross-process sum may differ in its last bit, and Adam (which divides by the gradient's own scale) carries that
into the parameters. Measured: the first four losses equal bit for bit, then <= 2.3e-7 relative; parameters
<= 1.6e-7 apart (attention key biases, whose gradient is exactly zero in theory, are pure rounding noise). The
test allows 1e-6 relative on losses and 1e-6 absolute on parameters, as `test_kill.py` does for runs on other
device counts; a lost or repeated step moves parameters by 1e-5 or more (Adam moves each by about its learning
rate: 3e-4 on the server, a tenth of it on the client)."""

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtl_jax import checkpoint, trainer
from qtl_jax.models import tinyllava as T
from qtl_jax.split import serve
from qtl_jax.split.remote import protocol_pb2 as pb
from qtl_jax.split.remote.client import ConnectConfig, RemoteClient, RemoteCrossing
from qtl_jax.split.remote.server import SplitServer, make_grpc_server
from qtl_jax.split.runtime import HalfState, SplitConfig, SplitTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "m" * 32
VOCAB, BATCH, LENGTH, STEPS = 64, 4, 32, 6
CLIENT_MESH, SERVER_MESH = (2, 1, 1), (1, 4, 2)
CHECKPOINT_AT = (2, STEPS)
START_S, DEADLINE_S = 240, 600  # the most the servers may take to start, and one call (a build, a compile)


def _config(text_transport: str = "quantized_embeddings"):
    """Stage 1 of the tiny preset, batch 4; what the server command line below sets too."""
    from configs.pretrain import get_config

    config = get_config(None)
    config.optim.batch_size = BATCH
    config.split.client_mesh = CLIENT_MESH
    config.split.server_mesh = SERVER_MESH
    config.compressor.text_transport = text_transport
    return config


SERVER_FLAGS = ["--config", os.path.join(ROOT, "configs", "pretrain.py"), f"--config.optim.batch_size={BATCH}",
                f"--config.split.client_mesh={CLIENT_MESH}".replace(" ", ""),
                f"--config.split.server_mesh={SERVER_MESH}".replace(" ", "")]


def _batch(step: int, size: int) -> dict:
    """A [4, 32] batch of `size`-pixel images and random text after the image placeholder, the text supervised."""
    rng = np.random.default_rng(step)
    ids = rng.integers(3, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    ids[:, 0], ids[:, 1] = 1, T.IMAGE_TOKEN_INDEX
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, BATCH)
    mask = np.arange(LENGTH)[None] < lengths[:, None]
    ids = np.where(mask, ids, 0)
    labels = np.where(mask & (np.arange(LENGTH)[None] >= 2), ids, T.IGNORE_INDEX).astype(np.int32)
    images = rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32)
    return {"images": images, "input_ids": ids, "attention_mask": mask, "labels": labels}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initial_params(text_transport: str = "quantized_embeddings"):
    """(host params, boxed) of stage 1's model, as `train.py` initialises them (the server does the same)."""
    config = _config(text_transport)
    params, boxed = trainer.init_params(config, trainer.model_config(config, VOCAB), jnp.float32,
                                        log=lambda _: None)
    return jax.device_get(params), boxed


class Client:
    """The client half of stage 1 here, from `initial` (`_initial_params`), talking to the server at `address`."""

    def __init__(self, address: str, initial, text_transport: str = "quantized_embeddings"):
        config = _config(text_transport)
        self.model_config = trainer.model_config(config, VOCAB)
        # Copies: the client's steps donate its state, which may alias the arrays it was built from.
        params, boxed = jax.tree.map(np.array, initial[0]), initial[1]
        tx_client, _ = trainer.build_optimizers(config, STEPS)
        connect = ConnectConfig(server=address, client_id="client0", token=TOKEN, insecure=True, deadline_s=DEADLINE_S,
                                wait_s=10)
        self.crossing = RemoteCrossing(RemoteClient(connect), self.model_config,
                                       trainer.session_fingerprint(config, self.model_config), stage="pretrain",
                                       vocab_size=VOCAB, num_steps=STEPS, downlink=config.split.downlink)
        split = SplitConfig(mode="remote", client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH)
        self.trainer = SplitTrainer(self.model_config, split, tx_client, None, params, boxed_like=boxed,
                                    trainable=tuple(config.optim.trainable), crossing=self.crossing)
        assert self.crossing.open(0, ()) == 0

    def step(self, step: int) -> float:
        batch = _batch(step, self.model_config.vision.image_size)
        return float(self.trainer.step(batch, step, checkpoint=step in CHECKPOINT_AT)["ce_loss"])

    def refused(self, request: pb.StepRequest) -> grpc.StatusCode:
        request.session_id = self.crossing.session_id
        with pytest.raises(grpc.RpcError) as e:
            self.crossing.client.call("Step", request, pb.StepReply)
        return e.value.code()


def _serve_here(workdir: str):
    """The reference: the same config's server in this process (8 devices: the same server mesh)."""
    config = _config()
    core = SplitServer(serve.config_stages(config, workdir, log=lambda _: None), {"client0": TOKEN},
                       log=lambda _: None)
    server, port = make_grpc_server(core, "127.0.0.1:0", credentials=None,
                                    max_message_bytes=serve.message_limit(config, workdir))
    return core, server, port


def _start_group(tmp_path, procs: list, flags=()):
    """Starts two server processes x 4 CPU devices into `procs` (SERVER_FLAGS, then `flags`); returns the file where
    process 0 writes its gRPC port. They share this session's compilation cache (the reference run fills it with
    what they compile alike)."""
    tokens, port_file = tmp_path / "tokens.txt", tmp_path / "port"
    tokens.write_text(f"client0 {TOKEN}\n")
    coordinator = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": ROOT}  # with the test run's compilation cache (conftest)
    for process_id in range(2):
        with open(tmp_path / f"server{process_id}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "qtl_jax.split.serve", *SERVER_FLAGS, *flags,
                 "--workdir", str(tmp_path / "server"), "--address", "127.0.0.1:0", "--insecure",
                 "--tokens", str(tokens), "--port_file", str(port_file),
                 "--coordinator", coordinator, "--num_processes", "2", "--process_id", str(process_id)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env))
    return port_file


def _wait_for_port(procs, port_file) -> int:
    start = time.monotonic()
    while not port_file.exists():
        if any(p.poll() is not None for p in procs) or time.monotonic() - start > START_S:
            raise RuntimeError(f"the server processes did not start; see {port_file.parent}/server*.log")
        time.sleep(0.2)
    return int(port_file.read_text())


def _stop_group(procs) -> None:
    """SIGTERM to process 0: it closes its checkpoints, then tells process 1 to stop; both must exit."""
    try:
        if procs:
            procs[0].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


GENERATE = {"max_new_tokens": 4, "eos_id": -1, "pad_id": 0}  # no eos: every token (the server allows 4)


def _generation(inference, client_params) -> dict:
    """A prompt uplink of the client's final parameters and the client's answer for each new token's rows."""
    batch = _batch(STEPS + 1, inference.vision.image_size)
    out = T.client_apply(inference, client_params, *(batch[k] for k in ("images", "input_ids", "attention_mask",
                                                                          "labels")))
    generation = {"config": inference, "uplink": out.uplink, "moments": out.text_moments, "round_trips": 0}

    def payload(tokens):
        generation["round_trips"] += 1
        return T.TinyLlavaClient(inference).apply({"params": client_params}, tokens, out.text_moments,
                                                  method=T.TinyLlavaClient.token_payload)

    generation["payload"] = payload
    return generation


def _host_state(client: Client):
    """A copy of the client's state on the host (its next steps donate the device buffers)."""
    return jax.tree.map(np.array, jax.device_get(client.trainer.state["client"]))


def _put_state(client: Client, state) -> None:
    shardings = client.trainer.state_shardings["client"]
    client.trainer.state["client"] = HalfState(*(jax.device_put(getattr(state, f), getattr(shardings, f))
                                                 for f in ("trainable", "frozen", "opt_state")))


def _assert_trees_close(got, expected, atol: float, what: str) -> None:
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol,
                                   err_msg=f"{what} {jax.tree_util.keystr(path)}")


def test_a_server_over_two_processes_trains_what_one_process_trains(tmp_path):
    assert jax.device_count() == 8  # the reference server's mesh here (conftest)
    initial = _initial_params()
    procs = []
    try:
        port_file = _start_group(tmp_path, procs)  # they start up while the reference runs
        core, server, port = _serve_here(str(tmp_path / "reference"))
        try:
            reference = Client(f"127.0.0.1:{port}", initial)
            expected = [reference.step(step) for step in range(1, STEPS + 1)]
            expected_client = jax.device_get(reference.trainer.params()["client"])
            reference.crossing.client.close()
        finally:
            server.stop(grace=None).wait(10)
            core.close()

        client = Client(f"127.0.0.1:{_wait_for_port(procs, port_file)}", initial)
        losses = [client.step(1), client.step(2)]
        at_2 = _host_state(client)
        # Refusals change nothing, on either process: an uplink without its arrays, a step out of order.
        assert client.refused(pb.StepRequest(step=3, batch_size=BATCH, text_length=LENGTH)) == (
            grpc.StatusCode.INVALID_ARGUMENT)
        assert client.refused(pb.StepRequest(step=5, batch_size=BATCH, text_length=LENGTH)) == (
            grpc.StatusCode.FAILED_PRECONDITION)
        losses += [client.step(step) for step in range(3, 6)]
        # The client goes back to its step-2 checkpoint: both server processes restore theirs.
        assert client.crossing.open(2, [2]) == 2
        _put_state(client, at_2)
        replayed = [client.step(step) for step in range(3, 6)]
        losses.append(client.step(STEPS))
        got_client = jax.device_get(client.trainer.params()["client"])
        # Generation on the two-process server, each new token's rows from the client (quantized text).
        generation = _generation(client.model_config.for_inference(), got_client)
        generated = client.crossing.generate(generation["uplink"], token_payload=generation["payload"],
                                             **GENERATE)
        client.crossing.client.close()
    finally:
        _stop_group(procs)
    assert [p.returncode for p in procs] == [0, 0]

    assert replayed == losses[2:5]  # the same processes from the same state: bit for bit
    np.testing.assert_allclose(losses, expected, rtol=1e-6, atol=0)
    _assert_trees_close(got_client, expected_client, 1e-6, "client")
    got_server = checkpoint.final_params(str(tmp_path / "server" / "pretrain"))["server"]
    expected_server = checkpoint.final_params(str(tmp_path / "reference" / "pretrain"))["server"]
    _assert_trees_close(got_server, expected_server, 1e-6, "server")
    # The tokens the two-process server generated are what its final parameters generate in one process.
    inference = generation["config"]
    rows = T.token_rows_fn(inference, {"client": got_client, "server": got_server})
    expected_tokens = T.server_generate(inference, got_server, generation["uplink"],
                                        embed=lambda t: rows(t, generation["moments"]), **GENERATE)
    np.testing.assert_array_equal(generated, expected_tokens)
    assert generation["round_trips"] == GENERATE["max_new_tokens"] - 1  # every token's rows crossed but the last


def test_a_server_over_two_processes_generates_from_token_ids(tmp_path):
    """The other text transport: the client sends the prompt's token ids and the server embeds them and every
    new token itself, the whole decode one on-device loop that both processes run (no round trip per token).
    Before any step: the tokens are what the initial server parameters generate in one process."""
    initial = _initial_params("token_ids")
    procs = []
    try:
        port_file = _start_group(tmp_path, procs, ["--config.compressor.text_transport=token_ids"])
        client = Client(f"127.0.0.1:{_wait_for_port(procs, port_file)}", initial, "token_ids")
        inference = client.model_config.for_inference()
        assert inference.text_transport == "token_ids"
        generation = _generation(inference, initial[0]["client"])
        generated = client.crossing.generate(generation["uplink"], **GENERATE)
        client.crossing.client.close()
    finally:
        _stop_group(procs)
    assert [p.returncode for p in procs] == [0, 0]
    assert generation["uplink"].text.codec == "token_ids" and generation["round_trips"] == 0
    expected = T.server_generate(inference, initial[0]["server"], generation["uplink"], **GENERATE)
    np.testing.assert_array_equal(generated, expected)
    assert generated.shape == (BATCH, GENERATE["max_new_tokens"])
