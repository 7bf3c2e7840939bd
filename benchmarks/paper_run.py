"""The paper's recipe at its real size, run end to end on this machine without checkpoints.

SigLIP so400m + OpenELM-270M from random weights (`--config.model.init=random`), 384 px images, bf16 compute,
the paper preset's optimizers and trainable parts, gradient accumulation 2 at batch 1, for 2 optimizer steps
of each stage (`configs/finetune.py:preset=paper`), then the end-of-stage-2 evaluation, on a small
LLaVA-format dataset generated here (Shapes-VQA scenes rendered at 384 px: captions for stage 1,
question/answer pairs for stage 2 and a held-out evaluation file) with a Llama-2-style SentencePiece tokenizer
trained here. Prints wall time per stage and the process's peak RSS.

    python benchmarks/paper_run.py [--workdir /tmp/paper_run] [--steps 2] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 2)  # one device for each half's mesh

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.finetune import get_config  # noqa: E402
from qtl_jax import trainer  # noqa: E402
from qtl_jax.data import shapes  # noqa: E402
from qtl_jax.data.templates import SYSTEM  # noqa: E402


def write_split(folder: str, name: str, samples, size: int, seed: int) -> str:
    """Renders `samples` at `size` px into folder/images and writes folder/name.json (LLaVA format)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    records = []
    for i, sample in enumerate(samples):
        pixels = shapes.render(sample.objects, size, np.random.default_rng([seed, i]))
        path = f"{name}_{i}.png"
        Image.fromarray(pixels).save(os.path.join(folder, "images", path))
        records.append({"id": sample.uid, "image": path, "question_type": sample.question_type,
                        "conversations": sample.conversations()})
    file = os.path.join(folder, f"{name}.json")
    with open(file, "w") as f:
        json.dump(records, f)
    return file


def llama_tokenizer(folder: str, texts: list[str]) -> str:
    """A Llama-2-style SentencePiece folder (BPE, byte fallback, split digits, <unk> 0, <s> 1, </s> 2)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 10), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        allow_whitespace_only_pieces=True, minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True}, f)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/qtl_paper_run")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per stage")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    data = os.path.join(args.workdir, "data")
    micro = 2 * args.steps  # batch 1 x accumulation 2
    captions = write_split(data, "captions", shapes.generate_samples("pretrain", 0, 0, micro), 384, 0)
    qa = write_split(data, "qa", shapes.generate_samples("train", 1, micro, 0), 384, 1)
    held_out = write_split(data, "held_out", shapes.generate_samples("validation", 2, 4, 0), 384, 2)
    texts = [SYSTEM + " USER: ASSISTANT:"] + [turn["value"] for file in (captions, qa, held_out)
                                              for record in json.load(open(file))
                                              for turn in record["conversations"]]
    tokenizer_dir = llama_tokenizer(os.path.join(data, "tokenizer"), texts)

    config = get_config("preset=paper")
    config.model.init = "random"
    config.data.data_dir = os.path.join(args.workdir, "tfds")
    config.data.tokenizer = tokenizer_dir
    config.data.annotation_file, config.data.image_root = qa, os.path.join(data, "images")
    config.stage1.data.annotation_file, config.stage1.data.image_root = captions, os.path.join(data, "images")
    config.data.eval_files = f"held_out={held_out}"
    config.optim.batch_size = config.stage1.optim.batch_size = 1
    config.optim.max_steps = args.steps
    config.eval.max_new_tokens = args.max_new_tokens
    config.log_every = 1
    print(f"paper preset: SigLIP so400m + OpenELM-270M, random init, {config.model.dtype}, batch "
          f"{config.optim.batch_size} x accumulation {config.optim.accum_steps}, {args.steps} optimizer steps per "
          f"stage; jax {jax.__version__}, {os.cpu_count()} cores")
    start = time.perf_counter()
    summary = trainer.train_and_evaluate(config, os.path.join(args.workdir, "run"))
    wall = time.perf_counter() - start
    stages = json.load(open(os.path.join(args.workdir, "run", "summary.json")))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nwall time {wall / 60:.1f} min for both stages and the evaluation; peak RSS {rss:.1f} GB")
    for s in stages:
        print(f"  {s['stage']}: {s['steps']} micro-steps, uplink {s['uplink_bytes_per_sample'] / 1e3:.1f} kB/sample, "
              f"downlink {s['downlink_bytes_per_sample'] / 1e3:.1f} kB/sample")
    print(f"  held-out accuracy (random weights, {args.max_new_tokens} new tokens): "
          f"{summary['held_out_accuracy'].get('all', float('nan')):.3f}")


if __name__ == "__main__":
    main()
