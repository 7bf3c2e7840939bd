"""Tokenizers: a Llama-style SentencePiece folder tokenized as SentencePiece does (legacy true and false), the
checks that refuse unusable folders, and the word-level tokenizer built from annotation files."""

import json

import pytest
import sentencepiece as spm

from qtl_jax.data import tokenizer as tokenizer_lib
from qtl_jax.data.templates import encode
from qtl_jax.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, load_tokenizer

from .conftest import make_llama_tokenizer


@pytest.fixture(scope="module")
def sp(llama_dir):
    return spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))


@pytest.mark.parametrize("text", ["ASSISTANT: 42", "\nWhat is 42?  ok", " ASSISTANT: yes", "你好 世界\n", "x\n\ny",
                                  "  two spaces", ""])
def test_plain_text_is_sentencepieces_own_encoding(llama_dir, sp, text):
    tok = load_tokenizer(str(llama_dir))
    assert isinstance(tok, SentencePieceTokenizer)
    ids, offsets = tok.tokenize(text)
    assert ids == sp.encode(text)  # dummy prefix, byte fallback, split digits: exactly SentencePiece
    assert len(offsets) == len(ids)
    # Offsets are character spans: every non-empty one covers the piece's own characters (a dummy-prefix "▁"
    # stands for no character).
    for i, (a, b) in zip(ids, offsets, strict=True):
        piece = sp.id_to_piece(i).replace("▁", " ")
        if a < b and not piece.startswith("<0x"):
            assert text[a:b] == piece or (a == 0 and " " + text[a:b] == piece)


def test_special_tokens_are_split_out_legacy_true_and_false(tmp_path, sp):
    text = "ASSISTANT: 4</s>USER: hi"
    legacy = load_tokenizer(str(make_llama_tokenizer(tmp_path / "legacy", legacy=True)))
    ids, offsets = legacy.tokenize(text)
    # legacy (the slow LlamaTokenizer, TinyLLaVA): every segment gets SentencePiece's dummy prefix.
    assert ids == [*sp.encode("ASSISTANT: 4"), 2, *sp.encode("USER: hi")]
    assert offsets[len(sp.encode("ASSISTANT: 4"))] == (12, 16)  # "</s>"
    modern = load_tokenizer(str(make_llama_tokenizer(tmp_path / "modern", legacy=False)))
    ids = modern.tokenize(text)[0]
    assert ids[:len(sp.encode("ASSISTANT: 4")) + 1] == [*sp.encode("ASSISTANT: 4"), 2]
    after = [sp.id_to_piece(i) for i in ids[len(sp.encode("ASSISTANT: 4")) + 1:]]
    assert not after[0].startswith("▁") and "".join(after).replace("▁", " ") == "USER: hi"


def test_offsets_of_non_ascii_text_are_characters(llama_dir):
    tok = load_tokenizer(str(llama_dir))
    text = "你好 世界 ok"
    ids, offsets = tok.tokenize(text)
    assert offsets[-1][1] == len(text)  # characters, not UTF-8 bytes (15 bytes before " ok")
    assert tok.decode(ids) == text


def test_special_ids_and_pad_is_unk(llama_dir, small_shapes):
    for folder in (str(llama_dir), small_shapes[1]):
        tok = load_tokenizer(folder)
        assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)


@pytest.mark.parametrize(("config", "message"), [
    ({"add_bos_token": False}, "add_bos_token false"),
    ({"add_eos_token": True}, "add_eos_token true"),
])
def test_unusable_sentencepiece_folders_are_refused(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        load_tokenizer(str(make_llama_tokenizer(tmp_path / "t", **config)))


def test_a_tokenizer_without_bos_is_refused(tmp_path, small_shapes):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "nobos")  # no post-processor: "a" -> [3], no <s>
    with pytest.raises(ValueError, match="does not start a text with <s>"):
        load_tokenizer(str(tmp_path / "nobos"))
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer\.model"):
        load_tokenizer(str(tmp_path))
    assert isinstance(load_tokenizer(small_shapes[1]), HuggingFaceTokenizer)


def test_word_tokenizer_from_annotation_files(tmp_path, capsys):
    conv = [{"from": "human", "value": "<image>\nWhich digit is shown?"}, {"from": "gpt", "value": "seven"}]
    (tmp_path / "a.json").write_text(json.dumps([{"id": "1", "image": "x.png", "conversations": conv}]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "2", "conversations": [
        {"from": "human", "value": "Is it odd?"}, {"from": "gpt", "value": "yes"}]}) + "\n")
    tokenizer_lib.main(["--out", str(tmp_path / "tok"), str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")])
    assert "wrote a word-level tokenizer" in capsys.readouterr().out
    tok = load_tokenizer(str(tmp_path / "tok"))
    for sample in (conv, [{"from": "human", "value": "Is it odd?"}, {"from": "gpt", "value": "yes"}]):
        enc = encode(sample, tok, "llama", 512)
        assert tok.unk_id not in enc.input_ids.tolist()  # every word, the template's included, is known
    assert "<image>" not in tokenizer_lib.annotation_words([str(tmp_path / "a.json")])
