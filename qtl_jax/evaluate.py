"""Evaluation: generate answers to LLaVA-format questions with a trained model and score them (SPEC §7).

A question/answer file is LLaVA-format (the training format): each sample's conversation ends with the
reference answer, everything before it is the prompt. Answers are generated greedily with the KV cache
(`tinyllava.server_generate`) and scored by exact match after VQA-style normalisation (lower case,
punctuation and articles removed), overall and per `question_type` (or `category`) when the samples have
one. Every answer is written to a JSON-lines file beside the scores, so other scorers can be run on it.

Inference runs the codecs' inference variant (`TinyLlavaConfig.for_inference`): RD-FSQ statistics per
sample, over that sample's real rows, and generated tokens quantized with their prompt's statistics, so an
answer does not depend on the other samples of its batch or on the batch size.

    python -m qtl_jax.evaluate --workdir W                         # the run's own evaluation sets again
    python -m qtl_jax.evaluate --workdir W --eval gqa=data/gqa_qa.json --image-root data/gqa/images
    python -m qtl_jax.evaluate --workdir W --eval vqav2=data/vqav2_val.json --scorer vqav2  # qtl_jax.scorers

`W` is a `train.py` workdir (its `finetune` stage is used) or a stage folder; the model, tokenizer, template
and compressors come from the config the run saved. Outputs go to `STAGE/eval/NAME.answers.jsonl` and
`STAGE/eval/NAME.scores.json`. At the end of stage 2 the trainer runs the same evaluation on the built-in
validation and test splits (Shapes-VQA) and on every file of `config.data.eval_files`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qtl_jax import files
from qtl_jax.data import builders
from qtl_jax.data.preprocess import load_image, preprocess_image
from qtl_jax.data.templates import BadSample, inference_prompt
from qtl_jax.data.tokenizer import Tokenizer
from qtl_jax.models import tinyllava as T


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# Module-level jits with the config static: compiled once per (config, dtype, shapes), shared by every Answerer.
_client_forward = jax.jit(T.client_apply, static_argnums=0, static_argnames="dtype")


def _token_payload_impl(config: T.TinyLlavaConfig, dtype, client_params, ids, moments):
    return T.TinyLlavaClient(config, dtype).apply({"params": client_params}, ids, moments,
                                                  method=T.TinyLlavaClient.token_payload)


_token_payload = jax.jit(_token_payload_impl, static_argnums=(0, 1))


class Answerer:
    """Generates answers of a trained model for batches of prompts: client and server halves in one process, or
    the client's here and the server's behind `remote` (a `RemoteCrossing`: the prompt's uplink goes over, and
    with quantized text embeddings each generated token costs one round trip, its row coded here).

    In one process a batch is three compiled calls (client half, prompt splice, and the whole decode loop with
    the new tokens' rows computed on the device: `TokenRows`), each compiled once per (prompt length bucket,
    batch size, max_new_tokens) for all the Answerers of a process; the parameters stay on the device and the
    host reads the tokens once per batch.

    Args:
      model_config: the model as trained; evaluation runs `model_config.for_inference()`.
      params: {"client", "server"} parameters ({"client"} with `remote`).
      tokenizer: the run's tokenizer.
      dtype: compute dtype.
      remote: a `qtl_jax.split.remote.client.RemoteCrossing` with an open session, or None.
    """

    def __init__(self, model_config: T.TinyLlavaConfig, params: dict, tokenizer: Tokenizer, dtype=jnp.float32,
                 remote=None):
        self.config = model_config.for_inference()
        # On the device once: host arrays as jit arguments would be copied over on every call.
        params = jax.device_put(params)
        self.params, self.tokenizer, self.dtype, self.remote = params, tokenizer, dtype, remote

    def answer(self, images: np.ndarray, prompts: Sequence[np.ndarray], length: int,
               max_new_tokens: int) -> list[str]:
        """Answers for prompts (int32 ids each, `IMAGE_TOKEN_INDEX` at the image) padded to `length` tokens.

        Args:
          images: float32[B, S, S, 3] preprocessed images (zeros for text-only prompts).
          prompts: B token-id arrays, each at most `length` long.
          length: the padded prompt length (a bucket).
          max_new_tokens: most tokens generated per answer.
        """
        batch = len(prompts)
        ids = np.full((batch, length), self.tokenizer.pad_id, np.int32)
        lengths = np.array([len(p) for p in prompts], np.int32)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = p
        mask = np.arange(length)[None, :] < lengths[:, None]  # from the tokenizer's lengths, never from ids
        out = _client_forward(self.config, self.params["client"], images, ids, mask,
                              np.full_like(ids, T.IGNORE_INDEX), dtype=self.dtype)
        tokens = self._generate(out, {"max_new_tokens": max_new_tokens, "eos_id": self.tokenizer.eos_id,
                                      "pad_id": self.tokenizer.pad_id})
        return [self.tokenizer.decode([t for t in row.tolist() if t not in (self.tokenizer.eos_id,
                                                                            self.tokenizer.pad_id)])
                for row in tokens]

    def _generate(self, out: T.ClientResult, options: dict) -> np.ndarray:
        """int32[B, max_new_tokens] host array: the tokens generated for the client half's result `out`."""
        cfg, dtype = self.config, self.dtype
        if self.remote is not None:  # the server generates; each new token's row comes from here
            payload = None
            if cfg.quantized_text:
                payload = lambda tokens: _token_payload(cfg, dtype, self.params["client"], tokens, out.text_moments)
            return self.remote.generate(out.uplink, token_payload=payload, **options)
        rows = {}  # the whole decode loop on the device
        if cfg.quantized_text:
            rows = {"embed_fn": T.TokenRows(cfg, dtype), "embed_params": (self.params, out.text_moments)}
        return T.server_generate(cfg, self.params["server"], out.uplink, dtype, **rows, **options)


