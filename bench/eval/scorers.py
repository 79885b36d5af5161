"""The scorers: one answer text against its key -> a score in [0, 1], as the field's evaluation scripts score it.

    from bench.eval.scorers import exact_score, vqa_score, choice_score, yesno_stats
    exact_score("Two.", "2")                               # 1.0: both normalise to "2"
    vqa_score("two", ["2"] * 3 + ["3"] * 7)                # 0.9: VQA soft accuracy, see vqa_score
    choice_score("(B) the square", "B", options)           # 1.0: letter extracted from the answer
    yesno_stats(["yes", "no"], ["yes", "yes"])             # POPE accuracy, precision, recall, F1, yes-ratio

- `normalize_answer` is VQAv2's official answer normalisation (the EvalAI answer processor that LLaVA's TextVQA
  evaluator `m4c_evaluator.py` uses): lower case, drop `,` and `?`, split `'s`, punctuation removed or turned into
  spaces, periods not followed by a digit removed, number words zero..ten -> digits, articles a/an/the removed,
  contractions without apostrophes restored ("dont" -> "don't").
- `exact`: normalised answer == normalised key.
- `vqa`: every key answer normalised; for each of the n human answers, min(#other humans who gave the model's
  answer / 3, 1), averaged over the n leave-one-out subsets (VQAv2's official evaluator and TextVQA's m4c evaluator
  do exactly this). With 10 answers of which k match: k = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.
  This is the "min(#humans that said it / 3, 1)" of the VQA paper, averaged so it is well defined over 10 humans.
- `choice`: the option letter pulled out of free text (`extract_choice`), compared with the key letter.
- `yesno`: LLaVA's POPE rule (`eval_pope.py`): keep the first sentence, drop commas; a reply with the word
  "No", "no" or "not" is no, anything else is yes. `yesno_stats` gives POPE's accuracy, precision, recall, F1 and
  yes-ratio ("yes" is the positive class; a 0/0 ratio counts as 0).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

METRICS = ("exact", "vqa", "choice", "yesno")

# ---- VQAv2 answer normalisation ---------------------------------------------------------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a period not followed by a digit)
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """VQAv2's answer normalisation: `"The Two Dogs!"` -> `"2 dogs"`, `"dont know."` -> `"don't know"`."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


# ---- the four scorers --------------------------------------------------------------------------------------
def exact_score(answer: str, key: str) -> float:
    """1.0 when the normalised answer equals the normalised key, else 0.0."""
    return float(normalize_answer(answer) == normalize_answer(key))


def vqa_score(answer: str, keys: Sequence[str]) -> float:
    """VQA soft accuracy of `answer` against the human answers `keys` (see the module docstring)."""
    if not keys:
        raise ValueError("vqa_score needs at least one key answer")
    pred = normalize_answer(answer)
    gts = [normalize_answer(k) for k in keys]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # leave human i out: the others who match are matches - 1 if i itself matched, else matches
    accs = [min(1.0, (matches - (g == pred)) / 3) for g in gts]
    return sum(accs) / len(accs)


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s*(\S.*?)\s*$")


def parse_options(question: str) -> dict[str, str]:
    """Lettered options listed in a question, one per line (`A. cat`, `B) dog`, `(C) bird`, `D: fish`).

    Returns {letter: option text} when the letters run A, B, C, ... with at least two options, else {}."""
    found: dict[str, str] = {}
    for line in str(question).splitlines():
        m = _OPTION_LINE.match(line)
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2)
    letters = sorted(found)
    if len(letters) < 2 or "".join(letters) != "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(letters)]:
        return {}
    return found


def extract_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer picks, or None.

    In order: a leading letter (`B`, `B.`, `(B)`, `B) square`); "answer is (B)" / "answer: B"; the answer equals
    one option's text (normalised); a single option letter standing alone as a word anywhere in the answer."""
    text = str(answer).strip()
    letters = set(options) if options else set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    m = re.match(r"^\(?([A-Z])(?:[.):,\s]|$)", text)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.search(r"answer(?: is|:)\s*\(?([A-Z])\b", text, flags=re.IGNORECASE)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    norm = normalize_answer(text)
    by_text = [k for k, v in options.items() if normalize_answer(v) == norm and norm]
    if len(by_text) == 1:
        return by_text[0]
    alone = {c for c in re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", text) if c in letters}
    if len(alone) == 1:
        return alone.pop()
    return None


def choice_score(answer: str, key: str, options: dict[str, str] | None = None) -> float:
    """1.0 when the letter extracted from `answer` is the key letter."""
    return float(extract_choice(answer, options or {}) == str(key).strip().upper())


def yesno_label(answer: str) -> str:
    """LLaVA's POPE reading of a reply: "no" when its first sentence has the word No/no/not, else "yes"."""
    text = str(answer)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def yesno_score(answer: str, label: str) -> float:
    """1.0 when the reply read as yes/no equals the label."""
    return float(yesno_label(answer) == str(label).strip().lower())


def yesno_stats(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's numbers over paired replies and yes/no labels: accuracy, precision, recall, f1, yes_ratio."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers but {len(labels)} labels")
    pred = [yesno_label(a) == "yes" for a in answers]
    gold = [str(x).strip().lower() == "yes" for x in labels]
    return yesno_counts_stats(
        tp=sum(p and g for p, g in zip(pred, gold)),
        fp=sum(p and not g for p, g in zip(pred, gold)),
        tn=sum(not p and not g for p, g in zip(pred, gold)),
        fn=sum(not p and g for p, g in zip(pred, gold)),
    )


def yesno_counts_stats(*, tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """POPE's numbers from the confusion counts ("yes" positive; x/0 = 0)."""

    def ratio(a: float, b: float) -> float:
        return a / b if b else 0.0

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": ratio(tp + tn, tp + fp + tn + fn),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": ratio(tp + fp, tp + fp + tn + fn),
    }
