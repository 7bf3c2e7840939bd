"""The split server's service over real gRPC on loopback: where a (re)opened session resumes (`resume_step`), the
session handshake, exactly-once steps, authentication (tokens, mutual TLS), a fuzz of malformed messages (each
refused with a client-side status, nothing applied), and two clients sharing one server half against an
in-process reference. One plaintext server serves the module; tests that need a fresh model build their own."""

import collections
import json
import threading
import time

import grpc
import jax
import numpy as np
import optax
import pytest

from qtl_jax.split import wire
from qtl_jax.split.remote import protocol_pb2 as pb
from qtl_jax.split.remote import security
from qtl_jax.split.remote.client import ConnectConfig, RemoteClient, RemoteCrossing
from qtl_jax.split.remote.server import SERVICE, RpcFailure, arrays_to_proto, resume_step
from qtl_jax.split.runtime import MODEL_KEYS, LocalCrossing, SplitConfig, SplitTrainer, to_mesh

from ..models.test_tinyllava import micro
from .test_remote import (
    CLIENT_MESH,
    SERVER_MESH,
    TOKENS,
    Served,
    _assert_params_close,
    _batch,
    _connect,
    _fingerprint,
    _params,
    _remote_trainer,
)

TIMEOUT = 10  # seconds: every raw call
# The module server knows these clients too (each test its own, so no test depends on another's steps).
EXTRA_TOKENS = {"carol": "c" * 32, "dave": "d" * 32, "erin": "e" * 32, "frank": "f" * 32}
ALL_TOKENS = {**TOKENS, **EXTRA_TOKENS}
CLIENT_SIDE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def model():
    """(cfg, host parameters, boxed): the tiny model, initialised once; `_copy` gives each user its own arrays
    (a server's step donates its parameters, which may alias the arrays it was built from)."""
    cfg = micro("rd_fsq")
    plain, boxed = _params(cfg)
    return cfg, jax.device_get(plain), boxed


def _copy(model):
    _, plain, boxed = model
    return jax.tree.map(np.array, plain), boxed


