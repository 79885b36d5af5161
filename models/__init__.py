"""Model registry and checkpoint tools (export side: torch + transformers).

- `models.registry`: named models (`tiny`, `bench`, `llava-next-7b`, `llava-next-mistral-7b`,
  `llava-next-13b`), their configs (shipped as JSON in `models/configs/`), prompt templates,
  tokenizer kinds, CLIP preprocessing numbers (CLIP_MEAN, CLIP_STD) and `flops_split`.
- `models.build`: `python -m models.build tiny --out checkpoints/tiny` writes a seeded random-weight
  HF checkpoint folder with a real (offline) tokenizer.
- `models.load`: `resolve_checkpoint`, `load_model` (-> model, tokenizer, LoadInfo), `load_prompt`; never
  downloads.
- `models.download`: `python -m models.download <name>` / `ensure_checkpoint`: fetches a registry model's
  checkpoint from the Hugging Face Hub when no complete copy is on this machine.
- `models.tokenizer`: the offline Mistral sentencepiece stand-in tokenizer.

Importing `models` or `models.registry` does not import torch or transformers.
"""
