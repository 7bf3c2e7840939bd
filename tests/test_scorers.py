"""Benchmark scorers: hand-computed VQAv2 / exact / choice / POPE / MME scores, the question join, both CLIs."""

import json

import ml_collections
import pytest

from qtl_jax import evaluate, scorers


def _rec(sample_id, answer, reference, **fields):
    return {"id": sample_id, "answer": answer, "reference": reference, **fields}


# --- VQAv2 ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("Two dogs.", "2 dogs"), ("none", "0"), ("The cat", "cat"), ("an apple", "apple"),
    ("dont", "don't"), ("don't", "don't"), ("isnt", "isn't"), ("Yes.", "yes"), ("3.5", "3.5"),
    ("1,000", "1000"), ("red, white", "red white"), ("red,white", "red white"), ("t-shirt", "t shirt"),
    ("(left)", "left"), ("  Two\tcats\n", "2 cats"), ("what?", "what"),
])
def test_vqa_normalize(text, expected):
    assert scorers.vqa_normalize(text) == expected


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_is_the_leave_one_out_mean(matches, expected):
    # k matching of 10: the k subsets without a match see k-1 matches, the 10-k others see k.
    # k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6; k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    refs = ["cat"] * matches + ["dog"] * (10 - matches)
    assert scorers.vqa_accuracy("cat", refs) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert scorers.vqa_accuracy("Two", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    assert scorers.vqa_accuracy("don't", ["dont"] * 3 + ["yes"] * 7) == pytest.approx(0.9)
    assert scorers.vqa_accuracy("The Dog.", ["dog", "a dog"] + ["cat"] * 8) == pytest.approx(0.6)
    assert scorers.vqa_accuracy("2", ["two"]) == 1.0  # one reference: ten agreeing annotators
    assert scorers.vqa_accuracy("3", ["two"]) == 0.0


def test_score_vqav2_records():
    records = [
        _rec("1", "Two", "2", answers=["2", "2"] + ["3"] * 8, question_type="how many", answer_type="number"),
        _rec("2", "yes", "Yes", question_type="is there", answer_type="yes/no"),  # no "answers": the reference
        _rec("3", "blue", "red", answers=[{"answer": "blue"}] * 3 + [{"answer": "red"}] * 7,
             question_type="how many", answer_type="other"),
        _rec("4", "x", None),  # neither answers nor a reference
    ]
    result = scorers.score_vqav2(records)
    assert result["samples"] == 3 and result["unscored"] == 1
    assert result["accuracy"] == pytest.approx({"all": (0.6 + 1 + 0.9) / 3, "how many": 0.75, "is there": 1.0})
    assert result["accuracy_by_answer_type"] == pytest.approx({"number": 0.6, "yes/no": 1.0, "other": 0.9})
    with pytest.raises(ValueError, match="sample 5"):
        scorers.score_vqav2([_rec("5", "x", "x", answers=[])])


# --- exact match ------------------------------------------------------------------------------------------


def test_score_exact_uses_evaluate_normalisation():
    records = [_rec("1", "The Red.", "red", question_type="color"), _rec("2", "blue", "red", question_type="color"),
               _rec("3", "a circle!", "circle", category="shape"), _rec("4", "circle", None)]
    assert evaluate.normalize_answer("The Red.") == evaluate.normalize_answer("red")
    result = scorers.score_exact(records)
    assert result["accuracy"] == pytest.approx({"all": 2 / 3, "color": 0.5, "shape": 1.0})
    assert result["samples"] == 3 and result["unscored"] == 1


# --- multiple choice --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("b", "B"), ("B.", "B"), ("(B)", "B"), ("B)", "B"), (" C \n", "C"),
    ("The answer is B.", "B"), ("the answer is (C).", "C"), ("Answer: D", "D"), ("B) cat", "B"),
    ("B. The cat", "B"), ("(C) a dog", "C"), ("I think (D) is right", "D"),
    ("A cat", None), ("cat", None), ("Either (A) or (B)", None), ("", None), ("The answer is a dog.", None),
])
def test_parse_choice(text, letter):
    assert scorers.parse_choice(text) == letter