@pytest.fixture(scope="module")
def served(model):
    server = Served(model[0], params=_copy(model))
    server.core.tokens = dict(ALL_TOKENS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def channel(served):
    with grpc.insecure_channel(served.address) as ch:
        yield ch


def _md(client_id, token=None):
    return (("x-client-id", client_id), ("authorization", f"Bearer {token or ALL_TOKENS[client_id]}"))


def _unary(channel, method, raw, metadata):
    return channel.unary_unary(f"/{SERVICE}/{method}")(raw, timeout=TIMEOUT, metadata=metadata)


def _generate(channel, raws, metadata):
    return list(channel.stream_stream(f"/{SERVICE}/Generate")(iter(raws), timeout=TIMEOUT, metadata=metadata))


def _refused(fn, *args):
    """(status, details) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        fn(*args)
    return err.value.code(), err.value.details() or ""


def _open_request(cfg, client_id="alice", fingerprint=None, **fields):
    values = dict(protocol_version=wire.PROTOCOL_VERSION, client_id=client_id, stage="finetune",
                  fingerprint=json.dumps(_fingerprint(cfg, "fp32") if fingerprint is None else fingerprint),
                  step=0, vocab_size=cfg.lm.vocab_size, num_steps=100)
    values.update(fields)
    return pb.OpenSessionRequest(**values)


def _client(model, address, client_id):
    """A remote-mode client trainer of `client_id` (any of ALL_TOKENS) with its session open at step 0."""
    cfg = model[0]
    plain, boxed = _copy(model)
    crossing = RemoteCrossing(RemoteClient(_connect(address, client_id, token=ALL_TOKENS[client_id])), cfg,
                              _fingerprint(cfg, "fp32"), stage="finetune", vocab_size=cfg.lm.vocab_size,
                              num_steps=100, downlink="fp32")
    split = SplitConfig(mode="remote", client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH)
    trainer = SplitTrainer(cfg, split, optax.adam(1e-2), None, plain, boxed_like=boxed, crossing=crossing)
    assert crossing.open(0, ()) == 0
    return trainer, crossing


def _uplink(trainer, batch):
    """The uplink the client's forward makes of `batch` (what its next step would send), without stepping."""
    client = trainer.state["client"]
    data = to_mesh({k: batch[k] for k in MODEL_KEYS}, trainer.meshes["client"])
    with jax.set_mesh(trainer.meshes["client"]):
        return trainer._client_forward(client.trainable, client.frozen, data)[0]


def _step_request(session_id, step, uplink, **fields):
    return pb.StepRequest(session_id=session_id, step=step, batch_size=2, text_length=10,
                          uplink=arrays_to_proto(wire.to_arrays(uplink)), **fields)


def _state(served):
    """(host copy of the server's parameters, steps applied): what a refused message must not change."""
    half = served.core.half
    return jax.device_get(half.trainer.params()["server"]), half.step


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def _assert_unchanged(served, before):
    params, step = _state(served)
    assert step == before[1]
    assert _same(params, before[0])


# ------------------------------------------------------------------------------------------ resume_step
@pytest.mark.parametrize(("known", "current", "client_ckpts", "server_ckpts", "expected"), [
    # Both at the same step: nothing to do (with or without checkpoints).
    (0, 0, (), (), (0, False)),
    (7, 7, (3,), (0, 3, 5), (7, False)),
    # The client crashed (the server is ahead): the server goes back to the newest common checkpoint.
    (5, 3, {0, 3}, [0, 3, 5], (3, True)),
    (8, 4, {0, 2, 4}, [0, 2, 6, 8], (2, True)),  # the client's current step 4 has no server checkpoint
    (5, 0, (), [0, 5], (0, True)),  # a client that starts over: back to the server's step 0
    # The server lost steps (restarted from its checkpoint at `known`): the client goes back to `known`.
    (3, 5, {0, 3}, [0, 3], (3, False)),
    (3, 5, {0, 3, 4}, [0, 3], (3, False)),  # not to the client's newer checkpoint 4, which the server lacks
    # ... or to an older common checkpoint when the client holds none at `known` (the server restores it).
    (4, 6, {0, 2}, [0, 2, 4], (2, True)),
])
def test_resume_step_single_client(known, current, client_ckpts, server_ckpts, expected):
    assert resume_step(known, current, client_ckpts, server_ckpts, shared=False) == expected


@pytest.mark.parametrize(("known", "current", "client_ckpts", "server_ckpts"), [
    (5, 3, (), [0, 5]),  # the client's only state (3) is unknown to the server's checkpoints
    (5, 3, {1}, []),  # a server that keeps nothing on disk
    (3, 5, {4}, [0, 1, 2, 3]),  # the server lost steps and the client holds nothing at or before 3 in common
])
def test_resume_step_no_common_step(known, current, client_ckpts, server_ckpts):
    with pytest.raises(RpcFailure) as err:
        resume_step(known, current, client_ckpts, server_ckpts, shared=False)
    assert err.value.code == PRECONDITION
    message = err.value.message
    assert "no step is held by both sides" in message
    assert f"step {known} for this client" in message and f"client is at step {current}" in message
    assert str(sorted(server_ckpts)) in message and str(sorted(client_ckpts)) in message


@pytest.mark.parametrize(("known", "current", "client_ckpts", "server_ckpts", "expected", "single"), [
    (4, 4, (), (), (4, False), (4, False)),
    # A restarted client behind the shared model continues where it is (it replays; no rollback)...
    (5, 3, {0, 3}, [0, 3, 5], (3, False), (3, True)),
    (5, 0, (), [], (0, False), None),  # None: one client alone could not resume at all (nothing in common)
    # ... and a client ahead of the shared model goes back to its newest state the model has not overtaken.
    (3, 5, {0, 3}, [0, 3], (3, False), (3, False)),
    (4, 6, {0, 2}, [0, 2, 4], (2, False), (2, True)),
])
def test_resume_step_shared_never_restores(known, current, client_ckpts, server_ckpts, expected, single):
    assert resume_step(known, current, client_ckpts, server_ckpts, shared=True) == expected
    if single is None:
        with pytest.raises(RpcFailure):
            resume_step(known, current, client_ckpts, server_ckpts, shared=False)
    else:
        assert resume_step(known, current, client_ckpts, server_ckpts, shared=False) == single


def test_resume_step_shared_without_a_usable_state():
    with pytest.raises(RpcFailure) as err:
        resume_step(3, 5, {4}, [0, 3], shared=True)  # nothing at or before the model's step 3
    assert err.value.code == PRECONDITION


# ---------------------------------------------------------------------------------------------- handshake
@pytest.mark.parametrize(("field", "value", "expected"), [
    ("downlink", "nf8", "downlink: server 'fp32', client 'nf8'"),
    ("model.lm.num_transformer_layers", 3, "model.lm.num_transformer_layers: server 2, client 3"),
    ("model.text_codec.num_bits", 4, "model.text_codec.num_bits: server 2, client 4"),
    ("buckets", [10, 20], "buckets: server [10], client [10, 20]"),
    ("dtype", None, "dtype: server 'float32', client '(absent)'"),  # None: the client leaves the field out
])
def test_handshake_names_the_differing_field(model, served, channel, field, value, expected):
    cfg = model[0]
    fp = _fingerprint(cfg, "fp32")
    if value is None:
        del fp[field]
    else:
        fp[field] = value
    code, details = _refused(_unary, channel, "OpenSession",
                             _open_request(cfg, "frank", fp).SerializeToString(), _md("frank"))
    assert code == PRECONDITION
    assert expected in details
    assert details.count(": server ") == 1  # that field only
    # The same request with the server's fingerprint opens a session.
    reply = pb.OpenSessionReply.FromString(
        _unary(channel, "OpenSession", _open_request(cfg, "frank").SerializeToString(), _md("frank")))
    assert len(reply.session_id) == 32 and reply.resume_step == 0


def test_handshake_protocol_version_and_malformed_fingerprint(model, channel):
    cfg = model[0]

    def open_(request):
        return _refused(_unary, channel, "OpenSession", request.SerializeToString(), _md("frank"))

    code, details = open_(_open_request(cfg, "frank", protocol_version=wire.PROTOCOL_VERSION + 1))
    assert code == PRECONDITION
    assert f"server {wire.PROTOCOL_VERSION}, client {wire.PROTOCOL_VERSION + 1}" in details
    # The fingerprint carries the version too: an old client that sends the right field but an old fingerprint.
    fp = {**_fingerprint(cfg, "fp32"), "protocol_version": 0}
    code, details = open_(_open_request(cfg, "frank", fp))
    assert code == PRECONDITION and f"protocol_version: server {wire.PROTOCOL_VERSION}, client 0" in details
    for bad in ("{not json", "", '{"downlink": "fp32"', "[1, 2, 3]", "null", '"fp32"'):
        request = _open_request(cfg, "frank")
        request.fingerprint = bad
        code, details = open_(request)
        assert code == INVALID, bad
        assert "fingerprint" in details and ("not JSON" in details or "JSON object" in details), bad


def test_deeply_nested_fingerprint_is_invalid_argument(model, channel):
    request = _open_request(model[0], "frank")
    request.fingerprint = "[" * 20000 + "]" * 20000  # 40 kB: well inside the message limit
    code, details = _refused(_unary, channel, "OpenSession", request.SerializeToString(), _md("frank"))
    assert code == INVALID and "fingerprint" in details


@pytest.mark.parametrize("what", ["fingerprint value", "fingerprint keys", "stage", "dtype", "shape"])
def test_refusals_with_oversized_client_text_keep_their_status(model, served, channel, what):
    """Each request is refused anyway; its refusal would echo >16 kB of client-chosen text into the details."""
    cfg = model[0]
    fp, long = _fingerprint(cfg, "fp32"), "x" * 30000
    if what == "fingerprint value":
        method, request, expected = "OpenSession", _open_request(cfg, "frank", {**fp, "downlink": long}), PRECONDITION
    elif what == "fingerprint keys":
        extra = {f"unknown_field_{i}": i for i in range(1500)}
        method, request, expected = "OpenSession", _open_request(cfg, "frank", {**fp, **extra}), PRECONDITION
    elif what == "stage":
        method, request, expected = "OpenSession", _open_request(cfg, "frank", stage=long), INVALID
    else:
        trainer, crossing = _client(model, served.address, "frank")
        try:
            method, request = "Step", _step_request(crossing.session_id, 1, _uplink(trainer, _batch(1)))
        finally:
            crossing.client.close()
        expected = INVALID
        if what == "dtype":
            request.uplink[0].dtype = long
        else:
            del request.uplink[0].shape[:]
            request.uplink[0].shape.extend([7] * 8000)
    code, details = _refused(_unary, channel, method, request.SerializeToString(), _md("frank"))
    assert code == expected, (code, details[:200])


# -------------------------------------------------------------------------------------------- exactly-once
def test_exactly_once_steps(model, served, channel):
    trainer, crossing = _client(model, served.address, "carol")
    try:
        recorded = []
        send = crossing.client._unary["Step"]

        def recording(raw, **kw):
            reply = send(raw, **kw)
            recorded.append((raw, reply))
            return reply

        crossing.client._unary["Step"] = recording
        before = _state(served)
        metrics = trainer.step(_batch(3), 1)
        (raw_request, raw_reply), = recorded
        after_1 = _state(served)
        assert after_1[1] == before[1] + 1 and not _same(after_1[0], before[0])  # the step was applied
        assert served.core.half.sessions["carol"] == 1

        # The same step again (a retry after a lost reply): the byte-identical reply, nothing applied twice.
        assert _unary(channel, "Step", raw_request, _md("carol")) == raw_reply
        _assert_unchanged(served, after_1)
        reply = pb.StepReply.FromString(raw_reply)
        assert reply.step == 1 and reply.ce_loss == float(metrics["ce_loss"])

        # Skipping a step, or going back before the last one, is refused and applies nothing.
        for wrong in (3, 0, -1, 10**12):
            request = pb.StepRequest.FromString(raw_request)
            request.step = wrong
            code, details = _refused(_unary, channel, "Step", request.SerializeToString(), _md("carol"))
            assert code == PRECONDITION and "expected step 2" in details, (wrong, details)
            _assert_unchanged(served, after_1)

        # The session goes on with step 2; then only step 2 is cached, step 1 is refused (not applied again).
        trainer.step(_batch(4), 2)
        after_2 = _state(served)
        assert after_2[1] == after_1[1] + 1 and served.core.half.sessions["carol"] == 2
        code, details = _refused(_unary, channel, "Step", raw_request, _md("carol"))
        assert code == PRECONDITION and "expected step 3" in details
        _assert_unchanged(served, after_2)
    finally:
        crossing.client.close()


class _SlowDisk:
    """A checkpoint manager whose saves land on disk `delay` seconds late (a slow disk): `save` starts the real one
    (arrays copied to the host at once), and the step shows in `all_steps` only once a timer has run and the real
    save has finished; `wait_until_finished` waits for both. A save waits for the previous one, as orbax does."""

    def __init__(self, ckpt, delay: float = 0.5):
        self.ckpt, self.delay, self.landing, self.pending = ckpt, delay, None, None

    def save(self, step, args):
        self.wait_until_finished()
        self.ckpt.save(step, args=args)
        self.pending = step
        self.landing = threading.Thread(target=time.sleep, args=(self.delay,), daemon=True)
        self.landing.start()

    def wait_until_finished(self):
        if self.landing is not None:
            self.landing.join()
        self.ckpt.wait_until_finished()
        self.pending = None

    def all_steps(self):
        return [s for s in self.ckpt.all_steps() if s != self.pending]

    def __getattr__(self, name):
        return getattr(self.ckpt, name)


def test_a_stage_last_step_is_on_disk_before_its_reply(model, tmp_path):
    """Within a stage a save may land after its reply (both sides go back to the newest step both hold); at a
    client's last step it may not: the client goes on to the next stage and never returns to this one."""
    cfg = model[0]
    served = Served(cfg, params=_copy(model), workdir=str(tmp_path))
    crossing = None
    try:
        trainer, crossing = _remote_trainer(cfg, served.address, params=_copy(model), num_steps=2)
        half = served.core.half
        half.ckpt.wait_until_finished()
        half.ckpt = _SlowDisk(half.ckpt)
        trainer.step(_batch(1), 1, checkpoint=True)
        assert half.checkpoints() == [0]  # step 1 is still being written: the reply did not wait for it
        trainer.step(_batch(2), 2, checkpoint=True)
        assert half.checkpoints()[-1] == 2  # the stage's last step: on disk before the reply
        assert (tmp_path / "checkpoints" / "2").is_dir()
    finally:
        if crossing is not None:
            crossing.client.close()
        served.stop()


# ---------------------------------------------------------------------------------------------- security
def test_tokens_and_session_ownership(model, served, channel):
    cfg = model[0]
    trainer, crossing = _client(model, served.address, "alice")
    try:
        alice_session = crossing.session_id
        bob_reply = pb.OpenSessionReply.FromString(_unary(channel, "OpenSession",
                                                          _open_request(cfg, "bob").SerializeToString(), _md("bob")))
        raw = _step_request(alice_session, 1, _uplink(trainer, _batch(5))).SerializeToString()
        before = _state(served)
        refusals = [
            ("no metadata", "Step", (), UNAUTHENTICATED),
            ("client id, no token", "Step", (("x-client-id", "alice"),), UNAUTHENTICATED),
            ("token, no client id", "Step", (("authorization", f"Bearer {TOKENS['alice']}"),), UNAUTHENTICATED),
            ("wrong token", "Step", _md("alice", "z" * 32), UNAUTHENTICATED),
            ("token without Bearer", "Step", (("x-client-id", "alice"), ("authorization", TOKENS["alice"])),
             UNAUTHENTICATED),
            ("bob's token as alice", "Step", _md("alice", TOKENS["bob"]), UNAUTHENTICATED),
            ("unknown client", "Step", _md("mallory", TOKENS["alice"]), UNAUTHENTICATED),
            ("bob with alice's session", "Step", _md("bob"), grpc.StatusCode.PERMISSION_DENIED),
            ("open as alice with bob's token", "OpenSession", _md("alice", TOKENS["bob"]), UNAUTHENTICATED),
        ]
        for name, method, metadata, expected in refusals:
            body = _open_request(cfg, "alice").SerializeToString() if method == "OpenSession" else raw
            code, details = _refused(_unary, channel, method, body, metadata)
            assert code == expected, name
            assert details, name
            _assert_unchanged(served, before)
            assert served.core.half.sessions["alice"] == 0, name
        code, _ = _refused(_generate, channel, [b""], _md("alice", TOKENS["bob"]))
        assert code == UNAUTHENTICATED
        # Alice's own session was neither replaced nor used: the very same message from her applies once.
        assert alice_session in served.core.sessions and bob_reply.session_id in served.core.sessions
        assert pb.StepReply.FromString(_unary(channel, "Step", raw, _md("alice"))).step == 1
        after = _state(served)
        assert after[1] == before[1] + 1 and not _same(after[0], before[0])
        assert served.core.half.sessions["alice"] == 1
    finally:
        crossing.client.close()


def test_mutual_tls(model, tmp_path):
    cfg = model[0]
    pki = security.make_certificates(str(tmp_path / "pki"), clients=("alice",))
    other = security.make_certificates(str(tmp_path / "other"), clients=("alice",))
    credentials = security.server_credentials(pki["server.pem"], pki["server.key"], client_ca_file=pki["ca.pem"])
    served = Served(cfg, credentials=credentials, params=_copy(model))
    raw = _open_request(cfg, "alice").SerializeToString()

    def status_with(channel, metadata=None):
        with channel:
            return _refused(_unary, channel, "OpenSession", raw, metadata or _md("alice"))[0]

    try:
        assert status_with(grpc.insecure_channel(served.address)) == grpc.StatusCode.UNAVAILABLE
        # A certificate from another CA (trusting the right server), and a client that trusts another CA.
        stranger = security.channel_credentials(pki["ca.pem"], other["alice.pem"], other["alice.key"])
        assert status_with(grpc.secure_channel(served.address, stranger)) == grpc.StatusCode.UNAVAILABLE
        misled = security.channel_credentials(other["ca.pem"], pki["alice.pem"], pki["alice.key"])
        assert status_with(grpc.secure_channel(served.address, misled)) == grpc.StatusCode.UNAVAILABLE
        # No client certificate at all (mutual TLS required).
        anonymous = security.channel_credentials(pki["ca.pem"])
        assert status_with(grpc.secure_channel(served.address, anonymous)) == grpc.StatusCode.UNAVAILABLE
        # The right certificate still needs the right token.
        right = security.channel_credentials(pki["ca.pem"], pki["alice.pem"], pki["alice.key"])
        assert status_with(grpc.secure_channel(served.address, right), _md("alice", "z" * 32)) == UNAUTHENTICATED
        assert served.core.half is None and not served.core.sessions  # nothing got through so far
        # Certificate and token: the client opens its session.
        client = RemoteClient(ConnectConfig(server=served.address, client_id="alice", token=TOKENS["alice"],
                                            tls_ca=pki["ca.pem"], tls_cert=pki["alice.pem"], tls_key=pki["alice.key"],
                                            wait_s=1, deadline_s=5))
        try:
            crossing = RemoteCrossing(client, cfg, _fingerprint(cfg, "fp32"), stage="finetune",
                                      vocab_size=cfg.lm.vocab_size, num_steps=100, downlink="fp32")
            assert crossing.open(0, ()) == 0
            assert served.core.sessions[crossing.session_id].client_id == "alice"
        finally:
            client.close()
    finally:
        served.stop()


# ---------------------------------------------------------------------------------------------------- fuzz
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "bool")
UNKNOWN_DTYPES = ("object", "complex128", "", "float1024", "<f4", "U8", "void", "datetime64", "str", "\u00e9",
                  "uint8 ")


