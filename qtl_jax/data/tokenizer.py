"""Tokenizers: one small interface over a Llama-2 SentencePiece folder and any fast Hugging Face tokenizer,
and the built-in word-level tokenizer (with a command that builds one from your annotation files).

`load_tokenizer(folder)` returns a `Tokenizer`:
  * a folder with `tokenizer.model` (Llama-2 and its relatives) is tokenized by `sentencepiece` itself, as
    TinyLLaVA's slow `LlamaTokenizer` does: the text is split at the special tokens (`<s>`, `</s>`, `<unk>`)
    and every other segment is encoded by the SentencePiece model. `legacy` (tokenizer_config.json, default
    true, as in transformers) decides whether a segment right after a special token gets SentencePiece's
    dummy-prefix "▁" (legacy true: "</s>USER" -> "</s>", "▁US", "ER") or not (false: "</s>", "US", "ER").
    This does not depend on the transformers version: transformers 4.x and 5.x tokenize the same Llama folder
    differently (5.x drops the "▁" that SentencePiece puts before a segment that starts with a space, e.g. the
    chunk " ASSISTANT:" after `<image>`), and TinyLLaVA's checkpoints were trained on SentencePiece's.
  * any other folder is loaded with `transformers.AutoTokenizer` and must be a fast tokenizer (character
    offsets), such as the built-in word-level one.

Both add `<s>` at the start of a text (a tokenizer that would not is refused: the templates and TinyLLaVA's
checkpoints expect it) and never `</s>` (the templates write it); pad is always `<unk>` (id 0 for Llama-2), as
in TinyLLaVA, whatever the folder says.

The built-in tokenizer is a `tokenizers` WordLevel model saved as a transformers fast tokenizer folder, with
Llama-2's special ids: `<unk>` = pad = 0, `<s>` = 1, `</s>` = 2. Words are `\\w+` runs and punctuation runs,
so "ASSISTANT:" is two tokens. Build one for your own LLaVA-format data (its vocabulary also holds the
template's words, which every prompt contains):

    python -m qtl_jax.data.tokenizer --out my_tokenizer data/train.json data/eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterable, Sequence

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_WORD = re.compile(r"\w+|[^\w\s]+")
Offsets = list[tuple[int, int]]


def split_words(text: str) -> list[str]:
    """The words the built-in tokenizer sees (its pre-tokenizer's split), lower/upper case kept."""
    return _WORD.findall(text)


class Tokenizer:
    """What the templates, the pipeline and evaluation need from a tokenizer.

    Attributes:
      path: the folder it was loaded from.
      bos_id, eos_id, unk_id: special ids; pad_id: always unk_id (TinyLLaVA's choice).
    """

    path: str
    bos_id: int
    eos_id: int
    unk_id: int

    @property
    def pad_id(self) -> int:
        return self.unk_id

    def __len__(self) -> int:
        """Vocabulary size (ids are < len(tokenizer))."""
        raise NotImplementedError

    def tokenize(self, text: str) -> tuple[list[int], Offsets]:
        """Token ids of `text` without `<s>`, and each token's character span [start, end) in `text`
        (zero-length for pieces that stand for no character, e.g. SentencePiece's dummy-prefix "▁")."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens left out."""
        raise NotImplementedError


def _byte_to_char(text: str) -> list[int]:
    """For every UTF-8 byte offset of `text` (and its end), the character offset it falls in."""
    out = []
    for i, ch in enumerate(text):
        out += [i] * len(ch.encode("utf-8"))
    out.append(len(text))
    return out


class SentencePieceTokenizer(Tokenizer):
    """A `tokenizer.model` folder, tokenized as the slow Llama tokenizer does (see the module docstring)."""

    def __init__(self, path: str):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.path = path
        config = _read_tokenizer_config(path)
        if not config.get("add_bos_token", True):
            raise ValueError(f"{path}: tokenizer_config.json sets add_bos_token false; the templates need a "
                             f"tokenizer that starts every text with {BOS} (Llama-2 does)")
        if config.get("add_eos_token", False):
            raise ValueError(f"{path}: tokenizer_config.json sets add_eos_token true; the templates write "
                             f"{EOS} themselves")
        legacy = config.get("legacy")
        self.legacy = True if legacy is None else bool(legacy)
        with open(os.path.join(path, "tokenizer.model"), "rb") as f:
            proto = f.read()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
        model.normalizer_spec.add_dummy_prefix = False
        self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
        self.bos_id, self.eos_id, self.unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()
        if min(self.bos_id, self.eos_id, self.unk_id) < 0:
            raise ValueError(f"{path}/tokenizer.model has no {BOS}, {EOS} or {UNK} piece "
                             f"(ids {self.bos_id}, {self.eos_id}, {self.unk_id})")
        self._special = {self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self.unk_id)}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self._special) + ")")

    def __len__(self) -> int:
        return self._sp.get_piece_size()

    def tokenize(self, text):
        ids, offsets, start = [], [], 0
        for k, segment in enumerate(self._split.split(text)):
            if k % 2:  # a special token's literal text
                ids.append(self._special[segment])
                offsets.append((start, start + len(segment)))
            elif segment:
                # SentencePiece's dummy prefix: on the text's first segment always, after a special token only
                # in legacy mode (as the slow LlamaTokenizer).
                sp = self._sp if (self.legacy or start == 0) else self._sp_no_prefix
                pieces = sp.encode(segment, return_type="proto").pieces
                chars = _byte_to_char(segment)
                ids += [p.id for p in pieces]
                offsets += [(start + chars[p.begin], start + chars[p.end]) for p in pieces]
            start += len(segment)
        return ids, offsets

    def decode(self, ids):
        return self._sp.decode([int(i) for i in ids if int(i) not in self._special.values()])


