"""Structural check of a bundle without loading its weights into torch (the streaming route's --verify).

    from export.check import check_bundle
    lines = check_bundle("artifacts/llava-next-7b-random")   # raises ExportError on the first mismatch

onnx.checker on every graph (by path, so > 2 GB works), Manifest.from_file with the sha256 of every file, each
graph's input/output names, ranks, static sizes and element types against the manifest, and one crop through
vision.onnx + its kept tokens through projector.onnx in onnxruntime. A 7B model cannot be held by torch on a
24 GiB machine, so this stands in for export.verify there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.errors import ExportError
from export.quiet import stderr_log
from export.watchdog import rss_bytes
from runtime.manifest import Manifest


def expected_io(manifest: Manifest) -> dict[str, dict[str, tuple[list, str]]]:
    """graph -> tensor name -> (dims, element type) the runtime expects; str dims are dynamic (any name)."""
    v, t, g = manifest.vision, manifest.text, manifest.graphs
    weights = "float16" if manifest.model.dtype == "fp16" else "float"
    p = v.tokens_per_image
    io = {
        "vision": {
            g["vision"].inputs["pixel_values"]: (["n", 3, v.image_size, v.image_size], weights),
            g["vision"].outputs["features"]: (["n", p, v.hidden_size], weights),
            g["vision"].outputs["early_scores"]: (["n", p], "float"),
            g["vision"].outputs["late_scores"]: (["n", p], "float"),
        },
        "projector": {
            g["projector"].inputs["features"]: (["k", v.hidden_size], weights),
            g["projector"].outputs["projected"]: (["k", t.hidden_size], weights),
        },
        "decoder": {
            g["decoder"].inputs["inputs_embeds"]: (["b", "s", t.hidden_size], weights),
            g["decoder"].inputs["attention_mask"]: (["b", "total"], "int64"),
            g["decoder"].inputs["position_ids"]: (["b", "s"], "int64"),
            g["decoder"].outputs["logits"]: (["b", 1, t.vocab_size], "float"),
        },
    }
    kv = ["b", t.num_kv_heads, "p", t.head_dim]
    for i in range(t.num_layers):
        for key in ("past_key", "past_value"):
            io["decoder"][g["decoder"].inputs[key].format(i=i)] = (kv, weights)
        for key in ("present_key", "present_value"):
            io["decoder"][g["decoder"].outputs[key].format(i=i)] = (kv, weights)
    return io


def declared_io(path: Path) -> dict[str, tuple[list, str]]:
    """name -> (dims, element type name) of a graph's inputs and outputs; dynamic dims as their names."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    out = {}
    for vi in [*graph.input, *graph.output]:
        tt = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        out[vi.name] = (
            dims,
            onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name.replace("float32", "float"),
        )
    return out


def check_bundle(
    folder: str | os.PathLike, *, run_vision: bool = True, log: Callable[[str], None] | None = stderr_log
) -> list[str]:
    """Structural checks of a (large) bundle without loading its weights into torch; returns report lines.

    onnx.checker on every graph (by path, so > 2 GB works), Manifest.from_file with the sha256 of every file,
    each graph's input/output names, ranks, static sizes and element types against the manifest, and
    (run_vision) one crop through vision.onnx + its kept tokens through projector.onnx in onnxruntime.
    Raises ExportError on the first mismatch.
    """
    import onnx

    say = log or (lambda _msg: None)
    folder = Path(folder)
    lines: list[str] = []

    def note(line: str) -> None:
        lines.append(line)
        say(line)

    t0 = time.perf_counter()
    manifest = Manifest.from_file(folder)
    note(f"manifest: {len(manifest.files)} files, sha256 all match ({time.perf_counter() - t0:.1f} s)")
    for graph, wanted in expected_io(manifest).items():
        path = manifest.path(graph)
        t0 = time.perf_counter()
        onnx.checker.check_model(str(path))
        got = declared_io(path)
        for name, (dims, elem) in wanted.items():
            if name not in got:
                raise ExportError(f"{path.name} has no input/output {name!r}; re-export the bundle")
            gdims, gelem = got[name]
            same = len(gdims) == len(dims) and all(
                isinstance(w, str) and isinstance(h, str) or w == h for w, h in zip(dims, gdims, strict=True)
            )
            if not same or gelem != elem:
                raise ExportError(
                    f"{path.name}: {name} is {gdims} {gelem}, expected {dims} {elem}; re-export"
                )
        note(
            f"{path.name}: onnx.checker ok, {len(wanted)} inputs/outputs as the manifest says "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    if run_vision:
        import onnxruntime as ort

        v, g = manifest.vision, manifest.graphs
        np_dtype = np.float16 if manifest.model.dtype == "fp16" else np.float32
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(manifest.path("vision")), providers=["CPUExecutionProvider"])
        t1 = time.perf_counter()
        pixels = np.random.default_rng(0).standard_normal((1, 3, v.image_size, v.image_size)).astype(np_dtype)
        feats, early, late = session.run(
            [g["vision"].outputs[k] for k in ("features", "early_scores", "late_scores")],
            {g["vision"].inputs["pixel_values"]: pixels},
        )
        t2 = time.perf_counter()
        del session
        heads = v.heads
        for label, s in (("early", early), ("late", late)):
            if (
                s.shape != (1, v.tokens_per_image)
                or not np.isfinite(s).all()
                or s.min() < 0
                or s.sum() > heads
            ):
                raise ExportError(
                    f"vision.onnx {label} scores are not a CLS attention row ({s.shape}, sum {s.sum()})"
                )
        if feats.shape != (1, v.tokens_per_image, v.hidden_size) or not np.isfinite(feats).all():
            raise ExportError(f"vision.onnx features have shape {feats.shape} or non-finite values")
        projector = ort.InferenceSession(str(manifest.path("projector")), providers=["CPUExecutionProvider"])
        (projected,) = projector.run(
            [g["projector"].outputs["projected"]], {g["projector"].inputs["features"]: feats[0, :115]}
        )
        if projected.shape != (115, manifest.text.hidden_size) or not np.isfinite(projected).all():
            raise ExportError(f"projector.onnx gave shape {projected.shape} or non-finite values")
        note(
            f"onnxruntime CPU: vision.onnx loaded in {t1 - t0:.1f} s, 1 crop in {t2 - t1:.1f} s "
            f"(scores sum {early.sum():.3f} / {late.sum():.3f} of {heads} heads); projector on 115 tokens "
            f"-> {projected.shape}; peak RSS {rss_bytes() / 2**30:.2f} GiB"
        )
    return lines
