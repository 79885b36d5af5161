"""Question and answer-key files -> checked `Question`s, each with its key, metric and the exact prompt to send.

    qs = read_questions("questions.jsonl")                         # LLaVA question jsonl, keys in-line or not
    attach_keys(qs, read_answer_keys("TextVQA_0.5.1_val.json"))    # --answers: jsonl / POPE labels / TextVQA json
    qs = prepare(qs, metric="auto", answer_style="short")          # metric per question + the prompt sent

Formats read:
- Questions: LLaVA's jsonl, one object a line: `question_id` (int or string), `image` (relative to the image
  folder), `text`, optional `category`; optional in-line keys `answer` (string), `answers` (list: VQA-style
  human answers) or `label` ("yes"/"no": POPE). Blank lines are skipped.
- `--answers`: a jsonl of `{question_id, answer | answers | label}` records (POPE's label files
  `coco_pope_*.json` are of this kind, whatever their extension); a json list of such records; a TextVQA-style
  annotation json `{"data": [{"question_id", "answers", ...}]}` or VQAv2's `{"annotations": [...]}` (answers as
  strings or `{"answer": ...}` objects). A question is matched by `question_id`; for TextVQA annotations also, as
  LLaVA's `eval_textvqa.py` does, by (`image_id`, question) when LLaVA's question file uses the image id as
  `question_id`.

Any malformed line or record raises `InputError` naming the file, the line and what is wrong, so a run stops
before a model is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.eval.scorers import METRICS, parse_options

SHORT_SUFFIX = "Answer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
ANSWER_STYLES = ("as-is", "short")


class EvalError(Exception):
    """Base class of bench.eval's own errors; the message is one line that says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class InputError(EvalError):
    """A question or answer-key file is missing or malformed (file, line, what is wrong)."""


@dataclass(frozen=True)
class Question:
    """One question line, its key (any of answer / answers / label), and once `prepare`d its metric and prompt."""

    question_id: int | str
    image: str
    text: str
    category: str | None = None
    answer: str | None = None  # exact / choice key
    answers: tuple[str, ...] | None = None  # VQA-style human answers
    label: str | None = None  # "yes" | "no"
    where: str = ""  # "questions.jsonl line 7", for messages
    metric: str | None = None  # set by prepare
    prompt: str | None = None  # set by prepare: the exact user text sent

    @property
    def has_key(self) -> bool:
        return self.answer is not None or self.answers is not None or self.label is not None

    @property
    def options(self) -> dict[str, str]:
        return parse_options(self.text)


