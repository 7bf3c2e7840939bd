"""`train_and_evaluate(config, workdir)`: the split training recipe, read top to bottom (SPEC §4).

Sections: data -> model -> optimizer -> split runtime (meshes) -> checkpoint/resume -> loop -> evaluation ->
summary. `finetune` with an empty `init_from` first runs `pretrain` into `workdir/pretrain`, so one command
does the whole recipe.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from qtl_jax.compress import COMPRESSORS, make_codec
from qtl_jax.data import builders, pipeline
from qtl_jax.data.preprocess import load_image, preprocess_image
from qtl_jax.data.templates import inference_prompt
from qtl_jax.data.tokenizer import load_tokenizer
from qtl_jax.metrics import MetricWriter
from qtl_jax.models import convert
from qtl_jax.models import tinyllava as T
from qtl_jax.models.openelm import OPENELM_270M, OPENELM_TINY
from qtl_jax.models.siglip import SIGLIP_SO400M, SIGLIP_TINY
from qtl_jax.split.runtime import SplitConfig, SplitTrainer

TRAINABLE_PARTS = ("vision_tower", "connector", "compressors", "token_embeddings", "language_model")


# ------------------------------------------------------------------------------------------------ checks
def check_config(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any data generation or compilation, with the field that is wrong."""
    for field in ("image", "text"):
        name = config.compressor[field]
        if name not in COMPRESSORS:
            raise ValueError(f"config.compressor.{field}: unknown compressor {name!r}; expected one of {COMPRESSORS}")
    if not 1 <= config.compressor.bits <= 8:
        raise ValueError(f"config.compressor.bits must be in 1..8, got {config.compressor.bits}")
    SplitConfig.from_config(config.split).check_devices()
    if config.optim.client_lr_scale < 0:
        raise ValueError(f"config.optim.client_lr_scale must be >= 0, got {config.optim.client_lr_scale}")
    if not 0.0 <= config.optim.client_delay_ratio < 1.0:
        raise ValueError(f"config.optim.client_delay_ratio must be in [0, 1), got {config.optim.client_delay_ratio}")
    unknown = set(config.optim.trainable) - set(TRAINABLE_PARTS)
    if unknown:
        raise ValueError(f"config.optim.trainable: unknown parts {sorted(unknown)}; expected {TRAINABLE_PARTS}")
    for field in ("siglip_checkpoint", "openelm_checkpoint", "tinyllava_checkpoint"):
        path = config.model[field]
        if path and not os.path.isdir(os.path.expanduser(path)):
            raise FileNotFoundError(f"config.model.{field}: checkpoint folder {path!r} does not exist")
    if config.data.dataset == "llava":
        for field in ("annotation_file", "image_root"):
            if not os.path.exists(os.path.expanduser(config.data[field])):
                raise FileNotFoundError(f"config.data.{field}: {config.data[field]!r} does not exist")
        if not config.data.tokenizer:
            raise ValueError("config.data.tokenizer: LLaVA data needs a tokenizer folder (e.g. Llama-2's)")
    elif config.data.dataset != "shapes":
        raise ValueError(f"config.data.dataset must be 'shapes' or 'llava', got {config.data.dataset!r}")
    if config.init_from and not os.path.isdir(os.path.join(config.init_from, "checkpoints")):
        raise FileNotFoundError(f"config.init_from: {config.init_from!r} holds no checkpoints/ of a stage-1 run")


# -------------------------------------------------------------------------------------------------- data
def prepare_data(config):
    """(train source, eval sources {name: source}, tokenizer folder)."""
    data_dir = os.path.expanduser(config.data.data_dir)
    if config.data.dataset == "shapes":
        builder, tokenizer_dir = builders.prepare_shapes(data_dir, config.data.shapes_config)
        sources = builder.as_data_source()
        train = sources["pretrain" if config.stage == "pretrain" else "train"]
        evals = {} if config.stage == "pretrain" else {"validation": sources["validation"], "test": sources["test"]}
        return train, evals, config.data.tokenizer or tokenizer_dir
    builder = builders.prepare_llava(data_dir, config.data.annotation_file, config.data.image_root,
                                     config.data.on_bad_sample)
    return builder.as_data_source()["train"], {}, config.data.tokenizer


# ------------------------------------------------------------------------------------------------- model
def model_config(config, vocab_size: int) -> T.TinyLlavaConfig:
    tiny = config.model.size == "tiny"
    lm = dataclasses.replace(OPENELM_TINY, vocab_size=vocab_size) if tiny else OPENELM_270M
    return T.TinyLlavaConfig(
        vision=SIGLIP_TINY if tiny else SIGLIP_SO400M, lm=lm,
        image_codec=make_codec(config.compressor.image, config.compressor.bits),
        text_codec=make_codec(config.compressor.text, config.compressor.bits),
        text_transport=config.compressor.text_transport, commitment_weight=config.compressor.commitment_weight)


