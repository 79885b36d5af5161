"""A Hugging Face Hub stand-in on 127.0.0.1 for the download tests: the endpoints snapshot_download calls.

    with FakeHub({"test/tiny": files}) as hub:          # files: {path: bytes}
        env = hub.env(tmp / "hf")                       # HF_ENDPOINT, HF_HOME, xet off, no token, online
        hub.cut["test/tiny"] = {"model-00001-of-00002.safetensors": 5000}   # the first GET of it stops there
        ... subprocess.run([...], env=env) ...
        hub.log                                         # [(method, repo, path, range header, authorization)]

Endpoints (what huggingface_hub 2.4 requests; older versions use the same ones):
  GET  /api/models/{repo}[/revision/{rev}] model info: id, sha, siblings
  GET  /api/models/{repo}/tree/{rev}       the file listing (path, size, oid, lfs) on one page
  HEAD /{repo}/resolve/{rev}/{path}        X-Repo-Commit, ETag (X-Linked-Etag/-Size for LFS files), Content-Length
  GET  /{repo}/resolve/{rev}/{path}        the bytes; honours `Range: bytes=N-` (206, Content-Range)
Unknown repos answer RepoNotFound (401 without a token, 404 with one, as the hub does); a repo in `gated` answers 401 GatedRepo without `Bearer <its token>`
and 403 GatedRepo with another one. `cut` drops the connection mid-file once; `fail` answers 500 for a file's
GETs while its count lasts. The server stops itself after `lifetime` seconds whatever the test does.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]], *, lifetime: float = 300.0):
        self.repos = repos
        self.sha = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.gated: dict[str, str] = {}  # repo -> the token that may read it
        self.cut: dict[str, dict[str, int]] = {}  # repo -> {path: bytes sent before the connection drops}
        self.fail: dict[str, dict[str, int]] = {}  # repo -> {path: GETs still answered 500}
        self.log: list[tuple[str, str, str, str | None, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._timer = threading.Timer(lifetime, self.server.shutdown)
        self._timer.daemon = True

    def __enter__(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def env(self, hf_home: Path, **extra: str) -> dict[str, str]:
        """The environment of a child process that downloads from this hub into `hf_home` (no token, online)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            env.pop(k, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_ETAG_TIMEOUT="5",
            HF_HUB_DOWNLOAD_TIMEOUT="5",
            NO_PROXY="127.0.0.1,localhost",
        )
        env.update(extra)
        return env

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of file `path` (None: the whole file), in order."""
        with self.lock:
            return [rng for method, _, p, rng, _ in self.log if method == "GET" and p == path]

    def tree(self, repo: str) -> list[dict]:
        out = []
        for path, data in sorted(self.repos[repo].items()):
            item = {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if path.endswith(".safetensors"):
                item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(item)
        return out

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj, head: bool = False) -> None:
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

            def _error(self, status: int, code: str, head: bool) -> None:
                self._send(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code}, head)

            def _serve(self, head: bool) -> None:
                parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
                api = parts[:2] == ["api", "models"]
                repo = "/".join(parts[2:4] if api else parts[0:2])
                rest = parts[4:] if api else parts[2:]
                file_path = "/".join(rest[2:]) if not api and rest[:1] == ["resolve"] else ""
                with hub.lock:
                    hub.log.append(("HEAD" if head else "GET", repo, file_path or "/".join(rest),
                                    self.headers.get("Range"), self.headers.get("Authorization")))  # fmt: skip
                if repo not in hub.repos:  # as the hub does: 401 to a request without a token, 404 with one
                    return self._error(401 if self.headers.get("Authorization") is None else 404, "RepoNotFound", head)
                if repo in hub.gated:
                    auth = self.headers.get("Authorization")
                    if auth != f"Bearer {hub.gated[repo]}":
                        return self._error(401 if auth is None else 403, "GatedRepo", head)
                sha = hub.sha[repo]
                files = hub.repos[repo]
                if api and (not rest or rest[:1] == ["revision"]):
                    siblings = [{"rfilename": p} for p in sorted(files)]
                    return self._json({"id": repo, "modelId": repo, "sha": sha, "siblings": siblings}, head)
                if api and rest[:1] == ["tree"]:
                    return self._json(hub.tree(repo), head)
                if not api and rest[:1] == ["resolve"] and file_path in files:
                    return self._file(repo, sha, file_path, files[file_path], head)
                return self._error(404, "EntryNotFound", head)

            def _file(self, repo: str, sha: str, path: str, data: bytes, head: bool) -> None:
                etag = hashlib.sha256(data).hexdigest() if path.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
                headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                if path.endswith(".safetensors"):
                    headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": len(data)})
                if head:
                    self.send_response(200)
                    for k, v in headers.items():
                        self.send_header(k, str(v))
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return
                with hub.lock:
                    failing = hub.fail.get(repo, {}).get(path, 0)
                    if failing:
                        hub.fail[repo][path] = failing - 1
                    cut_at = hub.cut.get(repo, {}).pop(path, None)
                if failing:
                    return self._send(500, b"temporary failure", {})
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes="):-1])
                body = data[start:]
                self.send_response(206 if start else 200)
                for k, v in headers.items():
                    self.send_header(k, str(v))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut_at is None:
                    self.wfile.write(body)
                    return
                self.wfile.write(body[:cut_at])  # then drop the connection mid-file
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)

        return Handler