# ---- reading ---------------------------------------------------------------------------------------------------
def _lines(path: Path, what: str):
    """(line number, parsed object) for each non-blank line of a jsonl file."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{what} file {path} cannot be read: {err}") from None
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path.name} line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path.name} line {number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _question_id(obj: dict, where: str) -> int | str:
    if "question_id" not in obj:
        raise InputError(f"{where}: no 'question_id'")
    qid = obj["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, int | str) or (isinstance(qid, str) and not qid.strip()):
        raise InputError(f"{where}: 'question_id' must be an integer or a non-empty string, got {qid!r}")
    return qid


def _keys(obj: dict, where: str) -> dict[str, Any]:
    """The answer keys present in a record, checked: {answer: str, answers: tuple[str], label: 'yes'|'no'}."""
    keys: dict[str, Any] = {}
    if obj.get("answer") is not None:
        a = obj["answer"]
        if isinstance(a, bool) or not isinstance(a, str | int | float):
            raise InputError(f"{where}: 'answer' must be a string, got {type(a).__name__}")
        keys["answer"] = str(a)
    if obj.get("answers") is not None:
        raw = obj["answers"]
        if not isinstance(raw, list) or not raw:
            raise InputError(f"{where}: 'answers' must be a non-empty list of strings")
        out = []
        for a in raw:
            if isinstance(a, dict) and isinstance(a.get("answer"), str):  # VQAv2 {"answer": ..., "answer_id": ...}
                a = a["answer"]
            if isinstance(a, bool) or not isinstance(a, str | int | float):
                raise InputError(f"{where}: 'answers' must be a list of strings, found {a!r}")
            out.append(str(a))
        keys["answers"] = tuple(out)
    if obj.get("label") is not None:
        label = obj["label"]
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise InputError(f"{where}: 'label' must be 'yes' or 'no', got {label!r}")
        keys["label"] = label.strip().lower()
    return keys


def read_questions(path: str | Path) -> list[Question]:
    """Every question of a LLaVA question jsonl, in file order (InputError on the first bad line)."""
    path = Path(path)
    out = []
    for number, obj in _lines(path, "questions"):
        where = f"{path.name} line {number}"
        qid = _question_id(obj, where)
        for name in ("image", "text"):
            if not isinstance(obj.get(name), str) or not obj[name].strip():
                got = "nothing" if name not in obj else repr(obj[name])
                raise InputError(f"{where}: '{name}' must be a non-empty string, got {got}")
        category = obj.get("category")
        if category is not None and not isinstance(category, str):
            raise InputError(f"{where}: 'category' must be a string, got {category!r}")
        out.append(Question(qid, obj["image"], obj["text"], category, where=where, **_keys(obj, where)))
    if not out:
        raise InputError(f"questions file {path} holds no questions")
    return out


@dataclass
class AnswerKeys:
    """Keys read from an --answers file: by question_id, and by (image_id, question) for TextVQA annotations."""

    path: Path
    by_id: dict[str, dict[str, Any]]
    by_image_question: dict[tuple[str, str], dict[str, Any]]


def read_answer_keys(path: str | Path) -> AnswerKeys:
    """An --answers file of any supported kind (see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"answers file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"answers file {path} cannot be read: {err}") from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        doc = None  # not one JSON document: jsonl (POPE's *.json label files are jsonl)
    if isinstance(doc, dict) and "question_id" in doc:
        doc = None  # a jsonl file of one record
    if isinstance(doc, dict):
        records = doc.get("data", doc.get("annotations"))
        if not isinstance(records, list):
            raise InputError(
                f"{path.name}: a JSON object must hold a 'data' (TextVQA) or 'annotations' (VQAv2) list; "
                f"found keys {sorted(doc)[:6]}"
            )
        items = [(f"{path.name} record {i}", r) for i, r in enumerate(records, 1)]
    elif isinstance(doc, list):
        items = [(f"{path.name} record {i}", r) for i, r in enumerate(doc, 1)]
    else:
        items = [(f"{path.name} line {n}", r) for n, r in _lines(path, "answers")]
    keys = AnswerKeys(path, {}, {})
    for where, rec in items:
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        qid = _question_id(rec, where)
        found = _keys(rec, where)
        if not found:
            raise InputError(f"{where}: no answer key ('answer', 'answers' or 'label')")
        keys.by_id[str(qid)] = found
        if "image_id" in rec and isinstance(rec.get("question"), str):
            keys.by_image_question[(str(rec["image_id"]), rec["question"].strip().lower())] = found
    return keys


def _textvqa_question(text: str) -> str:
    """The question inside a LLaVA TextVQA prompt (as LLaVA's eval_textvqa.prompt_processor reads it)."""
    lines = text.split("\n")
    if text.startswith("Reference OCR token:") and len(lines) > 1:
        return lines[1].strip().lower()
    return lines[0].strip().lower()


def attach_keys(questions: list[Question], keys: AnswerKeys) -> list[Question]:
    """Questions with the keys of `keys` filled in (a key in --answers wins over an in-line one)."""
    out = []
    for q in questions:
        found = keys.by_id.get(str(q.question_id))
        if found is None:
            found = keys.by_image_question.get((str(q.question_id), _textvqa_question(q.text)))
        out.append(replace(q, **found) if found else q)
    return out


# ---- metric and prompt -----------------------------------------------------------------------------------------
def question_metric(q: Question, metric: str) -> str:
    """The scorer for one question: `metric` itself, or under "auto" the one its key calls for:
    `answers` list -> vqa; `label` -> yesno; a one-letter `answer` to a question listing lettered options -> choice;
    any other `answer` -> exact. Raises InputError when the key does not fit a forced metric."""
    if not q.has_key:
        raise InputError(
            f"{q.where}: question_id {q.question_id!r} has no answer key ('answer', 'answers' or 'label' in the "
            "line, or a record in --answers)"
        )
    letter = q.answer is not None and re.fullmatch(r"\s*[A-Z]\s*", q.answer) is not None
    if metric == "auto":
        if q.answers is not None:
            return "vqa"
        if q.label is not None:
            return "yesno"
        return "choice" if letter and q.options else "exact"
    if metric == "choice" and not letter:
        raise InputError(f"{q.where}: --metric choice needs a one-letter 'answer' key, got {q.answer!r}")
    if metric == "yesno" and q.label is None and (q.answer or "").strip().lower() not in ("yes", "no"):
        raise InputError(f"{q.where}: --metric yesno needs a 'label' (or 'answer') of yes/no")
    if metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; use auto, {', '.join(METRICS)}")
    return metric


def compose_prompt(text: str, metric: str, answer_style: str) -> str:
    """The exact user text sent: the question (without any `<image>` marker: the prompt template places the image)
    and, under answer_style "short", LLaVA's suffix when the question does not carry it already."""
    text = text.replace("<image>", "").strip()
    if answer_style == "as-is":
        return text
    if answer_style != "short":
        raise InputError(f"unknown answer style {answer_style!r}; use {' or '.join(ANSWER_STYLES)}")
    suffix = CHOICE_SUFFIX if metric == "choice" else SHORT_SUFFIX
    return text if suffix in text else f"{text}\n{suffix}"


def prepare(questions: list[Question], *, metric: str = "auto", answer_style: str = "as-is") -> list[Question]:
    """Each question with its metric and prompt set; InputError (file, line) on the first that cannot be scored."""
    if metric != "auto" and metric not in METRICS:
        raise InputError(f"unknown metric {metric!r}; use auto, {', '.join(METRICS)}")
    out = []
    for q in questions:
        m = question_metric(q, metric)
        out.append(replace(q, metric=m, prompt=compose_prompt(q.text, m, answer_style)))
    return out


def subset(questions: list[Question], limit: int | None, seed: int) -> list[Question]:
    """`limit` questions drawn without replacement with `seed` (kept in file order); all of them when None."""
    if limit is None or limit >= len(questions):
        return list(questions)
    if limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    import random

    picked = sorted(random.Random(seed).sample(range(len(questions)), limit))
    return [questions[i] for i in picked]
