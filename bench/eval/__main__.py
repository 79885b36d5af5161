"""`python -m bench.eval`: a question file at several budgets -> LLaVA answer files + what each budget costs.

    python -m bench.eval --artifacts artifacts/tiny --questions bench/eval/sample/questions.jsonl \\
        --budgets 1.0,0.5,0.2,0.1 --max-new-tokens 16 --out out/eval

Prints summary.md at the end; exit status 2 with one line on bad input (nothing is run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.eval.data import (
    ANSWER_STYLES,
    EvalError,
    attach_keys,
    prepare,
    read_answer_keys,
    read_questions,
    subset,
)
from bench.eval.scorers import METRICS

EPILOG = """\
Input: LLaVA's question jsonl (question_id, image relative to --image-folder, text, optional category), keys in
the same line (answer; answers: list, VQA-style; label: yes/no, POPE-style) or in --answers (jsonl by question_id,
POPE label files, TextVQA/VQAv2 annotation json).
Output in --out: answers-<budget>.jsonl (LLaVA's answer format; metadata: budget, alpha, visual_tokens_kept,
ttft_ms; with --selectors, answers-<selector>-<budget>.jsonl for selectors other than hired, and the summary has
one row per (selector, budget); budget 1.0 is the stock model for all and runs once), summary.json, summary.md, summary.png, run.json. A killed run resumes with the same command; an --out
holding another run's answers (other model, alpha, max tokens, questions or prompts) is refused.
Metrics: exact (VQAv2-normalised match), vqa (VQAv2 soft accuracy over the answers list), choice (option letter),
yesno (POPE: accuracy, precision, recall, F1, yes-ratio); auto picks per question from its key: answers -> vqa,
label -> yesno, one letter with lettered options in the question -> choice, else exact.
TTFT = preprocess + vision + select + projector + prefill. Decoding is greedy.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.eval",
        description="Accuracy against budget: run a question file at several HiRED budgets, score each, report "
        "score, loyalty to budget 1.0 and TTFT per budget.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifacts", type=Path, help="bundle folder (python -m export ...) run locally")
    src.add_argument("--endpoint", help="OpenAI-compatible base URL of a served model, e.g. http://127.0.0.1:8080/v1")
    p.add_argument("--model", default=None, help="with --endpoint: the model name to ask for (default: the first "
                   "listed); an API key is read from $HIRED_API_KEY or $OPENAI_API_KEY")  # fmt: skip
    p.add_argument("--questions", type=Path, required=True, help="LLaVA question jsonl")
    p.add_argument("--image-folder", type=Path, default=None, help="folder the images are relative to "
                   "(default: the questions file's folder)")  # fmt: skip
    p.add_argument("--answers", type=Path, default=None, help="answer keys: jsonl by question_id, POPE label file, "
                   "TextVQA/VQAv2 annotation json")  # fmt: skip
    p.add_argument("--budgets", default="1.0,0.5,0.2,0.1", help="rates in (0, 1], comma-separated (default %(default)s)")
    p.add_argument("--selectors", default="hired", help="token selectors to compare, comma-separated, from hired, "
                   "cls, uniform, random, visionzip (default %(default)s); each gets its answer files and summary rows")  # fmt: skip
    p.add_argument("--alpha", type=float, default=None, help="base image's share of the budget (default: the bundle's)")
    p.add_argument("--metric", choices=("auto", *METRICS), default="auto", help="scorer (default auto, per question)")
    p.add_argument("--answer-style", choices=(*ANSWER_STYLES, "free"), default="as-is",
                   help="as-is (default; 'free' is the same): send the question text as written; short: append "
                   "LLaVA's single-word (or option-letter) instruction when absent")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="answer a seeded random subset of N questions")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit subset (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="per answer (default 128, as LLaVA's eval)")
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu", help="with --artifacts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, required=True, help="output folder (resumed when it holds this run's answers)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.errors import HiredError

    try:
        return _run(args)
    except (EvalError, HiredError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. --out not writable
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the answers written so far stay in {args.out}; the same command resumes", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from bench.eval.models import EndpointModel, LocalModel
    from bench.eval.run import evaluate, parse_budgets, parse_selectors

    budgets = parse_budgets(args.budgets)
    selectors = parse_selectors(args.selectors)
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        raise EvalError(f"--alpha must be in [0, 1], got {args.alpha}")
    style = "as-is" if args.answer_style == "free" else args.answer_style
    questions = read_questions(args.questions)
    if args.answers is not None:
        questions = attach_keys(questions, read_answer_keys(args.answers))
    questions = prepare(subset(questions, args.limit, args.seed), metric=args.metric, answer_style=style)
    image_folder = args.image_folder if args.image_folder is not None else args.questions.parent
    if not any((image_folder / q.image).is_file() for q in questions):
        raise EvalError(
            f"none of the {len(questions)} images exists under {image_folder} (e.g. {questions[0].image}); "
            "pass --image-folder (default: the questions file's folder)"
        )
    if args.endpoint:
        model = EndpointModel(args.endpoint, model=args.model)
    else:
        model = LocalModel(args.artifacts, provider=args.provider)
    readable = {
        "questions_file": str(args.questions),
        "answers_file": None if args.answers is None else str(args.answers),
        "answer_style": style,
        "metric": args.metric,
        "limit": args.limit,
        "seed": args.seed,
        "temperature": 0.0,
    }
    try:
        s = evaluate(model, questions, args.out, budgets=budgets, image_folder=image_folder, alpha=args.alpha,
                     max_new_tokens=args.max_new_tokens, progress=not args.no_progress, readable=readable,
                     selectors=selectors)  # fmt: skip
    finally:
        model.close()
    from bench.eval.summary import summary_markdown

    print(summary_markdown(s), end="")
    print(f"answers and summary.json/.md/.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
