"""The model owner's side of a networked split run: the server half behind a gRPC service (SPEC §6).

`SplitServer` is the service's logic, transport aside (tested directly and through gRPC):

* **Sessions.** A client opens one per stage with its id, the protocol version and the fingerprint of everything
  both sides must agree on (`wire.fingerprint`); a mismatch fails at once (FAILED_PRECONDITION) naming every
  differing field with both values. The first session of a stage builds the server half (`stages.build`) with
  the client's vocabulary size and step count, and restores the server's newest checkpoint of the stage.
* **Exactly-once steps.** Each session remembers the last step id it applied and that step's reply: the same id
  again gets the cached reply (a retry after a lost reply or a deadline), the next id is applied, anything else
  gets FAILED_PRECONDITION naming the expected id. Every array is checked against the session's templates
  before decoding (`wire.from_arrays`); a malformed message gets INVALID_ARGUMENT and changes nothing.
* **Coordinated checkpoints.** A step sent with `checkpoint` is saved (orbax, atomic; the save starts before
  the reply goes out and, at a client's last step of the stage, is on disk before it), and step 0 is saved when
  a stage starts, so the server always holds every step the client holds a checkpoint of, or a newer one. On
  (re)opening, `resume_step` picks the newest step both hold; the server restores it when it is not there
  already, and the client is told to.
* **Several clients.** Steps are serialized on the one model in arrival order (a lock); each client has its own
  session and step ids. A rollback would discard other clients' updates, so with several clients the server
  never restores: a client that restarts from an older checkpoint replays its lost steps, and those updates
  reach the server's model twice (bitwise recovery holds for one client per server).
* **Evaluation.** `generate` runs the server's generation on a prompt uplink; with quantized text embeddings
  each generated token costs one round trip: the server sends the token, the client answers with its row. A
  generation holds the model (training steps donate its parameters), so other clients' steps wait for it; a
  client that stops answering is dropped after `TOKEN_WAIT_S`.

Authentication (tokens, TLS) and the gRPC glue are at the bottom: `make_grpc_server`.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import jax
import numpy as np
from google.protobuf.message import DecodeError

from qtl_jax import checkpoint, sharding
from qtl_jax.models import tinyllava as T
from qtl_jax.split import multihost, wire
from qtl_jax.split.remote import protocol_pb2 as pb
from qtl_jax.split.remote import security
from qtl_jax.split.runtime import SplitTrainer, to_mesh

SERVICE = "qtl_jax.split.Split"
# The longest a generation may wait for the client's next token rows.
TOKEN_WAIT_S = 120.0
MAX_NEW_TOKENS = 4096


class RpcFailure(Exception):
    """A refusal with its gRPC status code; the service answers it and keeps serving."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _fail(code: grpc.StatusCode, message: str):
    raise RpcFailure(code, message)


# ---------------------------------------------------------------------------------------------- arrays
def arrays_to_proto(arrays: list[wire.WireArray]) -> list[pb.Array]:
    return [pb.Array(dtype=a.dtype, shape=a.shape, data=a.data) for a in arrays]


def arrays_from_proto(arrays) -> list[wire.WireArray]:
    return [wire.WireArray(a.dtype, tuple(a.shape), a.data) for a in arrays]


