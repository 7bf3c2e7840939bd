"""What a run keeps on disk: orbax checkpoints of both halves and the config it ran with (SPEC §4.2).

    STAGE_DIR/checkpoints/STEP/{client,server,meta}   each half's params and optimizer state, and
                                                      {"step", "iterator" (base64), "totals"}
    STAGE_DIR/config.json                             the stage's full config

In a networked run (`split.mode=remote`) each process keeps its own folder with its own half only: the client's
with {client, meta} (the iterator position lives there), the server's with {server, meta}; both save the same
steps (the client asks the server to save with the step it sends), step 0 included.

Saves are asynchronous and atomic. `save_state` returns once the arrays are copied to host memory (orbax's
`save` blocks on that copy), so the caller may donate them to its next step at once; a background thread writes
`STEP.orbax-checkpoint-tmp` and renames it to `STEP` only when every item is written. A run killed meanwhile
leaves no `STEP` folder: a restart resumes from the newest finished one (and `manager` removes the leftover
temporary folder). What waits for a pending save: the next `save_state` (orbax waits for the previous save
first), `restore_state`, `restore_meta`, `finished_steps` and `ckpt.close()` (the trainer closes its manager on
the way out, an error included). Note that orbax's own `latest_step()` / `all_steps()` list a step from the moment
its save starts: use `finished_steps` where only steps on disk count. `restore_state` puts a checkpoint back
onto the trainer's meshes; `final_params` reads a run's newest parameters onto the host from any process,
whatever devices it was saved from. A rerun in the same stage folder resumes; `check_resume_config` first
refuses a config that differs from the saved one in anything that changes the result, naming every field.
"""

from __future__ import annotations

import base64
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from qtl_jax import files
from qtl_jax.split.runtime import HALVES, HalfState, SplitTrainer, partition

CONFIG_FILE = "config.json"
# Fields a resumed run may change: they change when it stops, logs and saves, and what it evaluates at the end,
# not what it trains. A field ending in "." stands for its whole section.
RESUMABLE_FIELDS = ("stop_after", "log_every", "checkpoint_every", "eval.", "data.eval_files",
                    "data.eval_image_root", "model.cast_frozen_once", *(f"split.{f}" for f in (
                        "server", "client_id", "token_file", "tls_ca", "tls_cert", "tls_key", "insecure",
                        "deadline_s", "wait_s")))

# Fields added after runs were saved, with the value that trains what those runs trained: a saved config without
# one reads as that value (so a run started before the field existed resumes), any other value still differs.
ADDED_FIELDS = {"compressor.scale": "tensor", "model.attention": "auto"}


def latest_step(stage_dir: str) -> int | None:
    """The newest checkpointed step of a stage folder, None when it has none (nothing is created)."""
    path = os.path.abspath(os.path.join(stage_dir, "checkpoints"))
    if not os.path.isdir(path):
        return None
    ckpt = ocp.CheckpointManager(path)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def manager(stage_dir: str, create: bool = True) -> ocp.CheckpointManager:
    """The checkpoint manager a run saves with: asynchronous saves, the newest two steps kept (the older one is
    deleted only once the newer one is finished), temporary folders of a killed save removed on creation (so
    only the one process that saves into `stage_dir` may make one)."""
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(stage_dir, "checkpoints")),
        item_handlers={"client": ocp.StandardCheckpointHandler(), "server": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=create, enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))


def finished_steps(ckpt: ocp.CheckpointManager) -> list[int]:
    """The steps whose checkpoints are on disk in full, ascending: waits for a pending save first (orbax lists a
    step from the moment its save starts, and raises here if that save failed)."""
    ckpt.wait_until_finished()
    return sorted(ckpt.all_steps())


def _state_tree(trainer: SplitTrainer, half: str) -> dict:
    st = trainer.state[half]
    return {"params": st.params, "opt_state": st.opt_state}


def save_state(ckpt: ocp.CheckpointManager, trainer: SplitTrainer, step: int, iterator_state: bytes | None,
               totals: dict, data: dict | None) -> None:
    """Starts saving the halves the trainer holds (params and optimizer state), the data iterator position (the
    client's; None on a server), the step, the running totals and what the iterator runs over (`data`: the
    converted dataset's name and record count).

    Asynchronous: waits for the previous save, copies the arrays to host memory and returns; the files are
    written in the background. The trainer's step functions donate their state buffers, which is safe because
    orbax's `save` has finished the device -> host copy by then (`tests/test_checkpoint.py` checks it against a
    donating step). The JSON part is written in the background too, so it is snapshotted here: `totals` may
    change under the writer."""
    save_trees(ckpt, step, {h: _state_tree(trainer, h) for h in trainer.halves}, iterator_state, totals, data)


def save_trees(ckpt: ocp.CheckpointManager, step: int, trees: dict, iterator_state: bytes | None, totals: dict,
               data: dict | None) -> None:
    """`save_state` for state that no SplitTrainer holds: `trees` maps a half to its pytree (stage 0 saves
    {"client": {"params", "opt_state"}}, so `final_params` reads it like any stage)."""
    meta = json.loads(json.dumps({"step": step, "totals": totals, "data": data}))
    if iterator_state is not None:
        meta["iterator"] = base64.b64encode(iterator_state).decode()
    halves = {h: ocp.args.StandardSave(tree) for h, tree in trees.items()}
    ckpt.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **halves))


