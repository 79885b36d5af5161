"""export/: LLaVA-NeXT checkpoint -> verified ONNX artifact bundle (torch, transformers, onnx live here only).

    python -m export --model checkpoints/tiny --out artifacts/tiny --force --verify
    from export import export_model, export_bundle, verify_bundle

Modules: vision.py (vision tower + CLS-row scores), projector.py, decoder.py (KV-cache LLM), bundle.py
(staging, files, manifest numbers), pipeline.py (the stages), verify.py (ORT vs PyTorch), errors.py.
Names are imported lazily so `python -m export --help` and `import export.errors` stay light.
"""

from __future__ import annotations

_LAZY = {
    "export_model": "export.pipeline",
    "export_bundle": "export.pipeline",
    "load_for_export": "export.pipeline",
    "BundleMeta": "export.pipeline",
    "verify_bundle": "export.verify",
    "ExportError": "export.errors",
    "VerificationError": "export.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