# ------------------------------------------------------------------------------------------------ state
@dataclasses.dataclass
class StageHalf:
    """One stage's server half as the server runs it.

    Attributes:
      stage: "pretrain" or "finetune".
      trainer: a `SplitTrainer` holding the server half only.
      fingerprint: the server's side of the session agreement (`wire.fingerprint`).
      vocab_size, num_steps: what the first client declared; later clients must agree.
      batch_size: the training batch; buckets: the legal text lengths; eval_batch_size: the largest prompt batch.
      ckpt: the stage's checkpoint manager (None: the server keeps nothing on disk).
      step: steps applied, over all clients; sessions: {client id: its last applied step}.
      max_new_tokens: the most tokens a generation may ask for.
      accum_steps: micro-batches per optimizer step (a client has finished the stage after num_steps x this).
    """

    stage: str
    trainer: SplitTrainer
    fingerprint: dict
    vocab_size: int
    num_steps: int
    batch_size: int
    buckets: tuple[int, ...]
    eval_batch_size: int
    ckpt: Any = None
    step: int = 0
    sessions: dict = dataclasses.field(default_factory=dict)
    max_new_tokens: int = MAX_NEW_TOKENS
    accum_steps: int = 1
    _token_rows: Any = dataclasses.field(default=None, repr=False, compare=False)
    # Process 0 of a multi-process server: announces every operation on the model to the other processes, which
    # do the same (`follow`); None on a single-process server and on the followers themselves.
    leader: multihost.Leader | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def model_config(self) -> T.TinyLlavaConfig:
        return self.trainer.model_config

    def finished(self, step: int) -> bool:
        return step >= self.num_steps * self.accum_steps

    def token_rows(self):
        """Jitted (server params, token payload) -> rows the LM reads (inference codecs): made once per stage, so
        that each generation does not compile it again."""
        if self._token_rows is None:
            server = T.TinyLlavaServer(self.model_config.for_inference(), self.trainer.dtype)
            self._token_rows = jax.jit(lambda p, payload: server.apply({"params": p}, payload,
                                                                       method=T.TinyLlavaServer.token_rows))
        return self._token_rows

    def checkpoints(self) -> list[int]:
        return [] if self.ckpt is None else sorted(self.ckpt.all_steps())

    def save(self, durable: bool = False) -> None:
        """Starts saving the half at `self.step` (asynchronous, `checkpoint.save_state`): it returns once the
        arrays are on the host, so the reply goes out, and the next step may donate the state buffers, while the
        files are written. Asynchronous is safe for the protocol *within* a stage, which resumes from the newest
        step both sides hold on disk: a save waits for the previous one, so a crash loses at most the newest
        step, whose `STEP` folder then never appears (orbax renames a finished temporary folder); the server
        restarts from its previous checkpoint, which the client still holds (it keeps two, and waits for its own
        previous save before it sends a step that asks for a checkpoint), and both go back there.

        Not at a client's last step of the stage (`durable`): once answered, the client goes on to the next stage
        and never comes back to this one, so the save must be on disk before the reply (every process of a
        multi-process server waits for it). `restore` and `ckpt.close()` wait for a pending save."""
        if self.ckpt is not None:
            self._announce("save", step=self.step, sessions=self.sessions, durable=durable)
            checkpoint.save_state(self.ckpt, self.trainer, self.step, None, {"sessions": self.sessions}, None)
            if durable:
                self.ckpt.wait_until_finished()

    def restore(self, step: int) -> None:
        self._announce("restore", step=step)
        _, totals = checkpoint.restore_state(self.ckpt, self.trainer, step, None)
        self.step, self.sessions = step, dict(totals["sessions"])

    def server_step(self, uplink) -> tuple[float, tuple]:
        """The server step on an uplink of host arrays: (ce_loss, the downlink payloads as host arrays). On a
        multi-process server every process runs it: process 0 announces it with the uplink, and the downlink is
        gathered from all of them."""
        if self.leader is not None:
            batch, length = (int(d) for d in uplink.labels.shape)
            request = pb.StepRequest(batch_size=batch, text_length=length,
                                     uplink=arrays_to_proto(wire.to_arrays(uplink)))
            self.leader.announce("step", request.SerializeToString())
        ce, _, downlink = self.trainer.server_step(uplink)
        ce, downlink = sharding.to_host((ce, downlink))
        return float(ce), downlink

    def generate(self, request: pb.GenerateRequest, uplink, next_rows: Callable | None) -> np.ndarray:
        """Answers for a checked prompt (`request`, its `uplink` decoded): int32[B, max_new_tokens] on the host.
        With quantized text embeddings every new token's rows come from `next_rows(tokens int32[B, 1])`, which
        returns the checked GenerateRequest that carries them (or raises: the generation ends there).

        On a multi-process server every process runs it, in lockstep: process 0 announces the prompt and then each
        token's rows, or "abort" when `next_rows` fails; the followers' `next_rows` receives them. The prompt and
        the rows enter the mesh as every step's uplink does (`runtime.to_mesh`), and each token is gathered to
        every process (`sharding.to_host`, inside `generate`)."""
        if self.leader is not None:
            self.leader.announce_for_holder("generate", request.SerializeToString())
        cfg = self.model_config.for_inference()
        mesh = self.trainer.meshes["server"]
        multi = jax.process_count() > 1  # one process: the host arrays go in as they are (placed by jit)
        place = (lambda tree: to_mesh(tree, mesh)) if multi else (lambda tree: tree)
        params = self.trainer.params()["server"]
        embed = None
        if cfg.quantized_text:
            template = wire.token_rows_template(cfg, int(request.batch_size))
            rows = self.token_rows()

            def embed(tokens):
                try:  # decoded (so checked) before the rows are announced to the other processes
                    rows_request = next_rows(np.asarray(tokens))
                    payload = wire.from_arrays(template, arrays_from_proto(rows_request.token_rows), "token rows")
                except Exception:
                    if self.leader is not None:
                        self.leader.announce_for_holder("abort")
                    raise
                if self.leader is not None:
                    self.leader.announce_for_holder("token_rows", rows_request.SerializeToString())
                return rows(params, place(payload))

        return T.server_generate(cfg, params, place(uplink), self.trainer.dtype,
                                 max_new_tokens=request.max_new_tokens, eos_id=request.eos_id,
                                 pad_id=request.pad_id, embed=embed)

    def close(self) -> None:
        self._announce("close")
        if self.ckpt is not None:
            self.ckpt.close()

    def _announce(self, command: str, **fields) -> None:
        if self.leader is not None:
            self.leader.announce(command, **fields)


