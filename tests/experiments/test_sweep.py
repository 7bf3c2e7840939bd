"""The sweep end to end on its quick setting (two tiny runs, each in its own process), its plan, the README
block it generates."""

import csv
import json
import os

import pytest

from qtl_jax.experiments import sweep


def test_plan_and_its_errors():
    runs = sweep.plan(["digits"], ["none_fp16", "rd_fsq_cosine"], [1, 2], [0, 1])
    assert [(r.compressor, r.bits, r.seed) for r in runs] == [
        ("none_fp16", 16, 0), ("none_fp16", 16, 1), ("rd_fsq_cosine", 1, 0), ("rd_fsq_cosine", 1, 1),
        ("rd_fsq_cosine", 2, 0), ("rd_fsq_cosine", 2, 1)]
    assert runs[2].overrides() == {"data.dataset": "digits", "seed": 0, "compressor.image": "rd_fsq",
                                   "compressor.text": "rd_fsq", "compressor.bits": 1,
                                   "compressor.commitment": "cosine"}
    assert runs[2].workdir("/o") == "/o/digits/rd_fsq_cosine/b1/seed0"
    channel, = sweep.plan(["shapes"], ["rd_fsq_channel"], [2], [1])
    assert channel.overrides() == {"data.dataset": "shapes", "seed": 1, "compressor.image": "rd_fsq",
                                   "compressor.text": "rd_fsq", "compressor.bits": 2, "compressor.scale": "channel"}
    with pytest.raises(ValueError, match="unknown compressor 'qlora'"):
        sweep.plan(["shapes"], ["qlora"], [2], [0])
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        sweep.plan(["mnist"], ["rd_fsq"], [2], [0])
    with pytest.raises(ValueError, match="--bits: 9"):
        sweep.plan(["shapes"], ["rd_fsq"], [9], [0])
    # A misspelt --set field is caught before any run starts, naming what its section has.
    with pytest.raises(ValueError, match=r"--set optim.lrr: configs/finetune.py has no field 'optim.lrr'; optim "
                                         r"has \[.*'lr'.*\]"):
        sweep.main(["--out", "/nonexistent/sweep", "--set", "optim.lrr=1e-3", "--dry-run"])
    with pytest.raises(ValueError, match=r"no field 'optim.lr.x'; optim.lr has \[\]"):
        sweep.check_fields({"optim.lr.x": "1"})
    sweep.check_fields({"optim.lr": "1e-3", "stage1.optim.min_steps": "0", "data.data_dir": "/d"})


def test_update_readme_replaces_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{sweep.README_BEGIN}\nold\n{sweep.README_END}\noutro\n")
    summary = tmp_path / "results" / "summary.md"
    summary.parent.mkdir()
    summary.write_text("# Sweep results\n\n## shapes\n\n| a |\n\n![p](plots/x.png)\n")
    sweep.update_readme(str(readme), str(summary), "python -m qtl_jax.experiments.sweep --out X")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{sweep.README_END}\noutro\n") and "old" not in text
    assert "#### shapes" in text and "# Sweep results" not in text and "](results/plots/x.png)" in text
    assert "Made by `python -m qtl_jax.experiments.sweep --out X`" in text
    readme.write_text("no block")
    with pytest.raises(ValueError, match="no generated block"):
        sweep.update_readme(str(readme), str(summary), "x")


def test_last_error_reads_the_exception_a_training_log_ends_with(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("Traceback (most recent call last):\nOSError: an earlier attempt's\n"
                   "stage:  22%|##  | 1126/5000 [56:57<76:33, loss=0.001]\rstage:  23%|##  | 1127/5000"
                   "Traceback (most recent call last):\n"
                   '  File "/x/train.py", line 30, in <module>\n'
                   "    app.run(main)\n"
                   '  File "/x/qtl_jax/checkpoint.py", line 215, in check_resume_config\n'
                   '    raise ValueError(f"{stage_dir} holds a run with another config; "\n'
                   "ValueError: /w/pretrain holds a run with another config. Differing fields:\n"
                   "  compressor.scale: saved 'tensor', now 'channel'\n"
                   "Use another --workdir.\n\n")
    assert sweep.last_error(str(log)) == ("ValueError: /w/pretrain holds a run with another config. Differing "
                                          "fields:\n  compressor.scale: saved 'tensor', now 'channel'\n"
                                          "Use another --workdir.")
    text = log.read_text()
    log.write_text(text + "stage:   0%|    | 0/5000\rKilled\n")  # an attempt that ended without a traceback
    assert sweep.last_error(str(log), start=len(text)) == ""
    assert sweep.last_error(str(log)).startswith("ValueError: /w/pretrain")  # from the start: the earlier attempt
    assert sweep.last_error(str(tmp_path / "missing.log")) == ""


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    trained = []

    def train(run, out, overrides):
        trained.append(run.compressor)
        if run.compressor == "rd_fsq":
            raise sweep.RunFailed(f"{run}: training failed (exit 1); see log\nValueError: bad")
        return {}

    monkeypatch.setattr(sweep, "train", train)
    monkeypatch.setattr(sweep, "write_all", lambda out, n: {"csv": "c", "markdown": "m", "plots": []})
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--out", str(tmp_path), "--datasets", "shapes", "--compressors", "none_fp16,rd_fsq,nf",
                    "--seeds", "0"])
    assert trained == ["none_fp16", "rd_fsq", "nf"]  # the run after the failed one was trained too
    message = str(exit_.value.code)
    assert message.startswith("[sweep] 1 of 3 runs failed:") and "compressor='rd_fsq'" in message
    assert "ValueError: bad" in message and "going on with the other runs" in capsys.readouterr().out

    def nothing(out, n):
        raise sweep.NothingToReport("nothing")

    monkeypatch.setattr(sweep, "write_all", nothing)  # every run failed: the failures, not "nothing to report"
    monkeypatch.setattr(sweep, "train", lambda run, out, overrides: (_ for _ in ()).throw(sweep.RunFailed("x")))
    with pytest.raises(SystemExit, match="2 of 2 runs failed"):
        sweep.main(["--out", str(tmp_path), "--datasets", "shapes", "--compressors", "nf", "--seeds", "0,1"])


