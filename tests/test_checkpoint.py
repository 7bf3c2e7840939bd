"""Asynchronous checkpoints: `save_state` returns before the files are written, having copied the arrays off the
devices (the step functions donate them next), and a save that never finished is never resumed from."""

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from qtl_jax import checkpoint
from qtl_jax.models import tinyllava as T
from qtl_jax.split.runtime import HalfState, SplitConfig, SplitTrainer

from .models.test_tinyllava import batch, micro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(mode: str) -> SplitTrainer:
    cfg = micro("rd_fsq")
    boxed = jax.jit(T.TinyLlava(cfg).init)(jax.random.key(1), *batch())["params"]
    split = SplitConfig(mode=mode, client_mesh=(2, 1, 1), server_mesh=(1, 2, 2))
    return SplitTrainer(cfg, split, optax.adam(0.1), optax.adam(0.1), nn.meta.unbox(boxed), boxed_like=boxed)


def _batch(seed: int) -> dict:
    images, ids, mask, labels = batch(seed)
    return {"images": images, "input_ids": ids, "attention_mask": mask, "labels": labels}


def _host_state(trainer: SplitTrainer) -> dict:
    return jax.device_get({h: (trainer.state[h].params, trainer.state[h].opt_state) for h in trainer.halves})


@contextlib.contextmanager
def _writes_held(monkeypatch):
    """Holds every checkpoint write in orbax's background thread until the block ends (the JSON item's writer
    waits; the checkpoint is renamed to its step only once every item is written)."""
    release = threading.Event()
    write = ocp.JsonCheckpointHandler._save_fn

    async def held(self, item, directory):
        await asyncio.to_thread(release.wait, 120)
        await write(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", held)
    try:
        yield
    finally:
        release.set()


@pytest.mark.parametrize("mode", ["single", "meshes"])
def test_save_returns_before_the_write_and_the_donating_steps_after_it_change_nothing_saved(
        mode, tmp_path, monkeypatch):
    trainer = _trainer(mode)
    trainer.step(_batch(0))
    # The step functions donate the state: the server's arrays that go into a step are gone after it.
    server_before = trainer.state["server"].trainable
    trainer.step(_batch(1))
    assert all(x.is_deleted() for x in jax.tree.leaves(server_before))

    ckpt = checkpoint.manager(str(tmp_path))
    saved = _host_state(trainer)
    totals = {"samples": 8}
    with _writes_held(monkeypatch):
        checkpoint.save_state(ckpt, trainer, 2, b"position", totals, {"name": "d"})
        totals["samples"] += 4  # the JSON is written later: the checkpoint must hold the value at save time
        for seed in (2, 3):  # the saved buffers are donated while their write is pending
            trainer.step(_batch(seed))
        # Not written yet: only the temporary folder exists, which a restarted run would not see.
        assert os.listdir(tmp_path / "checkpoints") == ["2.orbax-checkpoint-tmp"]
        assert checkpoint.latest_step(str(tmp_path)) is None
    trained_on = _host_state(trainer)
    assert checkpoint.finished_steps(ckpt) == [2]
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    iterator, restored_totals = checkpoint.restore_state(ckpt, trainer, 2, {"name": "d"})
    assert (iterator, restored_totals) == (b"position", {"samples": 8})
    jax.tree.map(np.testing.assert_array_equal, _host_state(trainer), saved)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained_on), jax.tree.leaves(saved),
                                                        strict=True)]
    assert sum(changed) > len(changed) // 2  # the two steps moved the state: equality above is not vacuous
    ckpt.close()


def fake_half(value: float) -> SimpleNamespace:
    """A trainer holding one small half: what `save_state` / `restore_state` read and write."""
    state = HalfState({"w": jnp.full((64,), value)}, {"b": jnp.full((3,), -value)}, {"count": jnp.int32(value)})
    return SimpleNamespace(halves=("server",), state={"server": state}, is_trainable=lambda path: path[0] == "w")


# A run killed while its step-2 save is being written: step 1 is on disk, step 2 only as a temporary folder.
KILLED_RUN = """
import asyncio, os, sys
import orbax.checkpoint as ocp
from qtl_jax import checkpoint
from tests.test_checkpoint import fake_half

ckpt = checkpoint.manager(sys.argv[1])
checkpoint.save_state(ckpt, fake_half(1.0), 1, b"one", {"at": 1}, None)
ckpt.wait_until_finished()

async def never(self, item, directory):
    await asyncio.Event().wait()

ocp.JsonCheckpointHandler._save_fn = never
checkpoint.save_state(ckpt, fake_half(2.0), 2, b"two", {"at": 2}, None)
print(" ".join(sorted(os.listdir(os.path.join(sys.argv[1], "checkpoints")))), flush=True)
os._exit(0)
"""


def test_a_run_killed_while_saving_resumes_from_the_newest_finished_checkpoint(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "2.orbax-checkpoint-tmp"]
    assert checkpoint.latest_step(str(tmp_path)) == 1
    # The restarted run: its manager removes the half-written folder and lists step 1 only.
    ckpt = checkpoint.manager(str(tmp_path))
    assert checkpoint.finished_steps(ckpt) == [1]
    half = fake_half(0.0)
    assert checkpoint.restore_state(ckpt, half, 1, None) == (b"one", {"at": 1})
    state = jax.device_get(half.state["server"])
    assert (state.trainable["w"] == 1).all() and (state.frozen["b"] == -1).all() and state.opt_state["count"] == 1
    checkpoint.save_state(ckpt, fake_half(2.0), 2, b"two", {"at": 2}, None)  # step 2 again, in full this time
    assert checkpoint.finished_steps(ckpt) == [1, 2]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    ckpt.close()
