"""The model owner's server of a networked split run (SPEC §6):

    python -m qtl_jax.split.serve --config configs/finetune.py --workdir SERVER_DIR --address HOST:PORT \
        --tls_cert certs/server.pem --tls_key certs/server.key --tokens certs/tokens.txt [--tls_client_ca certs/ca.pem]

It holds the server half only (the compressors' server sides, OpenELM, its optimizer state) on its own mesh
(`split.server_mesh`), for the same stages as the client's `train.py` with the same config (stage 1 then stage 2
when `init_from` is empty); each stage's folder under SERVER_DIR keeps the server's checkpoints and config. It
never sees an image, a question's text (with quantized text embeddings) or the data files; it sees what crosses:
the quantized features, the labels of the supervised tokens and, with `token_ids`, the prompts' token ids.

`--insecure` serves plaintext gRPC, refused unless HOST is a loopback address. The server runs until it is
stopped (Ctrl-C or SIGTERM); restarted with the same command it resumes from its newest checkpoint and the
clients reconnect. `python -m qtl_jax.split.remote.security --out certs` makes a CA, certificates and tokens for a
local try-out.

Several hosts (a TPU pod slice, GPU hosts): the same command runs once per host with `--distributed` (JAX finds
the processes itself on TPU slices, SLURM and Open MPI) or `--coordinator HOST:PORT --num_processes N
--process_id I`; `split.server_mesh` then spans every device of every process (`qtl_jax.split.multihost`).
Process 0 serves gRPC on `--address`; the others follow its steps. `--workdir` must be one folder every host sees
(orbax writes each host's shards into the same checkpoint).
"""

from __future__ import annotations

import dataclasses
import signal
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from qtl_jax import files

