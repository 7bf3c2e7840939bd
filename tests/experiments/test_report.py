"""qtl_jax.experiments.report: summaries (hand-computed), CSV round trip, Markdown tables, plots and the report."""

import math
import os

import pytest

from qtl_jax.experiments import report as R


def _row(dataset, compressor, bits, seed, acc, val=None, up=None, down=2048.0, **extra):
    return {"dataset": dataset, "compressor": compressor, "bits": bits, "seed": seed, "accuracy": acc,
            "val_accuracy": val, "uplink_bytes_per_sample": up, "downlink_bytes_per_sample": down, "wall_s": 10.0,
            **extra}


def _rows():
    rows = [_row("digits", "none_fp16", 16, s, a, v, 14336.0) for s, a, v in [(0, 0.8, 0.7), (1, 0.9, 0.8),
                                                                              (2, 1.0, 0.9)]]
    entropy = [dict(kde_entropy_image=3.0, selected_bits_image=2, index_entropy_image=1.9, distinct_codes_image=4,
                    tokens_image=16),
               dict(kde_entropy_image=3.1, selected_bits_image=2, index_entropy_image=None, distinct_codes_image=4,
                    tokens_image=16),
               dict(kde_entropy_image=3.2, selected_bits_image=2, index_entropy_image=1.8, distinct_codes_image=3,
                    tokens_image=16, entropy_coded_bits_image=float("nan"))]
    rows += [_row("digits", "rd_fsq", 2, s, a, v, 1880.0, **e)
             for (s, a, v), e in zip([(0, 0.8, 0.75), (1, 0.81, 0.8), (2, 0.9, 0.85)], entropy, strict=True)]
    rows += [_row("digits", "nf", 4, 5, 0.85, 0.8, 3600.0),  # seed without an fp16 run: unpaired
             _row("digits", "fsq_tanh", 1, 0, 0.7, 0.6, 960.0),  # one paired seed
             _row("digits", "rd_fsq", 1, 0, 0.6, 0.5, 940.0),  # seed 0 paired, seed 7 not
             _row("digits", "rd_fsq", 1, 7, 0.7, 0.6, 940.0),
             _row("aaa", "rd_fsq", 3, 0, 0.5, 0.4, 100.0)]  # a dataset without a baseline
    return rows


def _get(summary, dataset, compressor, bits):
    (s,) = [s for s in summary if (s["dataset"], s["compressor"], s["bits"]) == (dataset, compressor, bits)]
    return s


def test_summarize_sort_order_and_grouping():
    summary = R.summarize(_rows())
    assert [(s["dataset"], s["compressor"], s["bits"]) for s in summary] == [
        ("aaa", "rd_fsq", 3), ("digits", "none_fp16", 16), ("digits", "fsq_tanh", 1), ("digits", "nf", 4),
        ("digits", "rd_fsq", 1), ("digits", "rd_fsq", 2)]
    assert [s["n"] for s in summary] == [1, 3, 1, 1, 2, 3]
    assert _get(summary, "digits", "rd_fsq", 1)["seeds"] == [0, 7]


def test_summarize_fp16_and_paired_group():
    summary = R.summarize(_rows())
    fp = _get(summary, "digits", "none_fp16", 16)
    assert fp["accuracy_mean"] == pytest.approx(0.9)
    assert fp["accuracy_std"] == pytest.approx(0.1)  # ddof=1: sqrt((0.01 + 0 + 0.01) / 2)
    assert fp["val_accuracy_mean"] == pytest.approx(0.8)
    assert fp["val_accuracy_std"] == pytest.approx(0.1)
    assert fp["relative_accuracy_mean"] == pytest.approx(1.0)
    assert fp["relative_accuracy_std"] == pytest.approx(0.0)
    assert fp["uplink_ratio"] == pytest.approx(1.0)

    rd = _get(summary, "digits", "rd_fsq", 2)
    assert rd["seeds"] == [0, 1, 2]
    assert rd["accuracy_mean"] == pytest.approx(2.51 / 3)  # 0.83667
    # sum of squares about the mean: 0.64 + 0.6561 + 0.81 - 2.51**2 / 3 = 0.0182 / 3; ddof=1 -> / 2
    assert rd["accuracy_std"] == pytest.approx(math.sqrt(0.0182 / 6))  # 0.055076
    assert rd["val_accuracy_mean"] == pytest.approx(0.8)
    assert rd["val_accuracy_std"] == pytest.approx(0.05)
    # paired ratios 0.8/0.8, 0.81/0.9, 0.9/1.0 = 1.0, 0.9, 0.9
    assert rd["relative_accuracy_mean"] == pytest.approx(2.8 / 3)  # 0.93333
    assert rd["relative_accuracy_std"] == pytest.approx(0.1 / math.sqrt(3))  # sqrt((0.0044.. + 2 * 0.0011..) / 2)
    assert rd["relative_accuracy_pairs"] == 3
    assert rd["uplink_bytes_per_sample_mean"] == pytest.approx(1880.0)
    assert rd["downlink_bytes_per_sample_mean"] == pytest.approx(2048.0)
    assert rd["uplink_ratio"] == pytest.approx(1880.0 / 14336.0)  # 0.13114
    assert rd["wall_s_mean"] == pytest.approx(10.0)
    # optional fields: means over the runs that have them (None and NaN left out)
    assert rd["kde_entropy_image_mean"] == pytest.approx(3.1)
    assert rd["selected_bits_image_mean"] == pytest.approx(2.0)
    assert rd["index_entropy_image_mean"] == pytest.approx(1.85)
    assert rd["distinct_codes_image_mean"] == pytest.approx(11 / 3)
    assert rd["tokens_image_mean"] == pytest.approx(16.0)
    assert rd["entropy_coded_bits_image_mean"] is None
    assert rd["kde_entropy_text_mean"] is None
    assert fp["kde_entropy_image_mean"] is None


