"""The runtime's typed errors: one base class, one line each, saying what was wrong and what to do."""

from __future__ import annotations


class HiredError(Exception):
    """Base class of every error the runtime raises on purpose."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: callers print str(err) as is.
        super().__init__(" ".join(str(message).split()))


class BundleError(HiredError):
    """The artifact bundle is missing, unreadable, tampered with or of an unknown version."""


class ImageError(HiredError):
    """The image could not be read, is empty, too large, or of an unsupported shape/dtype."""


class PromptError(HiredError):
    """The prompt is empty, too long, or contains the image placeholder."""


class BudgetError(HiredError):
    """A HiRED option (rate, alpha, distribution, newlines) is out of range."""


class GenerationError(HiredError):
    """Bad generation options (max_new_tokens, temperature, top_p) or a failed graph run."""


class PipelineClosedError(HiredError):
    """The Pipeline was closed: a new request after `close()`, or a stream or request that `close()` ended."""


class OutputError(HiredError):
    """A file or folder a command was asked to write (--dump, --show-kept) cannot be written there."""


class ProviderError(HiredError):
    """An unknown execution provider was requested."""


class RemoteError(HiredError):
    """The serving endpoint could not be reached or answered something unexpected."""


__all__ = [
    "HiredError",
    "BundleError",
    "ImageError",
    "PromptError",
    "BudgetError",
    "GenerationError",
    "PipelineClosedError",
    "OutputError",
    "ProviderError",
    "RemoteError",
]
