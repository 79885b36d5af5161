"""hired-edge runtime: numpy + onnxruntime + tokenizers + pillow only (never torch or transformers).

    from runtime import Pipeline
    r = Pipeline.load("artifacts/tiny").generate("photo.jpg", "What is this?", budget=0.2)
"""

from runtime.errors import (
    BudgetError,
    BundleError,
    GenerationError,
    HiredError,
    ImageError,
    PipelineClosedError,
    PromptError,
    ProviderError,
    RemoteError,
)

__all__ = [
    "Pipeline",
    "GenerationResult",
    "HiredError",
    "BundleError",
    "ImageError",
    "PromptError",
    "BudgetError",
    "GenerationError",
    "PipelineClosedError",
    "ProviderError",
    "RemoteError",
]


def __getattr__(name):
    # Lazy, so `import runtime.manifest` (used by export/) does not load onnxruntime sessions code.
    if name in ("Pipeline", "GenerationResult"):
        from runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
