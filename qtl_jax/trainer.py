"""`train_and_evaluate(config, workdir)`: the split training recipe, read top to bottom (SPEC §4).

Sections: checks -> data -> model -> optimizer -> stage (split runtime, checkpoint/resume, loop, evaluation,
export, summary) -> stage 0 -> the whole recipe. `finetune` with an empty `init_from` first runs `pretrain` into
`workdir/pretrain`, so one command does the whole recipe; with `tower.steps` > 0, stage 1 with an empty
`init_from` first runs stage 0 (`qtl_jax.tower`: the client pretrains its vision tower) into `workdir/tower`.

Every stage folder holds its config (`config.json`), checkpoints, `metrics.jsonl` and `summary.json`; a rerun
with the same workdir resumes where the newest checkpoint left off, and refuses a different config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from qtl_jax import checkpoint, tower
from qtl_jax import evaluate as evaluation
from qtl_jax.compress import COMPRESSORS, make_codec
from qtl_jax.compress.entropy import code_usage
from qtl_jax.compress.rd_fsq import LOSSES
from qtl_jax.data import builders, digits, pipeline
from qtl_jax.data.tokenizer import load_tokenizer
from qtl_jax.metrics import MetricWriter
from qtl_jax.models import convert
from qtl_jax.models import tinyllava as T
from qtl_jax.models.openelm import OPENELM_270M, OPENELM_TINY
from qtl_jax.models.siglip import SIGLIP_SO400M, SIGLIP_TINY
from qtl_jax.split import wire
from qtl_jax.split.runtime import Resync, SplitConfig, SplitTrainer

INITS = ("pretrained", "random")
# Data fields that belong to one stage: `configs/finetune.py`'s stage 1 keeps its own (the paper's two stages
# read different files from different image folders); the other data fields are shared by both stages.
STAGE_DATA_FIELDS = ("annotation_file", "image_root", "template", "eval_files", "eval_image_root")


# ------------------------------------------------------------------------------------------------ checks
def check_config(config: ml_collections.ConfigDict, name: str = "config", data: bool = True) -> None:
    """Fails fast, before any data generation or compilation, naming the field (as `name.section.field`).
    `data=False` (the server of a networked run, which never sees the data) skips the data fields."""
    for field in ("image", "text"):
        compressor = config.compressor[field]
        if compressor not in COMPRESSORS:
            raise ValueError(f"{name}.compressor.{field}: unknown compressor {compressor!r}; expected one of "
                             f"{COMPRESSORS}")
    commitment = config.compressor.get("commitment", "cosine")
    if commitment not in LOSSES:
        raise ValueError(f"{name}.compressor.commitment must be one of {LOSSES}, got {commitment!r}")
    if config.optim.get("min_steps", 0) < 0:
        raise ValueError(f"{name}.optim.min_steps must be >= 0, got {config.optim.min_steps}")
    if not 1 <= config.compressor.bits <= 8:
        raise ValueError(f"{name}.compressor.bits must be in 1..8, got {config.compressor.bits}")
    split = SplitConfig.from_config(config.split)
    if data:
        split.check_devices()
    if data and split.mode == "remote":
        for field in ("server", "token_file"):
            if not config.split[field]:
                raise ValueError(f"{name}.split.{field} must be set in remote mode")
        if not config.split.insecure and not config.split.tls_ca:
            raise ValueError(f"{name}.split.tls_ca: TLS needs the CA certificate that signed the server's (or "
                             f"{name}.split.insecure=true, plaintext, on loopback only)")
    if config.optim.client_lr_scale < 0:
        raise ValueError(f"{name}.optim.client_lr_scale must be >= 0, got {config.optim.client_lr_scale}")
    if not 0.0 <= config.optim.client_delay_ratio < 1.0:
        raise ValueError(f"{name}.optim.client_delay_ratio must be in [0, 1), got {config.optim.client_delay_ratio}")
    if config.optim.accum_steps < 1:
        raise ValueError(f"{name}.optim.accum_steps must be >= 1, got {config.optim.accum_steps}")
    unknown = set(config.optim.trainable) - set(T.PARTS)
    if unknown:
        raise ValueError(f"{name}.optim.trainable: unknown parts {sorted(unknown)}; expected some of {T.PARTS}")
    if config.model.init not in INITS:
        raise ValueError(f"{name}.model.init must be one of {INITS}, got {config.model.init!r}")
    folders = ("siglip_checkpoint", "openelm_checkpoint", "tinyllava_checkpoint")
    if config.model.init == "pretrained":
        for field in folders:
            path = config.model[field]
            if path and not os.path.isdir(os.path.expanduser(path)):
                raise FileNotFoundError(f"{name}.model.{field}: checkpoint folder {path!r} does not exist (for "
                                        f"random weights at these sizes set {name}.model.init=random)")
        complete = config.model.tinyllava_checkpoint or (config.model.siglip_checkpoint and
                                                         config.model.openelm_checkpoint)
        if not complete and not (config.stage == "finetune" and config.init_from):
            raise ValueError(f"{name}.model.init=pretrained needs {name}.model.tinyllava_checkpoint, or both "
                             f"siglip_checkpoint and openelm_checkpoint; set {name}.model.init=random to train "
                             f"from random weights")
    if config.data.dataset == "llava" and data:
        for field in ("annotation_file", "image_root"):
            if not os.path.exists(os.path.expanduser(config.data[field])):
                raise FileNotFoundError(f"{name}.data.{field}: {config.data[field]!r} does not exist")
        if not config.data.tokenizer:
            raise ValueError(f"{name}.data.tokenizer: LLaVA data needs a tokenizer folder (e.g. Llama-2's, or one "
                             f"built by `python -m qtl_jax.data.tokenizer`)")
    elif config.data.dataset not in (*builders.BUILT_IN, "llava"):
        raise ValueError(f"{name}.data.dataset must be one of {(*builders.BUILT_IN, 'llava')}, got "
                         f"{config.data.dataset!r}")
    if data and config.data.tokenizer and not os.path.isdir(os.path.expanduser(config.data.tokenizer)):
        raise FileNotFoundError(f"{name}.data.tokenizer: folder {config.data.tokenizer!r} does not exist")
    for eval_name, file in evaluation.parse_eval_files(config.data.eval_files, f"{name}.data.eval_files").items():
        if data and not os.path.isfile(os.path.expanduser(file)):
            raise FileNotFoundError(f"{name}.data.eval_files: {eval_name}={file!r} does not exist")
    if config.init_from and not os.path.isdir(os.path.join(config.init_from, "checkpoints")):
        previous = "stage-1" if config.stage == "finetune" else "stage-0 (tower)"
        raise FileNotFoundError(f"{name}.init_from: {config.init_from!r} holds no checkpoints/ of a {previous} run")
    if "tower" in config:
        if config.tower.steps < 0:
            raise ValueError(f"{name}.tower.steps must be >= 0, got {config.tower.steps}")
        if config.tower.steps and config.tower.batch_size < 2:
            raise ValueError(f"{name}.tower.batch_size must be >= 2 (the sigmoid loss contrasts the pairs of a "
                             f"batch), got {config.tower.batch_size}")


# -------------------------------------------------------------------------------------------------- data
def tokenizer_dir(config) -> str:
    """The run's tokenizer folder: data.tokenizer, else the built-in dataset's (created with it)."""
    if config.data.tokenizer:
        return os.path.expanduser(config.data.tokenizer)
    data_dir = os.path.expanduser(config.data.data_dir)
    if config.data.dataset == "digits":
        return os.path.join(digits.build(os.path.join(data_dir, "digits")), "tokenizer")
    if config.data.dataset != "shapes":
        raise ValueError("config.data.tokenizer: LLaVA data needs a tokenizer folder")
    return builders.prepare_shapes(data_dir, config.data.shapes_config)[1]


def train_source(config):
    """(records, identity) of the stage's training data: Shapes-VQA's captions (stage 1) or QA (stage 2), or
    the LLaVA file; identity = {"dataset": the converted dataset's name, "records": how many}."""
    data_dir = os.path.expanduser(config.data.data_dir)
    if config.data.dataset == "shapes":
        builder, _ = builders.prepare_shapes(data_dir, config.data.shapes_config)
        split = "train" if config.stage == "finetune" else "pretrain"  # stage 0 reads stage 1's captions
    elif config.data.dataset == "digits":
        folder = digits.build(os.path.join(data_dir, "digits"))
        file = "train.json" if config.stage == "finetune" else "pretrain.json"
        builder = builders.prepare_llava(data_dir, os.path.join(folder, file), folder, config.data.on_bad_sample,
                                         template=config.data.template)
        split = "train"
    else:
        builder = builders.prepare_llava(data_dir, os.path.expanduser(config.data.annotation_file),
                                         os.path.expanduser(config.data.image_root), config.data.on_bad_sample,
                                         template=config.data.template)
        split = "train"
    source = builder.as_data_source()[split]
    return source, {"dataset": f"{builder.info.full_name}/{split}", "records": len(source)}


# ------------------------------------------------------------------------------------------------- model
def _codec(config, name: str):
    # Runs saved before the loss term was a field trained with the paper's cosine term.
    options = {"commitment": config.compressor.get("commitment", "cosine"),
               "usage_weight": config.compressor.get("usage_weight", 0.0),
               "scale": config.compressor.get("scale", "tensor")} if name == "rd_fsq" else {}
    return make_codec(name, config.compressor.bits, **options)


def model_config(config, vocab_size: int) -> T.TinyLlavaConfig:
    """The model of a config; raises when the tokenizer's vocabulary does not fit the paper-size model's."""
    tiny = config.model.size == "tiny"
    lm = dataclasses.replace(OPENELM_TINY, vocab_size=vocab_size) if tiny else OPENELM_270M
    if vocab_size > lm.vocab_size:
        raise ValueError(f"config.data.tokenizer has {vocab_size} tokens, more than the model's vocabulary "
                         f"{lm.vocab_size}")
    speed = {"remat": config.model.get("remat", "none"), "attention": config.model.get("attention", "auto")}
    vision = dataclasses.replace(SIGLIP_TINY if tiny else SIGLIP_SO400M, **speed,
                                 scan_layers=config.model.get("scan_layers", False))
    return T.TinyLlavaConfig(
        vision=vision, lm=dataclasses.replace(lm, **speed),
        image_codec=_codec(config, config.compressor.image), text_codec=_codec(config, config.compressor.text),
        text_transport=config.compressor.text_transport, commitment_weight=config.compressor.commitment_weight)


def _example_batch(model_cfg, text_len: int = 8):
    size = model_cfg.vision.image_size
    ids = np.ones((1, text_len), np.int32)
    ids[0, 1] = T.IMAGE_TOKEN_INDEX
    return (np.zeros((1, size, size, 3), np.uint8), ids, np.ones((1, text_len), bool),  # the pipeline's dtype
            np.full((1, text_len), -100, np.int32))


def init_params(config, model_cfg, dtype, log=print):
    """(plain params, boxed abstract tree): random init, then (model.init=pretrained) the HF checkpoints."""
    model = T.TinyLlava(model_cfg, dtype)
    example = _example_batch(model_cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(config.seed), *example)["params"]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(config.seed), *example)["params"])
    folders = [config.model[f] for f in ("tinyllava_checkpoint", "siglip_checkpoint", "openelm_checkpoint")]
    if config.model.init == "random":
        if any(folders):
            log(f"model.init=random: not reading the checkpoint folders {[f for f in folders if f]}")
        return params, boxed
    if config.model.tinyllava_checkpoint:
        params = convert.merge_params(params, convert.load_tinyllava(config.model.tinyllava_checkpoint, model_cfg))
    if config.model.siglip_checkpoint:
        _, vt = convert.load_siglip(config.model.siglip_checkpoint, model_cfg.vision)
        params = convert.merge_params(params, {"client": {"vision_tower": vt}})
    if config.model.openelm_checkpoint:
        _, lm = convert.load_openelm(config.model.openelm_checkpoint)
        loaded = {"server": {"language_model": lm}}
        if model_cfg.quantized_text:  # the client's own copy of the input embedding (SPEC §2.3)
            loaded["client"] = {"token_embeddings": {"embedding": lm["token_embeddings"]["embedding"].copy()}}
        params = convert.merge_params(params, loaded)
    return params, boxed


