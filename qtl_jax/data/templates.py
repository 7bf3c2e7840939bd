"""TinyLLaVA prompt templates and their tokenization with the image placeholder (SPEC §5).

* `pretrain` (stage 1): `"<image>" + caption + "\\n"`; the human text is dropped, no `</s>`; the bos and the
  image are not supervised, everything after them is. A sample has exactly one caption (a multi-turn sample
  is refused: TinyLLaVA would silently keep its first answer only).
* `llama` (stage 2): `SYSTEM + " " + "USER: <image>\\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"`;
  the image moves to the front of the first question (`"<image>\\n{q}"`, stripped: a question that is only
  `<image>` gives `"USER: <image> ASSISTANT:"`). Supervised: everything after each `ASSISTANT:` up to and
  including its `</s>`, the space too: with Llama-2 an answer that does not start with a word piece that
  absorbs the space (a digit, CJK text, a newline) begins with a bare "▁" token, which TinyLLaVA trains and
  which is the first token generated after the inference prompt (that ends with `"ASSISTANT:"`).

Tokenization splits the prompt at `<image>`, tokenizes each chunk as its own text (so each chunk starts as a
text does, e.g. with SentencePiece's dummy-prefix "▁"), puts one bos first and IMAGE_TOKEN_INDEX (-200)
between chunks: the literal "<image>" is never tokenized.

Labels. TinyLLaVA derives the masked spans from token counts of re-tokenized pieces with per-tokenizer -1
corrections (its `legacy` rules), which silently masks a whole sample when the count is off. We mark instead
every token whose characters overlap a supervised span (a zero-length piece counts where it stands): the same
labels for the Llama-2 tokenizer, and exact for any tokenizer, whatever its whitespace conventions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qtl_jax.data.tokenizer import Tokenizer, split_words

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
TEMPLATES = ("pretrain", "llama")
TEMPLATE_WORDS = split_words(SYSTEM + " USER: ASSISTANT:")


class BadSample(ValueError):
    """A sample that cannot be used; the message names the sample (and file when known)."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A tokenized sample.

    Attributes:
      input_ids: int32[L] with IMAGE_TOKEN_INDEX at the image (at most one).
      labels: int32[L], IGNORE_INDEX where not supervised.
      prompt: the formatted prompt string.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    prompt: str


def _turns(conversations, sample_id: str) -> list[tuple[str, str | None]]:
    """[(question, answer)] from LLaVA turns; checks roles alternate human, gpt."""
    if not isinstance(conversations, list):
        raise BadSample(f"sample {sample_id}: 'conversations' must be a list of turns, got "
                        f"{type(conversations).__name__}")
    if not conversations:
        raise BadSample(f"sample {sample_id}: empty conversation")
    pairs = []
    for i in range(0, len(conversations), 2):
        human = conversations[i]
        gpt = conversations[i + 1] if i + 1 < len(conversations) else None
        for turn, role in ((human, "human"), (gpt, "gpt")):
            if turn is None:
                continue
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise BadSample(f"sample {sample_id}: turn {turn!r} needs 'from' and 'value'")
            if turn["from"] != role:
                raise BadSample(f"sample {sample_id}: turn {conversations.index(turn)} has role {turn['from']!r}, "
                                f"expected {role!r} (turns alternate human, gpt)")
        pairs.append((str(human["value"]), None if gpt is None else str(gpt["value"])))
    return pairs


