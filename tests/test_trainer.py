"""The real trainer end to end on the tiny preset (both modes, both stages, a few steps), resume, bad configs."""

import json
import os

import jax
import numpy as np
import pytest

from configs.finetune import get_config as finetune_config
from configs.pretrain import get_config as pretrain_config
from qtl_jax import trainer
from qtl_jax.metrics import read_metrics


def _config(tmp_path_factory, stage="finetune", **overrides):
    config = (finetune_config if stage == "finetune" else pretrain_config)()
    config.data.data_dir = str(tmp_path_factory.getbasetemp() / "tfds")  # shared: generated once
    config.data.shapes_config = "smoke"
    config.optim.batch_size = 4
    if "stage1" in config:
        config.stage1.optim.batch_size = 4
    config.optim.max_steps = 3
    config.log_every = 1
    config.eval.max_examples = 8
    config.eval.batch_size = 8
    config.split.client_mesh = (2, 1, 1)
    config.split.server_mesh = (1, 2, 2)
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (config[section] if section else config)[field] = value
    return config


def test_both_stages_end_to_end_in_meshes_mode(tmp_path_factory, tmp_path):
    summary = trainer.train_and_evaluate(_config(tmp_path_factory), str(tmp_path))
    assert summary["stage"] == "finetune" and summary["steps"] == 3
    for split in ("validation", "test"):
        acc = summary[f"{split}_accuracy"]
        assert set(acc) >= {"all"} and all(0.0 <= v <= 1.0 for v in acc.values())
    # RD-FSQ 2-bit: 1/8 of fp16 for the feature rows, plus the small metadata (positions, lengths, labels).
    assert 0.125 < summary["uplink_ratio_to_fp16"] < 0.16
    assert summary["downlink_bytes_per_sample"] > summary["uplink_bytes_per_sample"]  # fp32 gradients
    stages = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in stages] == ["pretrain", "finetune"]
    records = read_metrics(str(tmp_path / "finetune"))
    assert [r["step"] for r in records if "ce_loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["ce_loss"]) for r in records if "ce_loss" in r)
    assert os.path.isdir(tmp_path / "pretrain" / "checkpoints" / "3")  # stage 1 capped at max_steps too
    # The trained model is exported in the Hugging Face layout and loads back.
    from qtl_jax.models import convert

    export = tmp_path / "finetune" / "export"
    assert sorted(p.name for p in export.iterdir()) == [
        "client_token_embeddings.safetensors", "connector", "language_model", "qtl_jax.json", "vision_tower"]
    _, lm = convert.load_openelm(str(export / "language_model"))
    final = trainer.final_params(str(tmp_path / "finetune"))
    np.testing.assert_array_equal(lm["norm"]["weight"], np.asarray(final["server"]["language_model"]["norm"]["weight"]))


def test_single_mode_stage_two_from_a_stage_one_workdir(tmp_path_factory, tmp_path):
    stage1 = tmp_path / "stage1"
    trainer.train_and_evaluate(_config(tmp_path_factory, "pretrain", **{"split.mode": "single"}), str(stage1))
    config = _config(tmp_path_factory, **{"split.mode": "single", "init_from": str(stage1 / "pretrain"),
                                          "compressor.text_transport": "token_ids"})
    summary = trainer.train_and_evaluate(config, str(tmp_path / "stage2"))
    assert summary["steps"] == 3 and "test_accuracy" in summary
    assert not (tmp_path / "stage2" / "pretrain").exists()  # stage 1 was not run again


def _params(workdir):
    return jax.tree.map(np.asarray, trainer.final_params(workdir))


def test_interrupted_run_resumes_to_the_same_result(tmp_path_factory, tmp_path):
    overrides = {"optim.max_steps": 4, "checkpoint_every": 100, "split.mode": "single"}
    full = _config(tmp_path_factory, "pretrain", **overrides)
    trainer.train_and_evaluate(full, str(tmp_path / "full"))
    killed = _config(tmp_path_factory, "pretrain", **overrides, stop_after=2)
    assert trainer.train_and_evaluate(killed, str(tmp_path / "resumed"))["interrupted"]
    resumed = _config(tmp_path_factory, "pretrain", **overrides)
    assert trainer.train_and_evaluate(resumed, str(tmp_path / "resumed"))["steps"] == 4
    a, b = _params(str(tmp_path / "full" / "pretrain")), _params(str(tmp_path / "resumed" / "pretrain"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"compressor.image": "vq"}, ValueError, "config.compressor.image: unknown compressor 'vq'"),
    ({"compressor.bits": 9}, ValueError, r"config.compressor.bits must be in 1\.\.8"),
    ({"split.server_mesh": (4, 2, 2)}, ValueError, "need 18 devices, only 8 available"),
    ({"model.openelm_checkpoint": "/nonexistent/elm"}, FileNotFoundError, "config.model.openelm_checkpoint"),
    ({"data.dataset": "llava", "data.annotation_file": "/nonexistent.json"}, FileNotFoundError,
     "config.data.annotation_file"),
    ({"init_from": "/nonexistent/run"}, FileNotFoundError, "config.init_from"),
    ({"optim.client_delay_ratio": 1.0}, ValueError, r"config.optim.client_delay_ratio must be in \[0, 1\), got 1.0"),
    ({"optim.client_lr_scale": -0.1}, ValueError, "config.optim.client_lr_scale must be >= 0, got -0.1"),
])
def test_bad_config_fails_before_any_work(tmp_path_factory, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        trainer.train_and_evaluate(_config(tmp_path_factory, **overrides), str(tmp_path))
    assert not (tmp_path / "finetune").exists() and not (tmp_path / "pretrain").exists()


def test_answer_normalisation():
    assert trainer.normalize_answer(" The Red. ") == "red"
    assert trainer.normalize_answer("a circle!") == "circle"


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
    client_tx, server_tx = trainer.build_optimizers(config, params, num_steps=4)
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
    txs = dict(zip(("client", "server"), trainer.build_optimizers(config, params, num_steps=10), strict=True))
    steps = {}
    for half, tx in txs.items():
        state = tx.init(params[half])
        for _ in range(2):  # the first update has lr 0 (warmup from 0)
            update, state = tx.update({k: {"bias": np.ones(3, np.float32)} for k in params[half]}, state, params[half])
        steps[half] = np.asarray(jax.tree.leaves(update)[0])
    np.testing.assert_allclose(steps["client"], 0.25 * steps["server"], rtol=1e-6)
    assert np.all(steps["server"] < 0)