def _mutations(rng, base: pb.StepRequest, other_session: str, bad_open: bytes):
    """Yields (class, method, raw request(s), metadata or None for the fuzzing client's, expected status or None
    for any client-side one), ~600 in all."""

    def step_copy():
        request = pb.StepRequest()
        request.CopyFrom(base)
        return request

    def pick_array(request):
        return request.uplink[int(rng.integers(len(request.uplink)))]

    def random_bytes():
        return rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes()

    for _ in range(80):
        yield "random bytes", "OpenSession", random_bytes(), None, None
        yield "random bytes", "Step", random_bytes(), None, None
        yield "random bytes", "Generate", [random_bytes() for _ in range(int(rng.integers(1, 3)))], None, None
    # Byte-level mutations (overwrite, insert, delete) of messages wrong in a field no single mutation can mend
    # (an unknown session, a wrong protocol version and stage): whatever still parses must be refused on its merits.
    def mutated(raw):
        data = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            op, at = int(rng.integers(3)), int(rng.integers(len(data) + 1))
            if op == 0 and at < len(data):
                data[at] = int(rng.integers(256))
            elif op == 1:
                data.insert(at, int(rng.integers(256)))
            else:
                del data[at:at + int(rng.integers(1, 8))]
        return bytes(data)

    stranger = step_copy()
    stranger.session_id = "0" * 32
    stranger = stranger.SerializeToString()
    prompt = pb.GenerateRequest(session_id="0" * 32, batch_size=2, text_length=10, max_new_tokens=4,
                                uplink=base.uplink).SerializeToString()
    for _ in range(30):
        yield "mutated message", "OpenSession", mutated(bad_open), _md("frank"), None
        yield "mutated message", "Step", mutated(stranger), None, None
        yield "mutated message", "Generate", [mutated(prompt)], None, None
    for method in ("OpenSession", "Step"):
        yield "empty message", method, b"", None, None
    yield "empty stream", "Generate", [], None, INVALID
    for _ in range(10):
        yield "no token", ("OpenSession", "Step")[int(rng.integers(2))], random_bytes(), (), UNAUTHENTICATED
    for _ in range(35):
        request = step_copy()
        array = pick_array(request)
        array.data = array.data[:int(rng.integers(0, len(array.data)))]
        yield "truncated array", "Step", request.SerializeToString(), None, INVALID
        request = step_copy()
        array = pick_array(request)
        array.data = array.data + rng.bytes(int(rng.integers(1, 64)))
        yield "padded array", "Step", request.SerializeToString(), None, INVALID
        request = step_copy()
        array = pick_array(request)
        array.dtype = str(rng.choice([d for d in DTYPES if d != array.dtype]))
        yield "wrong dtype", "Step", request.SerializeToString(), None, INVALID
        request = step_copy()
        pick_array(request).dtype = str(rng.choice(UNKNOWN_DTYPES))
        yield "unknown dtype", "Step", request.SerializeToString(), None, INVALID
        request = step_copy()
        array = pick_array(request)
        shape = list(array.shape)
        kind = int(rng.integers(4))
        if kind == 0 and shape:
            shape[int(rng.integers(len(shape)))] += int(rng.choice([-1, 1, 7]))
        elif kind == 1:
            shape = [*shape, 1]
        elif kind == 2:
            shape = shape[:-1]
        else:
            shape = [-int(np.prod(shape))]
        del array.shape[:]
        array.shape.extend(shape)
        yield "wrong shape", "Step", request.SerializeToString(), None, INVALID
        request = step_copy()
        array = pick_array(request)
        del array.shape[:]
        array.shape.extend([int(rng.choice([2**40, 2**62, 2**63 - 1]))] + [2**31] * int(rng.integers(0, 3)))
        yield "huge shape", "Step", request.SerializeToString(), None, INVALID
    for wrong in (0, -1, 2, 3, 10**12, 2**63 - 1, -(2**63)):
        request = step_copy()
        request.step = wrong
        yield "step id", "Step", request.SerializeToString(), None, PRECONDITION
    for session_id in ("", "0" * 32, base.session_id[:-1], base.session_id.upper(), "x" * 500):
        request = step_copy()
        request.session_id = session_id
        yield "unknown session", "Step", request.SerializeToString(), None, grpc.StatusCode.NOT_FOUND
    request = step_copy()
    request.session_id = other_session
    yield "another client's session", "Step", request.SerializeToString(), None, grpc.StatusCode.PERMISSION_DENIED
    for batch_size, text_length in ((0, 10), (1, 10), (3, 10), (-2, 10), (2**31 - 1, 10), (2, 0), (2, 9), (2, 11),
                                    (2, -10), (2, 256), (1, 5)):
        request = step_copy()
        request.batch_size, request.text_length = batch_size, text_length
        yield "batch shape", "Step", request.SerializeToString(), None, INVALID
    request = step_copy()
    del request.uplink[:]
    yield "empty uplink", "Step", request.SerializeToString(), None, INVALID
    for _ in range(5):
        request = step_copy()
        request.uplink.append(pick_array(request))
        yield "extra array", "Step", request.SerializeToString(), None, INVALID
        request = step_copy()
        del request.uplink[int(rng.integers(len(request.uplink)))]
        yield "missing array", "Step", request.SerializeToString(), None, INVALID
        request = step_copy()
        request.uplink.reverse()
        yield "arrays out of order", "Step", request.SerializeToString(), None, INVALID
    # Generation on the fuzzing client's own session, each prompt wrong in one way.
    for fields in ({"batch_size": 0}, {"batch_size": 3}, {"text_length": 11}, {"max_new_tokens": 0},
                   {"max_new_tokens": -1}, {"max_new_tokens": 10**6}, {"uplink": []}, {"truncate": True}):
        prompt = pb.GenerateRequest(session_id=base.session_id, batch_size=2, text_length=10, max_new_tokens=4,
                                    uplink=base.uplink)
        if fields.pop("truncate", False):
            prompt.uplink[0].data = prompt.uplink[0].data[:-1]
        if "uplink" in fields:
            del prompt.uplink[:]
            fields.pop("uplink")
        for key, value in fields.items():
            setattr(prompt, key, value)
        yield "bad prompt", "Generate", [prompt.SerializeToString()], None, INVALID
    unknown = pb.GenerateRequest(session_id="0" * 32, batch_size=2, text_length=10, max_new_tokens=4)
    yield "unknown session", "Generate", [unknown.SerializeToString()], None, grpc.StatusCode.NOT_FOUND


