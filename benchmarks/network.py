"""Network cost of the split: bytes on the wire per step against the payload, and step time `remote` vs `meshes`.

1. Framing, no model runs. The paper-size model (SigLIP so400m 384 px + OpenELM-270M, RD-FSQ 2-bit) at batch 8 x
   text length 256, both text transports, and the tiny preset at batch 8 x 32: the uplink and the reply of each
   downlink codec (fp32, bf16, nf8, nf4), their arrays filled with random bytes and serialized as the client and
   the server do (`StepRequest` / `StepReply`, `arrays_to_proto(wire.to_arrays(tree))`). Per message: the payload
   (`Uplink.nbytes` / `Payload.nbytes`), the serialized message (what the client counts, `wire_*_bytes`) and the
   bytes on the TCP connection per call (a counting relay between the real client, `RemoteClient.call`, and a stub
   gRPC server that answers the canned reply: gRPC's length prefix, HTTP/2 frames and headers, flow control), each
   with its overhead over the payload. Target: <= 2% for the paper size.
2. Step time over loopback. The tiny preset and the mid-size model of `split_step.py`, random weights, SGD, batch
   8 x text 32, RD-FSQ 2-bit, fp32 downlink: the same batch stepped by a `meshes` trainer and by a `remote` trainer
   whose server (`SplitServer` behind gRPC on 127.0.0.1) runs in this process, interleaved step by step after two
   warm-up steps each. The median step time of each mode, the ratio remote / meshes, and the bytes per step of the
   serialized messages and on the socket (a few more steps, through the relay) against the payload.
3. Generation over loopback with quantized text embeddings (each new token: the server sends it, the client answers
   with its quantized row): time per generated token in one process and over the network (the same tokens,
   checked), and the bytes per round trip.

    python benchmarks/network.py [--repeats 10] [--tls]

Plaintext gRPC unless `--tls` (a throw-away CA and server certificate, target localhost). Every server, relay and
channel started here is stopped before the script ends; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import select
import socket
import statistics
import tempfile
import threading
import time
from concurrent import futures

import jax

jax.config.update("jax_num_cpu_devices", 2)  # meshes mode: client and server meshes on a CPU-only machine

import flax.linen as nn  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from split_step import MID, TINY, batch  # noqa: E402

from qtl_jax.models import tinyllava as T  # noqa: E402
from qtl_jax.split import wire  # noqa: E402
from qtl_jax.split.remote import protocol_pb2 as pb  # noqa: E402
from qtl_jax.split.remote import security  # noqa: E402
from qtl_jax.split.remote.client import ConnectConfig, RemoteClient, RemoteCrossing  # noqa: E402
from qtl_jax.split.remote.server import SERVICE, ParamStages, SplitServer, arrays_to_proto, make_grpc_server  # noqa: E402
from qtl_jax.split.runtime import DOWNLINKS, MODEL_KEYS, SplitConfig, SplitTrainer, downlink_nbytes  # noqa: E402

CLIENT_ID, TOKEN = "alice", secrets.token_hex(16)
TRANSPORTS = {"quantized_embeddings": "q-emb", "token_ids": "ids"}
SOCKET_CALLS = 2  # measured calls per message through the relay, after one warm-up call


# ------------------------------------------------------------------------------------------------ plumbing
class CountingRelay:
    """A TCP relay on 127.0.0.1 in front of 127.0.0.1:`port` that counts the bytes it passes each way ("up" to the
    server, "down" back). `close` stops every thread it started (waits bounded by the 0.1 s poll)."""

    def __init__(self, port: int):
        self.target = ("127.0.0.1", port)
        self.counts = {"up": 0, "down": 0}
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._spawn(self._accept)

    def _spawn(self, fn, *args) -> None:
        thread = threading.Thread(target=fn, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            for s in (conn, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets += [conn, upstream]
            self._spawn(self._pump, conn, upstream, "up")
            self._spawn(self._pump, upstream, conn, "down")

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while not self.stopping.is_set():
            try:
                if not select.select([src], [], [], 0.1)[0]:
                    continue
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
            with self.lock:
                self.counts[direction] += len(data)
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def snapshot(self) -> dict[str, int]:
        time.sleep(0.05)  # let frames sent after the reply (flow-control updates) through
        with self.lock:
            return dict(self.counts)

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for thread in self.threads:
            thread.join(timeout=5)


def socket_bytes(relay: CountingRelay, call, n: int = SOCKET_CALLS) -> dict[str, float]:
    """Mean bytes per `call()` on the relay's connection, each way, after one warm-up call (connection set-up,
    HTTP/2 settings, the first headers)."""
    call()
    before = relay.snapshot()
    for _ in range(n):
        call()
    after = relay.snapshot()
    return {k: (after[k] - before[k]) / n for k in before}


class Certificates:
    """--tls: a CA and a server certificate for localhost in a temporary folder (None: plaintext)."""

    def __init__(self, tls: bool):
        self.folder = tempfile.TemporaryDirectory() if tls else None
        self.paths = security.make_certificates(self.folder.name) if tls else {}

    def server(self) -> grpc.ServerCredentials | None:
        return security.server_credentials(self.paths["server.pem"], self.paths["server.key"]) if self.paths else None

    def connect(self, port: int, limit: int) -> ConnectConfig:
        host = "localhost" if self.paths else "127.0.0.1"
        return ConnectConfig(server=f"{host}:{port}", client_id=CLIENT_ID, token=TOKEN,
                             tls_ca=self.paths.get("ca.pem", ""), insecure=not self.paths, deadline_s=120, wait_s=30,
                             max_message_bytes=limit)

    def close(self) -> None:
        if self.folder is not None:
            self.folder.cleanup()


def overhead(total: float, payload: int) -> str:
    return f"{100 * (total - payload) / payload:+7.3f}%"


# ------------------------------------------------------------------------------------------------ 1. framing
def random_fill(template, rng: np.random.Generator):
    """The template's leaves (`jax.ShapeDtypeStruct`) as numpy arrays of random bytes."""
    def fill(leaf):
        dtype, shape = np.dtype(leaf.dtype), tuple(leaf.shape)
        raw = rng.integers(0, 256, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, dtype=np.uint8)
        return raw.view(dtype).reshape(shape)
    return jax.tree.map(fill, template)


