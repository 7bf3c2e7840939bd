"""The server half across several JAX processes (hosts): one server mesh over all their devices.

A TPU pod slice or a few GPU hosts run one JAX process per host; after `jax.distributed.initialize`
`jax.devices()` lists every process's devices and one mesh spans them all, so `split.server_mesh`'s fsdp and
tensor axes cross the hosts. JAX is multi-controller: every process must run every computation on that mesh
(and every orbax save and restore of it), in the same order. The gRPC service runs in process 0 only, so:

    process 0 (leader)                               processes 1..N-1 (followers)
    gRPC service, SplitServer (checks, sessions)     remote.server.follow(stages)
      a request that changes the model:
        Leader.announce(command)      == broadcast ==>  receive(): the same command
        the operation (collectives)   <== lockstep ==>  the same operation on their copy of the half
      reply (from the gathered arrays)

What is announced is what process 0 is about to do to the model (build a stage's half, a step on an uplink, a
save, a restore, a generation, a close), never a request: a refused request (bad token, wrong step id, malformed arrays)
changes nothing, so it is not announced and the followers never see it. Announcements are made while holding
the server's lock, so their order is the order of the operations. The uplink of a step travels in the
announcement; every process builds the global arrays from the same host arrays with
`jax.make_array_from_process_local_data` (`runtime.to_mesh`), and the downlink is gathered back to every process
(`sharding.to_host`) before process 0 replies.

A generation is a run of operations: process 0 announces the prompt ("generate"), then, with quantized text
embeddings, each new token's rows as the client sends them ("token_rows"), or "abort" when the client fails to;
every token is gathered to every process, so all of them see the same tokens and stop at the same one.

Broadcasts are collectives over the processes' devices (`multihost_utils.broadcast_one_to_all`): on CPU, gloo
over TCP (the default CPU collectives in jax 0.10.2); on GPUs NCCL, on TPUs the slice's interconnect.
"""

from __future__ import annotations

import json
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

# A broadcast's bytes are padded to a power of two (at least this many), so each padded size compiles once.
MIN_BROADCAST_BYTES = 1024
# The longest the followers wait in one broadcast while the server is idle: the leader then announces a no-op,
# so that no collective waits longer than the backends' collective time-outs.
KEEPALIVE_S = 60.0


def initialize(coordinator: str = "", num_processes: int | None = None, process_id: int | None = None,
               cpu_devices: int | None = None) -> None:
    """`jax.distributed.initialize` for a server group; arguments left empty are found by JAX where it can (TPU pod
    slices, SLURM, Open MPI). `cpu_devices`: this process's virtual devices on a CPU-only machine (accelerators
    are unaffected). Call before anything touches a JAX backend."""
    if cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    jax.distributed.initialize(coordinator or None, num_processes, process_id)


def check_server_mesh(shape) -> None:
    """Raises ValueError unless a server mesh of `shape` (data, fsdp, tensor) takes every device of every process:
    each process must hold part of it to follow the steps, and devices left out would idle."""
    need, have = int(np.prod(shape)), jax.device_count()
    if need != have:
        raise ValueError(f"the server mesh {tuple(shape)} has {need} devices; the {jax.process_count()} processes "
                         f"have {have} ({jax.local_device_count()} each): on several processes the server mesh "
                         f"must use all of them")


def broadcast(message: bytes | None) -> bytes:
    """Process 0's `message` on every process (the others pass None): its length, then its bytes. A collective:
    every process calls it, in the same order."""
    leader = jax.process_index() == 0
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(message) if leader else 0)))
    padded = max(MIN_BROADCAST_BYTES, 1 << max(size - 1, 0).bit_length())
    buffer = np.zeros(padded, np.uint8)
    if leader:
        buffer[:size] = np.frombuffer(message, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size].tobytes()


def _encode(command: str, fields: dict, payload: bytes) -> bytes:
    header = json.dumps({"command": command, **fields}).encode()
    return len(header).to_bytes(4, "big") + header + payload


def receive() -> tuple[str, dict, bytes]:
    """A follower's next announcement: (command, its JSON fields, its raw payload)."""
    message = broadcast(None)
    size = int.from_bytes(message[:4], "big")
    fields = json.loads(message[4:4 + size])
    return fields.pop("command"), fields, message[4 + size:]


class Leader:
    """Process 0's side: `announce` tells the followers what it is about to do to the model.

    Args:
      lock: the lock that serializes the server's operations (`SplitServer.lock`): each announcement is made,
        and the operation it announces done, while holding it. The keep-alive takes it too, so a no-op never
        falls between an announcement and its operation.
    """

    def __init__(self, lock: threading.RLock):
        self.lock = lock
        self.last = time.monotonic()
        self._stopped = threading.Event()
        self._keepalive = threading.Thread(target=self._keep_alive, daemon=True)

    def announce(self, command: str, payload: bytes = b"", **fields) -> None:
        with self.lock:
            self.announce_for_holder(command, payload, **fields)

    def announce_for_holder(self, command: str, payload: bytes = b"", **fields) -> None:
        """`announce` from a thread that works for the lock's holder while the holder waits for it (a generation's
        decode loop, `remote.server.SplitServer.generate`): the holder keeps every other announcement out, and
        taking the lock here would wait for the holder, which waits for this thread."""
        if self._stopped.is_set():  # nobody would take part in the broadcast: it would wait for ever
            raise RuntimeError(f"announcing {command!r}: the other server processes have been stopped")
        broadcast(_encode(command, fields, payload))
        self.last = time.monotonic()

    def start(self) -> None:
        """Makes the first broadcast at once, then starts the keep-alive (a no-op after `KEEPALIVE_S` without
        announcements). The first collective over a set of processes connects them, and gloo gives the peers of
        a connection a limited time to arrive (`Connect timeout`): the followers wait for the first announcement
        from their start, so it must not wait for the first client."""
        self.announce("noop")
        self._keepalive.start()

    def stop(self) -> None:
        """Tells the followers to return (once); the keep-alive ends with them."""
        with self.lock:
            if not self._stopped.is_set():
                self.announce("stop")
                self._stopped.set()

    def _keep_alive(self) -> None:
        while not self._stopped.wait(KEEPALIVE_S / 4):
            with self.lock:
                if not self._stopped.is_set() and time.monotonic() - self.last >= KEEPALIVE_S:
                    self.announce("noop")
