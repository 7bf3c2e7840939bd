"""Benchmark scorers for LLaVA-style evaluations: question file + answers JSONL -> scores.

`qtl_jax.evaluate` writes one JSON line per generated answer (`id`, `answer`, `reference`, ...). A scorer
joins these answers with their question file by sample id — the question file keeps per-sample fields
that the converted dataset drops (VQAv2's ten human answers, POPE's category, MME's image pairing) — and
scores them. Each scorer is a pure function `score_X(records) -> dict` over joined records: a record holds
the question file's sample (`image`, `conversations`, extra fields), overlaid with the answer line, plus
`id`, `answer` (the model's text) and `reference` (the question file's final gpt turn, else the answer
line's `reference`; None when neither has one). Records without a reference (and, for VQAv2, without
`answers`) are not scored: they are counted in "unscored". Every result has "accuracy" ({"all": ...,
<group>: ...}, fractions in [0, 1]; groups are `question_type`, else `category`) and "samples" (scored).

Scorers (`SCORERS`):

- "exact" (GQA convention): the answer is right when it equals the reference after
  `evaluate.normalize_answer` (lower case, punctuation and articles removed) — the score `evaluate`
  computes itself.
- "vqav2" (the official VQA evaluation script): answers and human answers are normalised like
  `vqaEval.py` does (`vqa_normalize`: punctuation removed or turned into spaces, commas between digits
  glued, a period kept only before a digit, lower case, number words to digits, articles dropped,
  contractions restored: "dont" -> "don't"). A question's accuracy is min(1, matches / 3), where matches
  counts the human answers equal to the prediction, averaged over the leave-one-out subsets of the human
  answers (10 subsets of 9 for VQAv2's 10 answers): with k of 10 matching that is 0.3 for k = 1, 0.6 for
  k = 2, 0.9 for k = 3 and 1 from k = 4. Human answers come from the sample's extra field "answers" (a
  list of strings, or of {"answer": ...} objects as in the VQA annotation files); without it the single
  reference counts as ten agreeing annotators (1 when it matches, else 0). Also reported per
  `answer_type` when samples have one ("yes/no", "number", "other").
- "choice" (ScienceQA convention, as in LLaVA's ScienceQA evaluation): the option letter is read from the
  answer ("B", "b", "B.", "(B)", "B) cat", "The answer is B.", "Answer: B", or the only "(X)" in the text;
  `parse_choice`) and compared with the reference's letter (the reference is a letter, or a text
  `parse_choice` reads, e.g. "The answer is B."). An answer without a readable letter is wrong and counted
  in "unparsed".
- "pope" (POPE object hallucination): the answer is read as yes/no as POPE's own script does
  (`parse_yes_no`: "no" when its first sentence has the word "No", "no" or "not", else "yes"; answers with
  neither yes nor no are counted in "unparsed" and, as in the script, read as "yes"), so scores compare with
  published ones. Metrics with "yes" as the positive
  class: accuracy, precision, recall, F1, yes-ratio (the fraction answered yes) and the confusion counts,
  overall ("all") and per `category` (random, popular, adversarial) when samples have one.
- "mme" (MME's paired yes/no scoring): the answer counts as yes/no when the normalised answer starts with
  that word, else it is "other" (always wrong; MME's script looks for "yes"/"no" in the first four
  characters, so it also reads "not ..." and "none" as no). Within each `category`, acc is the
  per-question accuracy and acc+ the fraction of images (field "image") whose questions (two per image in
  MME) are all right; a category's score is 100 * (acc + acc+), "total" the sum over categories, and
  "perception" / "cognition" the sums over MME's perception and cognition categories present.

    python -m qtl_jax.scorers --answers A.jsonl --questions Q.json --scorer vqav2 [--out scores.json]

scores an answers file, from `qtl_jax.evaluate` or elsewhere: an answer line needs an id ("id" or, as in
LLaVA's answer files, "question_id") and the answer ("answer" or "text"). `python -m qtl_jax.evaluate
--scorer NAME` runs a scorer on every `--eval` file right after generating its answers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Sequence

from qtl_jax.data.annotations import iter_annotations, jsonl_lines

# --- normalisation -----------------------------------------------------------------------------------------

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# Apostrophe-less spellings -> contractions (a subset of the VQA script's table, without the ones that are
# ordinary words as well, like "its", "lets", "well", "shed" or "wed").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "couldn'tve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "im": "i'm", "ive": "i've", "isnt": "isn't",
    "itd": "it'd", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "oclock": "o'clock",
    "oughtnt": "oughtn't", "shant": "shan't", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "somebodys": "somebody's", "someones": "someone's", "somethings": "something's", "thats": "that's",
    "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                   ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The script's period pattern, "(?!<=\d)(\.)(?!\d)", has a typo for a lookbehind; what it does (and what
# published VQAv2 numbers used) is remove every period that no digit follows: "3.5" keeps its period.
_PERIOD = re.compile(r"\.(?!\d)")


def vqa_normalize(text: str) -> str:
    """An answer normalised like the official VQA evaluation script (`processPunctuation`, then
    `processDigitArticle`): "Two dogs." -> "2 dogs", "1,000" -> "1000", "dont" -> "don't"."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark next to a space (or any mark, when a comma sits between digits) is removed; one
    # inside a word becomes a space. Both tests look at the text as given, like the script.
    glue = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in VQA_PUNCTUATION:
        out = out.replace(p, "" if glue or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)
    words = (NUMBER_WORDS.get(w, w) for w in out.lower().split())
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _normalize_answer(text: str) -> str:
    # Imported here: `qtl_jax.evaluate` pulls in JAX and the models, which scoring a file does not need.
    from qtl_jax.evaluate import normalize_answer

    return normalize_answer(str(text))