def evaluate_source(answerer: Answerer, source, *, template: str, buckets: Sequence[int], batch_size: int,
                    max_new_tokens: int, max_examples: int = 0, on_bad_sample: str = "fail",
                    answers_file: str | None = None, name: str = "eval") -> dict:
    """Generates and scores the answers of every sample of a data source (records of the builders' shape).

    A prompt longer than the largest bucket fails (`BadSample` naming the sample) or, with
    `on_bad_sample="skip"`, is left out and counted. Each batch is padded to the smallest bucket that holds its
    longest prompt; the last batch is filled with empty prompts, whose answers are dropped.

    Returns:
      {"accuracy": {"all": float, <question type>: float, ...}, "samples": int, "skipped": int,
       "skipped_reasons": [...]}; samples without a reference answer are generated but not scored.
    """
    tok = answerer.tokenizer
    size = answerer.config.vision.image_size
    n = len(source) if not max_examples else min(len(source), max_examples)
    correct, total, skipped = {}, {}, []
    with files.atomic_open(answers_file, encoding="utf-8") if answers_file else contextlib.nullcontext() as out:
        for start in range(0, n, batch_size):
            items = []
            for index in range(start, min(start + batch_size, n)):
                record = source[index]
                sample_id = _text(record["id"])
                conv = json.loads(_text(record["conversations"]))
                prompt = inference_prompt(conv, tok, template, sample_id)
                if len(prompt) > buckets[-1]:
                    reason = (f"{name}: sample {sample_id}: its prompt has {len(prompt)} tokens, more than the "
                              f"largest bucket {buckets[-1]}")
                    if on_bad_sample == "fail":
                        raise BadSample(reason)
                    skipped.append(reason)
                    continue
                image = np.zeros((size, size, 3), np.float32)
                if len(record["image"]):
                    image = preprocess_image(load_image(bytes(record["image"]), sample_id), size)
                last = conv[-1] if conv else {}
                items.append({"id": sample_id, "prompt": prompt, "image": image,
                              "question_type": _text(record.get("question_type", b"")),
                              "question": next((t["value"] for t in reversed(conv) if t.get("from") == "human"), ""),
                              "reference": last.get("value") if last.get("from") == "gpt" else None})
            if not items:
                continue
            empty = np.array([tok.bos_id], np.int32)
            prompts = [it["prompt"] for it in items] + [empty] * (batch_size - len(items))
            images = np.stack([it["image"] for it in items] + [np.zeros((size, size, 3), np.float32)]
                              * (batch_size - len(items)))
            length = next(b for b in buckets if b >= max(len(p) for p in prompts))
            answers = answerer.answer(images, prompts, length, max_new_tokens)
            for it, answer in zip(items, answers, strict=False):
                hit = None
                if it["reference"] is not None:
                    hit = normalize_answer(answer) == normalize_answer(it["reference"])
                    for key in {"all", it["question_type"]} - {""}:
                        correct[key] = correct.get(key, 0) + hit
                        total[key] = total.get(key, 0) + 1
                if out is not None:
                    out.write(json.dumps({"id": it["id"], "question_type": it["question_type"],
                                          "question": it["question"], "answer": answer,
                                          "reference": it["reference"], "correct": hit}) + "\n")
    return {"accuracy": {k: correct[k] / total[k] for k in total}, "samples": total.get("all", 0),
            "skipped": len(skipped), "skipped_reasons": skipped[:100]}


