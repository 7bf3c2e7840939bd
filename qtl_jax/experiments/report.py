"""The sweep's tables and plots: pure functions over result rows.

A *result row* is a dict describing one finished training run:

    dataset (str), compressor (str: "none_fp16", "rd_fsq", "fsq_tanh", "nf" or a variant such as
    "rd_fsq_cosine"), bits (int; 16 for none_fp16), seed (int), accuracy (float, test split),
    val_accuracy (float), uplink_bytes_per_sample (float), downlink_bytes_per_sample (float), wall_s (float)

plus the optional entropy fields of `ENTROPY_FIELDS` (absent, None or NaN when the run did not measure them).

* `write_csv` / `read_csv`: the rows as a CSV file (columns `COLUMNS`, then any extra keys), a typed round trip.
* `summarize`: one summary dict per (dataset, compressor, bits), with means/stds over seeds and accuracy relative
  to the uncompressed fp16 baseline (paired by seed).
* `markdown_table` / `entropy_table`: GitHub Markdown tables of a summary for one dataset.
* `plot_accuracy_vs_bits` / `plot_accuracy_vs_uplink`: PNG plots of a summary for one dataset.
* `write_report`: all of the above into one folder (results.csv, summary.md, plots/).

Every file is written atomically (`qtl_jax.files`).
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from qtl_jax import files

FP16 = "none_fp16"
"""The uncompressed baseline's compressor name: the reference of the relative accuracy and uplink ratio."""

REQUIRED_FIELDS = ("dataset", "compressor", "bits", "seed", "accuracy")
"""Keys every row must have (not None); the other base columns may be missing."""

BASE_FIELDS = ("dataset", "compressor", "bits", "seed", "accuracy", "val_accuracy",
               "uplink_bytes_per_sample", "downlink_bytes_per_sample", "wall_s")

ENTROPY_FIELDS = ("kde_entropy_image", "kde_entropy_text", "selected_bits_image", "selected_bits_text",
                  "index_entropy_image", "entropy_coded_bits_image", "distinct_codes_image", "tokens_image")
"""Optional per-run entropy measurements: KDE differential entropy of the image/text features (bits), the bit
widths chosen from it, the plug-in entropy of the run's own image indices and the rate its entropy coder achieved
(bits/element), and counts of distinct image codes and of image tokens."""

COLUMNS = BASE_FIELDS + ENTROPY_FIELDS
"""The CSV column order (extra keys found in the rows follow, sorted)."""

_STR_COLUMNS = frozenset({"dataset", "compressor"})
_INT_RE = re.compile(r"[+-]?\d+")

# Summary fields averaged over a group's runs besides accuracy/val_accuracy (which also get a std).
_MEAN_FIELDS = ("uplink_bytes_per_sample", "downlink_bytes_per_sample", "wall_s", *ENTROPY_FIELDS)

_ENTROPY_HEADERS = {
    "kde_entropy_image": "KDE entropy image (bits)",
    "kde_entropy_text": "KDE entropy text (bits)",
    "selected_bits_image": "selected bits image",
    "selected_bits_text": "selected bits text",
    "index_entropy_image": "index entropy image (bits/elem)",
    "entropy_coded_bits_image": "entropy-coded image (bits/elem)",
    "distinct_codes_image": "distinct image codes",
    "tokens_image": "image tokens",
}
_MISSING = "—"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


# ----------------------------------------------------------------------------------------------------------- files


def _cell(value: Any) -> str:
    """One CSV cell: "" for None, exact `repr` for floats (so they read back bit-identical)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return str(value)


def _parse(column: str, text: str) -> Any:
    if text == "":
        return None
    if column in _STR_COLUMNS:
        return text
    if _INT_RE.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def write_csv(rows: Iterable[dict], path: str) -> str:
    """Writes result rows as CSV, atomically.

    Args:
      rows: result rows (dicts). Missing keys and None values become empty cells; floats are written with `repr`
        (NaN as "nan"), so `read_csv` gives back the same values.
      path: the CSV file; its folder is created when missing.

    Returns:
      `path`. Columns: `COLUMNS` in that order, then any other keys of the rows, sorted.
    """
    rows = list(rows)
    extra = sorted({k for row in rows for k in row} - set(COLUMNS))
    header = [*COLUMNS, *extra]

    with files.atomic_open(path, newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for row in rows:
            w.writerow([_cell(row.get(k)) for k in header])
    return path


def read_csv(path: str) -> list[dict]:
    """Reads rows written by `write_csv`.

    Args:
      path: the CSV file.

    Returns:
      One dict per data line with every column of the header: empty cells are None; "dataset" and "compressor"
      stay str; other cells are int when they are an integer literal, else float when they parse as one (including
      "nan"/"inf"), else str (so booleans come back as "True"/"False").
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return [{k: _parse(k, v if v is not None else "") for k, v in line.items()} for line in reader]