def test_score_choice():
    records = [_rec("1", "The answer is B.", "B"), _rec("2", "cat", "(C)"), _rec("3", "A", "The answer is A."),
               _rec("4", "(D)", "C", question_type="bio")]
    result = scorers.score_choice(records)
    assert result["accuracy"] == pytest.approx({"all": 0.5, "bio": 0.0})
    assert result["unparsed"] == 1 and result["samples"] == 4
    with pytest.raises(ValueError, match=r"sample 9.*not an option letter"):
        scorers.score_choice([_rec("9", "A", "a cat")])


# --- POPE -------------------------------------------------------------------------------------------------


def test_parse_yes_no():  # POPE's official reading: the first sentence, "no" on No/no/not, else yes
    assert scorers.parse_yes_no("Yes, no doubt.") == "no"  # the script's quirk, kept for comparable scores
    assert scorers.parse_yes_no("Yes. There is no dog.") == "yes"  # only the first sentence counts
    assert scorers.parse_yes_no("I would say no, not yes") == "no"
    assert scorers.parse_yes_no("There is yes a dog") == "yes"
    assert scorers.parse_yes_no("The answer is not clear") == "no"
    assert scorers.parse_yes_no("Nothing") is None  # a word starting with "no" is not "no"


def test_score_pope_confusion_matrix():
    rows = [("random", "yes", "Yes, there is."),  # TP
            ("random", "yes", "No."),  # FN
            ("random", "no", "I think yes"),  # FP
            ("random", "no", "no"),  # TN
            ("adversarial", "yes", "There is a cat."),  # neither yes nor no: read as yes -> TP, unparsed
            ("adversarial", "yes", "Yes"),  # TP
            ("adversarial", "Yes.", "yes"),  # TP (the reference is normalised too)
            ("adversarial", "no", "No, there is no cat")]  # TN
    records = [_rec(str(i), answer, truth, category=cat) for i, (cat, truth, answer) in enumerate(rows)]
    result = scorers.score_pope(records)
    overall = result["metrics"]["all"]  # TP 4, FP 1, FN 1, TN 2
    assert (overall["tp"], overall["fp"], overall["fn"], overall["tn"]) == (4, 1, 1, 2)
    assert overall["accuracy"] == pytest.approx(6 / 8)
    assert overall["precision"] == pytest.approx(4 / 5)
    assert overall["recall"] == pytest.approx(4 / 5)
    assert overall["f1"] == pytest.approx(4 / 5)
    assert overall["yes_ratio"] == pytest.approx(5 / 8)
    adv = result["metrics"]["adversarial"]  # TP 3, TN 1
    assert (adv["precision"], adv["recall"], adv["f1"], adv["accuracy"], adv["yes_ratio"]) == pytest.approx(
        (1.0, 1.0, 1.0, 1.0, 3 / 4))
    assert adv["unparsed"] == 1 and result["metrics"]["random"]["unparsed"] == 0
    assert result["metrics"]["random"]["f1"] == pytest.approx(0.5)
    assert result["accuracy"] == pytest.approx({"all": 6 / 8, "random": 0.5, "adversarial": 1.0})
    assert result["unparsed"] == 1 and result["samples"] == 8
    with pytest.raises(ValueError, match="not yes or no"):
        scorers.score_pope([_rec("x", "yes", "maybe")])


# --- MME --------------------------------------------------------------------------------------------------


def test_score_mme_acc_and_acc_plus():
    rows = [("existence", "a.jpg", "yes", "Yes"), ("existence", "a.jpg", "no", "No, there is not."),
            ("existence", "b.jpg", "yes", "Yes."), ("existence", "b.jpg", "no", "There is no dog."),  # other
            ("count", "c.jpg", "yes", "no"), ("count", "c.jpg", "no", "no"),
            ("code_reasoning", "d.jpg", "yes", "yes"), ("code_reasoning", "d.jpg", "no", "no")]
    records = [_rec(str(i), answer, truth, category=cat, image=image)
               for i, (cat, image, truth, answer) in enumerate(rows)]
    result = scorers.score_mme(records)
    existence = result["categories"]["existence"]
    assert (existence["acc"], existence["acc_plus"], existence["images"]) == pytest.approx((0.75, 0.5, 2))
    assert existence["score"] == pytest.approx(125.0)
    assert result["categories"]["count"]["score"] == pytest.approx(50.0)  # acc 1/2, acc+ 0
    assert result["categories"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert result["total"] == pytest.approx(375.0)
    assert result["perception"] == pytest.approx(175.0) and result["cognition"] == pytest.approx(200.0)
    assert result["other"] == 1 and result["samples"] == 8
    assert result["accuracy"]["all"] == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match=r"sample z.*no 'image'"):
        scorers.score_mme([_rec("z", "yes", "yes", category="count")])