def _open_mutations(cfg, rng):
    """Malformed or mismatched OpenSession requests of the fuzzing client (none may replace its session)."""
    fp = _fingerprint(cfg, "fp32")
    cases = [({"protocol_version": 0}, PRECONDITION), ({"protocol_version": 2}, PRECONDITION),
             ({"protocol_version": 2**32 - 1}, PRECONDITION), ({"stage": "pretrain"}, INVALID),
             ({"stage": ""}, INVALID), ({"vocab_size": 0}, INVALID), ({"vocab_size": -1}, INVALID),
             ({"vocab_size": 2**40}, INVALID), ({"num_steps": 0}, INVALID), ({"num_steps": -5}, INVALID),
             ({"step": -1}, INVALID), ({"checkpoints": [0, -3]}, INVALID),
             ({"vocab_size": cfg.lm.vocab_size + 1}, PRECONDITION), ({"num_steps": 99}, PRECONDITION),
             ({"fingerprint": {**fp, "batch_size": 4}}, PRECONDITION),
             ({"fingerprint": {**fp, "stage": "pretrain"}}, PRECONDITION),
             ({"fingerprint": {**fp, "unknown_field": 1}}, PRECONDITION),
             ({"fingerprint": {}}, PRECONDITION)]
    for _ in range(12):
        text = json.dumps(fp)
        cut = int(rng.integers(1, len(text)))
        cases.append(({"fingerprint_text": text[:cut]}, INVALID))
    for fields, expected in cases:
        fields = dict(fields)
        text = fields.pop("fingerprint_text", None)
        request = _open_request(cfg, "dave", **fields)
        if text is not None:
            request.fingerprint = text
        yield "bad open", "OpenSession", request.SerializeToString(), None, expected


