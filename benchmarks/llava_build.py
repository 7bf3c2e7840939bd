"""Memory of the LLaVA-format conversion: peak RSS converting generated annotation files of growing size.

Writes LLaVA-format JSON lists of N samples (single-turn QA, each with its own image path; the images are 256
PNGs of ~24 kB, random noise so they do not compress, shared round-robin), then converts each in a fresh
process (`builders.prepare_llava`, what training does on first use) and reports that process's peak RSS
(`ru_maxrss`) and time. The conversion streams the annotation file and writes shards of
`SAMPLES_PER_SHARD` samples, so the peak should not grow with N; the image bytes alone are N x 24 kB.

    python benchmarks/llava_build.py [--samples 5000,20000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = """
import sys, time, resource
sys.path.insert(0, {root!r})
from qtl_jax.data import builders
start = time.perf_counter()
builder = builders.prepare_llava({data_dir!r}, {file!r}, {images!r}, log=lambda message: None)
print(len(builder.as_data_source()["train"]), time.perf_counter() - start,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_dataset(folder: str, samples: int, images: int = 256) -> str:
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        path = os.path.join(folder, "images", f"{i}.png")
        if not os.path.isfile(path):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (90, 90, 3), np.uint8)).save(buffer, format="PNG")
            with open(path, "wb") as f:
                f.write(buffer.getvalue())
    file = os.path.join(folder, f"llava_{samples}.json")
    records = [{"id": f"s{i}", "image": f"{i % images}.png",
                "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                                  {"from": "gpt", "value": f"Noise number {i}."}]} for i in range(samples)]
    with open(file, "w") as f:
        json.dump(records, f)
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="5000,20000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows, image_bytes = [], 0.0
        for n in (int(x) for x in args.samples.split(",")):
            file = write_dataset(folder, n)
            image_bytes = np.mean([os.path.getsize(os.path.join(folder, "images", f)) for f in
                                   os.listdir(os.path.join(folder, "images"))])
            code = CHILD.format(root=ROOT, data_dir=os.path.join(folder, f"tfds_{n}"), file=file,
                                images=os.path.join(folder, "images"))
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            converted, seconds, rss_kb = out.stdout.split()[-3:]
            rows.append((n, int(converted), float(seconds), wall, int(rss_kb) / 1024, n * image_bytes / 2**20))
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; image files {image_bytes / 1e3:.1f} kB each")
        print(f"{'samples':>8} {'converted':>9} {'convert s':>9} {'process s':>9} {'peak RSS MB':>11} "
              f"{'image bytes MB':>14}")
        for n, converted, seconds, wall, rss, images in rows:
            print(f"{n:>8} {converted:>9} {seconds:>9.1f} {wall:>9.1f} {rss:>11.0f} {images:>14.0f}")
        if len(rows) > 1:
            print(f"peak RSS ratio {rows[-1][0]} / {rows[0][0]} samples: {rows[-1][4] / rows[0][4]:.2f} "
                  f"(image bytes ratio {rows[-1][5] / rows[0][5]:.1f})")


if __name__ == "__main__":
    main()
