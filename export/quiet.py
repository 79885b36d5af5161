"""Keep an export's stderr to its own progress lines: drop the library chatter a user cannot act on.

    with quiet_export():
        ... torch.onnx.export(...), from_pretrained(...) ...
    stderr_log("vision.onnx: 4.6 MiB in 8.4 s")      # one progress line: "[export] vision.onnx: ..."

Dropped, for the block's duration only, and only these known messages (every other warning still shows):
  - torch.onnx's "torchvision is not installed. Skipping torchvision::nms" (and roi_align, ...), four per graph:
    the exporter's registry looks for torchvision's ops, which these graphs never use. (Installing torchvision
    would switch transformers' image processors to another backend and change preprocessing parity.)
  - torch's FutureWarning "`isinstance(treespec, LeafSpec)` is deprecated", raised inside torch.export itself.
  - torch.onnx's UserWarning "The axis name: X will not be used, since it shares the same shape constraints
    with another axis": the decoder's past keys and values share their dynamic axes by design.
  - transformers' "Loading weights" progress bar (the export prints its own "loaded ..." line).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

TORCHVISION_LOGGER = "torch.onnx._internal.exporter._registration"
TORCHVISION_MESSAGE = "torchvision is not installed"
QUIET_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"(# )?The axis name: .* will not be used, since it shares the same shape constraints"),
)


def stderr_log(msg: str) -> None:
    """The export's own progress line, on stderr."""
    print(f"[export] {msg}", file=sys.stderr, flush=True)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Within this block the known, harmless library messages listed above are not printed."""
    drop = _DropMessages(TORCHVISION_MESSAGE)
    logger = logging.getLogger(TORCHVISION_LOGGER)
    logger.addFilter(drop)
    bar_was_on = _progress_bar(False)
    try:
        with warnings.catch_warnings():
            for category, message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        logger.removeFilter(drop)
        if bar_was_on:
            _progress_bar(True)


def _progress_bar(on: bool) -> bool:
    """Turn transformers' progress bars on or off; returns whether they were on (False without transformers)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return False
    was_on = hf_logging.is_progress_bar_enabled()
    if on:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    return was_on