def eval_sources(config, log=print) -> dict:
    """{name: data source} of a stage-2 config: the built-in dataset's validation and test splits and
    every `config.data.eval_files` entry (name -> LLaVA-format file with answers), converted once."""
    data_dir = os.path.expanduser(config.data.data_dir)
    sources = {}
    if config.data.dataset == "shapes":
        builder, _ = builders.prepare_shapes(data_dir, config.data.shapes_config, log=log)
        split = builder.as_data_source()
        sources.update(validation=split["validation"], test=split["test"])
    elif config.data.dataset == "digits":
        from qtl_jax.data import digits

        folder = digits.build(os.path.join(data_dir, "digits"), log=log)
        for name in ("validation", "test"):
            sources[name] = builders.prepare_llava(data_dir, os.path.join(folder, f"{name}.json"), folder,
                                                   config.data.on_bad_sample, log=log,
                                                   template=config.data.template).as_data_source()["train"]
    for name, file in parse_eval_files(config.data.eval_files).items():
        sources[name] = builders.prepare_llava(data_dir, os.path.expanduser(file), eval_image_root(config, file),
                                               config.data.on_bad_sample, log=log,
                                               template=config.data.template).as_data_source()["train"]
    return sources


def parse_eval_files(value: str, field: str = "config.data.eval_files") -> dict[str, str]:
    """"NAME=FILE[,NAME=FILE...]" -> {name: file}; ValueError naming `field` when malformed."""
    files = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, file = item.partition("=")
        if not sep or not name.strip() or not file.strip():
            raise ValueError(f"{field}: expected NAME=FILE[,NAME=FILE...], got {item!r}")
        if name.strip() in files:
            raise ValueError(f"{field}: the name {name.strip()!r} appears twice")
        files[name.strip()] = file.strip()
    return files


def eval_image_root(config, file: str) -> str:
    """Where an eval file's image paths point: data.eval_image_root, else data.image_root, else its folder."""
    root = config.data.eval_image_root or config.data.image_root
    return os.path.expanduser(root) if root else os.path.dirname(os.path.abspath(os.path.expanduser(file)))