def parse_yes_no(text: str) -> str | None:
    """POPE's reading of an answer, as its official script (and LLaVA's eval_pope.py) does it: the first
    sentence (up to the first "."), commas removed, split on spaces; "no" when a word is "No", "no" or "not",
    else "yes" when a word is yes (any case); None when neither (POPE counts that as "yes").
    So "Yes, no doubt." reads "no", as in the official script."""
    first = str(text).split(".", 1)[0].replace(",", "")
    words = first.split(" ")
    if any(w in ("No", "no", "not") for w in words):
        return "no"
    return "yes" if any(w.lower() == "yes" for w in words) else None


def _leading_yes_no(text: str) -> str | None:
    """MME's reading: "yes"/"no" when the normalised answer starts with it, else None ("other")."""
    words = _normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


_CHOICE_WHOLE = re.compile(r"^\(?([A-Za-z])\)?[.):]?$")  # "B", "b", "B.", "(B)", "B)"
_CHOICE_ANSWER_IS = re.compile(r"(?i:answer(?:\s+is)?)\s*[:\-]?\s*\(?([A-Z])(?![A-Za-z'])")  # "The answer is B."
_CHOICE_LEADING = re.compile(r"^\(?([A-Z])(?:\)|[.:])(?:\s|$)")  # "B) cat", "B. cat", "(B) cat"
_CHOICE_PARENS = re.compile(r"\(([A-Z])\)")  # "... so (C) it is"


def parse_choice(text: str) -> str | None:
    """The option letter (upper case) of a multiple-choice answer, None when there is none to read.

    Read, in order: an answer that is only a letter ("B", "b", "B.", "(B)"); "answer is X" / "answer: X"
    (X upper case); a leading "X)", "X." or "X:"; else the single distinct "(X)" in the text. "A cat" is
    not read as A.
    """
    text = str(text).strip()
    for pattern in (_CHOICE_WHOLE, _CHOICE_ANSWER_IS, _CHOICE_LEADING):
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    letters = set(_CHOICE_PARENS.findall(text))
    return letters.pop() if len(letters) == 1 else None


