"""Which target token each remaining token joins (VisionZip's contextual grouping), on onnxruntime's MLAS.

    nearest = NearestTarget(threads=None)        # one per Pipeline; graphs load on first use, per feature dtype
    labels = nearest(features, rows, targets)    # features [n, N, D] fp32|fp16; per image rows [R_i], targets [G_i]

The contract is hired.selectors.nearest_target's (the numpy default), with the same answers, faster: numpy's BLAS
spends ~2.5 ms of a 1000x1000 request on these skinny products ([576, 1024] x [1024, G] per image, G ~ 12-45).
Images are batched: consecutive images whose target counts need the same number of COLUMN_BLOCK-wide column
blocks share one run of the graph (runtime/graphs/nearest_<dtype>.onnx, built by export/nearest_graph.py; a
shorter target list is padded by repeating its first target, which never wins a tie). Without onnxruntime (a
process whose graphs run elsewhere) or for another feature dtype the numpy default answers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hired.selectors import nearest_target

log = logging.getLogger("hired_edge")

GRAPH_DIR = Path(__file__).with_name("graphs")
INPUTS = ("features", "targets")  # the graphs' input names
OUTPUT = "labels"
DTYPES = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}  # features dtype -> graph
COLUMN_BLOCK = 16  # MLAS's SGEMM kernels compute 16 columns at a time: 12 targets cost what 16 do


def graph_path(dtype: str) -> Path:
    """runtime/graphs/nearest_<dtype>.onnx ("fp32" or "fp16")."""
    return GRAPH_DIR / f"nearest_{dtype}.onnx"


def batches(counts: Sequence[int]) -> list[tuple[int, int]]:
    """[(start, stop)]: runs of consecutive images with targets (counts[i] > 0) and the same number of
    COLUMN_BLOCK-wide blocks, each one run of the graph."""
    out: list[tuple[int, int]] = []
    blocks = [-(-g // COLUMN_BLOCK) for g in counts]
    for i, b in enumerate(blocks):
        if not b:
            continue
        if out and out[-1][1] == i and blocks[out[-1][0]] == b:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class NearestTarget:
    """hired.selectors.nearest_target on onnxruntime: (features [n, N, D], rows: n int64 arrays, targets: n int64
    arrays) -> n int64 arrays, for each of image i's rows the index into targets[i] of its most cosine-similar
    target (ties to the lower index); no labels for an image without targets.

    threads: onnxruntime intra-op threads (None: one per physical core, as the Pipeline's graphs). They spin
    between the graph's steps as the Pipeline's sessions do (onnxruntime's default: measured 10-17% faster here
    than sleeping, whose wake-ups cost more than these small steps). Thread-safe."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    def _session(self, dtype: str):
        """The loaded graph for `dtype`, or None where onnxruntime or the graph file is missing (warned once)."""
        with self._lock:
            if dtype not in self._sessions:
                self._sessions[dtype] = self._load(dtype)
            return self._sessions[dtype]

    def _load(self, dtype: str):
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        path = graph_path(dtype)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or 0
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # a broken install: the numpy default still gives the same groups
            log.warning("%s cannot be loaded (%s); VisionZip groups on numpy instead (slower); reinstall hired-edge",
                        path, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)  # fmt: skip
            return None

    def __call__(
        self, features: np.ndarray, rows: Sequence[np.ndarray], targets: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        dtype = DTYPES.get(features.dtype)
        session = self._session(dtype) if dtype else None
        if session is None:
            return nearest_target(features, rows, targets)
        out = [np.empty(0, dtype=np.int64)] * len(targets)
        counts = [len(t) for t in targets]
        for start, stop in batches(counts):
            ids = np.empty((stop - start, max(counts[start:stop])), dtype=np.int64)
            for k, image_targets in enumerate(targets[start:stop]):
                ids[k, : len(image_targets)] = image_targets
                ids[k, len(image_targets) :] = image_targets[0]  # equal to column 0: never the first maximum
            feeds = dict(zip(INPUTS, (np.ascontiguousarray(features[start:stop]), ids)))
            (labels,) = session.run([OUTPUT], feeds)  # [B, N]
            for k in range(stop - start):
                out[start + k] = labels[k][rows[start + k]]
        return out
