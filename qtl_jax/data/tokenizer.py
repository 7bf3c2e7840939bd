"""Tokenizers: the built-in dataset's word-level tokenizer, and loading any tokenizer folder.

The built-in tokenizer is a Hugging Face `tokenizers` WordLevel model saved as a `transformers` fast
tokenizer folder (tokenizer.json + tokenizer_config.json), so it is loaded by the same
`AutoTokenizer.from_pretrained(folder)` call as a real checkpoint's Llama-2 tokenizer. Its special ids follow
Llama-2: `<unk>` = pad = 0, `<s>` (bos) = 1, `</s>` (eos) = 2; encoding adds the bos, never the eos.
Words are `\\w+` runs and punctuation runs (the `Whitespace` pre-tokenizer), so "ASSISTANT:" is two tokens.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
_WORD = re.compile(r"\w+|[^\w\s]+")


def split_words(text: str) -> list[str]:
    """The words the built-in tokenizer sees (its pre-tokenizer's split), lower/upper case kept."""
    return _WORD.findall(text)


def build_word_tokenizer(words: Iterable[str], path: str):
    """Builds and saves the word-level tokenizer for `words` into folder `path`; returns it loaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {UNK: 0, BOS: 1, EOS: 2}
    for word in sorted(set(words) - set(vocab)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=UNK, padding_side="right")
    fast.save_pretrained(path)
    return load_tokenizer(path)


def load_tokenizer(path: str):
    """`AutoTokenizer.from_pretrained(path)` for a local folder, checked for what the templates need: a fast
    tokenizer (character offsets), bos and eos ids, and a pad id (unk when pad is unset, as TinyLLaVA does)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.is_fast:
        raise ValueError(f"{path}: the templates need a fast tokenizer (tokenizer.json), got {type(tok).__name__}")
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"{path}: tokenizer has no bos or eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token
    return tok
