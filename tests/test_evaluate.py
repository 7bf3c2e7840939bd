"""Evaluation: answers independent of the batch (RD-FSQ's inference statistics), one compilation per bucket,
scoring, eval-file parsing."""

import collections
import json

import jax
import numpy as np
import pytest

from configs.finetune import get_config
from qtl_jax import evaluate, trainer
from qtl_jax.data import builders
from qtl_jax.data.tokenizer import load_tokenizer
from qtl_jax.models import tinyllava as T

from .models.test_generate import compilations


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    config = get_config()
    builder, tokenizer_dir = builders.prepare_shapes(str(tmp_path_factory.getbasetemp() / "tfds"), "smoke")
    tok = load_tokenizer(tokenizer_dir)
    model_cfg = trainer.model_config(config, len(tok))
    params, _ = trainer.init_params(config, model_cfg, np.float32)
    # Random weights answer with random words; scale the LM's output so that greedy answers are not all
    # the same word.
    params = jax.tree.map(np.array, params)
    params["server"]["language_model"]["norm"]["weight"] *= 30
    return model_cfg, params, tok, builder.as_data_source()["validation"]


def _answers(setup, batch_size, path):
    model_cfg, params, tok, source = setup
    scores = evaluate.evaluate_source(evaluate.Answerer(model_cfg, params, tok), source, template="llama",
                                      buckets=(32, 48, 64), batch_size=batch_size, max_new_tokens=3,
                                      answers_file=str(path))
    return scores, [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_do_not_depend_on_the_batch_size(setup, tmp_path):
    scores, answers = _answers(setup, 1, tmp_path / "b1.jsonl")
    assert len(answers) == len(setup[3]) == 16 and len({a["answer"] for a in answers}) > 3
    for size in (7, 32):
        other_scores, other = _answers(setup, size, tmp_path / f"b{size}.jsonl")
        assert other == answers and other_scores == scores


def test_with_batch_statistics_answers_would_depend_on_the_batch(setup, tmp_path, monkeypatch):
    """The control: the training codec (one mean and std over the whole batch) changes answers with the batch
    size, which the inference statistics above prevent."""
    monkeypatch.setattr(T.TinyLlavaConfig, "for_inference", lambda self: self)
    _, alone = _answers(setup, 1, tmp_path / "b1.jsonl")
    _, together = _answers(setup, 32, tmp_path / "b32.jsonl")
    assert [a["answer"] for a in alone] != [a["answer"] for a in together]


def test_batches_of_a_bucket_compile_once(setup):
    """Locally a batch is three compiled calls (client half, prompt splice, decode loop): the first batch of a
    bucket compiles each once, the next batches nothing, and a second bucket one more set."""
    model_cfg, params, tok, source = setup
    jax.clear_caches()  # counts below must not depend on what earlier tests of the session compiled
    answerer = evaluate.Answerer(model_cfg, params, tok)
    answer, compiled = answerer.answer, []

    def counted(*args):
        with compilations() as names:
            result = answer(*args)
        compiled.append(collections.Counter(names))
        return result

    answerer.answer = counted
    for bucket in (48, 64):  # every prompt of the split has 41 to 43 tokens
        evaluate.evaluate_source(answerer, source, template="llama", buckets=(bucket,), batch_size=5,
                                 max_new_tokens=2, max_examples=15)
    once = {"client_apply": 1, "_prompt_rows": 1, "_generate_on_device": 1}
    assert compiled == [once, {}, {}] * 2


def test_answer_normalisation_and_eval_file_lists():
    assert evaluate.normalize_answer(" The Red. ") == "red"
    assert evaluate.normalize_answer("a circle!") == "circle"
    assert evaluate.parse_eval_files(" gqa=a.json, pope = b/c.jsonl,") == {"gqa": "a.json", "pope": "b/c.jsonl"}
    with pytest.raises(ValueError, match=r"config\.data\.eval_files: expected NAME=FILE"):
        evaluate.parse_eval_files("a.json")
    with pytest.raises(ValueError, match="the name 'x' appears twice"):
        evaluate.parse_eval_files("x=a.json,x=b.json")
