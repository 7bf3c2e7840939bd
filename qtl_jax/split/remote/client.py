"""The data owner's side of the network: a `Crossing` over gRPC (SPEC §6).

`RemoteCrossing.exchange` serializes the uplink (`wire.to_arrays`), sends it with its step id, validates the
downlink against the session's template and hands it back as host arrays; `SplitTrainer` does the rest exactly as
in `meshes` mode. Every call has a deadline (`deadline_s`) and carries the client id and its bearer token; a call
that fails with UNAVAILABLE or DEADLINE_EXCEEDED is retried with exponential backoff and full jitter, waiting for
the channel to come back (`wait_for_ready`), for at most `wait_s` in all, then fails with a message saying what
it waited for. A retried step is safe: the server applies each step id once and answers a repeat from its cache.

When the server restarted (the session is unknown to it), the crossing opens a new session: if the server holds
the client's current step, the step is simply sent again; otherwise both sides go back to the newest step both
hold and `Resync` tells the training loop to restore that checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence

import grpc
import numpy as np

from qtl_jax.models import tinyllava as T
from qtl_jax.split import wire
from qtl_jax.split.remote import protocol_pb2 as pb
from qtl_jax.split.remote import security
from qtl_jax.split.remote.server import SERVICE, arrays_from_proto, arrays_to_proto
from qtl_jax.split.runtime import Crossing, Resync, ServerReply

RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclasses.dataclass(frozen=True)
class ConnectConfig:
    """How the client reaches the server.

    Attributes:
      server: 'HOST:PORT'.
      client_id: who this client is (the server's tokens file names it).
      token: the bearer token.
      tls_ca: the CA certificate that signed the server's (TLS); empty with `insecure`.
      tls_cert, tls_key: this client's certificate and key (mutual TLS); empty otherwise.
      insecure: plaintext gRPC; only allowed on a loopback address.
      deadline_s: the deadline of one call.
      wait_s: the longest the client waits for an unreachable server, all retries together.
      max_message_bytes: the largest message either way.
    """

    server: str
    client_id: str
    token: str
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    insecure: bool = False
    deadline_s: float = 120.0
    wait_s: float = 300.0
    max_message_bytes: int = 64 * 2**20

    @classmethod
    def from_config(cls, split, max_message_bytes: int) -> ConnectConfig:
        """From a config's `split` section; the token is read from `split.token_file`."""
        if not split.server:
            raise ValueError("config.split.server: remote mode needs the server's HOST:PORT")
        if not split.token_file:
            raise ValueError("config.split.token_file: remote mode needs this client's token file")
        if not split.insecure and not split.tls_ca:
            raise ValueError("config.split.tls_ca: TLS needs the CA certificate that signed the server's (or "
                             "config.split.insecure=true on loopback)")
        return cls(server=split.server, client_id=split.client_id, token=security.read_token(split.token_file),
                   tls_ca=split.tls_ca, tls_cert=split.tls_cert, tls_key=split.tls_key, insecure=split.insecure,
                   deadline_s=split.deadline_s, wait_s=split.wait_s, max_message_bytes=max_message_bytes)


class RemoteClient:
    """A channel to the server with authenticated, deadline-bound, retried calls; counts the serialized bytes
    of every message (`sent_bytes`, `received_bytes`)."""

    def __init__(self, connect: ConnectConfig):
        self.connect = connect
        options = [("grpc.max_receive_message_length", connect.max_message_bytes),
                   ("grpc.max_send_message_length", connect.max_message_bytes)]
        if connect.insecure:
            security.check_plaintext_allowed(connect.server)
            self.channel = grpc.insecure_channel(connect.server, options=options)
        else:
            credentials = security.channel_credentials(connect.tls_ca, connect.tls_cert or None,
                                                       connect.tls_key or None)
            self.channel = grpc.secure_channel(connect.server, credentials, options=options)
        self.metadata = (("x-client-id", connect.client_id), ("authorization", f"Bearer {connect.token}"))
        self._unary = {name: self.channel.unary_unary(f"/{SERVICE}/{name}") for name in ("OpenSession", "Step")}
        self._generate = self.channel.stream_stream(f"/{SERVICE}/Generate")
        self.sent_bytes = self.received_bytes = 0

    def call(self, method: str, request, reply_cls):
        """One unary call: retried on UNAVAILABLE / DEADLINE_EXCEEDED for at most `wait_s` (backoff 0.1 s
        doubling to 5 s, full jitter); other statuses raise grpc.RpcError at once."""
        raw = request.SerializeToString()
        start, backoff = time.monotonic(), 0.1
        while True:
            try:
                reply = self._unary[method](raw, timeout=self.connect.deadline_s, metadata=self.metadata,
                                            wait_for_ready=True)
                break
            except grpc.RpcError as e:
                waited = time.monotonic() - start
                if e.code() not in RETRIED or waited >= self.connect.wait_s:
                    if e.code() in RETRIED:
                        raise ConnectionError(f"the server at {self.connect.server} did not answer {method} for "
                                              f"{waited:.0f} s (split.wait_s={self.connect.wait_s}): "
                                              f"{e.code().name} {e.details()}") from e
                    raise
                time.sleep(min(random.uniform(0, backoff), max(0.0, self.connect.wait_s - waited)))
                backoff = min(2 * backoff, 5.0)
        self.sent_bytes += len(raw)
        self.received_bytes += len(reply)
        return reply_cls.FromString(reply), len(raw), len(reply)

    def generate_stream(self, requests):
        return self._generate(requests, timeout=self.connect.deadline_s * 10, metadata=self.metadata,
                              wait_for_ready=True)

    def close(self) -> None:
        self.channel.close()


class RemoteCrossing(Crossing):
    """The crossing to a server in another process, for one stage.

    Args:
      client: the channel.
      model_config: the model as trained (the uplink and downlink templates come from it).
      fingerprint: this side of the session agreement (`wire.fingerprint`).
      stage, vocab_size, num_steps: what the session declares (the server builds its half from them).
      downlink: the downlink codec's name.
    """

    def __init__(self, client: RemoteClient, model_config: T.TinyLlavaConfig, fingerprint: dict, *, stage: str,
                 vocab_size: int, num_steps: int, downlink: str):
        self.client, self.model_config, self.fp = client, model_config, fingerprint
        self.stage, self.vocab_size, self.num_steps, self.downlink = stage, vocab_size, num_steps, downlink
        self.session_id = ""
        self.step = 0  # the last step the server acknowledged
        self.checkpoints: Callable[[], Sequence[int]] = lambda: ()

    def open(self, step: int, checkpoints: Sequence[int]) -> int:
        """Opens a session at the client's current `step` with the steps it holds checkpoints of; returns the
        step to continue from (the client restores it first when it differs from `step`)."""
        request = pb.OpenSessionRequest(protocol_version=wire.PROTOCOL_VERSION, client_id=self.client.connect.client_id,
                                        stage=self.stage, fingerprint=json.dumps(self.fp, sort_keys=True), step=step,
                                        checkpoints=sorted(checkpoints), vocab_size=self.vocab_size,
                                        num_steps=self.num_steps)
        reply, _, _ = self.client.call("OpenSession", request, pb.OpenSessionReply)
        self.session_id, self.step = reply.session_id, reply.resume_step
        return reply.resume_step

    def reopen(self) -> None:
        """After the server restarted: a new session at the client's current step; `Resync` when the server
        holds an older one only."""
        current = self.step
        if self.open(current, self.checkpoints()) != current:
            raise Resync(self.step)

    def exchange(self, step: int, uplink, checkpoint: bool = False) -> ServerReply:
        batch, length = (int(d) for d in uplink.labels.shape)
        request = pb.StepRequest(session_id=self.session_id, step=step, checkpoint=checkpoint, batch_size=batch,
                                 text_length=length, uplink=arrays_to_proto(wire.to_arrays(uplink)))
        try:
            reply, sent, received = self.client.call("Step", request, pb.StepReply)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise
            self.reopen()  # the server restarted
            request.session_id = self.session_id
            reply, sent, received = self.client.call("Step", request, pb.StepReply)
        self.step = step
        template = wire.downlink_template(self.model_config, self.downlink, batch, length)
        downlink = wire.from_arrays(template, arrays_from_proto(reply.downlink), "downlink")
        return ServerReply(np.float32(reply.ce_loss), downlink, {"up": sent, "down": received})

    def generate(self, uplink, *, max_new_tokens: int, eos_id: int, pad_id: int,
                 token_payload: Callable | None = None) -> np.ndarray:
        """Answers for a prompt uplink (`for_inference` codecs): int32[B, max_new_tokens]. With quantized text
        embeddings `token_payload(tokens int32[B, 1]) -> Payload` codes each generated token's row: one round trip
        per token. Generation changes nothing on the server, so a stream cut by a server restart is run again on
        a new session (waiting for the server as every call does)."""
        start = time.monotonic()
        while True:
            try:
                return self._generate(uplink, max_new_tokens, eos_id, pad_id, token_payload)
            except grpc.RpcError as e:
                if e.code() not in (*RETRIED, grpc.StatusCode.NOT_FOUND) or (
                        time.monotonic() - start > self.client.connect.wait_s):
                    raise
                self.reopen()

    def _generate(self, uplink, max_new_tokens, eos_id, pad_id, token_payload) -> np.ndarray:
        import queue

        batch, length = (int(d) for d in uplink.labels.shape)
        outgoing: queue.Queue = queue.Queue()
        outgoing.put(pb.GenerateRequest(session_id=self.session_id, batch_size=batch, text_length=length,
                                        uplink=arrays_to_proto(wire.to_arrays(uplink)),
                                        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id))

        def requests():
            while True:
                item = outgoing.get()
                if item is None:
                    return
                raw = item.SerializeToString()
                self.client.sent_bytes += len(raw)
                yield raw

        try:
            for raw in self.client.generate_stream(requests()):
                self.client.received_bytes += len(raw)
                reply = pb.GenerateReply.FromString(raw)
                (tokens,) = arrays_from_proto([reply.tokens])
                if reply.final:
                    return wire.from_arrays([np.zeros((batch, max_new_tokens), np.int32)], [tokens], "tokens")[0]
                if token_payload is None:
                    raise ValueError("the server asked for token rows, but this client sends token ids")
                new = wire.from_arrays([np.zeros((batch, 1), np.int32)], [tokens], "token")[0]
                payload = token_payload(new)
                outgoing.put(pb.GenerateRequest(session_id=self.session_id,
                                                token_rows=arrays_to_proto(wire.to_arrays(payload))))
        finally:
            outgoing.put(None)
        raise ConnectionError("the server closed the generation without its final tokens")