# --- scorers ------------------------------------------------------------------------------------------------


def _group(record: dict) -> str:
    return str(record.get("question_type") or record.get("category") or "")


def _accuracy(sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
    return {k: sums[k] / counts[k] for k in counts}


def _add(sums: dict, counts: dict, keys, value: float) -> None:
    for key in set(keys) - {""}:
        sums[key] = sums.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1


def score_exact(records: list[dict]) -> dict:
    """Exact match after `evaluate.normalize_answer` (GQA); per `question_type`/`category` as well."""
    sums, counts, unscored = {}, {}, 0
    for r in records:
        if r.get("reference") is None:
            unscored += 1
            continue
        hit = _normalize_answer(r["answer"]) == _normalize_answer(r["reference"])
        _add(sums, counts, ("all", _group(r)), float(hit))
    return {"accuracy": _accuracy(sums, counts), "samples": counts.get("all", 0), "unscored": unscored}


def vqa_accuracy(answer: str, references: Sequence[str]) -> float:
    """The official VQA accuracy of one answer: min(1, matches / 3) averaged over the leave-one-out subsets
    of the human answers, after `vqa_normalize`. A single reference counts as ten agreeing annotators."""
    prediction = vqa_normalize(answer)
    refs = [vqa_normalize(r) for r in references]
    if len(refs) == 1:
        return float(prediction == refs[0])
    hits = [ref == prediction for ref in refs]
    matches = sum(hits)
    return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(refs)


def _human_answers(record: dict) -> list[str] | None:
    answers = record.get("answers")
    if answers is None:
        return None if record.get("reference") is None else [record["reference"]]
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"sample {record['id']}: 'answers' must be a non-empty list of human answers, got "
                         f"{answers!r}")
    out = []
    for a in answers:
        if isinstance(a, dict):
            a = a.get("answer")
        if not isinstance(a, str):
            raise ValueError(f"sample {record['id']}: a human answer must be a string or an object with an "
                             f"'answer' string, got {a!r}")
        out.append(a)
    return out


def score_vqav2(records: list[dict]) -> dict:
    """VQAv2 soft accuracy (see the module docstring); per `question_type`/`category` and `answer_type`."""
    sums, counts, type_sums, type_counts, unscored = {}, {}, {}, {}, 0
    for r in records:
        references = _human_answers(r)
        if references is None:
            unscored += 1
            continue
        acc = vqa_accuracy(r["answer"], references)
        _add(sums, counts, ("all", _group(r)), acc)
        _add(type_sums, type_counts, (str(r.get("answer_type") or ""),), acc)
    result = {"accuracy": _accuracy(sums, counts), "samples": counts.get("all", 0), "unscored": unscored}
    if type_counts:
        result["accuracy_by_answer_type"] = _accuracy(type_sums, type_counts)
    return result


def score_choice(records: list[dict]) -> dict:
    """Multiple-choice letter accuracy (ScienceQA); an answer without a readable letter is wrong."""
    sums, counts, unparsed, unscored = {}, {}, 0, 0
    for r in records:
        if r.get("reference") is None:
            unscored += 1
            continue
        truth = parse_choice(r["reference"])
        if truth is None:
            raise ValueError(f"sample {r['id']}: the reference {r['reference']!r} is not an option letter")
        letter = parse_choice(r["answer"])
        unparsed += letter is None
        _add(sums, counts, ("all", _group(r)), float(letter == truth))
    return {"accuracy": _accuracy(sums, counts), "samples": counts.get("all", 0), "unparsed": unparsed,
            "unscored": unscored}


def _yes_no_reference(record: dict) -> str:
    words = _normalize_answer(record["reference"]).split()
    if not words or words[0] not in ("yes", "no"):
        raise ValueError(f"sample {record['id']}: the reference {record['reference']!r} is not yes or no")
    return words[0]


