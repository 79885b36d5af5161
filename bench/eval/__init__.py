"""bench.eval: accuracy against budget. A question file at several HiRED budgets -> LLaVA answer files + summary.

    python -m bench.eval --artifacts artifacts/tiny --questions bench/eval/sample/questions.jsonl \\
        --budgets 1.0,0.5,0.2,0.1 --max-new-tokens 16 --out out/eval

Modules, one job each: `data` (question and answer-key files, metric and prompt per question), `scorers` (exact,
VQA soft accuracy, option letter, POPE yes/no), `models` (local bundle or OpenAI-compatible endpoint), `run`
(answers files, run.json, resume), `summary` (summary.json/.md/.png), `__main__` (the CLI).
`sample/` holds the shipped synthetic sample set; `sample/make_sample.py` draws it.
"""
