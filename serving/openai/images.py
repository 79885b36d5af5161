"""Image URLs of chat messages -> image bytes, under the server's policy.

    policy = ImagePolicy(allow_files="/data/images", allow_url_fetch=False)
    data = policy.fetch("data:image/png;base64,iVBOR...")          # bytes for Pipeline.generate, or APIError 400

- `data:image/...;base64,...`: always.
- `file:///path`: only with `--allow-files DIR`, and only for regular files whose real path is inside DIR.
- `http(s)://`: only with `--allow-url-fetch`; then public addresses only (loopback, private, link-local and other
  reserved addresses are refused, checked on the address actually connected to), no redirects, at most
  `max_bytes` bytes within `timeout_s` seconds: the server must not become a way to reach other hosts.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from serving.openai.schema import APIError, bad_request

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ImagePolicy:
    allow_files: Path | None = None  # file:// URLs are read only under this folder (None: refused)
    allow_url_fetch: bool = False  # http(s):// URLs are fetched (None: refused)
    max_bytes: int = DEFAULT_MAX_BYTES  # per image, decoded
    timeout_s: float = DEFAULT_TIMEOUT_S  # whole fetch of one http(s) image
    allow_private_hosts: bool = False  # tests only: fetch from loopback

    def fetch(self, url: str, param: str = "messages") -> bytes:
        """The bytes of the image at `url`, or a 400 APIError saying why not."""
        scheme = url.partition(":")[0].lower()
        if scheme == "data":
            return self._data(url, param)
        if scheme == "file":
            return self._file(url, param)
        if scheme in ("http", "https"):
            return self._http(url, param)
        raise bad_request(
            f"image URL scheme {scheme!r} is not supported; send a data:image/...;base64 URL", param=param
        )

    def _too_big(self, n: int | str, param: str) -> APIError:
        return bad_request(
            f"the image is {n} bytes, over this server's {self.max_bytes}-byte limit", param=param
        )

    def _data(self, url: str, param: str) -> bytes:
        header, comma, payload = url.partition(",")
        media, *attrs = header[len("data:") :].split(";")
        if not comma or "base64" not in attrs:
            raise bad_request("a data URL must look like data:image/png;base64,<base64 bytes>", param=param)
        if media and not media.lower().startswith("image/") and media.lower() != "application/octet-stream":
            raise bad_request(f"the data URL's media type is {media!r}; send an image/* one", param=param)
        if len(payload) > 4 * (self.max_bytes // 3 + 2):  # surely over: do not decode it
            raise self._too_big(f"about {len(payload) * 3 // 4}", param)
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("the data URL's payload is not valid base64", param=param) from None
        if len(data) > self.max_bytes:
            raise self._too_big(len(data), param)
        return data

    def _file(self, url: str, param: str) -> bytes:
        if self.allow_files is None:
            raise bad_request(
                "file:// image URLs are disabled; send a data: URL or start the server with --allow-files DIR",
                param=param,
            )
        parts = urllib.parse.urlparse(url)
        if parts.netloc not in ("", "localhost"):
            raise bad_request(f"file URL host {parts.netloc!r} is not this machine", param=param)
        root = os.path.realpath(self.allow_files)
        path = os.path.realpath(urllib.parse.unquote(parts.path))
        if os.path.commonpath([root, path]) != root:
            raise bad_request(
                f"{url} is outside the folder this server may read (--allow-files)", param=param
            )
        try:
            if not os.path.isfile(path):
                raise bad_request(f"{url} is not a file", param=param)
            size = os.path.getsize(path)
            if size > self.max_bytes:
                raise self._too_big(size, param)
            with open(path, "rb") as f:
                return f.read(self.max_bytes + 1)
        except OSError as e:
            raise bad_request(f"{url} cannot be read ({e.strerror})", param=param) from None

    def _http(self, url: str, param: str) -> bytes:
        if not self.allow_url_fetch:
            raise bad_request(
                "http(s) image URLs are not fetched by this server; send the image as a data:image/...;base64 URL "
                "(or start the server with --allow-url-fetch)",
                param=param,
            )
        parts = urllib.parse.urlsplit(url)
        host, https = parts.hostname, parts.scheme.lower() == "https"
        try:
            port = parts.port or (443 if https else 80)
        except ValueError:
            raise bad_request(f"the image URL {url!r} has a bad port", param=param) from None
        if not host:
            raise bad_request(f"the image URL {url!r} has no host", param=param)
        deadline = time.monotonic() + self.timeout_s
        ip = self._public_address(host, port, param)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = _PinnedConnection(host, ip, port, https=https, timeout=self.timeout_s)
        try:
            conn.request("GET", path, headers={"Accept": "image/*", "User-Agent": "hired-edge"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise bad_request(
                    f"fetching the image URL gave HTTP {resp.status} (redirects are not followed)", param
                )
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > self.max_bytes:
                raise self._too_big(int(length), param)
            chunks, total = [], 0
            while chunk := resp.read(64 * 1024):
                total += len(chunk)
                if total > self.max_bytes:
                    raise self._too_big(f"over {self.max_bytes}", param)
                if time.monotonic() > deadline:
                    raise bad_request(f"fetching the image URL took over {self.timeout_s:g} s", param=param)
                chunks.append(chunk)
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            raise bad_request(
                f"the image URL could not be fetched ({type(e).__name__}: {e})", param=param
            ) from None
        finally:
            conn.close()

    def _public_address(self, host: str, port: int, param: str) -> str:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise bad_request(f"the image URL's host {host!r} does not resolve ({e})", param=param) from None
        for info in infos:
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            if self.allow_private_hosts or ip.is_global:
                return str(ip)
        raise bad_request(
            f"the image URL's host {host!r} is not a public address; this server fetches from public hosts only",
            param=param,
        )


class _PinnedConnection(http.client.HTTPSConnection):
    """HTTP(S) to `host` on the already-checked address `ip` (no second DNS lookup; TLS still checks `host`)."""

    def __init__(self, host: str, ip: str, port: int, *, https: bool, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip, self._https = ip, https

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host) if self._https else sock