def _binary_metrics(c: dict) -> dict:
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "samples": n, **c}


def score_pope(records: list[dict]) -> dict:
    """POPE yes/no metrics ("yes" positive), overall and per `category` (see the module docstring)."""
    confusion, unparsed, unscored = {}, 0, 0
    for r in records:
        if r.get("reference") is None:
            unscored += 1
            continue
        truth = _yes_no_reference(r)
        parsed = parse_yes_no(r["answer"])
        unparsed += parsed is None
        said = parsed or "yes"  # POPE's script: an answer without no/not is a yes
        cell = ("t" if said == truth else "f") + ("p" if said == "yes" else "n")
        for key in {"all", str(r.get("category") or "")} - {""}:
            counts = confusion.setdefault(key, {"tp": 0, "fp": 0, "tn": 0, "fn": 0, "unparsed": 0})
            counts[cell] += 1
            counts["unparsed"] += parsed is None
    metrics = {key: _binary_metrics(c) for key, c in confusion.items()}
    return {"metrics": metrics, "accuracy": {key: m["accuracy"] for key, m in metrics.items()},
            "samples": metrics["all"]["samples"] if metrics else 0, "unparsed": unparsed, "unscored": unscored}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "ocr")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def score_mme(records: list[dict]) -> dict:
    """MME acc / acc+ / score per category, their total, and the perception and cognition sums."""
    images: dict[str, dict[str, list[bool]]] = {}  # category -> image -> correctness of its questions
    other, unscored = 0, 0
    for r in records:
        if r.get("reference") is None:
            unscored += 1
            continue
        if not r.get("image"):
            raise ValueError(f"sample {r['id']}: MME pairs the questions of an image, and it has no 'image'")
        truth = _yes_no_reference(r)
        said = _leading_yes_no(r["answer"])
        other += said is None
        category = str(r.get("category") or r.get("question_type") or "all")
        images.setdefault(category, {}).setdefault(str(r["image"]), []).append(said == truth)
    categories, right, questions = {}, 0, 0
    for category, per_image in sorted(images.items()):
        hits = [h for results in per_image.values() for h in results]
        acc = sum(hits) / len(hits)
        acc_plus = sum(all(results) for results in per_image.values()) / len(per_image)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus),
                                "questions": len(hits), "images": len(per_image)}
        right, questions = right + sum(hits), questions + len(hits)
    accuracy = {"all": right / questions} if questions else {}
    accuracy.update((k, c["acc"]) for k, c in categories.items() if k != "all")
    result = {"categories": categories, "total": sum(c["score"] for c in categories.values()),
              "accuracy": accuracy, "samples": questions, "other": other, "unscored": unscored}
    for part, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [c["score"] for k, c in categories.items() if k.lower() in names]
        if present:
            result[part] = sum(present)
    return result


SCORERS: dict[str, Callable[[list[dict]], dict]] = {
    "exact": score_exact, "vqav2": score_vqav2, "choice": score_choice, "pope": score_pope, "mme": score_mme}


# --- files ----------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    """The objects of a JSON-lines file (blank lines skipped); ValueError naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for number, record, error in jsonl_lines(path, f):
            if error:
                raise ValueError(error)
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {json.dumps(record)[:60]}")
            records.append(record)
    return records


def _answer_id(answer: dict, name: str, index: int) -> str:
    for key in ("id", "question_id"):
        if answer.get(key) is not None:
            return str(answer[key])
    raise ValueError(f"{name}: answer {index + 1} has neither 'id' nor 'question_id'")