def test_summarize_single_seed_unpaired_and_partial_pairs():
    summary = R.summarize(_rows())
    nf = _get(summary, "digits", "nf", 4)  # one run, seed 5 has no fp16 run
    assert nf["accuracy_std"] is None  # one run: no spread, not a spread of 0
    assert nf["val_accuracy_std"] is None
    assert nf["relative_accuracy_mean"] == pytest.approx(0.85 / 0.9)  # ratio of means
    assert nf["relative_accuracy_std"] is None
    assert nf["relative_accuracy_pairs"] == 0

    tanh = _get(summary, "digits", "fsq_tanh", 1)  # one paired run
    assert tanh["relative_accuracy_mean"] == pytest.approx(0.7 / 0.8)
    assert tanh["relative_accuracy_std"] is None
    assert tanh["relative_accuracy_pairs"] == 1

    rd1 = _get(summary, "digits", "rd_fsq", 1)  # only seed 0 pairs; seed 7 is left out of the ratio
    assert rd1["accuracy_mean"] == pytest.approx(0.65)
    assert rd1["accuracy_std"] == pytest.approx(math.sqrt(0.005))
    assert rd1["relative_accuracy_mean"] == pytest.approx(0.6 / 0.8)
    assert rd1["relative_accuracy_std"] is None
    assert rd1["relative_accuracy_pairs"] == 1

    aaa = _get(summary, "aaa", "rd_fsq", 3)  # no baseline on that dataset (digits' fp16 does not count)
    assert aaa["relative_accuracy_mean"] is None
    assert aaa["relative_accuracy_std"] is None
    assert aaa["uplink_ratio"] is None


def test_summarize_pairs_within_dataset_only():
    rows = [_row("a", "none_fp16", 16, 0, 0.5, up=100.0), _row("b", "none_fp16", 16, 0, 1.0, up=200.0),
            _row("a", "nf", 2, 0, 0.4, up=10.0), _row("b", "nf", 2, 0, 0.4, up=10.0)]
    summary = R.summarize(rows)
    assert _get(summary, "a", "nf", 2)["relative_accuracy_mean"] == pytest.approx(0.8)
    assert _get(summary, "b", "nf", 2)["relative_accuracy_mean"] == pytest.approx(0.4)
    assert _get(summary, "a", "nf", 2)["uplink_ratio"] == pytest.approx(0.1)
    assert _get(summary, "b", "nf", 2)["uplink_ratio"] == pytest.approx(0.05)


def test_summarize_requires_fields():
    row = _row("digits", "nf", 2, 0, 0.5)
    del row["seed"]
    with pytest.raises(ValueError, match="seed"):
        R.summarize([row])
    with pytest.raises(ValueError, match="accuracy"):
        R.summarize([_row("digits", "nf", 2, 0, None)])


def test_csv_round_trip(tmp_path):
    rows = [_row("digits", "rd_fsq", 2, 0, 0.1 + 0.2, None, 1880.5, kde_entropy_image=3.25, tokens_image=16,
                 note="first run"),
            _row("digits", "none_fp16", 16, 1, 0.9, 0.8, 14336.0, entropy_coded_bits_image=float("nan"))]
    path = R.write_csv(rows, str(tmp_path / "sub" / "results.csv"))
    back = R.read_csv(path)
    header = open(path).readline().strip().split(",")
    assert header == [*R.COLUMNS, "note"]
    assert len(back) == 2
    first = back[0]
    assert first["accuracy"] == 0.1 + 0.2  # exact: repr round trip
    assert first["val_accuracy"] is None
    assert isinstance(first["bits"], int) and first["bits"] == 2
    assert isinstance(first["seed"], int)
    assert isinstance(first["tokens_image"], int) and first["tokens_image"] == 16
    assert isinstance(first["uplink_bytes_per_sample"], float) and first["uplink_bytes_per_sample"] == 1880.5
    assert first["note"] == "first run"
    assert first["kde_entropy_text"] is None  # absent -> empty -> None
    expected = {k: None for k in header} | rows[0]
    assert first == expected
    second = back[1]
    assert math.isnan(second["entropy_coded_bits_image"])
    assert second["note"] is None
    assert second["compressor"] == "none_fp16" and second["bits"] == 16
    assert [p for p in os.listdir(tmp_path / "sub") if p != "results.csv"] == []  # no temporary left
    # the summary of the read-back rows equals that of the originals
    assert R.summarize(R.read_csv(R.write_csv(_rows(), str(tmp_path / "all.csv")))) == R.summarize(_rows())