# ------------------------------------------------------------------------------------------------------- summary


def _finite(value: Any) -> float | None:
    """`value` as a float, or None when it is missing, non-numeric or NaN/inf."""
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two values (a single run has no spread to show:
    the tables print its mean alone, never a "± 0.000" that reads as no spread)."""
    if len(values) < 2:
        return None
    m = _mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def _sort_key(s: dict) -> tuple:
    return (s["dataset"], s["compressor"] != FP16, s["compressor"], s["bits"])


def summarize(rows: Iterable[dict]) -> list[dict]:
    """Aggregates result rows over seeds, one summary per (dataset, compressor, bits).

    Standard deviations are sample standard deviations (ddof=1) over the group's runs, and None for a group with a
    single run (or a single paired seed). Missing, None and NaN values of a field are left out of its mean/std
    (None when no run has it).

    Args:
      rows: result rows; "dataset", "compressor", "bits", "seed" and "accuracy" are required in each.

    Returns:
      A list of dicts sorted by dataset, then the fp16 baseline first, then compressor name, then bits, with keys:
        dataset, compressor, bits;
        n: the number of runs; seeds: their seeds, sorted;
        accuracy_mean, accuracy_std, val_accuracy_mean, val_accuracy_std;
        uplink_bytes_per_sample_mean, downlink_bytes_per_sample_mean, wall_s_mean;
        uplink_ratio: the group's mean uplink over the dataset's fp16 mean uplink (None without an fp16 run);
        relative_accuracy_mean, relative_accuracy_std, relative_accuracy_pairs: accuracy relative to fp16. For
          every run whose seed also has an fp16 run on the dataset (paired; several fp16 runs of one seed are
          averaged), the ratio accuracy / fp16 accuracy of that seed; mean and std of those ratios, and their
          number. Without any paired seed: the ratio of the group's mean accuracy to the fp16 mean accuracy, std
          None and pairs 0; without any fp16 run: all None (pairs 0);
        `{field}_mean` for every field of `ENTROPY_FIELDS` (None when no run has it), and for any other numeric
          key found in the group's rows.

    Raises:
      ValueError: a row lacks a required field.
    """
    rows = list(rows)
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_FIELDS if row.get(k) is None]
        if missing:
            raise ValueError(f"result row {i} lacks {missing}: {row}")

    groups: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((str(row["dataset"]), str(row["compressor"]), int(row["bits"])), []).append(row)

    # The fp16 baseline per dataset: accuracy per seed (averaged over repeats), mean accuracy, mean uplink.
    fp16_by_seed: dict[str, dict[int, float]] = {}
    fp16_acc: dict[str, float | None] = {}
    fp16_uplink: dict[str, float | None] = {}
    for dataset in {d for d, _, _ in groups}:
        base = [r for (d, c, _), rs in groups.items() if d == dataset and c == FP16 for r in rs]
        per_seed: dict[int, list[float]] = {}
        for r in base:
            acc = _finite(r["accuracy"])
            if acc is not None:
                per_seed.setdefault(int(r["seed"]), []).append(acc)
        fp16_by_seed[dataset] = {s: _mean(v) for s, v in per_seed.items()}
        fp16_acc[dataset] = _mean([a for a in (_finite(r["accuracy"]) for r in base) if a is not None])
        fp16_uplink[dataset] = _mean([u for u in (_finite(r.get("uplink_bytes_per_sample")) for r in base)
                                      if u is not None])

    known = set(COLUMNS)
    summary = []
    for (dataset, compressor, bits), group in groups.items():
        s: dict[str, Any] = {"dataset": dataset, "compressor": compressor, "bits": bits, "n": len(group),
                             "seeds": sorted(int(r["seed"]) for r in group)}
        for field in ("accuracy", "val_accuracy"):
            values = [v for v in (_finite(r.get(field)) for r in group) if v is not None]
            s[f"{field}_mean"] = _mean(values)
            s[f"{field}_std"] = _std(values)
        extra = sorted({k for r in group for k, v in r.items() if k not in known and _finite(v) is not None})
        for field in (*_MEAN_FIELDS, *extra):
            s[f"{field}_mean"] = _mean([v for v in (_finite(r.get(field)) for r in group) if v is not None])

        up, base_up = s["uplink_bytes_per_sample_mean"], fp16_uplink[dataset]
        s["uplink_ratio"] = up / base_up if up is not None and base_up else None

        pairs = fp16_by_seed[dataset]
        ratios = []
        for r in group:
            acc, ref = _finite(r["accuracy"]), pairs.get(int(r["seed"]))
            if acc is not None and ref:
                ratios.append(acc / ref)
        if ratios:
            s["relative_accuracy_mean"], s["relative_accuracy_std"] = _mean(ratios), _std(ratios)
        elif fp16_acc[dataset] and s["accuracy_mean"] is not None:
            s["relative_accuracy_mean"], s["relative_accuracy_std"] = s["accuracy_mean"] / fp16_acc[dataset], None
        else:
            s["relative_accuracy_mean"], s["relative_accuracy_std"] = None, None
        s["relative_accuracy_pairs"] = len(ratios)
        summary.append(s)
    return sorted(summary, key=_sort_key)


# ------------------------------------------------------------------------------------------------------ markdown


def human_bytes(n: float | None) -> str:
    """A byte count in decimal units: 512 -> "512 B", 12.5 -> "12.5 B", 1880 -> "1.9 kB", 2.5e6 -> "2.5 MB"."""
    if n is None or not math.isfinite(n):
        return _MISSING
    if abs(n) < 999.95:
        return f"{n:.0f} B" if float(n).is_integer() else f"{n:.1f} B"
    value = n
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000.0
        if abs(value) < 999.95 or unit == "TB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _fmt_mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return _MISSING
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def _fmt_percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return _MISSING
    return f"{100 * mean:.1f}%" if std is None else f"{100 * mean:.1f}% ± {100 * std:.1f}%"


def _fmt_float(value: float | None, digits: int = 3) -> str:
    return _MISSING if value is None else f"{value:.{digits}f}"


def _fmt_count(value: float | None) -> str:
    """Integers as such ("4", "1024"), non-integer means (over seeds) with two decimals."""
    if value is None:
        return _MISSING
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    sep = "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"
    return "\n".join([_md_row(header), sep, *(_md_row(r) for r in rows)]) + "\n"


def _dataset_rows(summary: Sequence[dict], dataset: str) -> list[dict]:
    rows = [s for s in summary if s["dataset"] == dataset]
    if not rows:
        have = sorted({s["dataset"] for s in summary})
        raise ValueError(f"no summary rows for dataset {dataset!r}; datasets: {have}")
    return rows


def markdown_table(summary: Sequence[dict], dataset: str) -> str:
    """The results of one dataset as a GitHub Markdown table.

    Args:
      summary: the output of `summarize`.
      dataset: which dataset's rows to show (in the summary's order).

    Returns:
      The table (ending in a newline) with columns: compressor, bits, seeds (the number of runs), test accuracy
      ("0.874 ± 0.030": mean ± sample std; the mean alone for a single run), accuracy relative to fp16 ("97.9% ±
      1.2%"; only the percentage when it rests on one paired seed or is a ratio of means of unpaired seeds), val
      accuracy (mean), uplink bytes/sample ("1.9 kB", decimal units), uplink relative to fp16 ("0.131") and
      downlink bytes/sample. Missing values show as "—".

    Raises:
      ValueError: the summary has no rows for `dataset`.
    """
    header = ["compressor", "bits", "seeds", "test accuracy", "relative to fp16", "val accuracy",
              "uplink / sample", "uplink vs fp16", "downlink / sample"]
    body = [[s["compressor"], str(s["bits"]), str(s["n"]),
             _fmt_mean_std(s["accuracy_mean"], s["accuracy_std"]),
             _fmt_percent(s["relative_accuracy_mean"], s["relative_accuracy_std"]),
             _fmt_float(s["val_accuracy_mean"]),
             human_bytes(s["uplink_bytes_per_sample_mean"]),
             _fmt_float(s["uplink_ratio"]),
             human_bytes(s["downlink_bytes_per_sample_mean"])]
            for s in _dataset_rows(summary, dataset)]
    return _md_table(header, body, "lrrrrrrrr")


def entropy_table(summary: Sequence[dict], dataset: str) -> str:
    """The entropy measurements of one dataset as a GitHub Markdown table.

    Args:
      summary: the output of `summarize`.
      dataset: which dataset's rows to show.

    Returns:
      A table (ending in a newline) with compressor, bits, seeds and one column per field of `ENTROPY_FIELDS`
      that any shown row has (means over seeds: entropies with three decimals, bit widths and counts as integers
      when they are, else two decimals), over only the rows that have at least one entropy field; "" when no row
      of the dataset has any.

    Raises:
      ValueError: the summary has no rows for `dataset`.
    """
    rows = [s for s in _dataset_rows(summary, dataset)
            if any(s.get(f"{f}_mean") is not None for f in ENTROPY_FIELDS)]
    fields = [f for f in ENTROPY_FIELDS if any(s.get(f"{f}_mean") is not None for s in rows)]
    if not rows:
        return ""
    counts = {"selected_bits_image", "selected_bits_text", "distinct_codes_image", "tokens_image"}
    body = [[s["compressor"], str(s["bits"]), str(s["n"]),
             *((_fmt_count if f in counts else _fmt_float)(s.get(f"{f}_mean")) for f in fields)]
            for s in rows]
    return _md_table(["compressor", "bits", "seeds", *(_ENTROPY_HEADERS[f] for f in fields)], body,
                     "lrr" + "r" * len(fields))


# --------------------------------------------------------------------------------------------------------- plots


def _new_axes(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry involved

    fig = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save_png(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with files.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


def _by_compressor(rows: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in rows:
        if s["accuracy_mean"] is not None:
            out.setdefault(s["compressor"], []).append(s)
    return {c: sorted(v, key=lambda s: s["bits"]) for c, v in out.items()}


def _styles(rows: Sequence[dict]) -> dict[str, dict]:
    """The same marker and color for a compressor in both plots of a dataset (fp16: black circles)."""
    names = sorted({s["compressor"] for s in rows} - {FP16})
    styles = {c: {"marker": _MARKERS[i % len(_MARKERS)], "color": f"C{i % 10}"} for i, c in enumerate(names)}
    return styles | {FP16: {"marker": "o", "color": "black"}}


def plot_accuracy_vs_bits(summary: Sequence[dict], dataset: str, path: str) -> str:
    """Plots test accuracy against bit width for one dataset, as a PNG (written atomically).

    One line per compressor (fp16 excluded) through its mean accuracy at each bit width, with ±std error bars;
    x ticks are the integers between the smallest and largest bit width (1..4 when none are present). The fp16
    baseline's mean is a horizontal dashed line with a shaded ±std band.

    Args:
      summary: the output of `summarize`.
      dataset: which dataset to plot.
      path: the PNG file; its folder is created when missing.

    Returns:
      `path`.

    Raises:
      ValueError: the summary has no rows for `dataset`.
    """
    rows = _dataset_rows(summary, dataset)
    fig, ax = _new_axes(f"{dataset}: test accuracy vs bits", "bits per element", "test accuracy")
    groups, styles = _by_compressor(rows), _styles(rows)
    base = groups.pop(FP16, [])
    bits = sorted({s["bits"] for v in groups.values() for s in v}) or [1, 4]
    if base:
        mean = _mean([s["accuracy_mean"] for s in base])
        std = _mean([s["accuracy_std"] or 0.0 for s in base])
        ax.axhline(mean, color="black", linestyle="--", linewidth=1.2, label=f"fp16 ({mean:.3f} ± {std:.3f})")
        if std:
            ax.axhspan(mean - std, mean + std, color="gray", alpha=0.2, linewidth=0)
    for compressor, ss in sorted(groups.items()):
        ax.errorbar([s["bits"] for s in ss], [s["accuracy_mean"] for s in ss],
                    yerr=[s["accuracy_std"] or 0.0 for s in ss], capsize=4, label=compressor, **styles[compressor])
    ax.set_xticks(range(bits[0], bits[-1] + 1))
    ax.set_xlim(bits[0] - 0.5, bits[-1] + 0.5)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    return _save_png(fig, path)


def plot_accuracy_vs_uplink(summary: Sequence[dict], dataset: str, path: str) -> str:
    """Plots test accuracy against uplink bytes per sample (log x) for one dataset, as a PNG (written atomically).

    One marker style and color per compressor (the same as in `plot_accuracy_vs_bits`; fp16 included), points
    with ±std error bars joined in order of bits, each annotated with its bit width ("2b"). Rows without a
    positive uplink are left out. Arguments, return value and errors as `plot_accuracy_vs_bits`.
    """
    rows = [s for s in _dataset_rows(summary, dataset)
            if s["uplink_bytes_per_sample_mean"] is not None and s["uplink_bytes_per_sample_mean"] > 0]
    fig, ax = _new_axes(f"{dataset}: test accuracy vs uplink", "uplink bytes per sample (log)", "test accuracy")
    groups, styles = _by_compressor(rows), _styles(_dataset_rows(summary, dataset))
    for compressor in sorted(groups, key=lambda c: (c != FP16, c)):
        ss = groups[compressor]
        xs = [s["uplink_bytes_per_sample_mean"] for s in ss]
        ys = [s["accuracy_mean"] for s in ss]
        ax.errorbar(xs, ys, yerr=[s["accuracy_std"] or 0.0 for s in ss], linestyle="-" if len(ss) > 1 else "none",
                    capsize=4, label=compressor, **styles[compressor])
        for s, x, y in zip(ss, xs, ys, strict=True):
            ax.annotate(f"{s['bits']}b", (x, y), textcoords="offset points", xytext=(5, 5), fontsize="x-small")
    if rows:
        ax.set_xscale("log")
        ax.legend(loc="best", fontsize="small")
    return _save_png(fig, path)


# -------------------------------------------------------------------------------------------------------- report


def _slug(name: str) -> str:
    """A file-name-safe version of a dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "dataset"


def write_report(rows: Iterable[dict], out_dir: str) -> dict:
    """Writes the sweep's report: the raw results, the Markdown summary and the plots.

    Args:
      rows: result rows (see the module docstring).
      out_dir: the report folder (created when missing). It receives results.csv (`write_csv`), summary.md (per
        dataset, sorted: a section with `markdown_table`, `entropy_table` when any row has entropy fields, and the
        two plots as Markdown image links relative to `out_dir`) and plots/{dataset}_accuracy_vs_bits.png,
        plots/{dataset}_accuracy_vs_uplink.png (dataset names with characters other than letters, digits,
        ".", "_" and "-" have those replaced by "_").

    Returns:
      {"csv": path of results.csv, "markdown": path of summary.md, "plots": [paths of the PNG files]}.
    """
    rows = list(rows)
    os.makedirs(out_dir, exist_ok=True)
    csv_path = write_csv(rows, os.path.join(out_dir, "results.csv"))
    summary = summarize(rows)
    datasets = sorted({s["dataset"] for s in summary})
    plots = []
    lines = ["# Sweep results", "",
             f"{len(rows)} runs; mean ± sample std (ddof=1) over seeds; relative accuracy paired by seed "
             f"with the {FP16} baseline.", ""]
    for dataset in datasets:
        slug = _slug(dataset)
        rel_bits = f"plots/{slug}_accuracy_vs_bits.png"
        rel_uplink = f"plots/{slug}_accuracy_vs_uplink.png"
        plots.append(plot_accuracy_vs_bits(summary, dataset, os.path.join(out_dir, rel_bits)))
        plots.append(plot_accuracy_vs_uplink(summary, dataset, os.path.join(out_dir, rel_uplink)))
        lines += [f"## {dataset}", "", markdown_table(summary, dataset)]
        entropy = entropy_table(summary, dataset)
        if entropy:
            lines += ["### Entropy", "", entropy]
        lines += [f"![{dataset}: accuracy vs bits]({rel_bits})", "",
                  f"![{dataset}: accuracy vs uplink]({rel_uplink})", ""]
    md_path = os.path.join(out_dir, "summary.md")
    files.write_text(md_path, "\n".join(lines))
    return {"csv": csv_path, "markdown": md_path, "plots": plots}


def quality_markdown(rows: list[dict]) -> str:
    """The codec-quality table (`features.quality_table`) as Markdown: one line per (modality, codec, bits)."""
    lines = ["| modality | codec | bits | NMSE | cosine | bits/element sent |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['modality']} | {r['codec']} | {r['bits']} | {r['nmse']:.4f} | {r['cosine']:.4f} | "
                     f"{r['bits_per_element']:.3f} |")
    return "\n".join(lines) + "\n"
