"""Input pipeline throughput: batches per second of the grain pipeline over Shapes-VQA, for the tiny (48 px)
and the paper (384 px) image sizes, in-process and with worker processes, next to the time the
dataset takes to generate. Compare with the trainer's step time to see whether input limits training.

    python benchmarks/data.py [--num-qa 2000] [--batches 50] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from absl import flags

from qtl_jax.data import builders, pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-qa", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    print(f"{os.cpu_count()} cores; Shapes-VQA with {args.num_qa} QA per size; batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as data_dir:
        for size, tokens in ((48, 9), (384, 728)):
            config = builders.ShapesVqaConfig(name=f"bench_{size}", image_size=size, num_qa=args.num_qa,
                                              num_captions=0, num_eval=8)
            start = time.perf_counter()
            builder, tokenizer_dir = builders.prepare_shapes(data_dir, config)
            generated = time.perf_counter() - start
            source = builder.as_data_source()["train"]
            for workers in (0, 2):
                cfg = pipeline.PipelineConfig(batch_size=args.batch_size, image_size=size, image_tokens=tokens,
                                              buckets=(64,), num_epochs=None, worker_count=workers)
                it = iter(pipeline.make_loader(source, tokenizer_dir, cfg, 0, 1))
                next(it)  # start-up (worker processes, tokenizer load) excluded
                start = time.perf_counter()
                for _ in range(args.batches):
                    next(it)
                rate = args.batches / (time.perf_counter() - start)
                print(f"{size:>4} px, {workers} workers: {rate:7.1f} batches/s ({rate * args.batch_size:8.1f} "
                      f"samples/s); generating {len(source)} records took {generated:.1f} s")


if __name__ == "__main__":
    main()