class Stages:
    """Where the server gets a stage's half: `fingerprint(stage, vocab_size)` (the server's side of the session
    agreement) and `build(stage, vocab_size, num_steps)` -> StageHalf. `qtl_jax.split.serve` builds them from a
    config file; tests from parameters."""

    names: tuple[str, ...] = ()

    def fingerprint(self, stage: str, vocab_size: int) -> dict:
        raise NotImplementedError

    def build(self, stage: str, vocab_size: int, num_steps: int) -> StageHalf:
        raise NotImplementedError


class ParamStages(Stages):
    """One stage served from parameters already in memory (tests, benchmarks, research code): the server half of
    `params` with optimizer `tx`, a fingerprint from `fingerprint_fields` (`wire.fingerprint`'s keyword
    arguments but the stage), and checkpoints in `workdir/checkpoints` when `workdir` is given."""

    def __init__(self, model_config: T.TinyLlavaConfig, split, tx, params, *, boxed_like=None, trainable=None,
                 stage: str = "finetune", batch_size: int, buckets, eval_batch_size: int | None = None,
                 dtype: str = "float32", workdir: str | None = None, max_length: int = 0):
        self.model_config, self.split, self.tx, self.params = model_config, split, tx, params
        self.boxed_like, self.trainable, self.names = boxed_like, trainable, (stage,)
        self.batch_size, self.buckets = batch_size, tuple(int(b) for b in buckets)
        self.eval_batch_size, self.dtype = eval_batch_size or batch_size, dtype
        self.workdir, self.max_length = workdir, max_length or max(self.buckets)

    def fingerprint(self, stage: str, vocab_size: int) -> dict:
        return wire.fingerprint(self.model_config, stage=stage, downlink=self.split.downlink, buckets=self.buckets,
                                batch_size=self.batch_size, max_length=self.max_length, dtype=self.dtype)

    def build(self, stage: str, vocab_size: int, num_steps: int) -> StageHalf:
        # A copy: the server step donates its parameters, and a later build must find the initial ones.
        params = jax.tree.map(np.array, self.params)
        trainer = SplitTrainer(self.model_config, self.split, None, self.tx, params, dtype=jax.numpy.dtype(
            self.dtype), boxed_like=self.boxed_like, trainable=self.trainable, halves=("server",))
        return StageHalf(stage, trainer, self.fingerprint(stage, vocab_size), vocab_size, num_steps, self.batch_size,
                         self.buckets, self.eval_batch_size,
                         ckpt=checkpoint.manager(self.workdir) if self.workdir else None)