def _example_batch(model_cfg, text_len: int = 8):
    size = model_cfg.vision.image_size
    ids = np.ones((1, text_len), np.int32)
    ids[0, 1] = T.IMAGE_TOKEN_INDEX
    return (np.zeros((1, size, size, 3), np.float32), ids, np.ones((1, text_len), bool),
            np.full((1, text_len), -100, np.int32))


def init_params(config, model_cfg, dtype):
    """(plain params, boxed abstract tree): random init, then HF checkpoints or a stage-1 run on top."""
    model = T.TinyLlava(model_cfg, dtype)
    example = _example_batch(model_cfg)
    boxed = jax.eval_shape(model.init, jax.random.key(config.seed), *example)["params"]
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(config.seed), *example)["params"])
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
def _part(path: tuple) -> str:
    top = path[0]
    return "compressors" if top in ("image_compressor", "text_compressor") else top


def lr_schedule(lr: float, warmup_ratio: float, num_steps: int, delay: int = 0) -> optax.Schedule:
    """0 for `delay` steps, then linear warmup (`warmup_ratio` of the steps left) and cosine decay to 0 at
    `num_steps`."""
    steps = max(num_steps - delay, 1)
    warmup = max(1, round(warmup_ratio * steps))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), 0.0)
    return optax.join_schedules([optax.constant_schedule(0.0), schedule], [delay]) if delay else schedule