def _examples(ids: list[str], limit: int = 5) -> str:
    return ", ".join(repr(i) for i in ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def join_questions(answers: list[dict], question_file: str, *, partial: bool = False,
                   answers_name: str = "the answers") -> list[dict]:
    """Joins answers with their samples of a LLaVA-format question file (JSON list or JSONL), by id.

    Args:
      answers: answer objects, each with an id ("id" or "question_id") and the model's answer ("answer"
        or "text").
      question_file: the question file the answers were generated for.
      partial: allow questions without an answer (a run cut by `max_examples`, or skipped samples); their
        number is not reported here (see `score_file`). Answers without a question always fail.
      answers_name: what to call the answers in errors (their file).

    Returns:
      One record per answer, in the answers' order: the question's fields overlaid with the answer's, with
      "id", "answer" and "reference" (the question's final gpt turn, else the answer's "reference", else None).

    Raises:
      ValueError naming the files and ids: an answer without a question, a question without an answer
      (unless `partial`), an id twice in either, an answer without an id or text, a malformed question.
    """
    questions: dict[str, dict] = {}
    for annotation in iter_annotations(question_file):
        record = annotation.record
        if not isinstance(record, dict):
            raise ValueError(annotation.error or f"{question_file}: sample {annotation.number} is not an object")
        sample_id = annotation.sample_id
        if sample_id in questions:
            raise ValueError(f"{question_file}: the id {sample_id!r} appears twice")
        questions[sample_id] = record
    joined, seen, orphans = [], set(), []
    for index, answer in enumerate(answers):
        sample_id = _answer_id(answer, answers_name, index)
        if sample_id in seen:
            raise ValueError(f"{answers_name}: the id {sample_id!r} is answered twice")
        seen.add(sample_id)
        if sample_id not in questions:
            orphans.append(sample_id)
            continue
        text = answer.get("answer", answer.get("text"))
        if text is None:
            raise ValueError(f"{answers_name}: the answer to {sample_id!r} has neither 'answer' nor 'text'")
        question = questions[sample_id]
        conv = question.get("conversations")
        last = conv[-1] if isinstance(conv, list) and conv and isinstance(conv[-1], dict) else {}
        reference = last.get("value") if last.get("from") == "gpt" else None
        joined.append({**question, **answer, "id": sample_id, "answer": str(text),
                       "reference": reference if reference is not None else answer.get("reference")})
    if orphans:
        raise ValueError(f"{answers_name}: {len(orphans)} answer(s) have no question in {question_file}: ids "
                         f"{_examples(orphans)}")
    unanswered = [i for i in questions if i not in seen]
    if unanswered and not partial:
        raise ValueError(f"{question_file}: {len(unanswered)} question(s) have no answer in {answers_name}: ids "
                         f"{_examples(unanswered)} (pass partial=True / --partial to score the answered ones)")
    return joined


def score_records(records: list[dict], scorer: str) -> dict:
    """`SCORERS[scorer](records)`; ValueError naming the known scorers for an unknown one."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
    return SCORERS[scorer](records)


def score_file(answers_file: str, question_file: str, scorer: str, *, partial: bool = False) -> dict:
    """Scores an answers JSONL file against its question file with `SCORERS[scorer]`.

    Returns:
      the scorer's result plus "name" (the scorer), "answers_file", "question_file" and "unanswered" (the
      questions without an answer; 0 unless `partial`).
    """
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
    answers = read_jsonl(answers_file)
    records = join_questions(answers, question_file, partial=partial, answers_name=answers_file)
    questions = sum(1 for _ in iter_annotations(question_file))
    return {"name": scorer, **score_records(records, scorer), "answers_file": answers_file,
            "question_file": question_file, "unanswered": questions - len(records)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Scores an answers JSONL file against its LLaVA-format "
                                                 "question file.")
    parser.add_argument("--answers", required=True, help="answers JSONL (id/question_id + answer/text per line)")
    parser.add_argument("--questions", required=True, help="the LLaVA-format question file (JSON list or JSONL)")
    parser.add_argument("--scorer", default="exact", choices=sorted(SCORERS))
    parser.add_argument("--partial", action="store_true", help="allow questions without an answer")
    parser.add_argument("--out", default=None, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    result = score_file(args.answers, args.questions, args.scorer, partial=args.partial)
    text = json.dumps(result, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