def stub_server(reply: list[bytes], credentials, limit: int) -> tuple[grpc.Server, int]:
    """A gRPC server whose Step answers `reply[0]` (serialized) whatever it is sent, on 127.0.0.1."""
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Step": grpc.unary_unary_rpc_method_handler(lambda raw, context: reply[0])})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit), ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials is not None
            else server.add_insecure_port("127.0.0.1:0"))
    if not port:
        raise OSError("could not bind the stub server to 127.0.0.1")
    server.start()
    return server, port


def framing(name: str, cfg, batch_size: int, length: int, certs: Certificates) -> list[str]:
    """Table rows: the uplink and each downlink codec's reply of one step, payload vs serialized vs socket."""
    rng = np.random.default_rng(0)
    session_id = secrets.token_hex(16)
    up_template = wire.uplink_template(cfg, batch_size, length)
    up_arrays = wire.to_arrays(random_fill(up_template, rng))
    assert wire.nbytes(up_arrays) == up_template.nbytes, (wire.nbytes(up_arrays), up_template.nbytes)
    request = pb.StepRequest(session_id=session_id, step=1, checkpoint=False, batch_size=batch_size, text_length=length,
                             uplink=arrays_to_proto(up_arrays))
    messages = {"up": (up_template.nbytes, len(request.SerializeToString()))}
    replies = {}
    for downlink in DOWNLINKS:
        template = wire.downlink_template(cfg, downlink, batch_size, length)
        arrays = wire.to_arrays(random_fill(template, rng))
        assert wire.nbytes(arrays) == downlink_nbytes(template)
        replies[downlink] = pb.StepReply(step=1, ce_loss=1.0, downlink=arrays_to_proto(arrays)).SerializeToString()
        messages[f"down {downlink}"] = (downlink_nbytes(template), len(replies[downlink]))

    limit = max(wire.max_message_bytes(cfg, d, batch_size, length) for d in DOWNLINKS)
    current = [b""]
    sockets, ups = {}, []
    with contextlib.ExitStack() as stack:
        server, port = stub_server(current, certs.server(), limit)
        stack.callback(lambda: server.stop(grace=None).wait(10))
        relay = CountingRelay(port)
        stack.callback(relay.close)
        client = RemoteClient(certs.connect(relay.port, limit))
        stack.callback(client.close)
        for downlink in DOWNLINKS:
            current[0] = replies[downlink]
            counted = socket_bytes(relay, lambda: client.call("Step", request, pb.StepReply))
            ups.append(counted["up"])
            sockets[f"down {downlink}"] = counted["down"]
        sockets["up"] = statistics.mean(ups)

    rows = []
    for message, (payload, serialized) in messages.items():
        rows.append(f"{name:<6} {TRANSPORTS[cfg.text_transport]:<6} {message:<10} {payload:>12,d} {serialized:>12,d} "
                    f"{overhead(serialized, payload)} {sockets[message]:>12,.0f} {overhead(sockets[message], payload)}")
    return rows