def resume_step(known: int, current: int, client_checkpoints, server_checkpoints, shared: bool) -> tuple[int, bool]:
    """Where a (re)opened session continues: (step, whether the server restores its checkpoint of it).

    known: the step the server's model holds for this client; current: the step the client's state is at;
    client_checkpoints / server_checkpoints: the steps each side can restore; shared: other clients train the
    same model, so the server may not roll back. Raises RpcFailure when no step is held by both sides."""
    client_steps = {current, *client_checkpoints}
    if known == current:
        return current, False
    if shared:  # the model stays; the client continues from its newest state the server has not overtaken...
        held = [s for s in client_steps if s <= known] if current > known else [current]
        if held:
            return max(held), False
    else:
        options = {s: s != known for s in client_steps & set(server_checkpoints)}
        if known in client_steps:
            options[known] = False
        if options:
            step = max(options)
            return step, options[step]
    _fail(grpc.StatusCode.FAILED_PRECONDITION,
          f"no step is held by both sides: the server's model is at step {known} for this client and holds "
          f"checkpoints {sorted(server_checkpoints)}; the client is at step {current} with checkpoints "
          f"{sorted(client_checkpoints)}")


@dataclasses.dataclass
class Session:
    client_id: str
    stage: str
    last_step: int
    cached: bytes | None = None  # the serialized reply to last_step


