"""hired-edge runtime: numpy + onnxruntime + tokenizers + pillow only (never torch or transformers)."""

from runtime.errors import (
    BudgetError,
    BundleError,
    GenerationError,
    HiredError,
    ImageError,
    PromptError,
    ProviderError,
    RemoteError,
)

__all__ = [
    "HiredError",
    "BundleError",
    "ImageError",
    "PromptError",
    "BudgetError",
    "GenerationError",
    "ProviderError",
    "RemoteError",
]