# --- files ------------------------------------------------------------------------------------------------


def _question(sample_id, reference=None, **fields):
    conv = [{"from": "human", "value": "<image>\nQ?"}]
    if reference is not None:
        conv.append({"from": "gpt", "value": reference})
    return {"id": sample_id, "image": f"{sample_id}.jpg", "conversations": conv, **fields}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_join_questions(tmp_path):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([_question("q1", "2", answers=["2"] * 10), _question(7, "yes"),
                                     _question("q3")]))
    answers = [{"question_id": 7, "text": "Yes"}, {"id": "q1", "answer": "two", "reference": "stale"},
               {"id": "q3", "answer": "x", "reference": "y"}]
    joined = scorers.join_questions(answers, str(questions))
    assert [r["id"] for r in joined] == ["7", "q1", "q3"]  # the answers' order; ids as strings
    assert joined[0]["answer"] == "Yes" and joined[0]["reference"] == "yes" and joined[0]["image"] == "7.jpg"
    assert joined[1]["reference"] == "2" and joined[1]["answers"] == ["2"] * 10  # the question file's gpt turn
    assert joined[2]["reference"] == "y"  # no gpt turn: the answer's reference

    with pytest.raises(ValueError, match=r"answers\.jsonl.*no question in .*q\.json: ids 'nope'"):
        scorers.join_questions([*answers, {"id": "nope", "answer": "x"}], str(questions),
                               answers_name="answers.jsonl")
    with pytest.raises(ValueError, match=r"q\.json: 1 question\(s\) have no answer .*ids 'q3'"):
        scorers.join_questions(answers[:2], str(questions))
    assert len(scorers.join_questions(answers[:2], str(questions), partial=True)) == 2
    with pytest.raises(ValueError, match="'q1' is answered twice"):
        scorers.join_questions([*answers, answers[1]], str(questions))
    with pytest.raises(ValueError, match="neither 'answer' nor 'text'"):
        scorers.join_questions([{"id": "q1"}], str(questions), partial=True)
    duplicated = _write_jsonl(tmp_path / "dup.jsonl", [_question("a"), _question("a")])
    with pytest.raises(ValueError, match=r"dup\.jsonl: the id 'a' appears twice"):
        scorers.join_questions([{"id": "a", "answer": "x"}], duplicated)


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"id": 1}\n\n{"id": \n')
    with pytest.raises(ValueError, match=r"a\.jsonl:3: malformed JSON"):
        scorers.read_jsonl(str(path))
    path.write_text('{"id": 1}\n\n[1]\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:3: expected a JSON object"):
        scorers.read_jsonl(str(path))


def test_cli_scores_an_answers_file(tmp_path, capsys):
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([
        _question("1", "2", answers=["2", "2"] + ["3"] * 8),  # "Two": 0.6
        _question("2", "no", answers=["no"] * 3 + ["yes"] * 7),  # "No.": 0.9
        _question("3", "red")]))  # single reference, wrong
    answers = _write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "answer": "Two"}, {"id": "2", "answer": "No."},
                                                  {"id": "3", "answer": "blue"}])
    out = tmp_path / "out" / "scores.json"
    result = scorers.main(["--answers", answers, "--questions", str(questions), "--scorer", "vqav2",
                           "--out", str(out)])
    assert result["accuracy"]["all"] == pytest.approx(1.5 / 3)
    assert result["name"] == "vqav2" and result["samples"] == 3 and result["unanswered"] == 0
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == result

    exact = scorers.main(["--answers", answers, "--questions", str(questions)])  # default: exact match
    assert exact["name"] == "exact" and exact["accuracy"]["all"] == pytest.approx(1 / 3)  # only "No." == "no"
    partial = _write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "answer": "2"}])
    with pytest.raises(ValueError, match="have no answer"):
        scorers.main(["--answers", partial, "--questions", str(questions), "--scorer", "vqav2"])
    result = scorers.main(["--answers", partial, "--questions", str(questions), "--scorer", "vqav2", "--partial"])
    assert result["accuracy"]["all"] == pytest.approx(0.6) and result["unanswered"] == 2
    with pytest.raises(SystemExit):
        scorers.main(["--answers", answers, "--questions", str(questions), "--scorer", "bogus"])
    with pytest.raises(ValueError, match="unknown scorer 'bogus'"):
        scorers.score_file(answers, str(questions), "bogus")


