"""TinyLLaVA checkpoints: stage folders (safetensors or pytorch_model.bin), full single-file checkpoints, export."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from qtl_jax.compress import make_codec
from qtl_jax.models import convert
from qtl_jax.models import tinyllava as T

from .test_tinyllava import init, micro


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = micro()
    params = init(cfg)
    path = tmp_path_factory.mktemp("tinyllava")
    convert.export_tinyllava(params, cfg, str(path))
    return cfg, params, path


def _assert_loaded_equal(loaded, params, client_embedding_from_lm=False):
    """A plain TinyLLaVA checkpoint (client_embedding_from_lm) has no compressors; our export has them."""
    merged = convert.merge_params(params, loaded)
    if client_embedding_from_lm:  # a plain TinyLLaVA checkpoint: the client's copy starts as the LM's table
        lm_table = params["server"]["language_model"]["token_embeddings"]["embedding"]
        np.testing.assert_array_equal(merged["client"]["token_embeddings"]["embedding"], lm_table)
        merged["client"]["token_embeddings"] = params["client"]["token_embeddings"]
    jax.tree.map(np.testing.assert_array_equal, merged, params)
    compressors = set() if client_embedding_from_lm else {"image_compressor", "text_compressor"}
    assert set(loaded["client"]) == {"vision_tower", "connector", "token_embeddings"} | compressors
    assert set(loaded["server"]) == {"language_model"} | compressors


def test_stage_folders_round_trip(exported):
    cfg, params, path = exported
    assert sorted(p.name for p in path.iterdir()) == [
        "client_token_embeddings.safetensors", "compressors.safetensors", "connector", "language_model",
        "qtl_jax.json", "vision_tower"]
    _assert_loaded_equal(convert.load_tinyllava(str(path), cfg), params)


class _IdTokenizer:
    """Answers as their token ids (no stop): enough to compare generations token for token."""

    bos_id, eos_id, pad_id = 1, -1, 0

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize(("name", "transport"), [("rd_fsq", "quantized_embeddings"), ("nf", "token_ids")])
def test_export_then_import_rebuilds_the_model_and_its_answers(tmp_path, name, transport):
    from qtl_jax.evaluate import Answerer

    from .test_tinyllava import batch

    cfg = micro(name, transport)
    params = jax.tree.map(lambda x: x + 0.01 * np.sign(x), init(cfg))  # trained-looking: no zero biases left
    convert.export_tinyllava(params, cfg, str(tmp_path))
    back_cfg, back = convert.load_export(str(tmp_path))
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)  # compressors included
    images, ids, _, _ = batch()
    prompts = [ids[0][:4], ids[1][:6]]
    answers = [Answerer(c, p, _IdTokenizer()).answer(images, prompts, 10, max_new_tokens=6)
               for c, p in ((cfg, params), (back_cfg, back))]
    assert answers[0] == answers[1] and len(answers[0][0].split()) == 6
    # Before this export held the compressors, a re-import got fresh random ones: other answers.
    fresh = convert.merge_params(init(cfg), convert.load_tinyllava(str(tmp_path), cfg))
    for half in ("client", "server"):
        for part in ("image_compressor", "text_compressor"):
            if part in fresh[half]:
                fresh[half][part] = init(cfg)[half][part]
    if cfg.image_codec.projected:
        assert Answerer(cfg, fresh, _IdTokenizer()).answer(images, prompts, 10, 6) != answers[0]


def test_full_single_file_checkpoint(exported, tmp_path):
    cfg, params, path = exported
    tensors = {}
    for part, prefix in (("language_model", "language_model."), ("vision_tower", "vision_tower._vision_tower."),
                         ("connector", "connector.")):
        tensors.update({prefix + k: v for k, v in convert.read_weights(str(path / part)).items()})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _assert_loaded_equal(convert.load_tinyllava(str(tmp_path), cfg), params, client_embedding_from_lm=True)
    del tensors["connector._connector.2.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(convert.CheckpointError, match=r"1 missing:\n    _connector.2.bias"):
        convert.load_tinyllava(str(tmp_path), cfg)
    save_file({k: v for k, v in tensors.items() if k.startswith("language_model.")},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(convert.CheckpointError, match="not a TinyLLaVA checkpoint"):
        convert.load_tinyllava(str(tmp_path), cfg)


def test_pytorch_bin_stage_folders(exported, tmp_path):
    cfg, params, path = exported
    for part in ("language_model", "vision_tower", "connector"):
        (tmp_path / part).mkdir()
        state = {k: torch.from_numpy(v.copy()) for k, v in convert.read_weights(str(path / part)).items()}
        torch.save(state, str(tmp_path / part / "pytorch_model.bin"))
    _assert_loaded_equal(convert.load_tinyllava(str(tmp_path), cfg), params, client_embedding_from_lm=True)


def test_mismatched_sizes_and_merge_errors(exported):
    cfg, params, path = exported
    wider = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, model_dim=96))
    with pytest.raises(convert.CheckpointError, match="mis-shaped"):
        convert.load_tinyllava(str(path), wider)
    with pytest.raises(convert.CheckpointError, match="loaded shape"):
        convert.merge_params(params, {"client": {"connector": {"linear_0": {"bias": np.zeros(3)}}}})
    with pytest.raises(convert.CheckpointError, match="no such parameter"):
        convert.merge_params(params, {"client": {"projector": {}}})
    assert T.IMAGE_TOKEN_INDEX == -200


def test_an_export_into_a_model_with_other_codecs_keeps_only_the_matching_compressors(tmp_path):
    cfg = micro("rd_fsq")
    params = jax.tree.map(lambda x: x + 0.01, init(cfg))
    convert.export_tinyllava(params, cfg, str(tmp_path))
    other = dataclasses.replace(micro("fsq_tanh", "token_ids"), image_codec=cfg.image_codec)
    loaded = convert.load_tinyllava(str(tmp_path), other)
    # The image compressor is the same RD-FSQ 2-bit: loaded. The text one is not sent as rows any more.
    np.testing.assert_array_equal(loaded["server"]["image_compressor"]["out_proj"]["kernel"],
                                  params["server"]["image_compressor"]["out_proj"]["kernel"])
    assert "text_compressor" not in loaded["client"] and "token_embeddings" not in loaded["client"]
    bits3 = dataclasses.replace(cfg, image_codec=make_codec("rd_fsq", 3))
    assert "image_compressor" not in convert.load_tinyllava(str(tmp_path), bits3)["server"]  # kept at its init
