"""Every claim of the paper on our data, with error bars, from one command (SPEC §7).

    python -m qtl_jax.experiments.sweep --out DIR [--datasets shapes,digits]
        [--compressors none_fp16,rd_fsq,fsq_tanh,nf] [--bits 2] [--seeds 0,1,2] [--set FIELD=VALUE ...]
        [--quick] [--dry-run]

trains the tiny recipe (`configs/finetune.py`, both stages) once per (dataset, compressor, bits, seed), with the
same recipe for every compressor, fp16 included, into DIR/DATASET/COMPRESSOR/bBITS/seedSEED (a `train.py`
workdir each; a finished run is reused and a killed one resumes, so an interrupted sweep simply continues; a run
that fails is reported at the end, with the error its log ends with, and the others go on).
After each run it measures, on the validation split: the KDE entropy of the compressor inputs and the bit
width the paper's criterion picks, the entropy of the 2-bit indices and what the ANS coder spends on them
(`features.entropy_report`); for the fp16 runs also the quality of every codec at 1-4 bits without training
(`features.quality_table`). Then it writes, over every finished run under DIR (so several invocations with
different --bits or --seeds add up):

    DIR/results.csv                 one row per run
    DIR/summary.md                  per dataset: accuracy mean ± std over seeds, relative to fp16 (paired by
                                    seed), bytes up and down per sample; the entropy table; the quality table
    DIR/plots/*.png                 accuracy vs bits (error bars), accuracy vs uplink bytes

Each finished run's numbers are kept in its folder's `record.json` (stage-2 summary, analysis, wall time): a
record alone is enough to report the run, and a run with one is never trained again. `--readme` commits the
records next to the README (`results/runs/DATASET/COMPRESSOR/bBITS/seedSEED.json`); `--records DIR` brings
such records into a sweep folder, so a sweep continues (or its tables are rebuilt with `--report-only`) on a
machine that has lost the checkpoints.

Compressor names: the codecs of `qtl_jax.compress` ("none_fp16", "rd_fsq", "fsq_tanh", "nf"), plus
"rd_fsq_cosine": RD-FSQ with the paper's cosine commitment term instead of our default distortion term, and
"rd_fsq_channel": RD-FSQ with statistics per channel (`compressor.scale=channel`) instead of one range for all.
`--quick` runs a small setting end to end in about a minute (the tests run it): Shapes-VQA "smoke", a few
steps, one padded length, fp16 and RD-FSQ 2-bit, seed 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

from qtl_jax import files
from qtl_jax.experiments import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASETS = ("shapes", "digits")
# Compressor name -> config overrides (beyond compressor.image / compressor.text = the codec).
VARIANTS = {"rd_fsq_cosine": ("rd_fsq", {"compressor.commitment": "cosine"}),
            "rd_fsq_channel": ("rd_fsq", {"compressor.scale": "channel"})}
CODECS = ("none_fp16", "none_bf16", "none_fp32", "rd_fsq", "fsq_tanh", "nf")
QUICK = {"data.shapes_config": "smoke", "data.buckets": "(64,)", "tower.batch_size": 8, "optim.max_steps": 6,
         "eval.max_examples": 16, "log_every": 2}  # one bucket: each stage compiles its step once


@dataclasses.dataclass(frozen=True)
class Run:
    dataset: str
    compressor: str
    bits: int
    seed: int

    @property
    def codec(self) -> str:
        return VARIANTS.get(self.compressor, (self.compressor, {}))[0]

    def workdir(self, out: str) -> str:
        return os.path.join(out, self.dataset, self.compressor, f"b{self.bits}", f"seed{self.seed}")

    def record_file(self, root: str) -> str:
        """Where `export_records` keeps this run's record under `root`: beside where its workdir would be."""
        return self.workdir(root) + ".json"

    def overrides(self) -> dict:
        values = {"data.dataset": self.dataset, "seed": self.seed, "compressor.image": self.codec,
                  "compressor.text": self.codec, "compressor.bits": self.bits if self.bits <= 8 else 2}
        values.update(VARIANTS.get(self.compressor, (None, {}))[1])
        return values