def test_score_file_pope_on_jsonl_questions(tmp_path):
    questions = _write_jsonl(tmp_path / "pope.jsonl", [_question("1", "yes", category="random"),
                                                       _question("2", "no", category="random")])
    answers = _write_jsonl(tmp_path / "a.jsonl", [{"id": "1", "answer": "Yes"}, {"id": "2", "answer": "Yes"}])
    result = scorers.score_file(answers, questions, "pope")
    assert result["metrics"]["random"]["precision"] == pytest.approx(0.5)
    assert result["metrics"]["random"]["yes_ratio"] == 1.0


# --- evaluate wiring ---------------------------------------------------------------------------------------


def test_run_evaluation_adds_the_scorer(tmp_path, monkeypatch):
    """`run_evaluation(..., scorer=...)` scores each eval file's answers and stores them under "scorer";
    built-in splits (no question file) are left out; "exact" adds nothing."""
    questions = tmp_path / "mme.json"
    questions.write_text(json.dumps([_question("1", "yes", category="color", image="p.jpg"),
                                     _question("2", "no", category="color", image="p.jpg"), _question("3", "no")]))
    generated = {"mme": [{"id": "1", "answer": "Yes"}, {"id": "2", "answer": "yes"}],  # "3": max_examples
                 "validation": [{"id": "v", "answer": "x", "reference": "x"}]}

    def fake_evaluate_source(answerer, source, *, answers_file, name, **kwargs):
        _write_jsonl(tmp_path / "eval" / f"{name}.answers.jsonl", generated[name])
        assert answers_file == str(tmp_path / "eval" / f"{name}.answers.jsonl")
        return {"accuracy": {"all": 0.5}, "samples": 2, "skipped": 0, "skipped_reasons": []}

    monkeypatch.setattr(evaluate, "Answerer", lambda *args: None)
    monkeypatch.setattr(evaluate, "evaluate_source", fake_evaluate_source)
    config = ml_collections.ConfigDict({
        "data": {"eval_files": f"mme={questions}", "template": "llama", "buckets": [32], "on_bad_sample": "fail"},
        "eval": {"batch_size": 2, "max_new_tokens": 4, "max_examples": 2}})
    (tmp_path / "eval").mkdir()
    logs = []
    results = evaluate.run_evaluation(config, None, None, None, {"mme": None, "validation": None},
                                      str(tmp_path / "eval"), None, log=logs.append, scorer="mme")
    scored = results["mme"]["scorer"]
    assert scored["categories"]["color"] == pytest.approx({"acc": 0.5, "acc_plus": 0.0, "score": 50.0,
                                                           "questions": 2, "images": 1})
    assert scored["unanswered"] == 1 and scored["name"] == "mme"
    assert json.loads((tmp_path / "eval" / "mme.scores.json").read_text())["scorer"] == scored
    assert "scorer" not in results["validation"] and any("validation: no question file" in s for s in logs)
    results = evaluate.run_evaluation(config, None, None, None, {"mme": None}, str(tmp_path / "eval"), None,
                                      log=logs.append)
    assert "scorer" not in results["mme"]


def test_evaluate_cli_scorer_option():
    with pytest.raises(SystemExit):
        evaluate.main(["--workdir", "nowhere", "--scorer", "bogus"])
    with pytest.raises(FileNotFoundError, match="nowhere"):  # a known scorer parses; then the workdir fails
        evaluate.main(["--workdir", "nowhere", "--scorer", "pope"])
