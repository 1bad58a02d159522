"""evaluation/mmlu.py: question file parsing, k-shot prompts, letter-logit scoring, paired delta."""
import json
import math

import pytest
import torch

from sagequant.evaluation.mmlu import (LETTERS, MMLUError, accuracy, build_prompts, letter_token_ids,
                                       load_questions, paired_delta, predict)


def _file(tmp_path, answers="ABCDABCD", topics=("astronomy", "virology")):
    rows = [{"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
             "answer_d": "answer_d", "correct_answer": "answer", "topic": "topic"}]
    for t in topics:
        rows += [{"question": f"{t} question {i}?", "answer_a": "one", "answer_b": "two", "answer_c": "three",
                  "answer_d": "four", "correct_answer": a, "topic": t} for i, a in enumerate(answers)]
    p = tmp_path / "mmlu.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    return p


def test_load_skips_header_rows_and_names_bad_lines(tmp_path):
    qs = load_questions(_file(tmp_path))
    assert len(qs) == 16 and qs[0].topic == "astronomy" and qs[1].answer == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(MMLUError, match="bad.jsonl:1: not an MMLU row"):
        load_questions(bad)


def test_five_shot_prompts_use_the_first_questions_of_each_topic(tmp_path):
    prompts = build_prompts(load_questions(_file(tmp_path)), shots=5, per_topic=2)
    assert len(prompts) == 4  # 8 - 5 = 3 left per topic, at most 2 scored
    text, q = prompts[0]
    assert text.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert text.count("Answer:") == 6 and text.endswith("astronomy question 5?\nA. one\nB. two\nC. three\n"
                                                        "D. four\nAnswer:")
    assert "astronomy question 4?\nA. one\nB. two\nC. three\nD. four\nAnswer: A\n\n" in text
    assert q.question == "astronomy question 5?"


def test_letter_scoring_and_accuracy(tmp_path):
    from sagequant.frontends.models import resolve_tokenizer
    tok = resolve_tokenizer("smollm2")
    letters = letter_token_ids(tok)
    assert len(set(letters)) == 4
    prompts = build_prompts(load_questions(_file(tmp_path)))

    def always_c(ids):
        logits = torch.zeros(ids.shape[0], ids.shape[1], len(tok))
        logits[..., letters[2]] = 1.0
        logits[..., letters[0] + 1] = 5.0  # a larger non-letter token must not count
        return logits
    preds = predict(always_c, tok, prompts)
    res = accuracy(preds, prompts)
    assert res["letter_share"] == {"A": 0.0, "B": 0.0, "C": 1.0, "D": 0.0}
    assert res["accuracy"] == 0.25 and res["per_topic"]["virology"] == {"questions": 8, "accuracy": 0.25}


def test_paired_bootstrap_delta(tmp_path):
    prompts = build_prompts(load_questions(_file(tmp_path, answers="AAAAAAAAAAAAAAAAAAAA")))
    right = torch.zeros(len(prompts), dtype=torch.long)
    wrong = right.clone()
    wrong[:10] = 1  # 10 of 40 answers changed, all for the worse
    d = paired_delta(right, wrong, prompts, resamples=4000)
    assert d["delta_points"] == pytest.approx(-25.0) and d["answers_changed"] == 0.25
    analytic = 100 * math.sqrt(0.25 * 0.75 / 40)  # se of a mean of 40 Bernoulli(0.25) differences
    assert d["delta_points_se"] == pytest.approx(analytic, rel=0.1)
    assert d["delta_points_95ci"][0] < -25 < d["delta_points_95ci"][1] < 0
    assert LETTERS == ("A", "B", "C", "D")