def test_fuzz_malformed_messages(model, served, channel):
    cfg = model[0]
    trainer, crossing = _client(model, served.address, "dave")
    try:
        other = pb.OpenSessionReply.FromString(
            _unary(channel, "OpenSession", _open_request(cfg, "erin").SerializeToString(), _md("erin"))).session_id
        batch = _batch(11)
        base = _step_request(crossing.session_id, 1, _uplink(trainer, batch))
        session_id, before = crossing.session_id, _state(served)
        rng = np.random.default_rng(0)
        bad_open = _open_request(cfg, "frank", protocol_version=7, stage="finetunX").SerializeToString()
        statuses, per_class = collections.Counter(), collections.defaultdict(collections.Counter)
        start = time.monotonic()
        cases = [*_mutations(rng, base, other, bad_open), *_open_mutations(cfg, rng)]
        for what, method, raw, metadata, expected in cases:
            metadata = _md("dave") if metadata is None else metadata
            call = _generate if method == "Generate" else (lambda ch, r, md, m=method: _unary(ch, m, r, md))
            try:
                call(channel, raw, metadata)
                code, details = None, "(accepted)"
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            statuses[code] += 1
            per_class[what][code] += 1
            assert code in CLIENT_SIDE, (what, method, code, details)
            assert expected is None or code == expected, (what, method, code, details)
            assert details.strip(), (what, method, code)
            assert time.monotonic() - start < 240, "the fuzz is too slow"
        assert sum(statuses.values()) >= 500, statuses
        # Every class of deliberate defect is represented, and mutated bytes get past parsing to later checks.
        assert len(per_class) >= 21, dict(per_class)
        assert len(per_class["random bytes"] + per_class["mutated message"]) >= 3, dict(per_class)
        # Nothing was applied, and the fuzzing client's session survived (a malformed open replaces nothing).
        _assert_unchanged(served, before)
        assert served.core.sessions[session_id].last_step == 0 and served.core.half.sessions["dave"] == 0

        # One valid step goes through and answers exactly what the in-process reference answers for the same
        # batch from the same parameters (the server's as they are now, the client's initial ones).
        plain, boxed = _copy(model)
        reference = SplitTrainer(cfg, SplitConfig(mode="meshes", client_mesh=CLIENT_MESH, server_mesh=SERVER_MESH),
                                 optax.adam(1e-2), optax.adam(1e-2), {"client": plain["client"], "server": before[0]},
                                 boxed_like=boxed)
        downlinks = {}
        for name, crosser in (("remote", crossing), ("reference", reference.crossing)):
            exchange = crosser.exchange

            def recording(*args, _exchange=exchange, _name=name, **kw):
                reply = _exchange(*args, **kw)
                downlinks[_name] = wire.to_arrays(reply.downlink)
                return reply

            crosser.exchange = recording
        remote_metrics, reference_metrics = trainer.step(batch, 1), reference.step(batch, 1)
        assert crossing.session_id == session_id  # the session that took all the fuzz
        assert float(remote_metrics["ce_loss"]) == pytest.approx(float(reference_metrics["ce_loss"]), rel=1e-6)
        assert downlinks["remote"] == downlinks["reference"]  # dtype, shape and bytes of every array
        assert served.core.half.step == before[1] + 1 and served.core.sessions[session_id].last_step == 1
        _assert_params_close(trainer.params()["client"], reference.params()["client"])
    finally:
        crossing.client.close()


