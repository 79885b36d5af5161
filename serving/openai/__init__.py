"""The OpenAI-compatible front door: `python -m serving.openai --artifacts DIR` serves `/v1/chat/completions`.

Modules: `schema` (the request, OpenAI's neutral fields, the `hired` object), `images` (image URL policy),
`backend` (local Pipeline or Triton gateway, one request's run), `slots` (admission), `metrics` (Prometheus),
`app` (the FastAPI app), `__main__` (the command line).
"""