class SplitServer:
    """The service's logic (see the module docstring). `tokens` = {client id: bearer token}.

    In process 0 of a multi-process server (`jax.distributed`, `qtl_jax.split.multihost`) it leads: every
    operation on the model is announced to the other processes, which run `follow`; `close` stops them."""

    def __init__(self, stages: Stages, tokens: dict[str, str], log: Callable[[str], None] = print):
        self.stages, self.tokens, self.log = stages, dict(tokens), log
        self.lock = threading.RLock()
        self.leader = None
        if jax.process_count() > 1:
            if jax.process_index() != 0:
                raise RuntimeError("process 0 serves; the other processes of the server run `follow`")
            self.leader = multihost.Leader(self.lock)
            self.leader.start()
        self.half: StageHalf | None = None
        self.sessions: dict[str, Session] = {}

    # -- authentication ------------------------------------------------------------------------------
    def authenticate(self, metadata) -> str:
        """The client id of a call whose metadata carries `x-client-id` and `authorization: Bearer TOKEN`
        matching that client's token (constant time); UNAUTHENTICATED otherwise."""
        meta = dict(metadata or ())
        client_id, auth = meta.get("x-client-id", ""), meta.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if not security.token_matches(self.tokens, client_id, token):
            _fail(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token for this client id")
        return client_id

    # -- sessions ------------------------------------------------------------------------------------
    def open_session(self, client_id: str, request: pb.OpenSessionRequest) -> pb.OpenSessionReply:
        if request.protocol_version != wire.PROTOCOL_VERSION:
            _fail(grpc.StatusCode.FAILED_PRECONDITION, f"protocol version: server {wire.PROTOCOL_VERSION}, client "
                                                       f"{request.protocol_version}")
        if request.stage not in self.stages.names:
            _fail(grpc.StatusCode.INVALID_ARGUMENT,
                  f"stage {request.stage[:64]!r}: the server runs {self.stages.names}")
        if not 0 < request.vocab_size <= 2**31 - 1 or not 0 < request.num_steps <= 2**40:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, f"vocab_size {request.vocab_size} and num_steps "
                                                    f"{request.num_steps} must be positive")
        if request.step < 0 or any(s < 0 for s in request.checkpoints):
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "steps must be >= 0")
        try:
            theirs = json.loads(request.fingerprint)
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
            _fail(grpc.StatusCode.INVALID_ARGUMENT, f"fingerprint is not JSON: {e}")
        if not isinstance(theirs, dict):
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "fingerprint must be a JSON object")
        with self.lock:
            ours = self.stages.fingerprint(request.stage, int(request.vocab_size))
            differences = wire.fingerprint_differences(ours, theirs)
            if differences:
                _fail(grpc.StatusCode.FAILED_PRECONDITION,
                      "the client's configuration differs from the server's: " + "; ".join(differences))
            half = self._stage_half(client_id, request)
            known = half.sessions.get(client_id, 0)
            shared = any(c != client_id for c in half.sessions)
            step, restore = resume_step(known, int(request.step), set(request.checkpoints), half.checkpoints(),
                                        shared)
            if restore:
                half.restore(step)
                self.log(f"[serve] {half.stage}: restored step {step} for client {client_id!r}")
            half.sessions[client_id] = step
            for sid in [s for s, v in self.sessions.items() if v.client_id == client_id]:
                del self.sessions[sid]  # a client has one session at a time
            session_id = secrets.token_hex(16)
            self.sessions[session_id] = Session(client_id, half.stage, step)
            self.log(f"[serve] {half.stage}: session for client {client_id!r} at step {step}")
            return pb.OpenSessionReply(session_id=session_id, resume_step=step)

    def _stage_half(self, client_id: str, request) -> StageHalf:
        half = self.half
        if half is not None and half.stage == request.stage:
            if (half.vocab_size, half.num_steps) != (request.vocab_size, request.num_steps):
                _fail(grpc.StatusCode.FAILED_PRECONDITION,
                      f"vocab_size / num_steps: server {half.vocab_size} / {half.num_steps}, client "
                      f"{request.vocab_size} / {request.num_steps}")
            return half
        if half is not None:
            # UNAVAILABLE: the client waits and asks again (its retries), as for a server that is not up yet.
            others = sorted({s.client_id for s in self.sessions.values() if s.client_id != client_id
                             and s.stage == half.stage and not half.finished(s.last_step)})
            if others:
                _fail(grpc.StatusCode.UNAVAILABLE,
                      f"the server is in stage {half.stage!r} with clients {others}; stage {request.stage!r} "
                      f"starts when they are done")
            half.close()
            self.sessions = {k: v for k, v in self.sessions.items() if v.stage == request.stage}
        self.half = None
        if self.leader is not None:
            self.leader.announce("build", stage=request.stage, vocab_size=int(request.vocab_size),
                                 num_steps=int(request.num_steps))
        half = self.stages.build(request.stage, int(request.vocab_size), int(request.num_steps))
        half.leader = self.leader
        steps = half.checkpoints()
        if steps:
            half.restore(steps[-1])
            self.log(f"[serve] {half.stage}: resumed from checkpoint {steps[-1]}")
        else:
            half.save()  # step 0: a fresh start can always be gone back to
        self.half = half
        return half

    def _session(self, client_id: str, session_id: str) -> tuple[Session, StageHalf]:
        session = self.sessions.get(session_id)
        if session is None:
            _fail(grpc.StatusCode.NOT_FOUND, "unknown session (the server may have restarted): open a new one")
        if session.client_id != client_id:
            _fail(grpc.StatusCode.PERMISSION_DENIED, "this session belongs to another client")
        if self.half is None or self.half.stage != session.stage:
            _fail(grpc.StatusCode.FAILED_PRECONDITION, f"the session's stage {session.stage!r} is over")
        return session, self.half

    # -- steps ---------------------------------------------------------------------------------------
    def step(self, client_id: str, request: pb.StepRequest) -> bytes:
        """Applies a step once; returns the serialized StepReply (cached for a retry)."""
        with self.lock:
            session, half = self._session(client_id, request.session_id)
            if request.step == session.last_step and session.cached is not None:
                return session.cached
            if request.step != session.last_step + 1:
                _fail(grpc.StatusCode.FAILED_PRECONDITION,
                      f"step {request.step}: expected step {session.last_step + 1} (or {session.last_step} again)")
            if request.batch_size != half.batch_size or request.text_length not in half.buckets:
                _fail(grpc.StatusCode.INVALID_ARGUMENT,
                      f"batch {request.batch_size} x {request.text_length}: expected batch size {half.batch_size} "
                      f"and a text length in {half.buckets}")
            template = wire.uplink_template(half.model_config, request.batch_size, request.text_length)
            try:
                uplink = wire.from_arrays(template, arrays_from_proto(request.uplink), "uplink")
            except wire.WireError as e:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            ce, downlink = half.server_step(uplink)
            half.step += 1
            half.sessions[client_id] = session.last_step = request.step
            if request.checkpoint:
                half.save(durable=half.finished(request.step))
            reply = pb.StepReply(step=request.step, ce_loss=ce,
                                 downlink=arrays_to_proto(wire.to_arrays(downlink)))
            session.cached = reply.SerializeToString()
            return session.cached

    # -- evaluation ----------------------------------------------------------------------------------
    def generate(self, client_id: str, requests: Iterator[pb.GenerateRequest]) -> Iterator[bytes]:
        """Generation on a prompt uplink (the first request); with quantized text embeddings, the rows of every
        generated token come from the client (one round trip each). Yields serialized GenerateReply.

        Three threads: this one (holding the lock for the whole generation, so no step and no announcement comes
        between), a reader of the client's stream, and the decode loop (`StageHalf.generate`), which hands each
        new token out and waits at most `TOKEN_WAIT_S` for its rows. This one waits for the decode loop to end
        before it lets go of the lock, whether the generation finishes, fails or the client goes away."""
        first = next(requests, None)
        if first is None:
            _fail(grpc.StatusCode.INVALID_ARGUMENT, "a generation starts with the prompt")
        with self.lock:
            _, half = self._session(client_id, first.session_id)
            cfg = half.model_config.for_inference()
            batch = first.batch_size
            if not 0 < batch <= half.eval_batch_size or first.text_length not in half.buckets:
                _fail(grpc.StatusCode.INVALID_ARGUMENT,
                      f"prompt batch {batch} x {first.text_length}: expected at most {half.eval_batch_size} prompts "
                      f"and a text length in {half.buckets}")
            if not 0 < first.max_new_tokens <= half.max_new_tokens:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens {first.max_new_tokens}: expected 1 to "
                                                        f"{half.max_new_tokens}")
            try:
                uplink = wire.from_arrays(wire.uplink_template(cfg, batch, first.text_length),
                                          arrays_from_proto(first.uplink), "prompt uplink")
            except wire.WireError as e:
                _fail(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            incoming: queue.Queue = queue.Queue()  # the client's token-row requests; None: its stream ended
            replies: queue.Queue = queue.Queue()  # GenerateReply to send, or the exception that ended the work

            def read():
                try:
                    for request in requests:
                        incoming.put(request)
                except Exception as e:  # a malformed request (RpcFailure) or the stream's own failure
                    incoming.put(e)
                incoming.put(None)

            def next_rows(tokens):
                replies.put(pb.GenerateReply(tokens=arrays_to_proto(wire.to_arrays(tokens))[0]))
                try:
                    item = incoming.get(timeout=TOKEN_WAIT_S)
                except queue.Empty:
                    _fail(grpc.StatusCode.DEADLINE_EXCEEDED, f"no token rows from the client in {TOKEN_WAIT_S} s")
                if item is None:
                    _fail(grpc.StatusCode.CANCELLED, "the client closed the generation")
                if isinstance(item, Exception):
                    raise item
                return item  # its rows are decoded, so checked, in `StageHalf.generate`

            def work():
                try:
                    tokens = half.generate(first, uplink, next_rows)
                    final = wire.to_arrays(np.asarray(tokens, np.int32))[0]
                    replies.put(pb.GenerateReply(tokens=arrays_to_proto([final])[0], final=True))
                except wire.WireError as e:  # malformed token rows
                    replies.put(RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(e)))
                except Exception as e:  # handed to the stream, which answers it as a status
                    replies.put(e)

            threading.Thread(target=read, daemon=True).start()
            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            try:
                while True:
                    item = replies.get()  # the worker always ends: each wait for the client is bounded
                    if isinstance(item, RpcFailure):
                        raise item
                    if isinstance(item, Exception):
                        _fail(grpc.StatusCode.INTERNAL, f"generation failed: {type(item).__name__}: {item}")
                    yield item.SerializeToString()
                    if item.final:
                        return
            finally:  # the client went away, or a failure: wake the worker if it waits, and let it finish
                incoming.put(None)
                worker.join()

    def close(self) -> None:
        with self.lock:
            if self.half is not None:
                self.half.close()
            if self.leader is not None:
                self.leader.stop()