# ------------------------------------------------------------------------------------------------ generation
def test_a_generation_the_client_fails_ends_with_its_status_and_frees_the_model(model, served, monkeypatch):
    """With quantized text rows the server waits for the client's rows of each new token. A client that sends
    malformed rows, closes its stream or stops answering gets INVALID_ARGUMENT, CANCELLED or DEADLINE_EXCEEDED
    after the first token; each time the generation's decode loop ends and the model is free: the client's next
    training step is served."""
    from qtl_jax.split.remote import server as S

    monkeypatch.setattr(S, "TOKEN_WAIT_S", 1.0)
    trainer, crossing = _client(model, served.address, "frank")
    try:
        prompt = pb.GenerateRequest(session_id=crossing.session_id, batch_size=2, text_length=10, max_new_tokens=4,
                                    eos_id=-1, uplink=arrays_to_proto(wire.to_arrays(_uplink(trainer, _batch(3)))))
        raw = prompt.SerializeToString()
        call = lambda requests: crossing.client.channel.stream_stream(f"/{SERVICE}/Generate")(
            requests, timeout=TIMEOUT, metadata=_md("frank"))
        silent = threading.Event()

        def stops_answering():
            yield raw
            silent.wait(TIMEOUT)  # holds the stream open without sending the rows

        cases = [("malformed rows", iter([raw, pb.GenerateRequest(token_rows=[]).SerializeToString()]), INVALID),
                 ("stream closed", iter([raw]), grpc.StatusCode.CANCELLED),
                 ("no answer", stops_answering(), grpc.StatusCode.DEADLINE_EXCEEDED)]
        for step, (what, requests, expected) in enumerate(cases, start=1):
            replies = []
            with pytest.raises(grpc.RpcError) as err:
                for reply in call(requests):
                    replies.append(pb.GenerateReply.FromString(reply))
            assert err.value.code() == expected, (what, err.value.details())
            assert len(replies) == 1 and not replies[0].final, what  # the first token, then the failure
            trainer.step(_batch(step), step)  # the model is free again (a held lock would outlast the call deadline)
            assert served.core.sessions[crossing.session_id].last_step == step
    finally:
        silent.set()
        crossing.client.close()