def restore_meta(ckpt: ocp.CheckpointManager, step: int) -> dict:
    """The JSON part of a checkpoint (step, totals, data, iterator); waits for a pending save first."""
    ckpt.wait_until_finished()
    return ckpt.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def restore_state(ckpt: ocp.CheckpointManager, trainer: SplitTrainer, step: int,
                  data: dict | None) -> tuple[bytes | None, dict]:
    """Puts the halves the trainer holds back on their meshes; returns (iterator state bytes or None, totals).
    Raises ValueError when the checkpoint's iterator ran over other data than `data` (an edited annotation file,
    converted anew): its position would point into different records. Waits for a pending save first (it may be
    the step asked for)."""
    trees, iterator, totals = restore_trees(ckpt, step, {h: _state_tree(trainer, h) for h in trainer.halves}, data)
    for half in trainer.halves:
        trainable, frozen = partition(trees[half]["params"], trainer.is_trainable)
        trainer.state[half] = HalfState(trainable, frozen, trees[half]["opt_state"])
    return iterator, totals


def restore_trees(ckpt: ocp.CheckpointManager, step: int, like: dict,
                  data: dict | None) -> tuple[dict, bytes | None, dict]:
    """The inverse of `save_trees`: (trees shaped and sharded like `like`, iterator state bytes or None, totals);
    the same data check as `restore_state`."""
    ckpt.wait_until_finished()
    halves = {h: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
              for h, tree in like.items()}
    r = ckpt.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **halves))
    if data is not None and r.meta.get("data", data) != data:
        raise ValueError(f"{ckpt.directory}: step {step} was trained on {r.meta['data']}, the data is now {data}; "
                         f"the saved data position does not apply. Use another --workdir or the original data.")
    iterator = r.meta.get("iterator")
    return ({h: r[h] for h in like}, None if iterator is None else base64.b64decode(iterator), r.meta["totals"])


def final_params(stage_dir: str) -> dict:
    """The {"client", "server"} parameters of a stage folder's newest checkpoint, as host arrays (only the half a
    process of a networked run saved: {"client"} or {"server"}).

    Works from any process: the arrays are read onto one local device, whatever mesh saved them, and the
    optimizer states are not read at all."""
    path = os.path.abspath(os.path.join(stage_dir, "checkpoints"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{stage_dir}: no checkpoint (expected {path}/STEP)")
    handlers = {"meta": ocp.JsonCheckpointHandler(), **{h: ocp.PyTreeCheckpointHandler() for h in HALVES}}
    ckpt = ocp.CheckpointManager(path, item_handlers=handlers)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{stage_dir}: no checkpoint (expected {path}/STEP)")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = ckpt.item_metadata(step)
    args = {}
    for half in (h for h in HALVES if h in metadata and metadata[h] is not None):
        item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                       metadata[half]["params"])}
        args[half] = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                            partial_restore=True)
    try:
        restored = ckpt.restore(step, args=ocp.args.Composite(**args))
    finally:
        ckpt.close()
    return jax.device_get({half: restored[half]["params"] for half in args})


# ------------------------------------------------------------------------------------------------- config
def save_config(stage_dir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the stage's config as JSON (via a temporary file, then an atomic rename; process 0 only)."""
    if jax.process_index():
        return
    files.write_text(os.path.join(stage_dir, CONFIG_FILE), config.to_json(indent=2, sort_keys=True))


def load_config(stage_dir: str) -> ml_collections.ConfigDict:
    """The config a stage folder was trained with (FileNotFoundError naming the folder if it has none)."""
    path = os.path.join(stage_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{stage_dir} holds no {CONFIG_FILE}: not the folder of a training stage "
                                f"(expected e.g. WORKDIR/finetune)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict,
                       ignore: tuple[str, ...] = RESUMABLE_FIELDS) -> list[str]:
    """'field: saved X, now Y' for every field (dotted path) that differs, tuples and lists alike."""
    as_json = lambda c: _flat(json.loads(c.to_json()))
    a, b = as_json(saved), as_json(current)
    for key, value in ADDED_FIELDS.items():  # where the saved config has the field's section
        if key not in a and any(k.startswith(key.rsplit(".", 1)[0] + ".") for k in a):
            a[key] = value
    ignored = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in ignore)
    return [f"{k}: saved {a.get(k, '(absent)')!r}, now {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not ignored(k)]


def check_resume_config(stage_dir: str, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError when a stage folder with checkpoints was trained with another config."""
    differences = config_differences(load_config(stage_dir), config)
    if differences:
        raise ValueError(f"{stage_dir} holds a run with another config; resuming it with this one would mix "
                         f"the two. Differing fields:\n  " + "\n  ".join(differences)
                         + f"\nUse another --workdir, or the saved config ({stage_dir}/{CONFIG_FILE}).")
