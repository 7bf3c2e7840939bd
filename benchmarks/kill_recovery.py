"""Crash recovery of a networked split run: SIGKILL the server or the client at a random step, restart it with the
same command, and check that the finished run equals an uninterrupted one, bit for bit.

Each trial starts the server (`python -m qtl_jax.split.serve`) and the client (`python train.py ...
--config.split.mode=remote`) as processes on 127.0.0.1, both stages of the tiny preset on the smoke-sized
Shapes-VQA (3 steps a stage, a checkpoint every 2 steps, step 0 included), kills one side once the client has
logged a random step (1 to 6), restarts it, waits for the client to finish, and compares both halves' final
parameters of both stages with those of the reference run (one uninterrupted networked run, first).

    python benchmarks/kill_recovery.py [--trials 20] [--sides server,client] [--seed 0] [--out DIR]

Prints one line per trial and, per side, how many trials matched (target: all). Every process is started and
stopped here; every wait is bounded (`--timeout` seconds a run).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "k" * 32
STEPS_PER_STAGE = 3


def smoke_flags(data_dir: str) -> list[str]:
    """The config of `tests/conftest.py:smoke_config` as flags (tests compare with the run made from that), with
    frequent checkpoints and one evaluated example (neither changes what is trained)."""
    return ["--config", os.path.join(ROOT, "configs", "finetune.py"), f"--config.data.data_dir={data_dir}",
            "--config.data.shapes_config=smoke", "--config.data.buckets=(64,)", "--config.optim.batch_size=4",
            "--config.stage1.optim.batch_size=4", "--config.optim.min_steps=0", "--config.stage1.optim.min_steps=0",
            f"--config.optim.max_steps={STEPS_PER_STAGE}", "--config.log_every=1", "--config.checkpoint_every=2",
            "--config.eval.max_examples=1", "--config.eval.batch_size=8", "--config.split.client_mesh=(2,1,1)",
            "--config.split.server_mesh=(1,2,2)"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One networked run: its server and client commands, started and restarted here."""

    def __init__(self, folder: str, data_dir: str, port: int):
        self.folder, self.port = folder, port
        os.makedirs(folder, exist_ok=True)
        tokens, token = os.path.join(folder, "tokens.txt"), os.path.join(folder, "client0.token")
        with open(tokens, "w") as f:
            f.write(f"client0 {TOKEN}\n")
        with open(token, "w") as f:
            f.write(TOKEN)
        flags = smoke_flags(data_dir)
        address = f"127.0.0.1:{port}"
        self.commands = {
            "server": [sys.executable, "-m", "qtl_jax.split.serve", *flags, "--workdir",
                       os.path.join(folder, "server"), "--address", address, "--insecure", "--tokens", tokens],
            "client": [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--workdir",
                       os.path.join(folder, "client"), "--config.split.mode=remote", f"--config.split.server={address}",
                       "--config.split.insecure=true", f"--config.split.token_file={token}",
                       "--config.split.wait_s=300"]}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, side: str) -> None:
        log = open(os.path.join(self.folder, f"{side}.log"), "a")
        log.write(f"[kill_recovery] starting the {side}\n")
        log.flush()
        self.procs[side] = subprocess.Popen(self.commands[side], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": ROOT})

    def kill(self, side: str) -> None:
        self.procs[side].send_signal(signal.SIGKILL)
        self.procs[side].wait(30)

    def client_steps(self) -> int:
        """Training steps the client has logged, both stages together."""
        total = 0
        for stage in ("pretrain", "finetune"):
            path = os.path.join(self.folder, "client", stage, "metrics.jsonl")
            if os.path.isfile(path):
                with open(path) as f:
                    total += sum(1 for line in f if '"ce_loss"' in line)
        return total

    def wait_client(self, timeout: float) -> int:
        try:
            return self.procs["client"].wait(timeout)
        except subprocess.TimeoutExpired:
            self.procs["client"].kill()
            raise

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def final_params(folder: str) -> dict:
    """{(stage, half): host params} of a run's two processes."""
    from qtl_jax import checkpoint

    out = {}
    for stage in ("pretrain", "finetune"):
        for half in ("client", "server"):
            out[stage, half] = checkpoint.final_params(os.path.join(folder, half, stage))[half]
    return out


def equal(a: dict, b: dict) -> bool:
    import jax

    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for key in a for x, y in zip(jax.tree.leaves(a[key]), jax.tree.leaves(b[key]), strict=True))


def run(folder: str, data_dir: str, timeout: float, kills: Sequence[tuple[str, int]] = ()) -> float:
    """One networked run in `folder` (server and client), killing and restarting each `(side, after_step)` of
    `kills` in turn once the client has logged that many steps; returns the wall time. Raises on a client failure
    or a time-out."""
    start = time.monotonic()
    r = Run(folder, data_dir, free_port())
    try:
        r.start("server")
        r.start("client")
        for side, after in kills:
            while r.client_steps() < after:
                if r.procs["client"].poll() is not None or time.monotonic() - start > timeout:
                    raise RuntimeError(f"the client ended or stalled before step {after}; see {folder}/client.log")
                time.sleep(0.05)
            r.kill(side)
            r.start(side)
        code = r.wait_client(max(1.0, timeout - (time.monotonic() - start)))
        if code:
            raise RuntimeError(f"the client exited with {code}; see {folder}/client.log")
    finally:
        r.stop()
    return time.monotonic() - start


def prepare_data(data_dir: str) -> None:
    """The smoke Shapes-VQA, generated once before the trials (so that no trial times its generation)."""
    from qtl_jax.data import builders

    builders.prepare_shapes(data_dir, "smoke")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--sides", default="server,client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", default="", help="keep the runs here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="kill_recovery_")
    data_dir = os.path.join(out, "tfds")
    prepare_data(data_dir)
    seconds = run(os.path.join(out, "reference"), data_dir, args.timeout)
    reference = final_params(os.path.join(out, "reference"))
    print(f"reference run: {seconds:.0f} s", flush=True)
    rng = random.Random(args.seed)
    matched = {}
    for side in args.sides.split(","):
        matched[side] = 0
        for trial in range(args.trials):
            after = rng.randint(1, 2 * STEPS_PER_STAGE)
            folder = os.path.join(out, f"{side}{trial}")
            try:
                seconds = run(folder, data_dir, args.timeout, [(side, after)])
                ok = equal(final_params(folder), reference)
                note = f"{seconds:.0f} s"
            except (RuntimeError, subprocess.TimeoutExpired, FileNotFoundError) as e:
                ok, note = False, str(e)
            matched[side] += ok
            print(f"kill {side} after step {after}: {'equal' if ok else 'DIFFERENT'} ({note})", flush=True)
            if ok and not args.out:
                shutil.rmtree(folder, ignore_errors=True)
    for side, n in matched.items():
        print(f"{side} killed: {n}/{args.trials} runs equal the uninterrupted one")
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