class GenerationAborted(Exception):
    """On a follower: process 0 ended the generation it announced (the client failed to send a token's rows)."""


def _follow_rows(tokens) -> pb.GenerateRequest:
    """A follower's `next_rows`: the token rows process 0 announces next (already checked there)."""
    command, _, payload = multihost.receive()
    if command == "abort":
        raise GenerationAborted()
    if command != "token_rows":
        raise ValueError(f"process {jax.process_index()}: {command!r} from process 0 in the middle of a generation")
    return pb.GenerateRequest.FromString(payload)


def follow(stages: Stages, log: Callable[[str], None] = print) -> None:
    """Processes 1..N-1 of a multi-process server: do to their own copy of the server half what process 0's
    `SplitServer` announces (`multihost.Leader`), in the same order, until it stops. Each operation is a
    collective over every process's devices (a step, a save, a restore, building a half), so each must run it;
    refused requests are never announced. Returns when process 0 closes; raises on a command it does not know."""
    half: StageHalf | None = None
    while True:
        command, fields, payload = multihost.receive()
        if command == "stop":
            return
        if command == "build":
            half = stages.build(fields["stage"], fields["vocab_size"], fields["num_steps"])
        elif command == "step":
            request = pb.StepRequest.FromString(payload)
            template = wire.uplink_template(half.model_config, request.batch_size, request.text_length)
            half.server_step(wire.from_arrays(template, arrays_from_proto(request.uplink), "uplink"))
        elif command == "save":
            half.step, half.sessions = fields["step"], fields["sessions"]
            half.save(fields["durable"])
        elif command == "restore":
            half.restore(fields["step"])
        elif command == "generate":
            request = pb.GenerateRequest.FromString(payload)
            cfg = half.model_config.for_inference()
            uplink = wire.from_arrays(wire.uplink_template(cfg, request.batch_size, request.text_length),
                                      arrays_from_proto(request.uplink), "prompt uplink")
            try:
                half.generate(request, uplink, _follow_rows)
            except GenerationAborted:
                pass
        elif command == "close":
            half.close()
        elif command != "noop":
            raise ValueError(f"process {jax.process_index()}: unknown command {command!r} from process 0")
        if command in ("build", "restore"):
            log(f"[serve] process {jax.process_index()}: {command} {fields}")


