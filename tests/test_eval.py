"""bench.eval: scorers on hand-computed cases, the input readers and their refusals, resume, and a tiny run.

The tiny runs use the shipped sample set with a few questions and tokens (tiny's answers are noise; what is
checked is the plumbing: LLaVA fields, budget 1.0 == Pipeline.generate, loyalty 100% at 1.0, resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.eval.data import (
    CHOICE_SUFFIX,
    SHORT_SUFFIX,
    InputError,
    Question,
    attach_keys,
    prepare,
    read_answer_keys,
    read_questions,
    subset,
)
from bench.eval.models import LocalModel, Reply
from bench.eval.run import OutDirError, answers_path, evaluate, parse_budgets, read_answers
from bench.eval.scorers import (
    exact_score,
    extract_choice,
    normalize_answer,
    parse_options,
    vqa_score,
    yesno_label,
    yesno_stats,
)
from bench.eval.summary import bootstrap_ci, summarize
from runtime.errors import BudgetError

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "bench" / "eval" / "sample"
LLAVA_FIELDS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
META_FIELDS = {"budget", "alpha", "visual_tokens_kept", "ttft_ms", "image"}
SUMMARY_FIELDS = ["budget", "n", "errors", "score", "ci95", "relative_to_full", "loyalty", "ttft_ms_median",
                  "ttft_ms_p90", "kept_mean"]  # fmt: skip


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- scorers: hand-computed values ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Two Dogs!", "2 dogs"),  # article, number word, punctuation
        ("dont know.", "don't know"),  # contraction restored, final period stripped
        ("3.5", "3.5"),  # a period before a digit stays
        ("Yes.", "yes"),
        ("an apple", "apple"),
        ("red/blue", "red blue"),  # '/' with no space around becomes a space
        ("hello, world", "hello world"),
        ("the man's hat", "man 's hat"),
        ("  Ten\tcats\n", "10 cats"),
    ],
)
def test_normalize_answer_follows_vqav2(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_score_averages_leave_one_out(k, expected):
    # k humans said "two" (normalised "2"), the others "cat": matched humans see k-1 others, the rest see k.
    # k=3: (3 * min(2/3, 1) + 7 * min(3/3, 1)) / 10 = 0.9
    keys = ["2"] * k + ["cat"] * (10 - k)
    assert vqa_score("Two.", keys) == pytest.approx(expected)


def test_vqa_score_single_answer_is_exact_match():
    assert vqa_score("Red", ["red"]) == 1.0
    assert vqa_score("reddish", ["red"]) == 0.0


@pytest.mark.parametrize(
    "answer, key, expected",
    [("Two.", "2", 1.0), ("Red.", "red", 1.0), ("reddish", "red", 0.0), ("a cat", "the cat", 1.0), ("", "cat", 0.0)],
)
def test_exact_score_on_normalised_strings(answer, key, expected):
    assert exact_score(answer, key) == expected


OPTIONS_Q = "Which shape is shown?\nA. circle\nB. square\nC. triangle\nD. star"


@pytest.mark.parametrize(
    "answer, letter",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C) triangle", "C"),
        ("The answer is D.", "D"),
        ("circle", "A"),  # the text of one option
        ("I think A", "A"),  # one option letter standing alone ("I" is no option)
        ("banana", None),
        ("A or B", "A"),  # a leading letter wins
        ("either A or B", None),  # two letters standing alone: no pick
    ],
)
def test_extract_choice(answer, letter):
    assert extract_choice(answer, parse_options(OPTIONS_Q)) == letter


def test_parse_options_needs_consecutive_letters():
    assert parse_options(OPTIONS_Q) == {"A": "circle", "B": "square", "C": "triangle", "D": "star"}
    assert parse_options("Is it?\n(A) yes\n(B) no") == {"A": "yes", "B": "no"}
    assert parse_options("What is this?\nB. only b\nC. and c") == {}
    assert parse_options("A. lonely") == {}


@pytest.mark.parametrize(
    "answer, label",
    [("Yes, there is a cat.", "yes"), ("No, there is not.", "no"), ("There is not a dog", "no"),
     ("Nope", "yes"), ("yes. No doubt", "yes"), ("no", "no")],  # fmt: skip
)
def test_yesno_label_follows_llava_pope(answer, label):
    assert yesno_label(answer) == label


def test_pope_stats_by_hand():
    # pred: yes yes yes no | yes no no ; gold: yes yes yes yes | no no yes  -> TP 3, FN 2, FP 1, TN 1
    answers = ["Yes", "yes", "Yes.", "No", "yes", "No.", "no"]
    labels = ["yes", "yes", "yes", "yes", "no", "no", "yes"]
    s = yesno_stats(answers, labels)
    assert s["accuracy"] == pytest.approx(4 / 7)
    assert s["precision"] == pytest.approx(3 / 4)
    assert s["recall"] == pytest.approx(3 / 5)
    assert s["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)  # 0.6667
    assert s["yes_ratio"] == pytest.approx(4 / 7)


def test_bootstrap_ci_brackets_the_mean_and_collapses_on_constant_scores():
    lo, hi = bootstrap_ci([0, 1] * 20)
    assert lo < 0.5 < hi and 0.25 < lo and hi < 0.75
    assert bootstrap_ci([1.0] * 5) == [1.0, 1.0]
    assert bootstrap_ci([]) is None


# ---- hand-made answer files -> summary ------------------------------------------------------------------------
def _answer_line(qid, prompt, text, budget, *, kept=100, ttft=10.0, error=None):
    meta = {"budget": budget, "alpha": 0.5, "visual_tokens_kept": kept, "ttft_ms": ttft, "image": "x.png"}
    if error:
        meta["error"] = error
    return {"question_id": qid, "prompt": prompt, "text": text, "answer_id": "a", "model_id": "m", "metadata": meta}


def test_summary_of_hand_made_answer_files(tmp_path):
    ten = ["2"] * 3 + ["3"] * 7
    qs = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "x.png", "text": "How many?", "answers": ten},  # "3": 7 match -> 1.0
        {"question_id": 2, "image": "x.png", "text": "How many?", "answers": ten},  # "two": 3 match -> 0.9
        {"question_id": 3, "image": "x.png", "text": "How many?", "answers": ten},  # "5": 0
        {"question_id": 4, "image": "x.png", "text": "How many?", "answers": ten},  # error: not scored
    ])  # fmt: skip
    questions = prepare(read_questions(qs))
    full = [_answer_line(1, "How many?", "3", 1.0, ttft=100, kept=1000),
            _answer_line(2, "How many?", "two", 1.0, ttft=120, kept=1000),
            _answer_line(3, "How many?", "5", 1.0, ttft=140, kept=1000),
            _answer_line(4, "How many?", "", 1.0, error="image not found")]  # fmt: skip
    low = [_answer_line(1, "How many?", "3", 0.2, ttft=10, kept=200),
           _answer_line(2, "How many?", "7", 0.2, ttft=20, kept=220),
           _answer_line(3, "How many?", "5", 0.2, ttft=30, kept=240),
           _answer_line(4, "How many?", "", 0.2, error="image not found")]  # fmt: skip
    s = summarize(questions, {1.0: full, 0.2: low}, model_id="m")
    assert s["metric"] == "vqa" and s["model_id"] == "m"
    b1, b2 = s["budgets"]
    assert list(b1) == SUMMARY_FIELDS
    assert (b1["budget"], b1["n"], b1["errors"]) == (1.0, 3, 1)
    assert b1["score"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert b2["score"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert b1["relative_to_full"] == 1.0 and b1["loyalty"] == 1.0
    assert b2["relative_to_full"] == pytest.approx(1.0 / 1.9)
    assert b2["loyalty"] == pytest.approx(2 / 3)  # "3" and "5" identical, "7" vs "two" not
    assert b1["ttft_ms_median"] == 120 and b1["ttft_ms_p90"] == pytest.approx(136)  # 120 + 0.8 * 20
    assert b2["kept_mean"] == pytest.approx(220)
    lo, hi = b1["ci95"]
    assert 0 <= lo <= b1["score"] <= hi <= 1


def test_summary_mixed_metrics_reports_each_and_pope(tmp_path):
    qs = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": "a", "image": "x.png", "text": "Colour?", "answer": "red"},
        {"question_id": "b", "image": "x.png", "text": f"{OPTIONS_Q}", "answer": "C"},
        {"question_id": "c", "image": "x.png", "text": "Is there a cat?", "label": "yes"},
        {"question_id": "d", "image": "x.png", "text": "Is there a dog?", "label": "no"},
    ])  # fmt: skip
    questions = prepare(read_questions(qs))
    assert [q.metric for q in questions] == ["exact", "choice", "yesno", "yesno"]
    lines = [_answer_line("a", "Colour?", "Red.", 1.0), _answer_line("b", OPTIONS_Q, "(C)", 1.0),
             _answer_line("c", "Is there a cat?", "Yes", 1.0), _answer_line("d", "Is there a dog?", "Yes", 1.0)]  # fmt: skip
    s = summarize(questions, {1.0: lines}, model_id="m")
    b = s["budgets"][0]
    assert s["metric"] == "mixed" and b["score"] == pytest.approx(3 / 4)
    assert b["by_metric"] == {"choice": {"n": 1, "score": 1.0}, "exact": {"n": 1, "score": 1.0},
                              "yesno": {"n": 2, "score": 0.5}}  # fmt: skip
    assert b["pope"] == pytest.approx({"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0})


# ---- input files ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line, what",
    [
        ('{"question_id": 1, "image": "x.png", "text": "Q?", "answer": "a"', "not valid JSON"),
        ('[1, 2]', "expected a JSON object"),
        ('{"image": "x.png", "text": "Q?", "answer": "a"}', "no 'question_id'"),
        ('{"question_id": 1, "text": "Q?", "answer": "a"}', "'image' must be a non-empty string, got nothing"),
        ('{"question_id": 1, "image": "x.png", "text": "", "answer": "a"}', "'text' must be a non-empty string"),
        ('{"question_id": 1, "image": "x.png", "text": "Q?", "label": "maybe"}', "'label' must be 'yes' or 'no'"),
        ('{"question_id": 1, "image": "x.png", "text": "Q?", "answers": []}', "'answers' must be a non-empty list"),
    ],
)
def test_malformed_question_line_names_file_and_line(tmp_path, line, what):
    good = '{"question_id": 0, "image": "x.png", "text": "Q?", "answer": "a"}'
    path = tmp_path / "questions.jsonl"
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="questions.jsonl line 3: ") as e:
        read_questions(path)
    assert what in str(e.value) and "\n" not in str(e.value)


def test_question_without_key_is_refused_before_running(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "image": "x.png", "text": "Q?"}])
    with pytest.raises(InputError, match=r"q.jsonl line 1: question_id 7 has no answer key"):
        prepare(read_questions(path))


def test_answer_keys_from_pope_label_file_and_textvqa_json(tmp_path):
    qs = read_questions(write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "a.png", "text": "Is there a cat?"},
        {"question_id": "img9", "image": "b.png", "text": "what does the sign say?\nReference OCR token: STOP"},
        {"question_id": 3, "image": "c.png", "text": "what brand?"},
    ]))  # fmt: skip
    # POPE label files are jsonl even though they are named .json
    pope = write_jsonl(tmp_path / "coco_pope_random.json", [{"question_id": 1, "text": "...", "label": "yes"}])
    textvqa = tmp_path / "TextVQA_val.json"
    textvqa.write_text(json.dumps({"data": [
        {"question_id": 3, "image_id": "c", "question": "what brand?", "answers": ["sony"] * 10},
        {"question_id": 55, "image_id": "img9", "question": "What does the sign say?", "answers": ["stop"] * 10},
    ]}))  # fmt: skip
    qs = attach_keys(attach_keys(qs, read_answer_keys(pope)), read_answer_keys(textvqa))
    assert qs[0].label == "yes"
    assert qs[1].answers == ("stop",) * 10  # LLaVA's TextVQA file uses the image id as question_id
    assert qs[2].answers == ("sony",) * 10
    assert [q.metric for q in prepare(qs)] == ["yesno", "vqa", "vqa"]


def test_bad_answers_file_names_the_record(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"data": [{"question_id": 1, "answers": ["a"]}, {"question_id": 2}]}))
    with pytest.raises(InputError, match=r"ann.json record 2: no answer key"):
        read_answer_keys(path)


def test_answer_style_short_appends_llava_suffixes_once():
    plain = Question(1, "x.png", "What colour?", answer="red", where="q")
    choice = Question(2, "x.png", OPTIONS_Q, answer="B", where="q")
    already = Question(3, "x.png", f"What colour?\n{SHORT_SUFFIX}", answer="red", where="q")
    marker = Question(4, "x.png", "<image>\nWhat colour?", answer="red", where="q")
    short = prepare([plain, choice, already, marker], answer_style="short")
    assert short[0].prompt == f"What colour?\n{SHORT_SUFFIX}"
    assert short[1].prompt == f"{OPTIONS_Q}\n{CHOICE_SUFFIX}" and short[1].metric == "choice"
    assert short[2].prompt == already.text
    assert short[3].prompt == f"What colour?\n{SHORT_SUFFIX}"  # the template places the image, not the text
    asis = prepare([plain, choice], answer_style="as-is")
    assert [q.prompt for q in asis] == [plain.text, OPTIONS_Q]
    with pytest.raises(InputError, match="--metric choice needs a one-letter"):
        prepare([plain], metric="choice")


def test_seeded_subset_is_stable_and_in_file_order():
    qs = read_questions(SAMPLE / "questions.jsonl")
    a, b = subset(qs, 5, 3), subset(qs, 5, 3)
    assert [q.question_id for q in a] == [q.question_id for q in b]
    assert [q.question_id for q in a] == sorted(q.question_id for q in a)
    assert [q.question_id for q in subset(qs, 5, 4)] != [q.question_id for q in a]


@pytest.mark.parametrize("text", ["1.0,0", "1.5", "0.2,-0.1", "nan", "1.0,abc", "0.5,0.5"])
def test_budgets_outside_range_are_refused(text):
    with pytest.raises(BudgetError) as e:
        parse_budgets(text)
    assert "\n" not in str(e.value)


def test_cli_bad_input_is_one_line_and_runs_nothing(tmp_path):
    bad = tmp_path / "questions.jsonl"
    bad.write_text('{"question_id": 1, "image": "x.png", "text": "Q?", "answer": "a"}\n{"question_id": 2,\n')
    for args, what in [
        (["--questions", str(bad), "--budgets", "1.0,0.2"], "questions.jsonl line 2: not valid JSON"),
        (["--questions", str(SAMPLE / "questions.jsonl"), "--budgets", "1.0,1.2"], "1.2 is outside (0, 1]"),
    ]:
        out = tmp_path / "out"
        r = subprocess.run([sys.executable, "-m", "bench.eval", "--artifacts", str(tmp_path / "no-bundle"),
                            *args, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and what in r.stderr, r.stderr
        assert not out.exists()


# ---- runs with a fake model: errors, refusals, resume ------------------------------------------------------------
class FakeModel:
    """Answers `prompt@budget` instantly; raises KeyboardInterrupt (a kill) after `stop_after` answers."""

    def __init__(self, model_id="fake", stop_after=None):
        self.model_id, self.stop_after, self.calls = model_id, stop_after, []

    def identity(self):
        return {"kind": "fake", "model_id": self.model_id}

    def answer(self, image, prompt, *, budget, alpha, max_new_tokens, path=None):
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt
        self.calls.append((prompt, budget))
        return Reply(f"{prompt}@{budget}", 100, 1.0, 0.5)

    def close(self):
        pass


def _sample(n=None):
    qs = prepare(read_questions(SAMPLE / "questions.jsonl"))
    return qs if n is None else qs[:n]


def _run(model, out, qs, budgets=(1.0, 0.2), **kw):
    return evaluate(model, qs, out, budgets=budgets, image_folder=SAMPLE / "images", max_new_tokens=4,
                    progress=False, **kw)  # fmt: skip


def test_interrupted_run_resumes_without_repeating_or_losing(tmp_path):
    qs, out = _sample(6), tmp_path / "out"
    first = FakeModel(stop_after=7)  # question 4's budget 1.0 answered, its 0.2 not
    with pytest.raises(KeyboardInterrupt):
        _run(first, out, qs)
    kept = {b: read_answers(answers_path(out, b)) for b in (1.0, 0.2)}
    assert (len(kept[1.0]), len(kept[0.2])) == (4, 3)
    # a kill in the middle of a write leaves a cut line: it is dropped and that question asked again
    with open(answers_path(out, 0.2), "a") as f:
        f.write('{"question_id": 4, "prompt": "How ma')
    second = FakeModel()
    s = _run(second, out, qs)
    assert second.calls == [(qs[3].prompt, 0.2)] + [(q.prompt, b) for q in qs[4:] for b in (1.0, 0.2)]
    for b in (1.0, 0.2):
        lines = read_answers(answers_path(out, b))
        assert [r["question_id"] for r in lines] == [q.question_id for q in qs]
        assert [r["text"] for r in lines] == [f"{q.prompt}@{b}" for q in qs]
        assert [r["answer_id"] for r in lines[: len(kept[b])]] == [r["answer_id"] for r in kept[b]]
    assert [b["n"] for b in s["budgets"]] == [6, 6]
    third = FakeModel()
    _run(third, out, qs)  # all done: nothing is asked again, the summary is rewritten
    assert third.calls == []


def test_out_folder_of_another_run_is_refused(tmp_path):
    qs, out = _sample(2), tmp_path / "out"
    _run(FakeModel("one"), out, qs)
    with pytest.raises(OutDirError, match=r"another run \(model 'one' \(fake\) vs 'two' \(fake\)\)"):
        _run(FakeModel("two"), out, qs)
    with pytest.raises(OutDirError, match="alpha None vs 0.3"):
        _run(FakeModel("one"), out, qs, alpha=0.3)
    with pytest.raises(OutDirError, match="other questions, prompts or subset"):
        _run(FakeModel("one"), out, _sample(3))
    with pytest.raises(OutDirError, match="other questions, prompts or subset"):
        _run(FakeModel("one"), out, prepare(read_questions(SAMPLE / "questions.jsonl"), answer_style="short")[:2])
    _run(FakeModel("one"), out, qs, budgets=(1.0, 0.5))  # another budget: same run, one more file
    assert len(read_answers(answers_path(out, 0.5))) == 2
    alien = tmp_path / "alien"
    alien.mkdir()
    (alien / "answers-1.0.jsonl").write_text('{"question_id": 1, "text": "?"}\n')
    with pytest.raises(OutDirError, match="no run.json"):
        _run(FakeModel("one"), alien, qs)
    # a run.json without any answer (a start that failed before answering) is no reason to refuse
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "run.json").write_text(json.dumps({"model": {"kind": "bundle", "model_id": "other"}}))
    _run(FakeModel("one"), failed, qs)
    assert json.loads((failed / "run.json").read_text())["model"]["model_id"] == "one"


def test_missing_and_unreadable_images_are_recorded_and_counted_apart(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "ok.png").write_bytes((SAMPLE / "images" / "shape-red-circle.png").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    qs = prepare(read_questions(write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "image": "ok.png", "text": "Colour?", "answer": "Colour?@1.0"},
        {"question_id": 2, "image": "gone.png", "text": "Colour?", "answer": "red"},
        {"question_id": 3, "image": "broken.png", "text": "Colour?", "answer": "red"},
    ])))  # fmt: skip
    model = FakeModel()
    s = evaluate(model, qs, tmp_path / "out", budgets=(1.0,), image_folder=folder, max_new_tokens=4, progress=False)
    lines = read_answers(answers_path(tmp_path / "out", 1.0))
    assert "error" not in lines[0]["metadata"]
    assert lines[1]["metadata"]["error"].startswith("image not found: ") and lines[1]["text"] == ""
    assert lines[2]["metadata"]["error"].startswith("ImageError: ")
    assert len(model.calls) == 1
    b = s["budgets"][0]
    assert (b["n"], b["errors"], b["score"]) == (1, 2, 1.0)


# ---- tiny, the real runtime -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(request) -> Path:
    """The tiny bundle: HIRED_TINY_BUNDLE as is (conftest's tiny_bundle would build the checkpoint first)."""
    reuse = os.environ.get("HIRED_TINY_BUNDLE")
    return Path(reuse) if reuse else request.getfixturevalue("tiny_bundle")


@pytest.fixture(scope="module")
def tiny_run(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    qs = prepare(subset(read_questions(SAMPLE / "questions.jsonl"), 3, 0), answer_style="short")
    model = LocalModel(bundle)
    try:
        s = evaluate(model, qs, out, budgets=(1.0, 0.2), image_folder=SAMPLE / "images", max_new_tokens=3,
                     progress=False)  # fmt: skip
    finally:
        model.close()
    return qs, out, s


def test_tiny_answer_lines_have_llava_fields(tiny_run):
    qs, out, _ = tiny_run
    for b in (1.0, 0.2):
        lines = read_answers(answers_path(out, b))
        assert [r["question_id"] for r in lines] == [q.question_id for q in qs]
        for r, q in zip(lines, qs):
            assert set(r) == LLAVA_FIELDS and META_FIELDS <= set(r["metadata"])
            assert r["prompt"] == q.prompt and "<image>" not in r["prompt"] and r["model_id"] == "tiny"
            meta = r["metadata"]
            assert meta["budget"] == b and isinstance(meta["budget"], float) and meta["alpha"] == 0.5
            assert meta["visual_tokens_kept"] > 0 and meta["ttft_ms"] > 0 and "error" not in meta
        assert len({r["answer_id"] for r in lines}) == len(lines)


def test_tiny_full_budget_answers_equal_pipeline_generate(tiny_run, bundle):
    from runtime import Pipeline

    qs, out, _ = tiny_run
    lines = read_answers(answers_path(out, 1.0))
    with Pipeline.load(bundle) as p:
        for r, q in zip(lines, qs):
            ref = p.generate(SAMPLE / "images" / q.image, q.prompt, budget=1.0, max_new_tokens=3, temperature=0.0)
            assert r["text"] == ref.text
            assert r["metadata"]["visual_tokens_kept"] == ref.visual_tokens["kept"]


def test_tiny_summary_loyalty_full_budget_is_total(tiny_run):
    _, out, s = tiny_run
    assert json.loads((out / "summary.json").read_text()) == s
    full, low = s["budgets"]
    assert [b["budget"] for b in s["budgets"]] == [1.0, 0.2]
    assert list(full)[: len(SUMMARY_FIELDS)] == SUMMARY_FIELDS
    assert full["loyalty"] == 1.0 and (full["n"], full["errors"]) == (3, 0)
    assert full["relative_to_full"] in (1.0, None)  # None only if tiny scored 0 at full budget
    assert low["kept_mean"] < full["kept_mean"]
    assert 0 <= low["loyalty"] <= 1
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1.0 | 3 | 0 |" in (out / "summary.md").read_text()


def test_tiny_cli_killed_run_resumes(bundle, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.eval", "--artifacts", str(bundle), "--questions",
           str(SAMPLE / "questions.jsonl"), "--image-folder", str(SAMPLE / "images"), "--budgets", "1.0",
           "--limit", "2", "--seed", "1", "--max-new-tokens", "2", "--no-progress", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers = out / "answers-1.0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if answers.exists() and answers.read_bytes().count(b"\n") >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    before = read_answers(answers)
    assert 1 <= len(before) <= 2
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    after = read_answers(answers)
    expected = [q.question_id for q in subset(read_questions(SAMPLE / "questions.jsonl"), 2, 1)]
    assert [a["question_id"] for a in after] == expected
    assert [a["answer_id"] for a in after[: len(before)]] == [a["answer_id"] for a in before]
    assert json.loads((out / "summary.json").read_text())["budgets"][0]["n"] == 2


def test_tiny_endpoint_answers_equal_the_local_run(tiny_run, bundle, tmp_path):
    """--endpoint against `python -m serving.openai` on the same bundle: the same greedy answers and kept tokens."""
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    import httpx

    from tests.serving_helpers import free_ports

    qs, local_out, _ = tiny_run
    (port,) = free_ports(1)
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "serving.openai", "--artifacts", str(bundle), "--port", str(port),
                               "--log-level", "warning"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        out = tmp_path / "out"
        r = subprocess.run([sys.executable, "-m", "bench.eval", "--endpoint", f"{url}/v1", "--questions",
                            str(SAMPLE / "questions.jsonl"), "--image-folder", str(SAMPLE / "images"), "--budgets",
                            "1.0,0.2", "--limit", "3", "--seed", "0", "--answer-style", "short", "--max-new-tokens",
                            "3", "--no-progress", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr + (tmp_path / "server.log").read_text()
        for b in (1.0, 0.2):
            served, local = read_answers(answers_path(out, b)), read_answers(answers_path(local_out, b))
            assert [a["prompt"] for a in served] == [q.prompt for q in qs]
            assert [a["text"] for a in served] == [a["text"] for a in local]
            for a, x in zip(served, local):
                assert set(a) == LLAVA_FIELDS and a["model_id"] == "tiny"
                for k in ("budget", "alpha", "visual_tokens_kept"):
                    assert a["metadata"][k] == x["metadata"][k]
                assert a["metadata"]["ttft_ms"] > 0
        assert json.loads((out / "run.json").read_text())["model"]["kind"] == "endpoint"
    finally:
        server.terminate()
        server.wait(60)
        log.close()


# ---- several selectors in one run --------------------------------------------------------------------------------
class SelectorModel(FakeModel):
    """FakeModel that also takes a selector (and the random selector's seed)."""

    def answer(self, image, prompt, *, budget, alpha, max_new_tokens, path=None, selector="hired", seed=None):
        self.calls.append((prompt, budget, selector, seed))
        return Reply(f"{prompt}@{budget}" if selector != "cls" else "other", 100, 1.0, 0.5)


def test_selectors_get_their_answer_files_and_summary_rows_and_full_runs_once(tmp_path):
    from bench.eval.run import parse_selectors

    qs, out = _sample(3), tmp_path / "out"
    model = SelectorModel()
    s = _run(model, out, qs, budgets=(1.0, 0.2), selectors=("hired", "cls", "random"))
    assert [(b["selector"], b["budget"]) for b in s["budgets"]] == [("hired", 1.0), ("hired", 0.2), ("cls", 0.2),
                                                                     ("random", 0.2)]  # fmt: skip
    assert sum(1 for c in model.calls if c[1] == 1.0) == 3  # budget 1.0 (the stock model) once per question
    assert {c[3] for c in model.calls if c[2] == "random"} == {0, 1, 2}  # seeded by the question's index
    for selector, name in (("hired", "answers-0.2.jsonl"), ("cls", "answers-cls-0.2.jsonl")):
        lines = read_answers(out / name)
        assert len(lines) == 3 and lines[0]["metadata"].get("selector", "hired") == selector
    cls_row = s["budgets"][2]
    assert cls_row["loyalty"] == 0.0 and s["budgets"][1]["loyalty"] == 0.0  # "@0.2" differs from "@1.0"
    md = (out / "summary.md").read_text()
    assert "| selector budget |" in md and "| cls 0.2 |" in md
    again = SelectorModel()
    _run(again, out, qs, budgets=(1.0, 0.2), selectors=("hired", "cls", "random"))
    assert again.calls == []  # resumed: nothing left
    with pytest.raises(BudgetError, match="'best' is not a selector; the choices are hired, cls, uniform"):
        parse_selectors("hired,best")


def test_tiny_sample_set_runs_every_selector(bundle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.eval", "--artifacts", str(bundle), "--questions",
                        str(SAMPLE / "questions.jsonl"), "--image-folder", str(SAMPLE / "images"), "--budgets",
                        "1.0,0.2", "--selectors", "hired,cls,uniform,random,visionzip", "--limit", "2",
                        "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {(b["selector"], b["budget"]): b for b in s["budgets"]}
    assert set(rows) == {("hired", 1.0)} | {(n, 0.2) for n in ("hired", "cls", "uniform", "random", "visionzip")}
    kept = {k: b["kept_mean"] for k, b in rows.items() if k[1] == 0.2}
    assert len(set(kept.values())) == 1  # every selector keeps HiRED's count
