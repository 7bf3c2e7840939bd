"""Templates and tokenization: hand-written ids with a tiny fast tokenizer, and TinyLLaVA's exact ids and labels
with a Llama-2-style SentencePiece model trained in the test.

The fast tokenizer is built here (Unigram pieces with Metaspace "▁" word starts, byte fallback for "\\n", bos 1,
eos 2, unk = pad = 0), so every expected id below can be checked by hand against PIECES: a trailing space
becomes a lone "▁" (4), a chunk after the image starts with "▁" + <0x0A>, and "USER" right after "</s>" gets
no "▁" (17, not 7).
"""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from qtl_jax.data import templates
from qtl_jax.data.templates import IMAGE_TOKEN, BadSample, encode, format_prompt, inference_prompt
from qtl_jax.data.tokenizer import HuggingFaceTokenizer, load_tokenizer

PIECES = ["<unk>", "<s>", "</s>", "<0x0A>", "▁", "▁Hi", ".", "▁USER", ":", "▁ASSISTANT", "what", "▁is", "▁it",
          "?", "▁yes", "▁no", "▁red", "USER", "▁a", "▁cat"]
X = -100
REAL_SYSTEM = templates.SYSTEM  # captured before the fixture below shortens it


@pytest.fixture(scope="module")
def tok():
    vocab = [(p, 0.0 if i < 4 else -1.0) for i, p in enumerate(PIECES)]
    t = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    t.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return HuggingFaceTokenizer(PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                                        unk_token="<unk>", pad_token="<unk>"))


@pytest.fixture(autouse=True)
def short_system(monkeypatch):
    monkeypatch.setattr(templates, "SYSTEM", "Hi.")


ONE_TURN = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "yes"}]
PROMPT_IDS = [1, 5, 6, 7, 8, 4, -200, 4, 3, 10, 11, 12, 13, 9, 8]  # "Hi. USER: " <image> "\nwhat is it? ASSISTANT:"


def test_llama_prompt_string():
    prompt, spans = format_prompt(ONE_TURN, "llama")
    assert prompt == "Hi. USER: <image>\nwhat is it? ASSISTANT: yes</s>"
    assert [prompt[a:b] for a, b in spans] == [" yes</s>"]  # everything after "ASSISTANT:"
    only_image = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a cat"}]
    assert format_prompt(only_image, "llama")[0] == "Hi. USER: <image> ASSISTANT: a cat</s>"  # TinyLLaVA strips
    assert REAL_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The "
                           "assistant gives helpful, detailed, and polite answers to the user's questions.")


def test_single_turn_ids_and_labels(tok):
    enc = encode(ONE_TURN, tok, "llama", max_length=64)
    assert enc.input_ids.tolist() == [*PROMPT_IDS, 14, 2]
    assert enc.labels.tolist() == [X] * 15 + [14, 2]  # only "▁yes" and "</s>"


def test_multi_turn_round_boundary(tok):
    conv = [*ONE_TURN, {"from": "human", "value": "is it red?"}, {"from": "gpt", "value": "no"}]
    enc = encode(conv, tok, "llama", max_length=64)
    assert enc.prompt.endswith("yes</s>USER: is it red? ASSISTANT: no</s>")
    assert enc.input_ids.tolist() == [*PROMPT_IDS, 14, 2, 17, 8, 11, 12, 16, 13, 9, 8, 15, 2]
    assert enc.labels.tolist() == [X] * 15 + [14, 2] + [X] * 8 + [15, 2]


def test_image_moves_to_the_front_of_the_first_question(tok):
    moved = [{"from": "human", "value": "what is it? <image>"}, {"from": "gpt", "value": "yes"}]
    assert encode(moved, tok, "llama", 64).input_ids.tolist() == [*PROMPT_IDS, 14, 2]


def test_pretrain_template(tok):
    conv = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "a cat"}]
    enc = encode(conv, tok, "pretrain", 64)
    assert enc.prompt == "<image>a cat\n"  # the human text is dropped, no </s>
    assert enc.input_ids.tolist() == [1, -200, 18, 19, 3]
    assert enc.labels.tolist() == [X, X, 18, 19, 3]


def test_inference_prompt(tok):
    assert inference_prompt(ONE_TURN[:1], tok).tolist() == PROMPT_IDS
    assert inference_prompt(ONE_TURN, tok).tolist() == PROMPT_IDS  # a present answer is dropped


def test_truncation_counts_image_rows(tok):
    # 17 tokens + 4 extra image rows = 21 > 20: truncated to 16 tokens, the answer token survives.
    enc = encode(ONE_TURN, tok, "llama", max_length=20, image_tokens=5)
    assert enc.input_ids.tolist() == [*PROMPT_IDS, 14] and enc.labels.tolist()[-1] == 14
    with pytest.raises(BadSample, match=r"sample s7: 17 tokens .* exceed max_length 19"):
        encode(ONE_TURN, tok, "llama", max_length=19, image_tokens=5, sample_id="s7")