def format_prompt(conversations, template: str, sample_id: str = "?", inference: bool = False):
    """The prompt string and the character spans of the supervised answers.

    Args:
      conversations: LLaVA turns [{"from": "human"|"gpt", "value": str}, ...].
      template: "pretrain" or "llama".
      sample_id: for error messages.
      inference: build the generation prompt: every answer but a missing last one is kept, and the prompt
        ends with "ASSISTANT:" (llama) or right after the image (pretrain).

    Returns:
      (prompt, [(start, end)] answer spans in characters, `</s>` included).
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    pairs = _turns(conversations, sample_id)
    if inference:  # generate the last answer: drop it if the sample has one
        pairs[-1] = (pairs[-1][0], None)
    elif pairs[-1][1] is None:
        raise BadSample(f"sample {sample_id}: the conversation ends without an answer")
    if template == "pretrain":
        if len(pairs) > 1:
            raise BadSample(f"sample {sample_id}: the pretrain template takes one caption, the conversation has "
                            f"{len(pairs)} question/answer rounds")
        if inference:
            return IMAGE_TOKEN, []
        answer = pairs[0][1] + "\n"
        return IMAGE_TOKEN + answer, [(len(IMAGE_TOKEN), len(IMAGE_TOKEN) + len(answer))]
    prompt, spans = SYSTEM + " ", []
    for i, (question, answer) in enumerate(pairs):
        if i == 0 and IMAGE_TOKEN in question:  # the image goes to the front of the first question
            question = (IMAGE_TOKEN + "\n" + question.replace(IMAGE_TOKEN, "").strip()).strip()
        elif IMAGE_TOKEN in question:
            raise BadSample(f"sample {sample_id}: {IMAGE_TOKEN} appears after the first question")
        prompt += f"USER: {question} ASSISTANT:"
        if answer is None:
            break
        start = len(prompt)  # the space after "ASSISTANT:" is supervised too (see the module docstring)
        prompt += " " + answer + "</s>"
        spans.append((start, len(prompt)))
    return prompt, spans


def tokenize_with_image(prompt: str, tokenizer: Tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (bos, then each `<image>`-split chunk with IMAGE_TOKEN_INDEX between chunks) and each token's
    character span in `prompt` ((-1, -1) for bos and the image)."""
    ids, spans, offset = [tokenizer.bos_id], [(-1, -1)], 0
    for k, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if k > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            spans.append((-1, -1))
        chunk_ids, chunk_offsets = tokenizer.tokenize(chunk)
        ids += chunk_ids
        spans += [(offset + a, offset + b) for a, b in chunk_offsets]
        offset += len(chunk) + len(IMAGE_TOKEN)
    return ids, spans


def _supervised(token: tuple[int, int], answer_spans: list[tuple[int, int]]) -> bool:
    """Whether a token's characters [a, b) overlap an answer span; a zero-length piece counts where it stands."""
    a, b = token
    if a < 0:
        return False
    return any((a < e and s < b) if a < b else s <= a < e for s, e in answer_spans)


def encode(conversations, tokenizer, template: str, max_length: int, sample_id: str = "?",
           image_tokens: int = 1) -> Encoded:
    """Formats and tokenizes one sample with its labels.

    Args:
      conversations: LLaVA turns.
      tokenizer: a `Tokenizer` (`qtl_jax.data.tokenizer.load_tokenizer`).
      template: "pretrain" or "llama".
      max_length: the model's sequence limit, counting each image as `image_tokens` rows.
      sample_id: for error messages.
      image_tokens: rows the image placeholder expands to in the model (728 for the paper's SigLIP).

    Returns:
      `Encoded`. Samples longer than max_length are truncated (as TinyLLaVA does) when the image and at least
      one supervised token survive; otherwise `BadSample` is raised.
    """
    prompt, answer_spans = format_prompt(conversations, template, sample_id)
    ids, spans = tokenize_with_image(prompt, tokenizer)
    supervised = [_supervised(span, answer_spans) for span in spans]
    labels = [i if keep else IGNORE_INDEX for i, keep in zip(ids, supervised, strict=True)]
    has_image = IMAGE_TOKEN_INDEX in ids
    budget = max_length - (image_tokens - 1 if has_image else 0)
    if len(ids) > budget:
        ids, labels = ids[:budget], labels[:budget]
        if (has_image and IMAGE_TOKEN_INDEX not in ids) or all(label == IGNORE_INDEX for label in labels):
            raise BadSample(f"sample {sample_id}: {len(spans)} tokens (+{image_tokens - 1 if has_image else 0} "
                            f"image rows) exceed max_length {max_length} and truncation leaves nothing to train on")
    return Encoded(np.asarray(ids, np.int32), np.asarray(labels, np.int32), prompt)


def inference_prompt(conversations, tokenizer, template: str = "llama", sample_id: str = "?") -> np.ndarray:
    """int32[L] token ids of the generation prompt (ends with "ASSISTANT:" for llama)."""
    prompt, _ = format_prompt(conversations, template, sample_id, inference=True)
    return np.asarray(tokenize_with_image(prompt, tokenizer)[0], np.int32)
