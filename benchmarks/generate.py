"""Generation speed: the on-device decode loop against the host loop, and JAX against PyTorch, in one script.

  (a) Evaluation on the tiny preset (random weights, the LM's output scaled as in tests/test_evaluate.py so that
      answers vary): `evaluate_source` over the smoke Shapes-VQA validation split, answers per second, with the
      host loop ("before": one jitted decode step, one token-rows call and one device->host sync per generated
      token, as `Answerer` did) and with the on-device loop ("after": one compiled call per batch, the new
      tokens' quantized text rows computed in the loop). The answers are checked to be identical.
  (b) OpenELM-270M greedy decoding, random weights converted from openelm-pytorch (qtl_jax.models.convert) so
      both sides compute the same function: batch 8, a 32-token prompt, 64 new tokens (no eos: every token is
      made), tokens per second of qtl_jax `generate` (on device) against openelm-pytorch with its own KV cache
      (`use_kv_cache=True`; the package has no generate function, so the loop is the obvious one: prefill, then
      one token per call with the returned cache, argmax on the last logits). The tokens are compared.

Median of --eval-repeats (a) or --repeats (b) runs after one warm-up (compilation excluded). fp32 throughout;
`--bf16` runs (b) in bf16 compute with float32 weights on both sides (PyTorch under `torch.autocast`). On a GPU
the PyTorch peer runs there too (`timing.torch_device`; timed to `torch.cuda.synchronize`).

    python benchmarks/generate.py [--eval-repeats 20] [--repeats 2] [--skip-eval] [--skip-openelm] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from peers import openelm_torch
from timing import autocast, synced, timed, torch_device

from qtl_jax.models.generate import generate
from qtl_jax.models.openelm import OPENELM_270M, OpenELM


def bench_evaluation(repeats: int, batch_size: int, new_tokens: int) -> None:
    # Imported here: (b) alone (`--skip-eval`) needs neither tensorflow-datasets nor the configs' packages.
    import tensorflow_datasets as tfds

    from configs.finetune import get_config
    from qtl_jax import evaluate, trainer
    from qtl_jax.data import builders
    from qtl_jax.data.tokenizer import load_tokenizer
    from qtl_jax.models import tinyllava as T

    class HostLoopAnswerer(evaluate.Answerer):
        """The same model and batches, decoded by the host loop: per generated token, a device->host read of the
        token (the eos check), then a jitted token-rows call and a jitted decode step."""

        def _generate(self, out, options):
            rows = T.token_rows_fn(self.config, self.params, self.dtype)
            return T.server_generate(self.config, self.params["server"], out.uplink, self.dtype,
                                     embed=lambda tokens: rows(tokens, out.text_moments), **options)

    tfds.disable_progress_bar()
    config = get_config()  # the tiny preset: RD-FSQ 2-bit, quantized text embeddings
    with tempfile.TemporaryDirectory() as data_dir:
        builder, tokenizer_dir = builders.prepare_shapes(data_dir, "smoke", log=lambda *_: None)
        tok = load_tokenizer(tokenizer_dir)
        source = builder.as_data_source()["validation"]
        model_cfg = trainer.model_config(config, len(tok))
        params, _ = trainer.init_params(config, model_cfg, np.float32)
        params = jax.tree.map(np.array, params)
        params["server"]["language_model"]["norm"]["weight"] *= 30
        answerers = {"before (host loop)": HostLoopAnswerer(model_cfg, params, tok),
                     "after (on device)": evaluate.Answerer(model_cfg, params, tok)}
        answers, seconds, per_batch = {}, {}, {}
        for name, answerer in answerers.items():
            path = os.path.join(data_dir, f"{name.split()[0]}.jsonl")
            spent = per_batch[name] = []

            def answer(*args, answer=answerer.answer, spent=spent):  # the model's share of the evaluation
                start = time.perf_counter()
                result = answer(*args)
                spent.append(time.perf_counter() - start)
                return result

            answerer.answer = answer

            def run(answerer=answerer, path=path):
                return evaluate.evaluate_source(answerer, source, template=config.data.template,
                                                buckets=tuple(config.data.buckets), batch_size=batch_size,
                                                max_new_tokens=new_tokens, answers_file=path)

            seconds[name] = timed(run, repeats)
            with open(path) as f:
                answers[name] = f.read()
    same = len(set(answers.values())) == 1
    before, after = seconds.values()
    batches = -(-len(source) // batch_size)
    answer_ms = {name: statistics.median(spent[batches:]) * 1e3 for name, spent in per_batch.items()}  # no warm-up
    print(f"(a) evaluation, tiny preset, {len(source)} Shapes-VQA answers, batch {batch_size}, {new_tokens} new "
          f"tokens: " + ", ".join(f"{name} {len(source) / s:.1f} answers/s" for name, s in seconds.items())
          + f"; after/before speed-up {before / after:.2f}x; identical answers: {same}")
    ms_before, ms_after = answer_ms.values()
    print(f"    of which Answerer.answer per batch (the model; the rest is reading images and prompts): before "
          f"{ms_before:.1f} ms, after {ms_after:.1f} ms, speed-up {ms_before / ms_after:.2f}x")


def bench_openelm(repeats: int, batch: int, prompt: int, new_tokens: int, bf16: bool) -> None:
    cfg = OPENELM_270M
    device = torch_device()
    tm, params = openelm_torch(cfg)
    tm.eval().to(device)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    model = OpenELM(cfg, dtype=jnp.bfloat16 if bf16 else jnp.float32)
    ids_jax, ids_torch = jax.device_put(ids), torch.from_numpy(ids).long().to(device)

    tokens = {}

    def run_jax():
        tokens["jax"] = generate(model, params, input_ids=ids_jax, max_new_tokens=new_tokens, eos_id=-1)

    def run_torch():
        with torch.inference_mode(), autocast(device, enabled=bf16):
            out = tm(ids_torch, use_kv_cache=True)
            made = []
            for t in range(new_tokens):
                made.append(out["logits"][:, -1].argmax(-1, keepdim=True))
                if t < new_tokens - 1:
                    out = tm(made[-1], kv_cache=out["kv_cache"], use_kv_cache=True)
            tokens["torch"] = torch.cat(made, dim=1).cpu().numpy()  # waits for the device

    t_jax = timed(run_jax, repeats)
    t_torch = timed(synced(run_torch, device), repeats)
    # Greedy decoding amplifies float rounding: once a near-tie flips, a row's continuation differs.
    same = tokens["jax"] == tokens["torch"]
    prefix = np.where(same.all(axis=1), new_tokens, np.argmin(same, axis=1))
    made = batch * new_tokens
    print(f"(b) OpenELM-270M greedy, {'bf16' if bf16 else 'fp32'}, batch {batch}, prompt {prompt}, {new_tokens} new "
          f"tokens: jax (on device) "
          f"{made / t_jax:.1f} tokens/s ({t_jax:.2f} s), openelm-pytorch (KV cache) {made / t_torch:.1f} tokens/s "
          f"({t_torch:.2f} s), jax/torch speed-up {t_torch / t_jax:.2f}x; identical rows {int(same.all(axis=1).sum())}"
          f"/{batch}, tokens equal before the first difference of each row: {sorted(prefix.tolist())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="(b): each run takes seconds to minutes on a CPU")
    parser.add_argument("--eval-repeats", type=int, default=20, help="(a): each run takes a fraction of a second")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--eval-new-tokens", type=int, default=16)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-openelm", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="(b) in bf16 compute (float32 weights) on both sides")
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind} | jax {jax.__version__} "
          f"({jax.default_backend()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}), "
          f"torch {torch.__version__} ({torch_device()}, {torch.get_num_threads()} threads)")
    if not args.skip_eval:
        bench_evaluation(args.eval_repeats, args.eval_batch, args.eval_new_tokens)
    if not args.skip_openelm:
        bench_openelm(args.repeats, batch=8, prompt=32, new_tokens=64, bf16=args.bf16)


if __name__ == "__main__":
    main()