class HuggingFaceTokenizer(Tokenizer):
    """A fast `transformers` tokenizer (folder with tokenizer.json, or an already loaded object)."""

    def __init__(self, tokenizer, path: str = "?"):
        self.path = path
        if not tokenizer.is_fast:
            raise ValueError(f"{path}: the templates need a fast tokenizer (character offsets), got "
                             f"{type(tokenizer).__name__}")
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None or tokenizer.unk_token_id is None:
            raise ValueError(f"{path}: the tokenizer needs {BOS}, {EOS} and {UNK} tokens; it has bos "
                             f"{tokenizer.bos_token}, eos {tokenizer.eos_token}, unk {tokenizer.unk_token}")
        first = tokenizer("a")["input_ids"]
        if not first or first[0] != tokenizer.bos_token_id:
            raise ValueError(f"{path}: the tokenizer does not start a text with {BOS}; the templates and "
                             f"TinyLLaVA's checkpoints need it (Llama-2 adds it)")
        if first[-1] == tokenizer.eos_token_id:
            raise ValueError(f"{path}: the tokenizer ends every text with {EOS}; the templates write it themselves")
        self._tok = tokenizer
        self.bos_id, self.eos_id, self.unk_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id

    def __len__(self) -> int:
        return len(self._tok)

    def tokenize(self, text):
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _read_tokenizer_config(path: str) -> dict:
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e


def load_tokenizer(path: str) -> Tokenizer:
    """The `Tokenizer` of a folder: SentencePiece when it holds `tokenizer.model`, else a fast transformers
    tokenizer. Raises FileNotFoundError / ValueError naming the folder and what is wrong."""
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
        return SentencePieceTokenizer(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(f"tokenizer folder {path!r} holds neither tokenizer.model (SentencePiece) nor "
                                f"tokenizer.json (fast tokenizer); found {sorted(os.listdir(path))}")
    from transformers import AutoTokenizer

    return HuggingFaceTokenizer(AutoTokenizer.from_pretrained(path), path)


def build_word_tokenizer(words: Iterable[str], path: str) -> Tokenizer:
    """Builds and saves the word-level tokenizer for `words` into folder `path`; returns it loaded."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {UNK: 0, BOS: 1, EOS: 2}
    for word in sorted(set(words) - set(vocab)):
        vocab[word] = len(vocab)
    tok = RawTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=UNK, padding_side="right")
    fast.save_pretrained(path)
    return load_tokenizer(path)


def annotation_words(files: Sequence[str]) -> set[str]:
    """Every word of every turn of LLaVA-format annotation files, plus the templates' own words."""
    from qtl_jax.data.annotations import iter_annotations
    from qtl_jax.data.templates import IMAGE_TOKEN, TEMPLATE_WORDS

    words = set(TEMPLATE_WORDS)
    for file in files:
        for annotation in iter_annotations(file):
            if annotation.error:
                raise ValueError(annotation.error)
            for turn in annotation.record["conversations"] or ():
                if isinstance(turn, dict):
                    words.update(split_words(str(turn.get("value", "")).replace(IMAGE_TOKEN, " ")))
    return words


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Builds a word-level tokenizer from LLaVA-format annotation files "
                                                 "(every word of every turn, plus the templates' words).")
    parser.add_argument("files", nargs="+", help="LLaVA-format JSON or JSONL annotation files")
    parser.add_argument("--out", required=True, help="folder to write the tokenizer to")
    args = parser.parse_args(argv)
    words = annotation_words(args.files)
    tok = build_word_tokenizer(words, args.out)
    print(f"wrote a word-level tokenizer of {len(tok)} tokens ({len(words)} words + {UNK} {BOS} {EOS}) to "
          f"{args.out}; use it with --config.data.tokenizer={args.out}")


if __name__ == "__main__":
    main()
