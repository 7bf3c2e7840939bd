"""Crash recovery: SIGKILL the server, then the client, of a networked run, each at a random step; each restarted
with the same command, the run finishes and equals the uninterrupted one.

The reference is the session's meshes run. In this process (8 devices) a networked run equals it bit for bit
(`test_remote_run.py`); the client and server processes here have 2 and 4 devices, and XLA rounds a few values
differently there (~1e-8), so this compares to 1e-6. A replayed or skipped step moves parameters by ~1e-4.
`benchmarks/kill_recovery.py` compares bit for bit with an uninterrupted run of the same two processes (20
trials of each side)."""

import os
import random
import sys

import jax
import numpy as np

from qtl_jax import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import kill_recovery


def test_killed_server_then_client_restart_and_the_run_equals_the_uninterrupted_one(trained, tmp_path,
                                                                                     tmp_path_factory):
    workdir, _ = trained
    reference = {(stage, half): checkpoint.final_params(str(workdir / stage))[half]
                 for stage in ("pretrain", "finetune") for half in ("client", "server")}
    total = 2 * kill_recovery.STEPS_PER_STAGE
    server_after = random.randint(1, total - 1)
    client_after = random.randint(server_after + 1, total)
    data_dir = str(tmp_path_factory.getbasetemp() / "tfds")  # the smoke data the session generated
    kill_recovery.run(str(tmp_path), data_dir, timeout=900, kills=[("server", server_after), ("client", client_after)])
    for side in ("server", "client"):  # each ran twice
        with open(tmp_path / f"{side}.log") as f:
            assert f.read().count(f"[kill_recovery] starting the {side}") == 2, side
    got = kill_recovery.final_params(str(tmp_path))
    for key, params in reference.items():
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(got[key])[0], jax.tree.leaves(params),
                                strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6,
                                       err_msg=f"{key} {jax.tree_util.keystr(path)} (kills after steps "
                                               f"{server_after}, {client_after})")