# --------------------------------------------------------------------------------------------- 2. step time
def init_params(cfg, data):
    """(plain numpy params, boxed shapes): every trainer and the server copy them onto their own devices."""
    args = [data[k] for k in MODEL_KEYS]
    boxed = jax.eval_shape(T.TinyLlava(cfg).init, jax.random.key(0), *args)["params"]
    plain = jax.device_get(nn.meta.unbox(jax.jit(T.TinyLlava(cfg).init)(jax.random.key(0), *args))["params"])
    return plain, boxed


def serve(stack: contextlib.ExitStack, cfg, plain, boxed, split: SplitConfig, batch_size: int, length: int,
          certs: Certificates) -> tuple[RemoteCrossing, int, int]:
    """An in-process server (the server half of `plain`) on 127.0.0.1 and an open session to it: (crossing, port,
    message size limit); `stack` stops both."""
    stages = ParamStages(cfg, split, optax.sgd(1e-3), plain, boxed_like=boxed, batch_size=batch_size,
                         buckets=(length,))
    limit = wire.max_message_bytes(cfg, split.downlink, batch_size, length)
    core = SplitServer(stages, {CLIENT_ID: TOKEN}, log=lambda _: None)
    stack.callback(core.close)
    server, port = make_grpc_server(core, "127.0.0.1:0", credentials=certs.server(), max_message_bytes=limit)
    stack.callback(lambda: server.stop(grace=None).wait(10))
    client = RemoteClient(certs.connect(port, limit))
    stack.callback(client.close)
    fp = wire.fingerprint(cfg, stage="finetune", downlink=split.downlink, buckets=(length,), batch_size=batch_size,
                          max_length=length, dtype="float32")
    crossing = RemoteCrossing(client, cfg, fp, stage="finetune", vocab_size=cfg.lm.vocab_size, num_steps=10**6,
                              downlink=split.downlink)
    assert crossing.open(0, ()) == 0
    return crossing, port, limit


class Stepper:
    """A trainer stepped with consecutive step ids; `run` blocks until the step (client update included) is done."""

    def __init__(self, trainer: SplitTrainer, data: dict):
        self.trainer, self.data, self.step_id, self.metrics = trainer, data, 0, {}

    def run(self) -> float:
        self.step_id += 1
        start = time.perf_counter()
        self.metrics = self.trainer.step(self.data, self.step_id)
        jax.block_until_ready((self.metrics["ce_loss"], self.trainer.state))
        return time.perf_counter() - start