_CONFIG = config_flags.DEFINE_config_file("config", "configs/finetune.py", "Training config file (the client's).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "server", "Where the server's checkpoints and configs go.")
_ADDRESS = flags.DEFINE_string("address", "127.0.0.1:50051", "HOST:PORT to listen on (port 0: any free port).")
_TLS_CERT = flags.DEFINE_string("tls_cert", "", "The server's certificate (PEM).")
_TLS_KEY = flags.DEFINE_string("tls_key", "", "The server's private key (PEM).")
_TLS_CLIENT_CA = flags.DEFINE_string("tls_client_ca", "", "Mutual TLS: require client certificates signed by this CA.")
_TOKENS = flags.DEFINE_string("tokens", "", "The clients' tokens: 'CLIENT_ID TOKEN' per line.")
_INSECURE = flags.DEFINE_bool("insecure", False, "Plaintext gRPC (loopback addresses only).")
_PORT_FILE = flags.DEFINE_string("port_file", "", "Write the bound port here once serving (for scripts).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Run as one of several server processes (jax.distributed); "
                                 "implied by --coordinator.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "Several processes: process 0's HOST:PORT for "
                                   "jax.distributed (empty: found by JAX on TPU slices, SLURM, Open MPI).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Several processes: how many (default: found by JAX).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Several processes: this one's index; 0 serves gRPC "
                                   "(default: found by JAX).")


def config_stages(config, workdir: str, log=print):
    """The `Stages` of a config: each stage's server half built as `train.py` builds both halves (same
    initialisation, so a networked run trains what a `meshes` run trains), from the stage's own folder."""
    import jax.numpy as jnp

    from qtl_jax import checkpoint, trainer
    from qtl_jax.split.remote.server import StageHalf, Stages
    from qtl_jax.split.runtime import SplitConfig, SplitTrainer

    plan = {c.stage: (c, d) for c, d in trainer.stage_plan(config, workdir, data=False)}

    class ConfigStages(Stages):
        names = tuple(plan)

        def fingerprint(self, stage: str, vocab_size: int) -> dict:
            stage_config = plan[stage][0]
            return trainer.session_fingerprint(stage_config, trainer.model_config(stage_config, vocab_size))

        def build(self, stage: str, vocab_size: int, num_steps: int) -> StageHalf:
            c, stage_dir = plan[stage]
            checkpoint.save_config(stage_dir, c)
            model_cfg = trainer.model_config(c, vocab_size)
            dtype = jnp.dtype(c.model.dtype)
            params, boxed = trainer.init_params(c, model_cfg, dtype, log)
            if c.stage == "finetune" and c.init_from:  # stage 1's server half (stage 0 is the client's alone)
                params = trainer.init_from_previous(c, params)
            _, tx_server = trainer.build_optimizers(c, num_steps)
            split = dataclasses.replace(SplitConfig.from_config(c.split), mode="meshes")
            half = SplitTrainer(model_cfg, split, None, tx_server, params, dtype=dtype, boxed_like=boxed,
                                trainable=tuple(c.optim.trainable), halves=("server",),
                                cast_frozen_once=c.model.get("cast_frozen_once", True))
            log(f"[serve] {stage}: server half built ({num_steps} steps, vocabulary {vocab_size})")
            return StageHalf(stage, half, self.fingerprint(stage, vocab_size), vocab_size, num_steps,
                             c.optim.batch_size, tuple(c.data.buckets), c.eval.batch_size,
                             ckpt=checkpoint.manager(stage_dir), max_new_tokens=c.eval.max_new_tokens,
                             accum_steps=c.optim.accum_steps)

    return ConfigStages()


def message_limit(config, workdir: str) -> int:
    """The largest legal message over the run's stages, for any tokenizer a client may bring (ids as int32 on
    the tiny preset, whose vocabulary follows the tokenizer; the paper's model has 32k)."""
    from qtl_jax import trainer

    limits = []
    for c, _ in trainer.stage_plan(config, workdir, data=False):
        vocab = trainer.model_config(c, 1).lm.vocab_size if c.model.size == "paper" else 2**16 + 1
        limits.append(trainer.max_message_bytes(c, trainer.model_config(c, vocab)))
    return max(limits)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    config = _CONFIG.value
    mesh_devices = int(np.prod(config.split.server_mesh))
    from qtl_jax.split import multihost
    from qtl_jax.split.remote import security
    from qtl_jax.split.remote.server import SplitServer, follow, make_grpc_server

    # On a CPU-only machine, the server mesh's virtual devices, split over the processes (accelerators are
    # unaffected).
    if not (_DISTRIBUTED.value or _COORDINATOR.value):
        jax.config.update("jax_num_cpu_devices", mesh_devices)
    else:
        processes = _NUM_PROCESSES.value
        if processes and mesh_devices % processes:
            raise app.UsageError(f"split.server_mesh {tuple(config.split.server_mesh)} ({mesh_devices} devices) "
                                 f"does not divide over {processes} processes")
        multihost.initialize(_COORDINATOR.value, processes, _PROCESS_ID.value,
                             cpu_devices=mesh_devices // processes if processes else None)
        multihost.check_server_mesh(config.split.server_mesh)
        if jax.process_index() != 0:  # no gRPC, no tokens or certificates here: process 0 answers the clients
            print(f"[serve] process {jax.process_index()} of {jax.process_count()}: following process 0", flush=True)
            follow(config_stages(config, _WORKDIR.value))
            print(f"[serve] process {jax.process_index()} stopped", flush=True)
            return

    if not _TOKENS.value:
        raise app.UsageError("--tokens: the clients' tokens file is required (python -m "
                             "qtl_jax.split.remote.security --out DIR makes one)")
    credentials = None
    if _INSECURE.value:
        security.check_plaintext_allowed(_ADDRESS.value)
    elif not (_TLS_CERT.value and _TLS_KEY.value):
        raise app.UsageError("--tls_cert and --tls_key are required (or --insecure on a loopback address)")
    else:
        credentials = security.server_credentials(_TLS_CERT.value, _TLS_KEY.value, _TLS_CLIENT_CA.value or None)
    core = SplitServer(config_stages(config, _WORKDIR.value), security.read_tokens(_TOKENS.value))
    server, port = make_grpc_server(core, _ADDRESS.value, credentials=credentials,
                                    max_message_bytes=message_limit(config, _WORKDIR.value))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    host = _ADDRESS.value.rsplit(":", 1)[0]
    print(f"[serve] stages {', '.join(core.stages.names)} on {host}:{port} "
          f"({'plaintext' if credentials is None else 'TLS'}{', mutual' if _TLS_CLIENT_CA.value else ''}); "
          f"{len(core.tokens)} clients may connect"
          + (f"; process 0 of {jax.process_count()}, the server mesh on {jax.device_count()} devices"
             if jax.process_count() > 1 else ""), flush=True)
    if _PORT_FILE.value:
        files.write_text(_PORT_FILE.value, str(port))
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    server.stop(grace=5).wait(10)
    core.close()
    print("[serve] stopped", flush=True)


if __name__ == "__main__":
    app.run(main)
