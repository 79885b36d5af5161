"""export/: LLaVA-NeXT checkpoint -> verified ONNX artifact bundle (torch, transformers, onnx live here only).

    python -m export --model checkpoints/tiny --out artifacts/tiny --force --verify
    from export import export_model, export_bundle, verify_bundle

The command line (`__main__.py`) and `export_model` choose the route: in memory, or streaming for random-weight
models too large for this machine's RAM.

    __main__.py   the command line (the only one): flags, exit codes, one-line errors
    defaults.py   opsets, dtypes per route, minimum onnxruntime, seed, memory limit (torch-free)
    pipeline.py   export_model (route choice, staging, interrupts) and the in-memory route (load, export, verify)
    vision.py     vision tower -> vision.onnx (feature-layer features + CLS-row scores of two blocks)
    projector.py  multimodal projector -> projector.onnx (kept tokens only)
    decoder.py    language model -> decoder.onnx (inputs_embeds + KV cache, last-position logits)
    quantize.py   the decoder's linear layers -> MatMulNBits (int8/int4)
    nearest_graph.py  the runtime's own similarity graphs (runtime/graphs/, VisionZip's grouping), committed
    bundle.py     the files beside the graphs (embed_tokens.npy, image_newline.npy, tokenizer.json) and the
                  manifest's numbers
    staging.py    a staging folder moved into place last; what --force may replace; leftovers of killed exports
    meta.py       the streaming route's model on the meta device, weight names and seeded values, data-less traces
    stream.py     the streaming route: weights written tensor by tensor into external data (per-tensor hook)
    watchdog.py   the streaming route's resident-memory limit
    check.py      structural check of a bundle without torch (the streaming route's --verify)
    verify.py     onnxruntime vs PyTorch on the same inputs (the in-memory route's --verify)
    reference.py  HiredReference: the PyTorch HiRED the tests and benchmarks compare against
    quiet.py      filters the library warnings nobody can act on during an export
    spec.py       fixed file and tensor names, layer arithmetic (torch-free)
    errors.py     ExportError (exit 2), VerificationError (exit 1), ExportInterrupted (exit 130)

Names are imported lazily so `python -m export --help` and `import export.errors` stay light.
"""

from __future__ import annotations

_LAZY = {
    "export_model": "export.pipeline",
    "export_bundle": "export.pipeline",
    "load_for_export": "export.pipeline",
    "BundleMeta": "export.pipeline",
    "export_streaming": "export.stream",
    "check_bundle": "export.check",
    "verify_bundle": "export.verify",
    "ExportError": "export.errors",
    "ExportInterrupted": "export.errors",
    "VerificationError": "export.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
