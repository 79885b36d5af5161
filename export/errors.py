"""Typed errors of the export side: one line each, saying what was wrong and what to do.

`ExportError` (exit code 2): bad input (unknown model, not LLaVA-NeXT, missing tokenizer, --out in the way).
`VerificationError` (exit code 1): the exported graphs disagree with PyTorch past tolerance.
`ExportInterrupted` (exit code 130, a KeyboardInterrupt): stopped by Ctrl-C or SIGTERM; says what is on disk.
"""

from __future__ import annotations


class ExportError(Exception):
    """The export cannot start or finish because of its input; nothing was written."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class VerificationError(Exception):
    """An exported graph's outputs differ from PyTorch's beyond the tolerance."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ExportInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the export; the message says what is on disk now (exit code 130)."""

    exit_code = 130

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
