"""Crash recovery: SIGKILL the server, then the client, of a networked run, each at a random step; each restarted
with the same command, the run finishes and equals the uninterrupted one (the session's meshes run, which a
networked run equals bit for bit). `benchmarks/kill_recovery.py` runs 20 trials of each side alone."""

import os
import random
import sys

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
    assert kill_recovery.equal(kill_recovery.final_params(str(tmp_path)), reference), (server_after, client_after)