# --------------------------------------------------------------------------------------------- two clients
def test_two_clients_share_the_server_half(model):
    cfg = model[0]
    served = Served(cfg, params=_copy(model))
    clients = {}
    try:
        for name in ("alice", "bob"):
            clients[name] = _remote_trainer(cfg, served.address, client_id=name, params=_copy(model))
        plain, boxed = _copy(model)
        reference_server = SplitTrainer(cfg, SplitConfig(mode="meshes", client_mesh=CLIENT_MESH,
                                                         server_mesh=SERVER_MESH),
                                        None, optax.adam(1e-2), plain, boxed_like=boxed, halves=("server",))
        references = {}
        for name in ("alice", "bob"):
            plain, boxed = _copy(model)
            references[name] = SplitTrainer(cfg, SplitConfig(mode="remote", client_mesh=CLIENT_MESH,
                                                              server_mesh=SERVER_MESH),
                                             optax.adam(1e-2), None, plain, boxed_like=boxed,
                                             crossing=LocalCrossing(reference_server))
        seeds = {"alice": 100, "bob": 200}
        for step in range(1, 4):
            for name in ("alice", "bob"):
                b = _batch(seeds[name] + step)
                remote_loss = float(clients[name][0].step(b, step)["ce_loss"])
                reference_loss = float(references[name].step(b, step)["ce_loss"])
                assert remote_loss == pytest.approx(reference_loss, rel=1e-6), (name, step)
        assert served.core.half.step == 6 and served.core.half.sessions == {"alice": 3, "bob": 3}
        _assert_params_close(served.core.half.trainer.params()["server"], reference_server.params()["server"])
        for name in ("alice", "bob"):
            _assert_params_close(clients[name][0].params()["client"], references[name].params()["client"])

        # Both sessions at once, from two threads: every step is applied, once.
        errors = []

        def run(name):
            try:
                for step in range(4, 7):
                    float(clients[name][0].step(_batch(seeds[name] + step), step)["ce_loss"])
            except Exception as e:  # reported below
                errors.append((name, e))

        threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in ("alice", "bob")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)
        assert not errors, errors
        assert served.core.half.step == 12 and served.core.half.sessions == {"alice": 6, "bob": 6}
        for name, (_, crossing) in clients.items():
            assert served.core.sessions[crossing.session_id].last_step == 6, name
    finally:
        for _, crossing in clients.values():
            crossing.client.close()
        served.stop()
