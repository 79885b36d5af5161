"""Model registry and checkpoint tools (export side: torch + transformers).

- `models.registry`: named models (`tiny`, `bench`, `llava-next-7b`, `llava-next-mistral-7b`,
  `llava-next-13b`), their configs (shipped as JSON in `models/configs/`), prompt templates,
  tokenizer kinds, and `flops_split`.
- `models.build`: `python -m models.build tiny --out checkpoints/tiny` writes a seeded random-weight
  HF checkpoint folder with a real (offline) tokenizer.
- `models.load`: `resolve_checkpoint`, `load_model`, `load_prompt`; never downloads.

Importing `models` or `models.registry` does not import torch or transformers.
"""