def run_evaluation(config, model_cfg, params, tokenizer: Tokenizer, sources: dict, out_dir: str, dtype,
                   log=print, scorer: str = "exact", remote=None) -> dict:
    """Evaluates every source, writing `out_dir/NAME.answers.jsonl` and `NAME.scores.json`; returns
    {name: scores}. With `remote` (a `RemoteCrossing`), `params` are the client's and the server generates. A
    `scorer` other than "exact" (`qtl_jax.scorers.SCORERS`) also scores the answers to each
    `config.data.eval_files` file against that file, under "scorer" in its scores."""
    answerer = Answerer(model_cfg, params, tokenizer, dtype, remote)
    primary = jax.process_index() == 0  # every process generates; process 0 writes
    question_files = parse_eval_files(config.data.eval_files)
    results = {}
    for name, source in sources.items():
        answers_file = os.path.join(out_dir, f"{name}.answers.jsonl")
        scores = evaluate_source(
            answerer, source, template=config.data.template, buckets=tuple(config.data.buckets),
            batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens,
            max_examples=config.eval.max_examples, on_bad_sample=config.data.on_bad_sample,
            answers_file=answers_file if primary else None, name=name)
        if primary and scorer != "exact":
            if name in question_files:
                from qtl_jax.scorers import score_file

                # partial: max_examples and skipped samples leave questions unanswered
                scores["scorer"] = score_file(answers_file, os.path.expanduser(question_files[name]), scorer,
                                              partial=True)
                log(f"  {name}: {scorer} accuracy {scores['scorer']['accuracy'].get('all', float('nan')):.3f}"
                    + (f", total {scores['scorer']['total']:.1f}" if "total" in scores["scorer"] else ""))
            else:
                log(f"  {name}: no question file (built-in split), so no {scorer} scores")
        if primary:
            with open(os.path.join(out_dir, f"{name}.scores.json"), "w") as f:
                json.dump(scores, f, indent=2)
        log(f"  {name}: accuracy {scores['accuracy'].get('all', float('nan')):.3f} on {scores['samples']} "
            f"samples" + (f" ({scores['skipped']} skipped)" if scores["skipped"] else "")
            + f"; answers in {out_dir}/{name}.answers.jsonl")
        results[name] = scores
    return results


def find_stage(workdir: str) -> str:
    """The stage folder to evaluate: WORKDIR/finetune when it exists, else WORKDIR itself (a stage folder)."""
    from qtl_jax.checkpoint import CONFIG_FILE

    for stage_dir in (os.path.join(workdir, "finetune"), workdir):
        if os.path.isfile(os.path.join(stage_dir, CONFIG_FILE)) and os.path.isdir(os.path.join(stage_dir,
                                                                                                "checkpoints")):
            return stage_dir
    raise FileNotFoundError(f"{workdir}: neither it nor {workdir}/finetune is a trained stage (a folder with "
                            f"config.json and checkpoints/)")


def main(argv: Sequence[str] | None = None) -> None:
    from qtl_jax import checkpoint, trainer
    from qtl_jax.data.tokenizer import load_tokenizer
    from qtl_jax.scorers import SCORERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a train.py workdir or one of its stage folders")
    parser.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                        help="a LLaVA-format question/answer file to evaluate (repeatable); default: the run's own")
    parser.add_argument("--image-root", default=None, help="folder the files' image paths are relative to")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--max-examples", type=int, default=None, help="0 = all")
    parser.add_argument("--scorer", default="exact", choices=sorted(SCORERS),
                        help="benchmark scorer run on the --eval files' answers as well (qtl_jax.scorers)")
    args = parser.parse_args(argv)
    stage_dir = find_stage(args.workdir)
    config = checkpoint.load_config(stage_dir)
    files = parse_eval_files(",".join(args.eval), "--eval")
    with config.unlocked():
        if files:
            config.data.eval_files = ",".join(f"{name}={file}" for name, file in files.items())
        if args.image_root is not None:
            config.data.eval_image_root = args.image_root
        for field, value in (("batch_size", args.batch_size), ("max_new_tokens", args.max_new_tokens),
                             ("max_examples", args.max_examples)):
            if value is not None:
                config.eval[field] = value
    tokenizer = load_tokenizer(trainer.tokenizer_dir(config))
    model_cfg = trainer.model_config(config, len(tokenizer))
    sources = eval_sources(config)
    if files:
        sources = {name: sources[name] for name in files}
    if not sources:
        raise ValueError(f"{stage_dir}: nothing to evaluate: the run has no evaluation sets; pass --eval NAME=FILE")
    params = checkpoint.final_params(stage_dir)
    print(f"evaluating {stage_dir} ({config.compressor.image}/{config.compressor.text}, "
          f"{config.compressor.bits} bits) on {', '.join(sources)}")
    results = run_evaluation(config, model_cfg, params, tokenizer, sources, os.path.join(stage_dir, "eval"),
                             jnp.dtype(config.model.dtype), scorer=args.scorer)
    print(json.dumps({name: r["accuracy"] for name, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