def test_csv_keeps_numeric_looking_names_as_str(tmp_path):
    path = R.write_csv([_row("2024", "7", 2, 0, 0.5)], str(tmp_path / "r.csv"))
    (row,) = R.read_csv(path)
    assert row["dataset"] == "2024" and row["compressor"] == "7"


def test_human_bytes():
    assert R.human_bytes(512) == "512 B"
    assert R.human_bytes(12.5) == "12.5 B"
    assert R.human_bytes(1880.0) == "1.9 kB"
    assert R.human_bytes(14336.0) == "14.3 kB"
    assert R.human_bytes(999.96) == "1.0 kB"
    assert R.human_bytes(2.5e6) == "2.5 MB"
    assert R.human_bytes(None) == "—"


def test_markdown_table_exact_cells():
    summary = R.summarize(_rows())
    table = R.markdown_table(summary, "digits")
    lines = table.strip().split("\n")
    assert lines[0] == ("| compressor | bits | seeds | test accuracy | relative to fp16 | val accuracy | "
                        "uplink / sample | uplink vs fp16 | downlink / sample |")
    assert lines[1] == "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| none_fp16 | 16 | 3 | 0.900 ± 0.100 | 100.0% ± 0.0% | 0.800 | 14.3 kB | 1.000 | 2.0 kB |"
    assert lines[3] == "| fsq_tanh | 1 | 1 | 0.700 | 87.5% | 0.600 | 960 B | 0.067 | 2.0 kB |"
    assert lines[4] == "| nf | 4 | 1 | 0.850 | 94.4% | 0.800 | 3.6 kB | 0.251 | 2.0 kB |"
    assert lines[6] == "| rd_fsq | 2 | 3 | 0.837 ± 0.055 | 93.3% ± 5.8% | 0.800 | 1.9 kB | 0.131 | 2.0 kB |"
    assert len(lines) == 7
    other = R.markdown_table(summary, "aaa").strip().split("\n")
    assert other[2] == "| rd_fsq | 3 | 1 | 0.500 | — | 0.400 | 100 B | — | 2.0 kB |"
    with pytest.raises(ValueError, match="nope"):
        R.markdown_table(summary, "nope")


def test_entropy_table():
    summary = R.summarize(_rows())
    lines = R.entropy_table(summary, "digits").strip().split("\n")
    assert lines[0] == ("| compressor | bits | seeds | KDE entropy image (bits) | selected bits image | "
                        "index entropy image (bits/elem) | distinct image codes | image tokens |")
    assert lines[2] == "| rd_fsq | 2 | 3 | 3.100 | 2 | 1.850 | 3.67 | 16 |"
    assert len(lines) == 3  # only the row with entropy fields
    assert R.entropy_table(summary, "aaa") == ""


def _check_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024


def test_write_report(tmp_path):
    out = tmp_path / "report"
    result = R.write_report(_rows(), str(out))
    assert result["csv"] == str(out / "results.csv")
    assert result["markdown"] == str(out / "summary.md")
    assert sorted(result["plots"]) == sorted(str(out / "plots" / f"{d}_accuracy_vs_{k}.png")
                                             for d in ("aaa", "digits") for k in ("bits", "uplink"))
    for p in result["plots"]:
        _check_png(p)
    assert len(R.read_csv(result["csv"])) == len(_rows())
    md = open(result["markdown"], encoding="utf-8").read()
    assert md.index("## aaa") < md.index("## digits")
    for d in ("aaa", "digits"):
        assert f"![{d}: accuracy vs bits](plots/{d}_accuracy_vs_bits.png)" in md
        assert f"![{d}: accuracy vs uplink](plots/{d}_accuracy_vs_uplink.png)" in md
    assert "| rd_fsq | 2 | 3 | 0.837 ± 0.055 | 93.3% ± 5.8% | 0.800 | 1.9 kB | 0.131 | 2.0 kB |" in md
    assert md.count("### Entropy") == 1  # only digits has entropy fields
    assert "| rd_fsq | 2 | 3 | 3.100 | 2 | 1.850 | 3.67 | 16 |" in md
    leftovers = [n for n in os.listdir(out) + os.listdir(out / "plots") if n.endswith(".tmp")]
    assert leftovers == []


def test_plot_accuracy_vs_bits_fp16_only(tmp_path):
    summary = R.summarize([_row("d", "none_fp16", 16, s, a, up=100.0) for s, a in [(0, 0.5), (1, 0.7)]])
    _check_png(R.plot_accuracy_vs_bits(summary, "d", str(tmp_path / "a" / "bits.png")))
    _check_png(R.plot_accuracy_vs_uplink(summary, "d", str(tmp_path / "a" / "uplink.png")))