@pytest.mark.parametrize(("conv", "message"), [
    ([], "empty conversation"),
    ([{"from": "human", "value": "<image>\nhi"}], "ends without an answer"),
    ([{"from": "human", "value": "hi"}, {"from": "assistant", "value": "yes"}], "role 'assistant', expected 'gpt'"),
    ([{"from": "gpt", "value": "hi"}, {"from": "gpt", "value": "yes"}], "role 'gpt', expected 'human'"),
    ([{"from": "human"}, {"from": "gpt", "value": "yes"}], "needs 'from' and 'value'"),
    ([*ONE_TURN, {"from": "human", "value": "<image> again"}, {"from": "gpt", "value": "no"}],
     "appears after the first question"),
])
def test_bad_conversations_name_the_sample(tok, conv, message):
    with pytest.raises(BadSample, match=f"sample id42: .*{message}"):
        encode(conv, tok, "llama", 64, sample_id="id42")


def test_labels_are_int32_arrays(tok):
    enc = encode(ONE_TURN, tok, "llama", 64)
    assert enc.input_ids.dtype == np.int32 and enc.labels.dtype == np.int32


def test_pretrain_template_refuses_more_than_one_caption(tok):
    conv = [*ONE_TURN, {"from": "human", "value": "and?"}, {"from": "gpt", "value": "no"}]
    with pytest.raises(BadSample, match=r"sample c9: the pretrain template takes one caption, .* 2 question"):
        encode(conv, tok, "pretrain", 64, sample_id="c9")


# ------------------------------------------------------------------------ a Llama-2-style SentencePiece model
def _tinyllava_ids_and_labels(prompt: str, sp) -> tuple[list[int], list[int]]:
    """TinyLLaVA's llama template as its code computes it, written out independently: ids from SentencePiece
    (chunks at <image>, one bos, </s> as the eos id, legacy tokenization), labels from its length arithmetic:
    per round (split at "</s>"), mask len(tokens of "...ASSISTANT: ") - 2 tokens (the bos, and the lone "▁" of
    the separator's trailing space), keep the rest of the round and its </s>."""
    def n_tokens(text):  # len(tokenizer_image_token(text)): bos + the chunks + one id per image
        chunks = text.split(IMAGE_TOKEN)
        return 1 + sum(len(sp.encode(c)) for c in chunks) + len(chunks) - 1

    ids = [1]
    for k, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if k:
            ids.append(-200)
        for j, segment in enumerate(chunk.split("</s>")):
            ids += ([2] if j else []) + sp.encode(segment)
    labels, cur = list(ids), 1
    labels[0] = X
    for rnd in prompt.split("</s>"):
        head, sep, _ = rnd.partition(" ASSISTANT: ")
        if not rnd or not sep:
            break
        instruction = n_tokens(head + sep) - 2
        labels[cur:cur + instruction] = [X] * instruction
        cur += n_tokens(rnd)  # + its </s> - the bos
    labels[cur:] = [X] * (len(labels) - cur)
    return ids, labels


CONVERSATIONS = {
    "digits": [{"from": "human", "value": "<image>\nHow many dogs?"}, {"from": "gpt", "value": "42"}],
    "word": [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat."}],
    "cjk": [{"from": "human", "value": "<image>\n你好?"}, {"from": "gpt", "value": "你好 世界"}],
    "newline": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "\nnew line"}],
    "only image": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "7 cats"}],
    "multi-turn": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "13"},
                   {"from": "human", "value": "Is it red?"}, {"from": "gpt", "value": "yes"},
                   {"from": "human", "value": "And blue?"}, {"from": "gpt", "value": "7"}],
    "text only": [{"from": "human", "value": "Say 7."}, {"from": "gpt", "value": "7"}],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_and_labels_equal_tinyllavas_with_a_llama_tokenizer(llama_dir, name):
    import sentencepiece as spm

    tok = load_tokenizer(str(llama_dir))
    sp = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    enc = encode(CONVERSATIONS[name], tok, "llama", 512)
    ids, labels = _tinyllava_ids_and_labels(enc.prompt, sp)
    assert enc.input_ids.tolist() == ids
    assert enc.labels.tolist() == labels


def test_an_answer_without_a_leading_word_piece_starts_with_a_supervised_bare_space(llama_dir):
    import sentencepiece as spm

    tok = load_tokenizer(str(llama_dir))
    bare = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model")).piece_to_id("▁")
    enc = encode(CONVERSATIONS["digits"], tok, "llama", 512)
    supervised = [i for i in enc.labels.tolist() if i != X]
    assert supervised[0] == bare and tok.decode(supervised) == "42"  # "▁", "4", "2", "</s>"
    assert supervised[-1] == tok.eos_id and len(supervised) == 4
    # The inference prompt ends right before that bare space: it is the first token to generate.
    prompt = inference_prompt(CONVERSATIONS["digits"], tok).tolist()
    assert enc.input_ids.tolist()[:len(prompt)] == prompt and enc.input_ids[len(prompt)] == bare