def build_optimizers(config, params, num_steps: int):
    """One optax chain per half: clip, AdamW with warmup + cosine, no decay on biases/norms/1-D params,
    frozen parts zeroed, gradient accumulation (MultiSteps) when accum_steps > 1.

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

    def make(half_params, schedule):
        names = jax.tree_util.tree_map_with_path(lambda p, _: tuple(k.key for k in p), half_params)
        decay = jax.tree.map(lambda n, x: x.ndim > 1 and n[-1] not in ("bias", "scale", "weight"),
                             names, half_params, is_leaf=lambda n: isinstance(n, tuple))
        train = jax.tree.map(lambda n: "train" if _part(n) in o.trainable else "freeze", names,
                             is_leaf=lambda n: isinstance(n, tuple))
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                         optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay, mask=decay))
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, train)
        return optax.MultiSteps(tx, o.accum_steps) if o.accum_steps > 1 else tx

    return make(params["client"], schedules["client"]), make(params["server"], schedules["server"])


# ------------------------------------------------------------------------------------------- checkpoints
def _manager(workdir: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def _state_tree(trainer: SplitTrainer, half: str) -> dict:
    st = trainer.state[half]
    return {"params": st.params, "opt_state": st.opt_state}


def save_checkpoint(manager, trainer: SplitTrainer, step: int, iterator_state: bytes, metrics: dict) -> None:
    """Both halves, both optimizer states, the data iterator position and the step, saved atomically."""
    manager.save(step, args=ocp.args.Composite(
        client=ocp.args.StandardSave(_state_tree(trainer, "client")),
        server=ocp.args.StandardSave(_state_tree(trainer, "server")),
        meta=ocp.args.JsonSave({"step": step, "iterator": base64.b64encode(iterator_state).decode(),
                                "totals": metrics})))
    manager.wait_until_finished()


def restore_checkpoint(manager, trainer: SplitTrainer, step: int):
    """Puts both halves back on their meshes; returns (iterator state bytes, totals)."""
    from qtl_jax.split.runtime import HalfState

    abstract = {h: jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(trainer, h)) for h in ("client", "server")}
    r = manager.restore(step, args=ocp.args.Composite(
        client=ocp.args.StandardRestore(abstract["client"]), server=ocp.args.StandardRestore(abstract["server"]),
        meta=ocp.args.JsonRestore()))
    for half in ("client", "server"):
        trainer.state[half] = HalfState(r[half]["params"], r[half]["opt_state"])
    return base64.b64decode(r.meta["iterator"]), r.meta["totals"]


def final_params(workdir: str) -> dict:
    """The {"client", "server"} parameters of the newest checkpoint of a run (host arrays)."""
    manager = _manager(workdir)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint to initialise from")
    r = manager.restore(step, args=ocp.args.Composite(client=ocp.args.StandardRestore(),
                                                      server=ocp.args.StandardRestore()))
    return {"client": r["client"]["params"], "server": r["server"]["params"]}


# ---------------------------------------------------------------------------------------------- evaluation
def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def evaluate(config, model_cfg, params, source, tokenizer_dir: str, dtype) -> dict:
    """Generation-based exact-match accuracy, overall and per question type, on a QA source."""
    tok = load_tokenizer(tokenizer_dir)
    n = len(source) if not config.eval.max_examples else min(len(source), config.eval.max_examples)
    records = [source[i] for i in range(n)]
    correct, total = {}, {}
    bucket = config.data.buckets[-1]
    client = jax.jit(lambda p, *b: T.client_apply(model_cfg, p, *b, dtype=dtype).uplink)
    embed = T.token_rows_fn(model_cfg, params, dtype) if model_cfg.quantized_text else None
    for start in range(0, n, config.eval.batch_size):
        chunk = records[start:start + config.eval.batch_size]
        size = model_cfg.vision.image_size
        batch = len(chunk)
        ids = np.zeros((config.eval.batch_size, bucket), np.int32)
        images = np.zeros((config.eval.batch_size, size, size, 3), np.float32)
        answers, types = [], []
        for i, r in enumerate(chunk):
            conv = json.loads(r["conversations"])
            prompt = inference_prompt(conv, tok, config.data.template)[:bucket]
            ids[i, :len(prompt)] = prompt
            if len(r["image"]):
                images[i] = preprocess_image(load_image(bytes(r["image"])), size)
            answers.append(conv[-1]["value"])
            types.append(r["question_type"].decode() if isinstance(r["question_type"], bytes) else r["question_type"])
        mask = ids != 0
        mask[:, 0] = True
        uplink = client(params["client"], images, ids, mask, np.full_like(ids, -100))
        out = T.server_generate(model_cfg, params["server"], uplink, dtype, max_new_tokens=config.eval.max_new_tokens,
                                eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, embed=embed)
        for i in range(batch):
            tokens = [t for t in out[i].tolist() if t not in (tok.eos_token_id, tok.pad_token_id)]
            hit = normalize_answer(tok.decode(tokens)) == normalize_answer(answers[i])
            for key in {"all", types[i]} - {""}:
                correct[key] = correct.get(key, 0) + hit
                total[key] = total.get(key, 0) + 1
    return {k: correct[k] / total[k] for k in total if total[k]}


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


def train_stage(config, workdir: str) -> dict:
    """One stage: returns its summary dict (also written to workdir/summary.json)."""
    from tqdm import tqdm

    check_config(config)
    dtype = jnp.dtype(config.model.dtype)
    train_source, eval_sources, tokenizer_dir = prepare_data(config)
    tok = load_tokenizer(tokenizer_dir)
    model_cfg = model_config(config, len(tok))
    params, boxed = init_params(config, model_cfg, dtype)
    if config.stage == "finetune" and config.init_from:
        # Parts stage 2 does not have (e.g. the text compressor when it sends token ids) are left out.
        params = convert.merge_params(params, final_params(config.init_from), ignore_extra=True)

    pipe = pipeline.PipelineConfig(
        template=config.data.template, batch_size=config.optim.batch_size, image_size=model_cfg.vision.image_size,
        image_tokens=model_cfg.image_tokens, max_length=config.data.max_length, buckets=tuple(config.data.buckets),
        seed=config.seed, num_epochs=config.optim.epochs, worker_count=config.data.worker_count,
        on_bad_sample=config.data.on_bad_sample)
    micro_steps = config.optim.epochs * (len(train_source) // (pipe.batch_size * jax.process_count()))
    num_steps = micro_steps // config.optim.accum_steps
    if config.optim.max_steps:
        num_steps = min(num_steps, config.optim.max_steps)
        micro_steps = num_steps * config.optim.accum_steps
    tx_client, tx_server = build_optimizers(config, params, num_steps)
    split = SplitConfig.from_config(config.split)
    trainer = SplitTrainer(model_cfg, split, tx_client, tx_server, params, dtype=dtype, boxed_like=boxed)

    iterator = iter(pipeline.make_loader(train_source, tokenizer_dir, pipe))
    manager = _manager(workdir)
    step = 0
    totals = {"uplink_bytes": 0, "downlink_bytes": 0, "samples": 0}
    if manager.latest_step() is not None:
        step = manager.latest_step()
        iterator_state, totals = restore_checkpoint(manager, trainer, step)
        iterator.set_state(iterator_state)
    writer = MetricWriter(workdir, config.stage)
    bar = tqdm(total=micro_steps, initial=step, desc=config.stage, unit="step", dynamic_ncols=True)
    last = time.perf_counter()
    while step < micro_steps:
        batch = next(iterator)
        metrics = trainer.step(batch)
        step += 1
        totals["uplink_bytes"] += metrics["uplink_bytes"]
        totals["downlink_bytes"] += metrics["downlink_bytes"]
        totals["samples"] += len(batch["input_ids"])
        if step % config.log_every == 0 or step == micro_steps:
            now = time.perf_counter()
            ce = float(metrics["ce_loss"])
            step_time = (now - last) / config.log_every
            last = now
            writer.write(step, ce_loss=ce, commitment_loss=float(metrics["commitment_loss"]), step_time=step_time,
                         uplink_mb=metrics["uplink_bytes"] / 1e6, downlink_mb=metrics["downlink_bytes"] / 1e6)
            bar.set_postfix(loss=f"{ce:.3f}", s_per_step=f"{step_time:.2f}",
                            up_mb=f"{metrics['uplink_bytes'] / 1e6:.2f}",
                            down_mb=f"{metrics['downlink_bytes'] / 1e6:.2f}")
        bar.update(1)
        interrupted = bool(config.stop_after) and step >= config.stop_after and step < micro_steps
        if step % config.checkpoint_every == 0 or step == micro_steps or interrupted:
            save_checkpoint(manager, trainer, step, iterator.get_state(), totals)
        if interrupted:
            bar.close()
            writer.close()
            return {"stage": config.stage, "steps": step, "interrupted": True}
    bar.close()

    params = jax.device_get(trainer.params())
    summary = {"stage": config.stage, "steps": step, "samples": totals["samples"],
               "uplink_bytes_run": totals["uplink_bytes"], "downlink_bytes_run": totals["downlink_bytes"]}
    if totals["samples"]:
        summary["uplink_bytes_per_sample"] = totals["uplink_bytes"] / totals["samples"]
        summary["downlink_bytes_per_sample"] = totals["downlink_bytes"] / totals["samples"]
        example = _example_batch(model_cfg, max(config.data.buckets[0], 8))
        example = tuple(np.repeat(x, config.optim.batch_size, 0) for x in example)
        summary["uplink_ratio_to_fp16"] = uplink_ratio_to_fp16(model_cfg, example)
    if config.stage == "finetune":  # the trained model back in the Hugging Face layout, for PyTorch users
        convert.export_tinyllava(params, model_cfg, os.path.join(workdir, "export"))
        summary["export"] = os.path.join(workdir, "export")
    for name, source in eval_sources.items():
        summary[f"{name}_accuracy"] = evaluate(config, model_cfg, params, source, tokenizer_dir, dtype)
        writer.write(step, **{f"{name}_accuracy_{k}": v for k, v in summary[f"{name}_accuracy"].items()})
    writer.close()
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the configured stage (stage 1 first when finetuning without init_from); prints a summary."""
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    summaries = []
    if config.stage == "finetune" and not config.init_from:
        if "stage1" not in config:
            raise ValueError("config.init_from is empty and the config has no stage1 section to run first")
        stage1 = ml_collections.ConfigDict(config.stage1.to_dict())
        for section in ("data", "model", "compressor", "split"):
            for key, value in config[section].items():
                if key not in ("template", "annotation_file"):
                    stage1[section][key] = value
        for key in ("seed", "stop_after", "log_every", "checkpoint_every"):
            stage1[key] = config[key]
        stage1.optim.max_steps = config.optim.max_steps
        stage1_dir = os.path.join(workdir, "pretrain")
        summaries.append(train_stage(stage1, stage1_dir))
        if summaries[-1].get("interrupted"):
            return summaries[-1]
        config = ml_collections.ConfigDict(config.to_dict())
        config.init_from = stage1_dir
    summaries.append(train_stage(config, os.path.join(workdir, config.stage)))
    _print_summary(summaries)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    return summaries[-1]


def _print_summary(summaries) -> None:
    for s in summaries:
        if s.get("interrupted"):
            print(f"\n[{s['stage']}] stopped at step {s['steps']} (stop_after); run again to resume")
            continue
        print(f"\n[{s['stage']}] {s['steps']} steps, {s['samples']} samples")
        if "uplink_bytes_per_sample" in s:
            print(f"  uplink {s['uplink_bytes_per_sample'] / 1e3:.1f} kB/sample ({s['uplink_bytes_run'] / 1e6:.1f} MB "
                  f"run, {s['uplink_ratio_to_fp16']:.3f} x fp16), downlink {s['downlink_bytes_per_sample'] / 1e3:.1f} "
                  f"kB/sample ({s['downlink_bytes_run'] / 1e6:.1f} MB run)")
        for split in ("validation", "test"):
            acc = s.get(f"{split}_accuracy")
            if acc:
                per_type = ", ".join(f"{k} {v:.3f}" for k, v in sorted(acc.items()) if k != "all")
                print(f"  {split} accuracy {acc.get('all', float('nan')):.3f}  ({per_type})")