def plan(datasets, compressors, bits, seeds) -> list[Run]:
    """The runs of a sweep; the uncompressed baselines run once per seed (their `bits` is 16 or 32)."""
    runs = []
    for dataset in datasets:
        if dataset not in DATASETS:
            raise ValueError(f"--datasets: unknown dataset {dataset!r}; expected some of {DATASETS}")
        for compressor in compressors:
            if compressor not in CODECS and compressor not in VARIANTS:
                raise ValueError(f"--compressors: unknown compressor {compressor!r}; expected some of "
                                 f"{CODECS + tuple(VARIANTS)}")
            widths = [32 if compressor == "none_fp32" else 16] if compressor.startswith("none_") else bits
            for b in widths:
                if not compressor.startswith("none_") and not 1 <= b <= 8:
                    raise ValueError(f"--bits: {b} is not in 1..8")
                runs.extend(Run(dataset, compressor, b, seed) for seed in seeds)
    return runs


def _finetune_summary(workdir: str) -> dict | None:
    path = os.path.join(workdir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        summaries = json.load(f)
    last = summaries[-1] if summaries else {}
    if last.get("stage") != "finetune" or last.get("interrupted") or "test_accuracy" not in last:
        return None
    return last


class RunFailed(RuntimeError):
    """One run's training process failed; the message names the run, its log and the error it ended with."""


class NothingToReport(RuntimeError):
    """No finished run under the sweep's folder."""


def last_error(log_path: str, start: int = 0, max_lines: int = 12) -> str:
    """The exception a training log ends with (its type and message, the lines after the traceback's last frame),
    reading from byte `start` on (where this attempt's output begins: the log is appended to), or '' when there
    is none. A traceback may follow a progress bar on the same line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.rstrip() for line in text.replace("Traceback (most", "\nTraceback (most").splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return ""
    tail = lines[starts[-1] + 1:]
    frames = [i for i, line in enumerate(tail) if line.startswith('  File "')]
    i = frames[-1] + 1 if frames else 0
    while i < len(tail) and tail[i].startswith("    "):  # the last frame's source line and its ^^^ markers
        i += 1
    return "\n".join([line for line in tail[i:] if line.strip()][:max_lines])


def train(run: Run, out: str, overrides: dict, log=print) -> dict:
    """Trains (or resumes, or reuses) one run in its own process; returns its stage-2 summary. Raises RunFailed
    when the process fails or ends without a stage-2 summary."""
    workdir = run.workdir(out)
    recorded = _read_record(workdir)
    summary = recorded["summary"] if recorded else _finetune_summary(workdir)
    if summary is not None:
        return summary
    os.makedirs(workdir, exist_ok=True)
    values = {"data.data_dir": os.path.join(out, "tfds"), **run.overrides(), **overrides}
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "finetune.py"),
               "--workdir", workdir, *(f"--config.{k}={v}" for k, v in values.items())]
    log(f"[sweep] training {run} -> {workdir}")
    log_path = os.path.join(workdir, "train.log")
    _clock_invocation(workdir, start=True)
    with open(log_path, "a") as stream:
        offset = stream.tell()
        result = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        error = last_error(log_path, offset)
        raise RunFailed(f"{run}: training failed (exit {result.returncode}); see {log_path}"
                        + (f"\n{error}" if error else ""))
    summary = _finetune_summary(workdir)
    if summary is None:
        raise RunFailed(f"{run}: training ended without a stage-2 summary; see {log_path}")
    _clock_invocation(workdir, start=False)
    return summary


WALL = "wall_s.json"


def _clock_invocation(workdir: str, start: bool, now: float | None = None) -> dict:
    """Keeps `wall_s.json`: the [start, end] wall-clock times of every training invocation of the run, and their
    sum `wall_s`. A killed invocation never writes its end: the next one closes it at the last write of
    `train.log` (the killed process's last sign of life), so a resumed run counts all its parts. Time a process
    spent stopped (SIGSTOP) counts too. Returns the new contents."""
    now = time.time() if now is None else now
    path = os.path.join(workdir, WALL)
    clock = {"invocations": []}
    if os.path.isfile(path):
        with open(path) as f:
            clock = json.load(f)
    parts = clock.get("invocations")
    if parts is None:  # written before the invocations were kept: its one total stands for the earlier part
        parts = [[0.0, clock["wall_s"]]]
    if start:
        if parts and parts[-1][1] is None:
            log_path = os.path.join(workdir, "train.log")
            last = os.path.getmtime(log_path) if os.path.isfile(log_path) else parts[-1][0]
            parts[-1][1] = min(max(last, parts[-1][0]), now)
        parts.append([now, None])
    elif parts and parts[-1][1] is None:
        parts[-1][1] = now
    clock = {"wall_s": sum(end - begin for begin, end in parts if end is not None), "invocations": parts}
    files.write_json(path, clock)
    return clock


def analyse(run: Run, out: str, max_samples: int) -> dict:
    """The run's entropy report (and, for fp16, the codec quality table), computed once and cached (a cached one
    needs no JAX: `--report-only` over analysed runs starts in a second)."""
    stage_dir = os.path.join(run.workdir(out), "finetune")
    path = os.path.join(stage_dir, "analysis.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    from qtl_jax.experiments import features

    feats = features.client_features(stage_dir, "validation", max_samples)
    analysis = {"entropy": features.entropy_report(feats, run.bits if run.bits <= 8 else None)}
    if run.compressor == report.FP16:
        analysis["quality"] = features.quality_table(feats)
    files.write_json(path, analysis)
    return analysis


RECORD = "record.json"


def _read_record(workdir: str) -> dict | None:
    path = os.path.join(workdir, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_record(run: Run, out: str, max_samples: int) -> dict | None:
    """The run's record (`record.json` in its folder): its stage-2 summary, its analysis and its wall time. Made
    once from a finished workdir (analysing it) and kept; None while the run has not finished."""
    workdir = run.workdir(out)
    record = _read_record(workdir)
    if record is not None:
        return record
    summary = _finetune_summary(workdir)
    if summary is None:
        return None
    wall = None
    wall_file = os.path.join(workdir, WALL)
    if os.path.isfile(wall_file):
        with open(wall_file) as f:
            wall = json.load(f)["wall_s"]
    record = {"run": dataclasses.asdict(run), "summary": summary, "analysis": analyse(run, out, max_samples),
              "wall_s": wall}
    files.write_json(os.path.join(workdir, RECORD), record)
    return record


def result_row(run: Run, record: dict) -> dict:
    summary = record["summary"]
    return {"dataset": run.dataset, "compressor": run.compressor, "bits": run.bits, "seed": run.seed,
            "accuracy": summary["test_accuracy"]["all"],
            "val_accuracy": summary.get("validation_accuracy", {}).get("all"),
            "uplink_bytes_per_sample": summary.get("uplink_bytes_per_sample"),
            "downlink_bytes_per_sample": summary.get("downlink_bytes_per_sample"), "wall_s": record.get("wall_s"),
            **record["analysis"].get("entropy", {})}


def _run_folders(root: str):
    """(Run, path) for every DATASET/COMPRESSOR/bBITS/seedSEED[suffix] entry under `root`."""
    for dataset in DATASETS:
        for compressor in sorted(os.listdir(os.path.join(root, dataset))) if os.path.isdir(
                os.path.join(root, dataset)) else ():
            folder = os.path.join(root, dataset, compressor)
            for b in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
                if not (b.startswith("b") and b[1:].isdigit() and os.path.isdir(os.path.join(folder, b))):
                    continue
                for s in sorted(os.listdir(os.path.join(folder, b))):
                    seed = s[4:].removesuffix(".json")
                    if s.startswith("seed") and seed.isdigit():
                        yield Run(dataset, compressor, int(b[1:]), int(seed)), os.path.join(folder, b, s)


def finished_runs(out: str) -> list[Run]:
    """Every finished (or recorded) run under `out`, whatever invocation trained it."""
    return [run for run, path in _run_folders(out) if os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, RECORD)) or _finetune_summary(path) is not None)]


def export_records(out: str, dest: str) -> int:
    """Copies every run record under `out` to `dest/DATASET/COMPRESSOR/bBITS/seedSEED.json`; returns how many."""
    n = 0
    for run, path in _run_folders(out):
        if os.path.isfile(os.path.join(path, RECORD)):
            target = run.record_file(dest)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(os.path.join(path, RECORD), target)
            n += 1
    return n


def import_records(source: str, out: str) -> int:
    """Brings the records `export_records` wrote under `source` into the sweep folder `out`, for runs that have
    none there (a local record wins); returns how many. Raises ValueError naming a record that is not one."""
    if not os.path.isdir(source):
        raise ValueError(f"--records {source}: no such folder")
    n = 0
    for run, path in _run_folders(source):
        if not path.endswith(".json"):
            continue
        with open(path) as f:
            try:
                record = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a sweep record ({e})") from e
        missing = {"run", "summary", "analysis"} - set(record) if isinstance(record, dict) else {"a JSON object"}
        if missing or record["run"] != dataclasses.asdict(run):
            raise ValueError(f"{path}: not the record of {run} (missing {sorted(missing)} or another run: "
                             f"{record.get('run') if isinstance(record, dict) else record!r})")
        workdir = run.workdir(out)
        if not os.path.isfile(os.path.join(workdir, RECORD)):
            os.makedirs(workdir, exist_ok=True)
            shutil.copy(path, os.path.join(workdir, RECORD))
            n += 1
    return n


def write_all(out: str, max_samples: int) -> dict:
    """results.csv, summary.md (with the quality tables) and the plots over every finished run under `out`."""
    rows, quality = [], {}
    for run in finished_runs(out):
        record = run_record(run, out, max_samples)
        rows.append(result_row(run, record))
        if "quality" in record["analysis"] and run.dataset not in quality:
            quality[run.dataset] = (run.seed, record["analysis"]["quality"])
    if not rows:
        raise NothingToReport(f"{out}: no finished run to report")
    files = report.write_report(rows, out)
    if quality:
        with open(files["markdown"], "a") as f:
            for dataset, (seed, table) in sorted(quality.items()):
                f.write(f"\n## {dataset}: codec quality without training\n\nOn the validation features of the "
                        f"fp16 run (seed {seed}); the first half of the rows fits a least-squares decoder, the "
                        f"second half is scored (`qtl_jax.experiments.features.reconstruction_quality`).\n\n")
                f.write(report.quality_markdown(table))
    return files


README_BEGIN = "<!-- sweep results: generated by python -m qtl_jax.experiments.sweep --readme; do not edit -->"
README_END = "<!-- end of sweep results -->"


def update_readme(readme: str, summary_md: str, command: str) -> None:
    """Replaces the block between README_BEGIN and README_END in `readme` with the sweep's summary (its
    top-level heading dropped, headings moved down two levels) and the command that made it. Atomic."""
    with open(readme) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{readme}: no generated block; add the lines\n{README_BEGIN}\n{README_END}")
    with open(summary_md) as f:
        lines = [line for line in f.read().splitlines() if not line.startswith("# ")]
    body = "\n".join("##" + line if line.startswith("#") else line for line in lines).strip()
    body = body.replace("](plots/", "](" + os.path.relpath(os.path.dirname(summary_md), os.path.dirname(
        os.path.abspath(readme))) + "/plots/")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n\nMade by `{command}`.\n\n{body}\n\n{README_END}{tail}"
    files.write_text(readme, new)


def _parse_set(items) -> dict:
    values = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set: expected FIELD=VALUE, got {item!r}")
        values[key] = value
    return values


def check_fields(overrides: dict) -> None:
    """Raises ValueError naming a --set field that the recipe (`configs/finetune.py`) does not have, and the
    fields its section has: caught before any run starts, instead of failing every run."""
    import ml_collections

    from configs.finetune import get_config

    config = get_config(None)
    for key in overrides:
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i])
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                raise ValueError(f"--set {key}: configs/finetune.py has no field {key!r}; "
                                 f"{where + ' has' if where else 'its sections are'} {known}")
            node = node[part]


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from e


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets", default="shapes,digits")
    parser.add_argument("--compressors", default="none_fp16,rd_fsq,fsq_tanh,nf")
    parser.add_argument("--bits", default="2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", metavar="FIELD=VALUE",
                        help="a config override for every run, e.g. --set optim.min_steps=1000 (repeatable)")
    parser.add_argument("--analysis-samples", type=int, default=512, help="validation samples for the entropy "
                        "and quality measurements")
    parser.add_argument("--quick", action="store_true", help="a small end-to-end setting (tests)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    parser.add_argument("--readme", help="a README whose generated block gets the summary (and the plots and "
                        "the run records, copied next to it under results/)")
    parser.add_argument("--records", help="a folder of run records (what --readme writes to results/runs): "
                        "their runs count as finished here, so they are reported and not trained again")
    args = parser.parse_args(argv)
    datasets = [d for d in args.datasets.split(",") if d]
    compressors = [c for c in args.compressors.split(",") if c]
    overrides = _parse_set(args.set)
    check_fields(overrides)
    if args.quick:
        overrides = {**QUICK, **overrides}
        datasets = ["shapes"] if args.datasets == parser.get_default("datasets") else datasets
        compressors = (["none_fp16", "rd_fsq"] if args.compressors == parser.get_default("compressors")
                       else compressors)
        args.seeds = "0" if args.seeds == parser.get_default("seeds") else args.seeds
        args.analysis_samples = min(args.analysis_samples, 16)
    runs = plan(datasets, compressors, _ints(args.bits, "--bits"), _ints(args.seeds, "--seeds"))
    if args.dry_run:
        for run in runs:
            print(run, "->", run.workdir(args.out))
        return {}
    os.makedirs(args.out, exist_ok=True)
    if args.records:
        print(f"[sweep] {import_records(args.records, args.out)} run records brought in from {args.records}")
    failed = []  # a failed run does not stop the others (a sweep runs for hours): they are reported at the end
    for i, run in enumerate([] if args.report_only else runs):
        print(f"[sweep] {i + 1}/{len(runs)}: {run}", flush=True)
        try:
            train(run, args.out, overrides)
        except RunFailed as e:
            print(f"[sweep] {e}\n[sweep] going on with the other runs", flush=True)
            failed.append(str(e))
    failures = f"[sweep] {len(failed)} of {len(runs)} runs failed:\n" + "\n".join(failed)
    try:
        files = write_all(args.out, args.analysis_samples)
    except NothingToReport as e:
        if failed:  # nothing finished to report: the failures are the news
            raise SystemExit(failures) from e
        raise
    print(f"[sweep] wrote {files['csv']}, {files['markdown']} and {len(files['plots'])} plots")
    if args.readme:
        results = os.path.join(os.path.dirname(os.path.abspath(args.readme)), "results")
        os.makedirs(os.path.join(results, "plots"), exist_ok=True)
        for name in ("results.csv", "summary.md"):
            shutil.copy(os.path.join(args.out, name), os.path.join(results, name))
        for plot in files["plots"]:
            shutil.copy(plot, os.path.join(results, "plots", os.path.basename(plot)))
        export_records(args.out, os.path.join(results, "runs"))
        update_readme(args.readme, os.path.join(results, "summary.md"),
                      "python -m qtl_jax.experiments.sweep " + " ".join(argv if argv is not None else sys.argv[1:]))
        print(f"[sweep] updated {args.readme} (tables) and {results} (csv, summary, plots)")
    if failed:
        raise SystemExit(failures)
    return files


if __name__ == "__main__":
    main()
