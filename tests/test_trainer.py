"""The real trainer end to end on the tiny preset: both stages in meshes mode, evaluation in a fresh process,
own LLaVA-format data with skipped samples, resume (config check, metrics, stop_after), bad configs."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.finetune import get_config as finetune_config
from qtl_jax import checkpoint, evaluate, probe, trainer
from qtl_jax.data import builders, tokenizer
from qtl_jax.metrics import read_metrics

from .conftest import smoke_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path_factory, stage="finetune", arg=None, **overrides):
    return smoke_config(tmp_path_factory, stage, arg, **overrides)


def test_both_stages_end_to_end_in_meshes_mode(trained, tmp_path_factory):
    workdir, summary = trained
    assert summary["stage"] == "finetune" and summary["steps"] == 3
    for split in ("validation", "test"):
        acc = summary[f"{split}_accuracy"]
        assert set(acc) >= {"all"} and all(0.0 <= v <= 1.0 for v in acc.values())
        answers = (workdir / "finetune" / "eval" / f"{split}.answers.jsonl").read_text().splitlines()
        assert len(answers) == 8  # eval.max_examples
        scores = json.loads((workdir / "finetune" / "eval" / f"{split}.scores.json").read_text())
        assert scores["accuracy"] == acc and scores["samples"] == 8
        assert np.mean([json.loads(line)["correct"] for line in answers]) == acc["all"]
    # RD-FSQ 2-bit: 1/8 of fp16 for the feature rows, plus the small metadata (positions, lengths, labels).
    assert 0.125 < summary["uplink_ratio_to_fp16"] < 0.16
    assert summary["downlink_bytes_per_sample"] > summary["uplink_bytes_per_sample"]  # fp32 gradients
    stages = json.loads((workdir / "summary.json").read_text())
    assert [s["stage"] for s in stages] == ["pretrain", "finetune"]
    records = read_metrics(str(workdir / "finetune"))
    assert [r["step"] for r in records if "ce_loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["ce_loss"]) for r in records if "ce_loss" in r)
    assert os.path.isdir(workdir / "pretrain" / "checkpoints" / "3")  # stage 1 capped at max_steps too
    # Every folder records the config it ran with: the whole recipe's, and each stage's own.
    full = checkpoint.load_config(str(workdir))
    assert full.stage1.optim.lr == 3e-4 and full.init_from == ""
    assert checkpoint.load_config(str(workdir / "finetune")).init_from == str(workdir / "pretrain")
    assert checkpoint.load_config(str(workdir / "pretrain")).data.template == "pretrain"
    # The trained model is exported, compressors included, and loads back as the same model.
    from qtl_jax.models import convert

    export = workdir / "finetune" / "export"
    assert sorted(p.name for p in export.iterdir()) == [
        "client_token_embeddings.safetensors", "compressors.safetensors", "connector", "language_model",
        "qtl_jax.json", "vision_tower"]
    _, params = convert.load_export(str(export))
    jax.tree.map(np.testing.assert_array_equal, params, checkpoint.final_params(str(workdir / "finetune")))


def _llava_file(records, path, image_dir, answers=True):
    """Shapes-VQA records as a LLaVA-format JSON file with PNG images (what a user brings)."""
    os.makedirs(image_dir, exist_ok=True)
    samples = []
    for r in records:
        sample_id = r["id"].decode()
        with open(os.path.join(image_dir, f"{sample_id}.png"), "wb") as f:
            f.write(bytes(r["image"]))
        conv = json.loads(r["conversations"])
        samples.append({"id": sample_id, "image": f"{sample_id}.png", "question_type": r["question_type"].decode(),
                        "conversations": conv if answers else conv[:-1]})
    with open(path, "w") as f:
        json.dump(samples, f)
    return str(path)


def test_evaluate_restores_the_run_in_a_fresh_process(trained, tmp_path, tmp_path_factory):
    """`python -m qtl_jax.evaluate` on a LLaVA-format copy of the validation split gives the trainer's own
    validation answers, from a process with 1 CPU device (the run was saved from 8)."""
    workdir, summary = trained
    source = builders.prepare_shapes(str(tmp_path_factory.getbasetemp() / "tfds"), "smoke")[0]
    records = [source.as_data_source()["validation"][i] for i in range(8)]
    file = _llava_file(records, tmp_path / "val.json", tmp_path / "images")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    result = subprocess.run([sys.executable, "-m", "qtl_jax.evaluate", "--workdir", str(workdir), "--eval",
                             f"mine={file}", "--image-root", str(tmp_path / "images")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    eval_dir = workdir / "finetune" / "eval"
    mine = [json.loads(line) for line in (eval_dir / "mine.answers.jsonl").read_text().splitlines()]
    own = [json.loads(line) for line in (eval_dir / "validation.answers.jsonl").read_text().splitlines()]
    assert mine == own
    assert json.loads((eval_dir / "mine.scores.json").read_text())["accuracy"] == summary["validation_accuracy"]


def test_probe_reads_the_saved_config_and_validation_images_only(trained, capsys):
    probe.main(["--workdir", str(trained[0])])
    out = capsys.readouterr().out
    assert "object tokens" in out and "quantized: colour" in out


def test_own_llava_data_with_the_tiny_preset(tmp_path, tmp_path_factory, capsys):
    """A user's LLaVA-format files: a word tokenizer built from them, stage 1 with bad samples skipped and
    reported (over-long captions keep their place as empty rows: the step count is exact), stage 2 from it
    with token ids on the wire and an evaluation file."""
    splits = builders.prepare_shapes(str(tmp_path_factory.getbasetemp() / "tfds"), "smoke")[0].as_data_source()
    take = lambda split, n: [splits[split][i] for i in range(n)]
    captions = _llava_file(take("pretrain", 24), tmp_path / "captions.json", tmp_path / "images")
    samples = json.loads(open(captions).read())
    samples[3]["conversations"][1]["value"] = "a very " * 60 + "long caption"  # longer than the largest bucket
    samples.append({"id": "lost", "image": "missing.png", "conversations": samples[0]["conversations"]})
    with open(captions, "w") as f:
        json.dump(samples, f)
    qa = _llava_file(take("train", 16), tmp_path / "qa.json", tmp_path / "images")
    held_out = _llava_file(take("validation", 8), tmp_path / "held_out.json", tmp_path / "images")
    tokenizer.main(["--out", str(tmp_path / "tok"), captions, qa])
    common = {"data.dataset": "llava", "data.tokenizer": str(tmp_path / "tok"),
              "data.image_root": str(tmp_path / "images"), "data.on_bad_sample": "skip", "split.mode": "single",
              "optim.max_steps": 0, "optim.epochs": 1}
    stage1 = _config(tmp_path_factory, "pretrain", **common, **{"data.annotation_file": captions,
                                                                "data.buckets": (48,)})
    summary = trainer.train_and_evaluate(stage1, str(tmp_path / "w1"))
    assert summary["steps"] == 24 // 4 and summary["skipped_samples"] == 1  # 25 records, 1 lost at conversion
    assert "text tokens exceed the largest bucket 48" in summary["skipped_reasons"][0]
    assert "lost" in capsys.readouterr().out  # the conversion reported it
    stage2 = _config(tmp_path_factory, **common, **{"data.annotation_file": qa,
                                                    "init_from": str(tmp_path / "w1" / "pretrain"),
                                                    "compressor.text_transport": "token_ids",
                                                    "data.eval_files": f"held_out={held_out}"})
    summary = trainer.train_and_evaluate(stage2, str(tmp_path / "w2"))
    assert summary["steps"] == 4 and set(summary["held_out_accuracy"]) >= {"all"}
    assert not (tmp_path / "w2" / "pretrain").exists()  # stage 1 was not run again
    assert len((tmp_path / "w2" / "finetune" / "eval" / "held_out.answers.jsonl").read_text().splitlines()) == 8
    # The annotation file edited under a checkpoint: converted anew, and the run refuses to resume on it.
    with open(qa, "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match=r"was trained on .*qa_.* the data is now"):
        trainer.train_and_evaluate(stage2, str(tmp_path / "w2"))


def _params(workdir):
    return jax.tree.map(np.asarray, checkpoint.final_params(workdir))


def test_interrupted_run_resumes_to_the_same_result(tmp_path_factory, tmp_path):
    overrides = {"optim.max_steps": 4, "checkpoint_every": 2, "split.mode": "single"}
    full = _config(tmp_path_factory, "pretrain", **overrides)
    trainer.train_and_evaluate(full, str(tmp_path / "full"))
    resumed_dir = tmp_path / "resumed"
    killed = _config(tmp_path_factory, "pretrain", **overrides, stop_after=3)
    assert trainer.train_and_evaluate(killed, str(resumed_dir))["interrupted"]
    # The same command again stops where it is: no extra step.
    assert trainer.train_and_evaluate(killed, str(resumed_dir))["steps"] == 3
    assert checkpoint.manager(str(resumed_dir / "pretrain")).latest_step() == 3
    # As if killed after logging step 3 but before its checkpoint: resume from step 2, log 3 again.
    shutil.rmtree(resumed_dir / "pretrain" / "checkpoints" / "3")
    # Another config in the same workdir is refused before any work, naming the fields ...
    other = _config(tmp_path_factory, "pretrain", **overrides, **{"optim.lr": 1e-3, "data.buckets": (32, 64)})
    with pytest.raises(ValueError, match=r"(?s)another config.*data\.buckets: saved \[64\], now \[32, 64\].*"
                                         r"optim\.lr: saved 0\.0003, now 0\.001"):
        trainer.train_and_evaluate(other, str(resumed_dir))
    # ... while stop_after, log and checkpoint cadence may change.
    resumed = _config(tmp_path_factory, "pretrain", **overrides, log_every=2)
    assert trainer.train_and_evaluate(resumed, str(resumed_dir))["steps"] == 4
    a, b = _params(str(tmp_path / "full" / "pretrain")), _params(str(resumed_dir / "pretrain"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    steps = [r["step"] for r in read_metrics(str(resumed_dir / "pretrain")) if "ce_loss" in r]
    assert steps == [1, 2, 4]  # step 3 was logged before the "kill", then dropped and not logged again (log 2)


def test_stage_zero_then_stage_one_from_its_frozen_tower_and_resume(tmp_path_factory, tmp_path):
    frozen = ("connector", "compressors", "token_embeddings", "language_model")
    overrides = {"tower.steps": 4, "optim.max_steps": 4, "checkpoint_every": 2, "split.mode": "single",
                 "optim.trainable": frozen}
    config = _config(tmp_path_factory, "pretrain", **overrides)
    full = tmp_path / "full"
    (stage0, tower_dir), (stage1, stage1_dir) = trainer.stage_plan(config, str(full))
    assert (stage0.stage, stage1.stage, stage1.init_from) == ("tower", "pretrain", tower_dir)
    assert (tower_dir, stage1_dir) == (str(full / "tower"), str(full / "pretrain"))
    trainer.train_and_evaluate(config, str(full))
    stages = json.loads((full / "summary.json").read_text())
    assert [(s["stage"], s["steps"]) for s in stages] == [("tower", 4), ("pretrain", 4)]
    assert np.isfinite(stages[0]["final_loss"]) and 0 <= stages[0]["final_retrieval"] <= 1
    # Stage 1 starts from stage 0's vision tower and, frozen, keeps it; the rest of the client trains.
    tower = checkpoint.final_params(tower_dir)["client"]
    stage1_client = checkpoint.final_params(stage1_dir)["client"]
    jax.tree.map(np.testing.assert_array_equal, tower["vision_tower"], stage1_client["vision_tower"])
    assert set(tower) == {"vision_tower", "image_head", "image_projection", "text_tower", "text_projection",
                          "logit_scale", "logit_bias"}
    # Killed in stage 0 after logging step 3, before its checkpoint: the same command resumes from step 2 and
    # ends where the uninterrupted run ended, stage 1 included.
    killed = tmp_path / "killed"
    assert trainer.train_and_evaluate(_config(tmp_path_factory, "pretrain", **overrides, stop_after=3),
                                      str(killed))["interrupted"]
    assert checkpoint.latest_step(str(killed / "tower")) == 3 and not (killed / "pretrain").exists()
    shutil.rmtree(killed / "tower" / "checkpoints" / "3")
    assert trainer.train_and_evaluate(config, str(killed))["steps"] == 4
    for stage in ("tower", "pretrain"):
        jax.tree.map(np.testing.assert_array_equal, checkpoint.final_params(str(full / stage)),
                     checkpoint.final_params(str(killed / stage)))
    records = [r for r in read_metrics(str(killed / "tower")) if "tower_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    np.testing.assert_array_equal([r["tower_loss"] for r in records],
                                  [r["tower_loss"] for r in read_metrics(tower_dir) if "tower_loss" in r])
    # The server of a networked run has no data and no part in stage 0: its plan starts at stage 1.
    assert [c.stage for c, _ in trainer.stage_plan(config, str(tmp_path / "server"), data=False)] == ["pretrain"]


def test_only_fields_that_change_training_block_a_resume():
    saved = finetune_config()
    current = finetune_config()
    current.stop_after, current.eval.batch_size, current.data.eval_files = 5, 1, "x=a.json"
    assert checkpoint.config_differences(saved, current) == []
    # A field added since the run was saved: its absence reads as the value that trains the same, no other.
    del saved.compressor["scale"], saved.model["attention"]
    assert checkpoint.config_differences(saved, current) == []
    current.compressor.scale, current.model.attention = "channel", "xla"
    assert checkpoint.config_differences(saved, current) == [
        "compressor.scale: saved 'tensor', now 'channel'", "model.attention: saved 'auto', now 'xla'"]
    current.compressor.scale, current.model.attention = "tensor", "auto"
    current.data.buckets, current.optim.lr = (64,), 1e-3
    assert checkpoint.config_differences(saved, current) == [
        "data.buckets: saved [32, 48, 64], now [64]", "optim.lr: saved 0.0003, now 0.001"]


def test_stage_one_keeps_its_own_data_fields():
    config = finetune_config("preset=paper")
    config.stage1.data.image_root = "/data/llava_pretrain/images"
    config.data.image_root = "/data/finetune/images"
    config.data.data_dir = "/data/tfds"
    config.compressor.bits = 3
    stage1 = trainer.stage1_config(config)
    assert stage1.data.image_root == "/data/llava_pretrain/images"
    assert stage1.data.annotation_file == "data/blip_laion_cc_sbu_558k.json" and stage1.data.template == "pretrain"
    assert stage1.data.data_dir == "/data/tfds" and stage1.compressor.bits == 3  # shared fields follow stage 2
    assert stage1.optim.lr == 5e-4 and stage1.optim.trainable == ("connector", "compressors")


@pytest.mark.parametrize(("arg", "overrides", "error", "message"), [
    (None, {"compressor.image": "vq"}, ValueError, "config.compressor.image: unknown compressor 'vq'"),
    (None, {"compressor.bits": 9}, ValueError, r"config.compressor.bits must be in 1\.\.8"),
    (None, {"split.server_mesh": (4, 2, 2)}, ValueError, "need 18 devices, only 8 available"),
    (None, {"model.init": "pretrained"}, ValueError, "config.model.init=pretrained needs"),
    (None, {"model.init": "zeros"}, ValueError, "config.model.init must be one of"),
    (None, {"model.init": "pretrained", "model.openelm_checkpoint": "/nonexistent/elm"}, FileNotFoundError,
     "config.model.openelm_checkpoint"),
    ("preset=paper", {}, FileNotFoundError,
     "config.model.siglip_checkpoint: checkpoint folder .* does not exist .*model.init=random"),
    ("preset=paper", {"model.init": "random"}, FileNotFoundError,
     "config.data.annotation_file: 'data/llava_v1_5_mix665k.json' does not exist"),
    (None, {"data.dataset": "llava", "data.annotation_file": "/nonexistent.json"}, FileNotFoundError,
     "config.data.annotation_file"),
    # Stage 2's own data is there, stage 1's is not: the message names stage 1's field.
    (None, {"data.dataset": "llava", "data.annotation_file": "EXISTING", "data.image_root": "EXISTING",
            "data.tokenizer": "EXISTING", "stage1.data.annotation_file": "/nonexistent.json"}, FileNotFoundError,
     "config.stage1.data.annotation_file: '/nonexistent.json' does not exist"),
    (None, {"data.eval_files": "a.json"}, ValueError, "config.data.eval_files: expected NAME=FILE"),
    (None, {"data.eval_files": "x=/nonexistent.json"}, FileNotFoundError, "config.data.eval_files: x="),
    (None, {"init_from": "/nonexistent/run"}, FileNotFoundError, "config.init_from"),
    (None, {"optim.client_delay_ratio": 1.0}, ValueError, r"config.optim.client_delay_ratio must be in \[0, 1\)"),
    (None, {"optim.client_lr_scale": -0.1}, ValueError, "config.optim.client_lr_scale must be >= 0, got -0.1"),
    (None, {"stage1.optim.accum_steps": 0}, ValueError, "config.stage1.optim.accum_steps must be >= 1"),
])
def test_bad_config_fails_before_any_work(tmp_path_factory, tmp_path, arg, overrides, error, message):
    (tmp_path / "data.json").write_text("[]")
    existing = {"data.annotation_file": str(tmp_path / "data.json")}
    overrides = {k: existing.get(k, str(tmp_path)) if v == "EXISTING" else v for k, v in overrides.items()}
    config = _config(tmp_path_factory, arg=arg, **overrides)
    with pytest.raises(error, match=message):
        trainer.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_configs_are_importable_once_installed(tmp_path):
    code = "import configs.finetune as f; c = f.get_config('preset=paper'); print(c.model.init, c.optim.accum_steps)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pretrained", "2"]


def test_lr_schedule_waits_then_warms_up_and_decays():
    sched = trainer.lr_schedule(1e-3, 0.1, num_steps=110, delay=10)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 9, 10, 15, 20, 110)],
                               [0.0, 0.0, 0.0, 5e-4, 1e-3, 0.0], atol=1e-9)
    plain = trainer.lr_schedule(1e-3, 0.1, num_steps=100)
    np.testing.assert_allclose([float(plain(s)) for s in (0, 5, 10, 55)], [0.0, 5e-4, 1e-3, 5e-4], atol=1e-9)


def test_client_waits_for_the_delay_while_the_server_trains():
    config = finetune_config()
    config.optim.client_delay_ratio, config.optim.warmup_ratio = 0.5, 0.0
    params = {"client": {"connector": {"kernel": np.ones((2, 2), np.float32)}},
              "server": {"language_model": {"kernel": np.ones((2, 2), np.float32)}}}
    client_tx, server_tx = trainer.build_optimizers(config, num_steps=4)
    grads = jax.tree.map(np.ones_like, params)
    state = {"client": client_tx.init(params["client"]), "server": server_tx.init(params["server"])}
    moved = []
    for _ in range(4):
        for half, tx in (("client", client_tx), ("server", server_tx)):
            update, state[half] = tx.update(grads[half], state[half], params[half])
            params[half] = jax.tree.map(lambda p, u: p + u, params[half], update)
        moved.append([not np.allclose(jax.tree.leaves(params[h])[0], 1.0) for h in ("client", "server")])
    # Warmup starts from lr 0 (one step here): the server moves from update 2, the client 2 updates later.
    assert moved == [[False, False], [False, True], [False, True], [True, True]]


def test_client_steps_are_client_lr_scale_times_the_servers():
    config = finetune_config()
    config.optim.client_delay_ratio, config.optim.client_lr_scale, config.optim.warmup_ratio = 0.0, 0.25, 0.0
    params = {"client": {"connector": {"bias": np.zeros(3, np.float32)}},
              "server": {"language_model": {"bias": np.zeros(3, np.float32)}}}
    txs = dict(zip(("client", "server"), trainer.build_optimizers(config, num_steps=10), strict=True))
    steps = {}
    for half, tx in txs.items():
        state = tx.init(params[half])
        for _ in range(2):  # the first update has lr 0 (warmup from 0)
            update, state = tx.update({k: {"bias": np.ones(3, np.float32)} for k in params[half]}, state, params[half])
        steps[half] = np.asarray(jax.tree.leaves(update)[0])
    np.testing.assert_allclose(steps["client"], 0.25 * steps["server"], rtol=1e-6)
    assert np.all(steps["server"] < 0)


def test_weight_decay_only_on_matrices():
    mask = trainer._decay_mask({"dense": {"kernel": np.ones((2, 2)), "bias": np.ones(2)},
                                "norm": {"weight": np.ones(2)}, "emb": {"embedding": np.ones((3, 2))}})
    assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"weight": False}, "emb": {"embedding": True}}


def test_evaluation_finds_the_stage_folder(trained, tmp_path):
    workdir, _ = trained
    assert evaluate.find_stage(str(workdir)) == str(workdir / "finetune")
    assert evaluate.find_stage(str(workdir / "pretrain")) == str(workdir / "pretrain")
    with pytest.raises(FileNotFoundError, match="is a trained stage"):
        evaluate.find_stage(str(tmp_path))


def test_step_budget_follows_the_data():
    config = finetune_config()  # tiny: 2 epochs, batch 16, at least 5000 steps
    assert trainer.step_budget(config, 20_000) == (4, 5000)  # Shapes-VQA: 1250 batches a pass -> 4 passes
    assert trainer.step_budget(config, 4317) == (19, 5000)  # digits: 269 batches a pass -> 19 passes
    assert trainer.step_budget(config, 200_000) == (2, 25_000)  # big data: the epochs decide
    config.optim.accum_steps = 2  # 269 micro-batches a pass, 2 per step: 38 passes give >= 10000 micro-batches
    assert trainer.step_budget(config, 4317) == (38, 5000)
    config.optim.min_steps = 0
    assert trainer.step_budget(config, 4317) == (2, 269)
    assert trainer.step_budget(config, 8) == (2, 0)  # no full batch: the trainer reports it


def test_collapse_is_visible_in_the_training_metrics(trained):
    workdir, _ = trained
    records = [r for r in read_metrics(str(workdir / "finetune")) if "ce_loss" in r]
    for r in records:  # batch 4 x 9 image tokens of the tiny tower; RD-FSQ 2-bit
        assert r["image_tokens"] == 36
        assert 1 <= r["image_distinct_codes"] <= 36
        assert 0 < r["image_code_entropy"] <= 2
        assert 0 <= r["image_clipped"] < 0.05 and 0 <= r["text_clipped"] < 0.05


def test_entropy_report_and_codec_quality_on_a_trained_run(trained):
    from qtl_jax.compress.entropy import index_entropy
    from qtl_jax.experiments import features

    workdir, _ = trained
    feats = features.client_features(str(workdir / "finetune"), "validation", max_samples=8)
    image, text = feats["image"], feats["text"]
    assert image.x.shape == (8 * 9, 128) and image.z.shape == (8 * 9, 128) and image.idx.dtype == np.uint8
    assert text.x.shape[0] == text.z.shape[0] > 8  # the prompts' real text rows
    report = features.entropy_report(feats, bits=2)
    assert report["tokens_image"] == 72 and 1 <= report["distinct_codes_image"] <= 72
    assert report["index_entropy_image"] == index_entropy(image.idx, 2)[0]
    assert report["selected_bits_image"] == int(np.ceil(report["kde_entropy_image"]))
    # The ANS coder cannot beat the per-channel entropy it models, and it pays for its tables.
    assert report["entropy_coded_bits_image"] > report["index_entropy_image"] - 0.05
    # (How the quality falls with the bits is tested on known features in tests/experiments; 72 rows of a
    # 3-step run are too few for the least-squares decoder to say anything.)
    rows = features.quality_table({"image": image}, bits=(1, 4))
    by = {(r["codec"], r["bits"]): r for r in rows}
    assert len(rows) == 6 and all(np.isfinite(r["nmse"]) and -1 <= r["cosine"] <= 1 for r in rows)
    assert by[("rd_fsq", 4)]["bits_per_element"] == 4.0 and by[("rd_fsq", 1)]["bits_per_element"] == 1.0
    assert by[("nf", 4)]["bits_per_element"] > 4.0  # block minima and scales travel too