# ------------------------------------------------------------------------------------------------ gRPC
MAX_DETAILS = 2000  # status details travel in gRPC metadata (16 kB at most): a refusal never quotes more


def _guard(context, fn):
    """Runs `fn`, answering an RpcFailure with its status (the server keeps serving). The details are cut to
    `MAX_DETAILS` characters: they may quote what the client sent."""
    try:
        return fn()
    except RpcFailure as e:
        message = e.message if len(e.message) <= MAX_DETAILS else e.message[:MAX_DETAILS] + " ... (truncated)"
        context.abort(e.code, message)


def _parse(message_cls, raw: bytes):
    try:
        return message_cls.FromString(raw)
    except (DecodeError, RuntimeError, ValueError) as e:
        _fail(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {message_cls.__name__}: {e}")


def _handlers(server: SplitServer) -> grpc.GenericRpcHandler:
    # Raw bytes in and out: parsing happens here, so that a malformed message gets INVALID_ARGUMENT with what
    # was wrong (not gRPC's INTERNAL "Exception deserializing request"), and replies are cached serialized.
    def open_session(raw, context):
        client_id = _guard(context, lambda: server.authenticate(context.invocation_metadata()))
        return _guard(context, lambda: server.open_session(client_id, _parse(pb.OpenSessionRequest, raw))
                      ).SerializeToString()

    def step(raw, context):
        client_id = _guard(context, lambda: server.authenticate(context.invocation_metadata()))
        return _guard(context, lambda: server.step(client_id, _parse(pb.StepRequest, raw)))

    def generate(raw_requests, context):
        client_id = _guard(context, lambda: server.authenticate(context.invocation_metadata()))
        requests = (_parse(pb.GenerateRequest, raw) for raw in raw_requests)
        stream = server.generate(client_id, requests)
        while True:
            item = _guard(context, lambda: next(stream, None))
            if item is None:
                return
            yield item

    return grpc.method_handlers_generic_handler(SERVICE, {
        "OpenSession": grpc.unary_unary_rpc_method_handler(open_session),
        "Step": grpc.unary_unary_rpc_method_handler(step),
        "Generate": grpc.stream_stream_rpc_method_handler(generate),
    })


def make_grpc_server(server: SplitServer, address: str, *, credentials: grpc.ServerCredentials | None,
                     max_message_bytes: int, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A started gRPC server for `server` on `address` ('HOST:PORT'; port 0 picks a free one): TLS with
    `credentials`, plaintext with None (loopback only). Returns (grpc server, bound port)."""
    if credentials is None:
        security.check_plaintext_allowed(address)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=[
        ("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0)])
    grpc_server.add_generic_rpc_handlers((_handlers(server),))
    port = (grpc_server.add_secure_port(address, credentials) if credentials is not None
            else grpc_server.add_insecure_port(address))
    if not port:
        raise OSError(f"could not bind the server to {address}")
    grpc_server.start()
    return grpc_server, port
