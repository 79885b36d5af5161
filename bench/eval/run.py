"""The run: every question at every (selector, budget), one LLaVA answer line appended per answer, resumable.

    runs = plan_runs((1.0, 0.2), ("hired", "cls"))   # [("hired", 1.0), ("hired", 0.2), ("cls", 0.2)]
    done = open_out(out, config, questions, runs)    # checks run.json, returns answers already written per run
    run_questions(model, questions, out, done, image_folder=folder, alpha=None, max_new_tokens=16)

Budget 1.0 is the stock model whatever the selector (runtime.options), so it runs once, under the first selector.

Files in the output folder:
- `run.json`: what the answers depend on (the model's identity, alpha, max_new_tokens and a digest of the questions
  with the exact prompts sent, so the answer style, metric and subset are in it). Another run with different values
  is refused rather than mixed in; the budgets, the metric used for scoring and the answer keys may change.
- `answers-<budget>.jsonl` (e.g. `answers-0.2.jsonl`): LLaVA's answer format, one line per question in question
  order: `question_id`, `prompt` (the user text sent, without template or `<image>`), `text`, `answer_id`,
  `model_id`, `metadata` {`budget`, `alpha`, `visual_tokens_kept`, `ttft_ms`, `image`, `selector` for a selector
  other than hired, and `error` when the question could not be answered}. Selectors other than hired write
  `answers-<selector>-<budget>.jsonl` (e.g. `answers-visionzip-0.2.jsonl`).

Lines are written whole and flushed one by one, question by question (all budgets of a question, then the next),
so a killed run keeps every finished answer. On resume, a cut last line is dropped, the lines present are checked
against the questions (same ids and prompts, in order), and each budget goes on from its first missing question.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.eval.data import EvalError, Question
from bench.eval.models import QuestionError, read_image

RUN_FILE = "run.json"
RUN_KEYS = ("model", "alpha", "max_new_tokens", "questions")  # a difference in any of these refuses the folder


class OutDirError(EvalError):
    """The output folder holds answers of another run (or files this tool cannot read)."""


def format_budget(budget: float) -> str:
    """1.0 -> "1.0", 0.25 -> "0.25": the file-name form of a budget."""
    return repr(float(budget))


def answers_path(out: Path, budget: float, selector: str = "hired") -> Path:
    """answers-<budget>.jsonl for HiRED (the default selector), answers-<selector>-<budget>.jsonl for another."""
    tag = "" if selector == "hired" else f"{selector}-"
    return out / f"answers-{tag}{format_budget(budget)}.jsonl"


def plan_runs(budgets: Sequence[float], selectors: Sequence[str] = ("hired",)) -> list[tuple[str, float]]:
    """(selector, budget) pairs in run order; budget 1.0 (the stock model for every selector) only once."""
    return [(s, float(b)) for s in selectors for b in budgets if float(b) < 1.0 or s == selectors[0]]


def questions_digest(questions: Sequence[Question]) -> str:
    """sha256 over (question_id, image, prompt) of every question, in order."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([q.question_id, q.image, q.prompt], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def run_config(identity: dict, questions: Sequence[Question], *, alpha: float | None, max_new_tokens: int,
               **readable: Any) -> dict[str, Any]:  # fmt: skip
    """The run.json object: RUN_KEYS (compared on resume) plus readable facts (not compared)."""
    return {
        "tool": "bench.eval",
        "model": identity,
        "alpha": alpha,
        "max_new_tokens": max_new_tokens,
        "questions": {"n": len(questions), "sha256": questions_digest(questions)},
        **readable,
    }


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def open_out(out: Path, config: dict[str, Any], questions: Sequence[Question],
             runs: Sequence[tuple[str, float]]) -> dict[tuple[str, float], int]:  # fmt: skip
    """Check (or start) the output folder; the number of answers already written per (selector, budget).

    Raises OutDirError when the folder holds another run's answers, or answer lines that do not follow the
    questions. A last line cut short by a kill is removed."""
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    existing = [p for p in sorted(out.glob("answers-*.jsonl")) if p.stat().st_size > 0]
    if run_file.exists() and existing:  # without answers, an old run.json (say, of a failed start) is replaced
        try:
            old = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise OutDirError(f"{run_file} is unreadable ({err}); pass another --out or delete that folder") from None
        diff = [k for k in RUN_KEYS if old.get(k) != config.get(k)] if isinstance(old, dict) else list(RUN_KEYS)
        if diff:
            what = ", ".join(_describe(k, old.get(k) if isinstance(old, dict) else None, config.get(k)) for k in diff)
            raise OutDirError(
                f"--out {out} holds answers of another run ({what}); refusing to mix them: pass another --out "
                "or delete that folder"
            )
    elif existing:
        raise OutDirError(
            f"--out {out} holds {existing[0].name} but no {RUN_FILE}, so what made those answers is unknown; "
            "pass another --out or delete those files"
        )
    _write_json_atomic(run_file, config)
    return {(s, b): _check_answers(answers_path(out, b, s), questions) for s, b in runs}


