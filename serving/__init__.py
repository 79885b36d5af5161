"""hired-edge serving: a Pipeline behind a network. Torch-free, like runtime/ (numpy, onnxruntime, tritonclient).

    python -m serving --artifacts artifacts/tiny                            # Triton server (PyTriton): model `hired`
    python -m serving.triton_repo --artifacts artifacts/tiny --out repo     # a model repository for NVIDIA's Triton

    from serving import RemotePipeline
    with RemotePipeline("127.0.0.1:8001") as p:
        r = p.generate("photo.jpg", "What is in this picture?", budget=0.2)   # same GenerationResult as Pipeline's

Modules: protocol (the wire protocol: tensors, request parsing, outcome encoding, errors; pure), remote
(RemotePipeline, the client), triton_server (the PyTriton server; `python -m serving`), venv (its numpy<2
environment), triton_repo (bundle -> Triton model repository) with triton_templates/.
`from serving import RemotePipeline` loads the client only, never the server.
"""

__all__ = ["RemotePipeline"]


def __getattr__(name):
    if (
        name == "RemotePipeline"
    ):  # lazy: `import serving` stays light (no tritonclient, no onnxruntime sessions)
        from serving.remote import RemotePipeline

        return RemotePipeline
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