def test_quick_sweep_end_to_end(tmp_path, tmp_path_factory):
    out = tmp_path / "sweep"
    data_dir = tmp_path_factory.getbasetemp() / "tfds"  # the session's Shapes-VQA smoke data, when made already
    files = sweep.main(["--out", str(out), "--quick", "--set", f"data.data_dir={data_dir}",
                        "--set", "optim.max_steps=2", "--set", "eval.max_examples=8"])
    with open(files["csv"]) as f:
        rows = {r["compressor"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none_fp16", "rd_fsq"}
    for r in rows.values():
        assert r["dataset"] == "shapes" and r["seed"] == "0" and 0 <= float(r["accuracy"]) <= 1
        assert float(r["kde_entropy_image"]) > 0 and int(r["selected_bits_image"]) >= 1
    # 2-bit codes are 1/8 of fp16 (plus the labels and positions every compressor sends).
    ratio = float(rows["rd_fsq"]["uplink_bytes_per_sample"]) / float(rows["none_fp16"]["uplink_bytes_per_sample"])
    assert 0.125 < ratio < 0.16
    assert 0 < float(rows["rd_fsq"]["index_entropy_image"]) <= 2
    assert int(rows["rd_fsq"]["distinct_codes_image"]) <= int(rows["rd_fsq"]["tokens_image"])
    summary = (out / "summary.md").read_text()
    assert "## shapes" in summary and "| rd_fsq | 2 | 1 |" in summary and "codec quality without training" in summary
    for plot in files["plots"]:
        assert os.path.getsize(plot) > 1000
    # Finished runs are reused: a second invocation trains nothing and reports the same rows; --readme fills
    # the README's block and commits the run records under results/runs.
    readme = tmp_path / "repo" / "README.md"
    readme.parent.mkdir()
    readme.write_text(f"# x\n{sweep.README_BEGIN}\n{sweep.README_END}\n")
    again = sweep.main(["--out", str(out), "--quick", "--report-only", "--readme", str(readme)])
    assert again["csv"] == files["csv"] and "| rd_fsq | 2 | 1 |" in readme.read_text()
    records = tmp_path / "repo" / "results" / "runs"
    assert sorted(str(p.relative_to(records)) for p in records.rglob("*.json")) == [
        "shapes/none_fp16/b16/seed0.json", "shapes/rd_fsq/b2/seed0.json"]
    # The records alone rebuild the same table on a machine without the runs (nothing is trained: a sweep with
    # --records reports a recorded run as finished).
    elsewhere = tmp_path / "elsewhere"
    rebuilt = sweep.main(["--out", str(elsewhere), "--quick", "--records", str(records)])
    with open(files["csv"]) as f, open(rebuilt["csv"]) as g:
        assert f.read() == g.read()
    assert not (elsewhere / "shapes" / "rd_fsq" / "b2" / "seed0" / "finetune").exists()
    assert "codec quality without training" in (elsewhere / "summary.md").read_text()


def test_records_that_are_not_records_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"--records .*: no such folder"):
        sweep.import_records(str(tmp_path / "missing"), str(tmp_path / "out"))
    bad = tmp_path / "runs" / "digits" / "nf" / "b2" / "seed1.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"seed1.json: not a sweep record"):
        sweep.import_records(str(tmp_path / "runs"), str(tmp_path / "out"))
    other = {"run": {"dataset": "digits", "compressor": "nf", "bits": 2, "seed": 0}, "summary": {}, "analysis": {}}
    bad.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"seed1.json: not the record of Run\(dataset='digits', compressor='nf', "
                                         r"bits=2, seed=1\)"):
        sweep.import_records(str(tmp_path / "runs"), str(tmp_path / "out"))
    other["run"]["seed"] = 1
    bad.write_text(json.dumps(other))
    assert sweep.import_records(str(tmp_path / "runs"), str(tmp_path / "out")) == 1
    assert sweep.finished_runs(str(tmp_path / "out")) == [sweep.Run("digits", "nf", 2, 1)]
    assert sweep.import_records(str(tmp_path / "runs"), str(tmp_path / "out")) == 0  # a local record wins


def test_wall_time_counts_every_invocation_of_a_resumed_run(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("step 1\n")
    clock = sweep._clock_invocation(str(tmp_path), start=True, now=1000.0)
    assert clock == {"wall_s": 0, "invocations": [[1000.0, None]]}
    os.utime(log, (1250.0, 1250.0))  # the killed invocation's last write to its log
    sweep._clock_invocation(str(tmp_path), start=True, now=2000.0)  # resumed: the killed part ends at 1250
    clock = sweep._clock_invocation(str(tmp_path), start=False, now=2100.0)
    assert clock == {"wall_s": 350.0, "invocations": [[1000.0, 1250.0], [2000.0, 2100.0]]}
    # A file from before the invocations were kept: its total is the first part.
    (tmp_path / sweep.WALL).write_text('{"wall_s": 63.0}')
    sweep._clock_invocation(str(tmp_path), start=True, now=3000.0)
    clock = sweep._clock_invocation(str(tmp_path), start=False, now=3040.0)
    assert clock["wall_s"] == 103.0 and len(clock["invocations"]) == 2
