"""Metric writers: JSON lines always (`metrics.jsonl` in the workdir), TensorBoard when `tensorboardX` is
installed. One record per call: {"step": int, "stage": str, ...scalars}. Only JAX process 0 writes.

A resumed run truncates the JSON lines to the step it resumes from (`truncate`); TensorBoard event files are
append-only, so there a resumed run's repeated steps appear twice."""

from __future__ import annotations

import json
import os
import time

from qtl_jax import files


class MetricWriter:
    def __init__(self, workdir: str, stage: str):
        import jax

        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.stage = stage
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard", stage))
        except ImportError:
            self._tb = None

    def write(self, step: int, **scalars) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "stage": self.stage, "time": time.time(),
                  **{k: (float(v) if not isinstance(v, str | dict) else v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)

    def truncate(self, step: int) -> None:
        """Drops this stage's records after `step` and its end-of-stage (non-training) records at `step`: a run
        that starts from `step` logs those again. Atomic."""
        if not self.enabled:
            return
        records = read_metrics(os.path.dirname(self.path))
        keep = [r for r in records if r.get("stage") != self.stage or r["step"] < step
                or (r["step"] == step and any(k in r for k in TRAINING_KEYS))]
        if len(keep) == len(records):
            return
        with files.atomic_open(self.path) as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


# A record holding one of these is a training step's (stage 1/2: ce_loss; stage 0: tower_loss).
TRAINING_KEYS = ("ce_loss", "tower_loss")


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
