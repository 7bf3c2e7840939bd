import io
import json

import pytest

from qtl_jax.data import builders

SMALL = builders.ShapesVqaConfig(name="test_small", image_size=32, num_qa=80, num_captions=24, num_eval=20)

# Text the Llama-style SentencePiece model below is trained on: the templates' words, digits, CJK, newlines.
SP_TEXTS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A cat sitting on a mat.",
    "USER: How many dogs are there? ASSISTANT: 42 dogs.", "Describe the picture. 你好 世界",
    "Yes No red blue green circle square triangle\nnew line", "the answer is 7 and 13",
]


def make_llama_tokenizer(folder, legacy=True, **config):
    """A Llama-2-style SentencePiece folder: BPE with byte fallback, split digits, dummy prefix, no whitespace
    normalisation, <unk> 0, <s> 1, </s> 2 (as Llama-2's tokenizer.model), plus tokenizer_config.json."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXTS * 20), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    settings = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": True, "add_eos_token": False,
                "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, **config}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_llama_tokenizer(tmp_path_factory.mktemp("llama_tokenizer"))


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory):
    """A small Shapes-VQA (32 px, 80 QA, 24 captions, 20 validation/test) and its tokenizer folder."""
    return builders.prepare_shapes(str(tmp_path_factory.mktemp("tfds")), SMALL)