# --------------------------------------------------------------------------------------------- optimizer
def lr_schedule(lr: float, warmup_ratio: float, num_steps: int, delay: int = 0) -> optax.Schedule:
    """0 for `delay` steps, then linear warmup (`warmup_ratio` of the steps left) and cosine decay to 0 at
    `num_steps`."""
    steps = max(num_steps - delay, 1)
    warmup = max(1, round(warmup_ratio * steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.0)
    return optax.join_schedules([optax.constant_schedule(0.0), schedule], [delay]) if delay else schedule


def _decay_mask(params):
    """Weight decay on matrices only: not on biases, norms or any 1-D parameter."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim > 1 and path[-1].key not in ("bias", "scale", "weight"), params)


def build_optimizers(config, num_steps: int):
    """One optax chain per half: clip, AdamW with warmup + cosine, no decay on biases/norms/1-D params,
    gradient accumulation (MultiSteps) when accum_steps > 1. They are given the trainable parameters only
    (`SplitTrainer`), so frozen parts have no optimizer state and no accumulator.

    The client's learning rate is `lr * client_lr_scale` and stays 0 for the first `client_delay_ratio` of the
    steps (Adam's moments still accumulate), then warms up and decays over the steps left. With a quantized
    uplink and a client trained from random weights, both halves at one lr from the first step collapse the
    codes: the server's early gradients push every image row the same way, Adam turns that into fast growth of
    per-channel offsets, RD-FSQ's shared 3-sigma range widens, and all objects fall into the same bins (the
    README's "Measured" has the numbers). A delay lets the server learn to read the initial codes first.
    """
    o = config.optim
    schedules = {"client": lr_schedule(o.lr * o.client_lr_scale, o.warmup_ratio, num_steps,
                                     round(o.client_delay_ratio * num_steps)),
                 "server": lr_schedule(o.lr, o.warmup_ratio, num_steps)}

    def make(schedule):
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                         optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay, mask=_decay_mask))
        return optax.MultiSteps(tx, o.accum_steps) if o.accum_steps > 1 else tx

    return make(schedules["client"]), make(schedules["server"])


# ------------------------------------------------------------------------------------------------- stage
def uplink_nbytes(model_cfg, example) -> int:
    """Exact uplink bytes of the client half on a batch of this shape (nothing is computed)."""
    client = T.TinyLlavaClient(model_cfg)
    params = jax.eval_shape(client.init, jax.random.key(0), *example)
    return jax.eval_shape(lambda p, *b: client.apply(p, *b), params, *example).uplink.nbytes


def uplink_ratio_to_fp16(model_cfg, example) -> float:
    """Uplink bytes relative to sending the same rows as fp16 (the paper's reference)."""
    fp16 = dataclasses.replace(model_cfg, image_codec=make_codec("none_fp16"), text_codec=make_codec("none_fp16"))
    return uplink_nbytes(model_cfg, example) / uplink_nbytes(fp16, example)


def step_budget(config, num_records: int) -> tuple[int, int]:
    """(epochs the loader runs, optimizer steps) of a stage: `optim.epochs` passes over the data, but at least
    `optim.min_steps` optimizer steps (more passes over a small dataset: the budget follows the data, not a
    fixed number of epochs). Skipped samples keep their place as empty rows (pipeline), so this is exact."""
    per_epoch = num_records // (config.optim.batch_size * jax.process_count())  # micro-batches per pass
    if not per_epoch:
        return config.optim.epochs, 0
    accum = config.optim.accum_steps
    epochs = max(config.optim.epochs, math.ceil(config.optim.get("min_steps", 0) * accum / per_epoch))
    return epochs, max(config.optim.epochs * per_epoch // accum, config.optim.get("min_steps", 0))


def collapse_metrics(model_cfg, metrics: dict) -> dict[str, float]:
    """What shows a code collapse while it happens, for the image rows of a step's uplink: image_tokens,
    image_distinct_codes, image_code_entropy (bits/element), and the codecs' stats (RD-FSQ's image_clipped and
    text_clipped fractions). Host-side; called at log steps only."""
    uplink = metrics["uplink"]
    usage = code_usage(model_cfg.image_codec, uplink.image, (uplink.image_pos >= 0)[:, None])
    return {**{f"image_{k}": v for k, v in usage.items()},
            **{k: float(v) for k, v in (metrics.get("stats") or {}).items()}}


def session_fingerprint(config, model_cfg: T.TinyLlavaConfig) -> dict:
    """What the client and the server of a networked run must agree on (`wire.fingerprint`), from a stage config."""
    return wire.fingerprint(model_cfg, stage=config.stage, downlink=config.split.downlink,
                            buckets=tuple(config.data.buckets), batch_size=config.optim.batch_size,
                            max_length=config.data.max_length, dtype=config.model.dtype)


def max_message_bytes(config, model_cfg: T.TinyLlavaConfig) -> int:
    """The largest legal message of a stage (a training batch or an evaluation batch at the longest bucket)."""
    batch = max(config.optim.batch_size, config.eval.batch_size)
    return wire.max_message_bytes(model_cfg, config.split.downlink, batch, max(config.data.buckets))


def remote_crossing(config, model_cfg: T.TinyLlavaConfig, vocab_size: int, num_steps: int):
    """The client's crossing to the server of `config.split.server` for this stage (remote mode)."""
    from qtl_jax.split.remote.client import ConnectConfig, RemoteClient, RemoteCrossing

    connect = ConnectConfig.from_config(config.split, max_message_bytes(config, model_cfg))
    return RemoteCrossing(RemoteClient(connect), model_cfg, session_fingerprint(config, model_cfg),
                          stage=config.stage, vocab_size=vocab_size, num_steps=num_steps,
                          downlink=config.split.downlink)


def init_from_previous(config, params: dict) -> dict:
    """`params` with what the stage takes over from `config.init_from`: stage 1 the vision tower of stage 0,
    stage 2 everything of stage 1 (parts it does not have, e.g. the text compressor when it sends token ids,
    are left out)."""
    loaded = checkpoint.final_params(config.init_from)
    if config.stage == "pretrain":
        return convert.merge_params(params, tower.vision_tower(loaded["client"]))
    return convert.merge_params(params, loaded, ignore_extra=True)


def _interrupted(config, step: int, total: int) -> bool:
    return bool(config.stop_after) and config.stop_after <= step < total


def train_stage(config, workdir: str, log=print) -> dict:
    """One stage in `workdir` (its stage folder): returns its summary dict (also written to summary.json)."""
    check_config(config)
    _check_resume(config, workdir)
    checkpoint.save_config(workdir, config)
    ckpt = checkpoint.manager(workdir)
    writer = MetricWriter(workdir, config.stage)
    try:
        return _train_stage(config, workdir, ckpt, writer, log)
    finally:
        writer.close()
        ckpt.close()


def _train_stage(config, workdir: str, ckpt, writer: MetricWriter, log) -> dict:
    from tqdm import tqdm

    primary = jax.process_index() == 0
    dtype = jnp.dtype(config.model.dtype)
    source, data = train_source(config)
    tok_dir = tokenizer_dir(config)
    tokenizer = load_tokenizer(tok_dir)
    model_cfg = model_config(config, len(tokenizer))
    params, boxed = init_params(config, model_cfg, dtype, log)
    if config.init_from:
        params = init_from_previous(config, params)

    epochs, num_steps = step_budget(config, len(source))
    pipe = pipeline.PipelineConfig(
        template=config.data.template, batch_size=config.optim.batch_size, image_size=model_cfg.vision.image_size,
        image_tokens=model_cfg.image_tokens, max_length=config.data.max_length, buckets=tuple(config.data.buckets),
        seed=config.seed, num_epochs=epochs, worker_count=config.data.worker_count,
        on_bad_sample=config.data.on_bad_sample)
    if config.optim.max_steps:
        num_steps = min(num_steps, config.optim.max_steps)
    micro_steps = num_steps * config.optim.accum_steps
    if not micro_steps:
        raise ValueError(f"{len(source)} training samples make no full batch of {pipe.batch_size} x "
                         f"{config.optim.accum_steps} accumulation steps")
    tx_client, tx_server = build_optimizers(config, num_steps)
    remote = config.split.mode == "remote"
    crossing = remote_crossing(config, model_cfg, len(tokenizer), num_steps) if remote else None
    trainer = SplitTrainer(model_cfg, SplitConfig.from_config(config.split), tx_client, tx_server, params,
                           dtype=dtype, boxed_like=boxed, trainable=tuple(config.optim.trainable), crossing=crossing,
                           cast_frozen_once=config.model.get("cast_frozen_once", True))
    del params  # the trainer holds its own copy on the meshes

    iterator = iter(pipeline.make_loader(source, tok_dir, pipe))
    totals = {"uplink_bytes": 0, "downlink_bytes": 0, "samples": 0, "skipped_samples": 0, "skipped_reasons": []}
    if remote:
        totals.update(wire_up_bytes=0, wire_down_bytes=0)
        if ckpt.latest_step() is None:  # step 0 too: a server that restarts early can always be met there
            checkpoint.save_state(ckpt, trainer, 0, iterator.get_state(), totals, data)

    def restore(at: int) -> int:
        iterator_state, saved = checkpoint.restore_state(ckpt, trainer, at, data)
        totals.update(saved)
        iterator.set_state(iterator_state)
        # Records logged after the step we start from (a crash after logging, or a finished stage evaluated
        # again) are logged again: drop them so that metrics.jsonl has each once.
        writer.truncate(at)
        return at

    # Saves are asynchronous (`checkpoint.save_state`): steps are read as finished on disk, restores wait too.
    saved_steps = checkpoint.finished_steps(ckpt)
    step = restore(saved_steps[-1]) if saved_steps and saved_steps[-1] else 0
    writer.truncate(step)
    # Continue from the newest step both sides hold (a finished stage 1 needs no session: the server has it too).
    if remote and (step < micro_steps or config.stage == "finetune"):
        crossing.checkpoints = lambda: checkpoint.finished_steps(ckpt)
        resume = crossing.open(step, saved_steps)
        if resume != step:
            log(f"[{config.stage}] the server holds step {resume}: resuming both from there")
            step = restore(resume)
    if _interrupted(config, step, micro_steps):
        return {"stage": config.stage, "steps": step, "interrupted": True}
    bar = tqdm(total=micro_steps, initial=step, desc=config.stage, unit="step", dynamic_ncols=True)
    last = time.perf_counter()
    while step < micro_steps:
        batch = next(iterator)
        save = (step + 1) % config.checkpoint_every == 0 or step + 1 == micro_steps or _interrupted(
            config, step + 1, micro_steps)
        if save and remote:
            # The server saves this step before it replies and then drops its older checkpoints but one: our
            # previous checkpoint must be on disk by then, or a crash of both sides could leave no common step.
            ckpt.wait_until_finished()
        try:
            metrics = trainer.step(batch, step + 1, save)
        except Resync as e:  # the server restarted from an older checkpoint
            log(f"[{config.stage}] the server resumed at step {e.step}: restoring the client's checkpoint")
            step = restore(e.step)
            bar.reset(micro_steps)
            bar.update(step)
            continue
        step += 1
        for key in ("uplink_bytes", "downlink_bytes", "wire_up_bytes", "wire_down_bytes"):
            if key in metrics:
                totals[key] += metrics[key]
        skipped = [reason for reason in batch["skipped"].tolist() if reason]
        totals["samples"] += len(batch["input_ids"]) - len(skipped)
        for reason in skipped:
            if totals["skipped_samples"] < 5:
                log(f"skipped: {reason}")
            totals["skipped_samples"] += 1
            if len(totals["skipped_reasons"]) < 100:
                totals["skipped_reasons"].append(reason)
        if step % config.log_every == 0 or step == micro_steps:
            now = time.perf_counter()
            ce = float(metrics["ce_loss"])
            step_time = (now - last) / config.log_every
            last = now
            writer.write(step, ce_loss=ce, commitment_loss=float(metrics["commitment_loss"]), step_time=step_time,
                         uplink_mb=metrics["uplink_bytes"] / 1e6, downlink_mb=metrics["downlink_bytes"] / 1e6,
                         skipped_samples=totals["skipped_samples"], **collapse_metrics(model_cfg, metrics))
            bar.set_postfix(loss=f"{ce:.3f}", s_per_step=f"{step_time:.2f}",
                            up_mb=f"{metrics['uplink_bytes'] / 1e6:.2f}",
                            down_mb=f"{metrics['downlink_bytes'] / 1e6:.2f}")
        bar.update(1)
        if save:  # asynchronous: the write overlaps the next steps; `ckpt.close()` waits for it on the way out
            checkpoint.save_state(ckpt, trainer, step, iterator.get_state(), totals, data)
        if _interrupted(config, step, micro_steps):
            bar.close()
            return {"stage": config.stage, "steps": step, "interrupted": True}
    bar.close()

    params = jax.device_get(trainer.params())
    summary = {"stage": config.stage, "steps": step, "samples": totals["samples"],
               "uplink_bytes_run": totals["uplink_bytes"], "downlink_bytes_run": totals["downlink_bytes"],
               "skipped_samples": totals["skipped_samples"], "skipped_reasons": totals["skipped_reasons"]}
    if totals["skipped_samples"]:
        log(f"[{config.stage}] {totals['skipped_samples']} samples skipped (on_bad_sample=skip); the first reasons "
            f"are in {workdir}/summary.json")
    if remote:  # what the serialized messages weighed, framing included
        summary["wire_up_bytes_run"], summary["wire_down_bytes_run"] = totals["wire_up_bytes"], totals[
            "wire_down_bytes"]
    if totals["samples"]:
        summary["uplink_bytes_per_sample"] = totals["uplink_bytes"] / totals["samples"]
        summary["downlink_bytes_per_sample"] = totals["downlink_bytes"] / totals["samples"]
        example = _example_batch(model_cfg, max(config.data.buckets[0], 8))
        example = tuple(np.repeat(x, config.optim.batch_size, 0) for x in example)
        summary["uplink_ratio_to_fp16"] = uplink_ratio_to_fp16(model_cfg, example)
    if config.stage == "finetune":
        if not remote:  # the trained model in the Hugging Face layout, compressors included
            if primary:
                convert.export_tinyllava(params, model_cfg, os.path.join(workdir, "export"))
            summary["export"] = os.path.join(workdir, "export")
        sources = evaluation.eval_sources(config, log)
        if sources:
            log(f"[{config.stage}] evaluating on {', '.join(sources)}" + (" over the network" if remote else ""))
        results = evaluation.run_evaluation(config, model_cfg, params, tokenizer, sources,
                                            os.path.join(workdir, "eval"), dtype, log, remote=crossing)
        for name, scores in results.items():
            summary[f"{name}_accuracy"] = scores["accuracy"]
            writer.write(step, **{f"{name}_accuracy_{k}": v for k, v in scores["accuracy"].items()})
    if primary:
        _write_summary(workdir, summary)
    return summary


# ------------------------------------------------------------------------------------------------ stage 0
def train_tower_stage(config, workdir: str, log=print) -> dict:
    """Stage 0 in `workdir`: `config.tower.steps` steps of SigLIP's sigmoid loss on stage 1's image-caption pairs
    (`qtl_jax.tower`), on this process's default device; checkpointed and resumed like the other stages (the
    client's state and the data position). Returns its summary (also written to summary.json)."""
    if jax.process_count() > 1:  # each process would train its own tower on its own shard of the data
        raise ValueError(f"config.tower.steps: stage 0 runs in a single process, this is one of "
                         f"{jax.process_count()}; set tower.steps=0 here and give stage 1 (init_from) the tower "
                         f"folder of a one-process run")
    check_config(config)
    _check_resume(config, workdir)
    checkpoint.save_config(workdir, config)
    t = config.tower
    num_steps = min(t.steps, config.optim.max_steps) if config.optim.max_steps else t.steps
    source, data = train_source(config)
    tok_dir = tokenizer_dir(config)
    vocab_size = len(load_tokenizer(tok_dir))
    model_cfg = model_config(config, vocab_size)  # its vision tower is what stage 0 trains
    tower_cfg = tower.TowerConfig(model_cfg.vision, vocab_size, t.max_text_len, t.text_depth, t.embed_dim)
    per_epoch = len(source) // t.batch_size
    if not per_epoch:
        raise ValueError(f"config.tower.batch_size: {len(source)} image-caption pairs make no batch of "
                         f"{t.batch_size}")
    pipe = pipeline.PipelineConfig(
        template=config.data.template, batch_size=t.batch_size, image_size=tower_cfg.vision.image_size,
        image_tokens=model_cfg.image_tokens, max_length=config.data.max_length,
        buckets=tuple(config.data.buckets), seed=config.seed, num_epochs=math.ceil(num_steps / per_epoch),
        worker_count=config.data.worker_count, on_bad_sample=config.data.on_bad_sample)
    tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                     optax.adamw(lr_schedule(t.lr, t.warmup_ratio, num_steps), weight_decay=t.weight_decay,
                                 mask=_decay_mask))
    params = tower.init(tower_cfg, config.seed)
    state = {"params": params, "opt_state": tx.init(params)}
    step_fn = tower.make_step(tower_cfg, tx)
    iterator = iter(pipeline.make_loader(source, tok_dir, pipe))
    ckpt = checkpoint.manager(workdir)
    writer = MetricWriter(workdir, config.stage)
    try:
        saved = checkpoint.finished_steps(ckpt)
        step = saved[-1] if saved else 0
        if step:
            trees, iterator_state, _ = checkpoint.restore_trees(ckpt, step, {"client": state}, data)
            state = trees["client"]
            iterator.set_state(iterator_state)
        writer.truncate(step)
        logged = {}
        while step < num_steps and not _interrupted(config, step, num_steps):
            batch = next(iterator)
            ids, lengths, positives = tower.captions(batch["labels"], t.max_text_len)
            state["params"], state["opt_state"], metrics = step_fn(state["params"], state["opt_state"],
                                                                   batch["images"], ids, lengths, positives)
            step += 1
            if step % config.log_every == 0 or step == num_steps:
                logged = {k: float(v) for k, v in metrics.items()}
                writer.write(step, **{f"tower_{k}": v for k, v in logged.items()})
            if step % config.checkpoint_every == 0 or step == num_steps or _interrupted(config, step, num_steps):
                checkpoint.save_trees(ckpt, step, {"client": state}, iterator.get_state(), {}, data)
    finally:
        writer.close()
        ckpt.close()
    if _interrupted(config, step, num_steps):
        return {"stage": config.stage, "steps": step, "interrupted": True}
    summary = {"stage": config.stage, "steps": step, "samples": step * t.batch_size,
               **{f"final_{k}": v for k, v in logged.items()}}
    _write_summary(workdir, summary)  # stage 0 runs in one process only
    return summary


# ---------------------------------------------------------------------------------------------- recipe
def stage1_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Stage 1 of `configs/finetune.py`: its own `stage1` section, with the shared fields of stage 2.

    Shared: the data fields but `STAGE_DATA_FIELDS` (each stage keeps its own annotation file, image folder,
    template and evaluation files), the model, compressor, split and tower (stage 0) sections, seed,
    stop/log/checkpoint cadence and `optim.max_steps`. Everything else in `stage1` is stage 1's own."""
    stage1 = ml_collections.ConfigDict(config.stage1.to_dict())
    for section in ("data", "model", "compressor", "split", "tower"):
        if section not in config:  # a config saved before the section existed
            continue
        if section not in stage1:
            stage1[section] = ml_collections.ConfigDict()
        for key, value in config[section].items():
            if not (section == "data" and key in STAGE_DATA_FIELDS):
                stage1[section][key] = value
    for key in ("seed", "stop_after", "log_every", "checkpoint_every"):
        stage1[key] = config[key]
    stage1.optim.max_steps = config.optim.max_steps
    return stage1


def _check_resume(config, stage_dir: str) -> None:
    if (checkpoint.latest_step(stage_dir) is not None
            and os.path.isfile(os.path.join(stage_dir, checkpoint.CONFIG_FILE))):
        checkpoint.check_resume_config(stage_dir, config)


def stage_plan(config: ml_collections.ConfigDict, workdir: str, data: bool = True) -> list[tuple]:
    """[(stage config, stage folder)] of a run: stage 1 then stage 2 when finetuning without init_from, else
    the one stage; stage 0 ("tower") first when a stage 1 without init_from has `tower.steps` > 0. Checks every
    stage's config (`data=False`: the server, which has no data and takes no part in stage 0, so its plan leaves
    stage 0 out) and refuses a folder that holds a run with another config."""
    check_config(config, data=data)  # the fields as the user set them (stage 1 shares most of them)
    if config.stage == "finetune" and not config.init_from:
        if "stage1" not in config:
            raise ValueError("config.init_from is empty and the config has no stage1 section to run first")
        stage1 = stage1_config(config)
        check_config(stage1, "config.stage1", data=data)
        stage1_dir = os.path.join(workdir, "pretrain")
        stages = _with_stage0(stage1, stage1_dir, workdir, data)
        config = ml_collections.ConfigDict(config.to_dict())
        config.init_from = stage1_dir
        del config["stage1"]
        stages.append((config, os.path.join(workdir, config.stage)))
    else:
        stages = _with_stage0(config, os.path.join(workdir, config.stage), workdir, data)
    for stage_config, stage_dir in stages:
        _check_resume(stage_config, stage_dir)
    return stages


def _with_stage0(config, stage_dir: str, workdir: str, data: bool) -> list[tuple]:
    """[(config, stage_dir)], or stage 0 into WORKDIR/tower and then this stage 1 starting from it."""
    if config.stage != "pretrain" or config.init_from or not data or not config.get("tower", {}).get("steps"):
        return [(config, stage_dir)]
    tower_dir = os.path.join(workdir, "tower")
    stage0 = ml_collections.ConfigDict(config.to_dict())
    stage0.stage = "tower"
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = tower_dir
    return [(stage0, tower_dir), (config, stage_dir)]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the configured stage (stage 1 first when finetuning without init_from); prints a summary.

    Before any work: both stages' configs are checked, and a workdir that holds a run with another config is
    refused (`checkpoint.check_resume_config`). The config is saved as `workdir/config.json`, and each stage's
    own as `workdir/STAGE/config.json`."""
    full = config
    stages = stage_plan(config, workdir)
    checkpoint.save_config(workdir, full)
    summaries = []
    for stage_config, stage_dir in stages:
        run = train_tower_stage if stage_config.stage == "tower" else train_stage
        summaries.append(run(stage_config, stage_dir))
        if summaries[-1].get("interrupted"):
            break
    _print_summary(summaries)
    if jax.process_index() == 0:
        _write_summary(workdir, summaries)
    return summaries[-1]


def _write_summary(folder: str, summary) -> None:
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _print_summary(summaries) -> None:
    for s in summaries:
        if s.get("interrupted"):
            print(f"\n[{s['stage']}] stopped at step {s['steps']} (stop_after); run again to resume")
            continue
        if s["stage"] == "tower":
            print(f"\n[tower] {s['steps']} steps of SigLIP's sigmoid loss on {s['samples']} image-caption pairs: "
                  f"loss {s.get('final_loss', float('nan')):.3f}, batch retrieval {s.get('final_retrieval', 0):.3f}")
            continue
        print(f"\n[{s['stage']}] {s['steps']} steps, {s['samples']} samples"
              + (f", {s['skipped_samples']} skipped" if s.get("skipped_samples") else ""))
        if "uplink_bytes_per_sample" in s:
            print(f"  uplink {s['uplink_bytes_per_sample'] / 1e3:.1f} kB/sample ({s['uplink_bytes_run'] / 1e6:.1f} MB "
                  f"run, {s['uplink_ratio_to_fp16']:.3f} x fp16), downlink {s['downlink_bytes_per_sample'] / 1e3:.1f} "
                  f"kB/sample ({s['downlink_bytes_run'] / 1e6:.1f} MB run)")
        for key, acc in s.items():
            if key.endswith("_accuracy") and acc:
                per_type = ", ".join(f"{k} {v:.3f}" for k, v in sorted(acc.items()) if k != "all")
                print(f"  {key[:-len('_accuracy')]} accuracy {acc.get('all', float('nan')):.3f}"
                      + (f"  ({per_type})" if per_type else ""))