def _describe(key: str, old: Any, new: Any) -> str:
    if key == "questions":
        return "other questions, prompts or subset"
    if key == "model" and isinstance(old, dict) and isinstance(new, dict):
        return f"model {old.get('model_id')!r} ({old.get('kind')}) vs {new.get('model_id')!r} ({new.get('kind')})" + (
            ", same name but another bundle" if old.get("model_id") == new.get("model_id") else ""
        )
    return f"{key} {old!r} vs {new!r}"


def _check_answers(path: Path, questions: Sequence[Question]) -> int:
    """How many answer lines `path` holds, each checked against its question; a cut last line is truncated."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last line was cut by a kill: drop it, its question is asked again
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    lines = data.decode("utf-8").splitlines()
    if len(lines) > len(questions):
        raise OutDirError(f"{path} holds {len(lines)} answers for {len(questions)} questions; refusing to mix")
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            qid, prompt = rec["question_id"], rec["prompt"]
        except (ValueError, KeyError, TypeError):
            raise OutDirError(f"{path.name} line {i + 1}: not an answer line; delete the file to redo it") from None
        q = questions[i]
        if qid != q.question_id or prompt != q.prompt:
            raise OutDirError(
                f"{path.name} line {i + 1} answers question_id {qid!r}, expected {q.question_id!r} with the same "
                "prompt; refusing to mix: pass another --out or delete that folder"
            )
    return len(lines)


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The answer lines of one budget's file (complete lines only)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def answer_record(q: Question, *, text: str, model_id: str, budget: float, alpha: float | None,
                  kept: int | None, ttft_ms: float | None, error: str | None = None,
                  selector: str = "hired") -> dict[str, Any]:  # fmt: skip
    """One line of LLaVA's answer format with this tool's metadata."""
    meta: dict[str, Any] = {"budget": float(budget), "alpha": alpha, "visual_tokens_kept": kept,
                            "ttft_ms": ttft_ms, "image": q.image}  # fmt: skip
    if selector != "hired":
        meta["selector"] = selector
    if error is not None:
        meta["error"] = error
    return {
        "question_id": q.question_id,
        "prompt": q.prompt,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": meta,
    }


def run_questions(model, questions: Sequence[Question], out: Path, done: dict[tuple[str, float], int], *,
                  image_folder: Path, alpha: float | None, max_new_tokens: int, progress: bool = True) -> int:  # fmt: skip
    """Answer every (question, selector, budget) not yet in the answers files; returns how many were answered now."""
    from tqdm import tqdm

    budgets = list(done)  # (selector, budget) runs
    todo = sum(max(0, len(questions) - done[b]) for b in budgets)
    if todo == 0:
        return 0
    files = {(s, b): open(answers_path(out, b, s), "a", encoding="utf-8") for s, b in budgets}
    bar = tqdm(total=todo, unit="answer", desc="eval", file=sys.stderr, disable=not progress, smoothing=0.1,
               dynamic_ncols=True)  # fmt: skip
    count = 0
    try:
        for i, q in enumerate(questions):
            need = [b for b in budgets if i >= done[b]]
            if not need:
                continue
            path = image_folder / q.image
            try:
                image, image_error = read_image(path), None
            except QuestionError as err:
                image, image_error = None, str(err)
            for sel, b in need:
                bar.set_postfix_str(f"{sel} {format_budget(b)}, question {i + 1}/{len(questions)}", refresh=False)
                error = image_error
                chosen = {} if sel == "hired" else {"selector": sel}  # models that know only HiRED still work
                if sel == "random":  # reproducible draws: the question's index seeds them
                    chosen["seed"] = i
                if error is None:
                    try:
                        r = model.answer(image, q.prompt, budget=b, alpha=alpha, max_new_tokens=max_new_tokens,
                                         path=path, **chosen)  # fmt: skip
                    except QuestionError as err:
                        error = str(err)
                if error is None:
                    rec = answer_record(q, text=r.text, model_id=model.model_id, budget=b, alpha=r.alpha,
                                        kept=r.kept, ttft_ms=r.ttft_ms, selector=sel)  # fmt: skip
                else:
                    rec = answer_record(q, text="", model_id=model.model_id, budget=b, alpha=alpha, kept=None,
                                        ttft_ms=None, error=error, selector=sel)  # fmt: skip
                f = files[(sel, b)]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")  # one write per line: whole or cut, never mixed
                f.flush()
                count += 1
                bar.update(1)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    return count


def parse_budgets(text: str) -> tuple[float, ...]:
    """"1.0,0.5,0.2" -> (1.0, 0.5, 0.2): each a rate in (0, 1], no repeats (BudgetError otherwise)."""
    from runtime.errors import BudgetError

    out: list[float] = []
    for part in str(text).split(","):
        try:
            b = float(part)
        except ValueError:
            raise BudgetError(f"--budgets must be numbers in (0, 1] separated by commas, got {part.strip()!r}") from None
        if not 0 < b <= 1:  # also refuses nan
            raise BudgetError(f"--budgets: {part.strip()} is outside (0, 1]; a budget is the share of visual tokens kept")
        if b in out:
            raise BudgetError(f"--budgets: {part.strip()} is given twice")
        out.append(b)
    return tuple(out)


def parse_selectors(text: str) -> tuple[str, ...]:
    """"hired,cls" -> ("hired", "cls"): each one of hired.selectors.SELECTORS, no repeats (BudgetError otherwise)."""
    from hired.selectors import SELECTORS
    from runtime.errors import BudgetError

    out = tuple(part.strip() for part in str(text).split(","))
    for name in out:
        if name not in SELECTORS:
            raise BudgetError(f"--selectors: {name!r} is not a selector; the choices are {', '.join(SELECTORS)}")
    if len(set(out)) != len(out):
        raise BudgetError(f"--selectors: a selector is given twice in {text!r}")
    return out


def evaluate(model, questions: Sequence[Question], out: Path, *, budgets: Sequence[float], image_folder: Path,
             alpha: float | None = None, max_new_tokens: int = 128, progress: bool = True,
             readable: dict[str, Any] | None = None, selectors: Sequence[str] = ("hired",)) -> dict[str, Any]:  # fmt: skip
    """Answer the prepared `questions` with `model` at every (selector, budget) into `out` (resuming), then write
    and return the summary. The model is loaded only when something is left to answer."""
    from bench.eval.summary import summarize, write_summary

    config = run_config(model.identity(), questions, alpha=alpha, max_new_tokens=max_new_tokens, **(readable or {}))
    runs = plan_runs(budgets, tuple(selectors))
    done = open_out(out, config, questions, runs)
    run_questions(model, questions, out, done, image_folder=image_folder, alpha=alpha, max_new_tokens=max_new_tokens,
                  progress=progress)  # fmt: skip
    answers = {(s, b) if tuple(selectors) != ("hired",) else b: read_answers(answers_path(out, b, s)) for s, b in runs}
    s = summarize(questions, answers, model_id=model.model_id)
    write_summary(out, s)
    return s