def step_time(name: str, cfg, batch_size: int, length: int, downlink: str, repeats: int,
              certs: Certificates) -> list[str]:
    data = batch(cfg, batch_size, length)
    plain, boxed = init_params(cfg, data)
    split = dict(client_mesh=(1, 1, 1), server_mesh=(1, 1, 1), downlink=downlink)
    meshes = Stepper(SplitTrainer(cfg, SplitConfig(mode="meshes", **split), optax.sgd(1e-3), optax.sgd(1e-3), plain,
                                  boxed_like=boxed), data)

    with contextlib.ExitStack() as stack:
        crossing, port, limit = serve(stack, cfg, plain, boxed, SplitConfig(mode="meshes", **split), batch_size,
                                      length, certs)
        remote = Stepper(SplitTrainer(cfg, SplitConfig(mode="remote", **split), optax.sgd(1e-3), None, plain,
                                      boxed_like=boxed, crossing=crossing), data)
        for _ in range(2):  # compiles
            meshes.run()
            remote.run()
        times = {"meshes": [], "remote": []}
        for i in range(repeats):  # interleaved, alternating which goes first
            for mode in (("meshes", "remote") if i % 2 == 0 else ("remote", "meshes")):
                times[mode].append((meshes if mode == "meshes" else remote).run())
        losses = float(meshes.metrics["ce_loss"]), float(remote.metrics["ce_loss"])
        m = remote.metrics
        assert m["uplink_bytes"] == meshes.metrics["uplink_bytes"]
        assert m["downlink_bytes"] == meshes.metrics["downlink_bytes"]

        # Bytes on the socket: the same session continues over a channel through the counting relay.
        relay = CountingRelay(port)
        stack.callback(relay.close)
        crossing.client = RemoteClient(certs.connect(relay.port, limit))
        stack.callback(crossing.client.close)
        counted = socket_bytes(relay, remote.run)

    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [f"{name:>4}: meshes {median['meshes'] * 1e3:8.1f} ms/step, remote {median['remote'] * 1e3:8.1f} ms/step, "
            f"remote/meshes {median['remote'] / median['meshes']:.2f}   (last loss meshes {losses[0]:.6f}, remote "
            f"{losses[1]:.6f})"]
    for way, key in (("up", "uplink_bytes"), ("down", "downlink_bytes")):
        payload, message, on_socket = m[key], m[f"wire_{way}_bytes"], counted[way]
        rows.append(f"      {way:<4} payload {payload:>10,d} B, message {message:>10,d} B "
                    f"({overhead(message, payload)}), socket {on_socket:>10,.0f} B ({overhead(on_socket, payload)})")
    return rows


# ------------------------------------------------------------------------------------- 3. generation
def generation(name: str, cfg, batch_size: int, length: int, new_tokens: int, repeats: int,
               certs: Certificates) -> list[str]:
    """Greedy generation of `new_tokens` tokens for a batch of prompts with quantized text embeddings, in one
    process (`server_generate` with `token_rows_fn`) and over the network (`RemoteCrossing.generate`: one round
    trip per token, the client codes each new token's row): time per token, bytes per round trip."""
    cfg = cfg.for_inference()
    data = batch(cfg, batch_size, length)
    plain, boxed = init_params(cfg, data)
    client = jax.jit(lambda p, *b: T.client_apply(cfg, p, *b))
    out = client(plain["client"], *(data[k] for k in MODEL_KEYS))
    rows = T.token_rows_fn(cfg, jax.device_put(plain))
    payload = jax.jit(lambda p, ids, m: T.TinyLlavaClient(cfg).apply({"params": p}, ids, m,
                                                                     method=T.TinyLlavaClient.token_payload))
    options = {"max_new_tokens": new_tokens, "eos_id": -1, "pad_id": 0}  # no end token: every token is made

    def local():
        return T.server_generate(cfg, jax.device_put(plain["server"]), out.uplink,
                                 embed=lambda t: rows(t, out.text_moments), **options)

    with contextlib.ExitStack() as stack:
        split = SplitConfig(mode="meshes", client_mesh=(1, 1, 1), server_mesh=(1, 1, 1))
        crossing = serve(stack, cfg, plain, boxed, split, batch_size, length, certs)[0]
        remote_client = crossing.client

        def remote():
            return crossing.generate(out.uplink, token_payload=lambda t: payload(plain["client"], t, out.text_moments),
                                     **options)

        expected, got = local(), remote()  # warm-up (compiles) and the check: the same tokens
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        times = {"local": [], "remote": []}
        sent, received = remote_client.sent_bytes, remote_client.received_bytes
        for _ in range(repeats):
            for mode, fn in (("local", local), ("remote", remote)):
                start = time.perf_counter()
                jax.block_until_ready(fn())
                times[mode].append((time.perf_counter() - start) / new_tokens)
        trips = repeats * new_tokens
        up, down = (remote_client.sent_bytes - sent) / trips, (remote_client.received_bytes - received) / trips
    median = {k: statistics.median(v) for k, v in times.items()}
    return [f"{name:>4}: local {median['local'] * 1e3:7.2f} ms/token, remote {median['remote'] * 1e3:7.2f} ms/token "
            f"(remote/local {median['remote'] / median['local']:.2f}, +{(median['remote'] - median['local']) * 1e3:.2f}"
            f" ms per round trip); per token up {up:,.0f} B, down {down:,.0f} B (the prompt's message included)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32, help="text length of the step-time batches")
    parser.add_argument("--paper-length", type=int, default=256, help="text length of the paper-size messages")
    parser.add_argument("--downlink", default="fp32", choices=DOWNLINKS, help="downlink codec of the step-time runs")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per prompt in part 3")
    parser.add_argument("--tls", action="store_true", help="TLS instead of plaintext (loopback either way)")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}), grpc {grpc.__version__}, "
          f"{'TLS' if args.tls else 'plaintext'} over loopback")
    certs = Certificates(args.tls)
    try:
        print(f"\n1. One step's messages, random payload bytes, no model runs: paper size at batch {args.batch} x "
              f"text {args.paper_length}, tiny at batch {args.batch} x {args.length}; RD-FSQ 2-bit; socket = bytes "
              f"on the TCP connection per call (mean of {SOCKET_CALLS})")
        print(f"{'model':<6} {'text':<6} {'message':<10} {'payload B':>12} {'serialized B':>12} {'overhead':>8} "
              f"{'socket B':>12} {'overhead':>8}")
        for name, base, length in (("paper", T.TINYLLAVA_PAPER, args.paper_length), ("tiny", TINY, args.length)):
            for transport in TRANSPORTS:
                cfg = dataclasses.replace(base, text_transport=transport)
                print("\n".join(framing(name, cfg, args.batch, length, certs)))

        print(f"\n2. Step time over loopback, random weights, SGD, batch {args.batch} x text {args.length}, RD-FSQ "
              f"2-bit, downlink {args.downlink}: median of {args.repeats} interleaved steps after 2 warm-up steps; "
              f"bytes per step")
        for name, cfg in (("tiny", TINY), ("mid", MID)):
            print("\n".join(step_time(name, cfg, args.batch, args.length, args.downlink, args.repeats, certs)))

        print(f"\n3. Generation over loopback with quantized text embeddings, batch {args.batch} prompts x text "
              f"{args.length}, {args.new_tokens} new tokens, median of {args.repeats}: one round trip per token")
        for name, cfg in (("tiny", TINY), ("mid", MID)):
            print("\n".join(generation(name, cfg, args.batch, args.length, args.new_tokens, args.repeats, certs)))
    finally:
        certs.close()


if __name__ == "__main__":
    main()
