"""Fetching the media a request names, under one set of rules for every caller.

A ``video_url`` / ``image_url`` may be

* ``file://PATH``: only inside a directory named by ``--allowed-local-media-path``
  (none by default). The path is resolved (``..`` and every symlink followed) before
  the check, so a link inside an allowed folder that points outside it is refused.
* ``data:video/...;base64,...`` (``data:image/...`` for images): decoded in memory,
  within the size limit.
* ``http(s)://HOST/...``: only when ``--allowed-media-domains`` names HOST (off by
  default), redirects included, with a download timeout and the size limit.

Anything else is a 400 naming the URL scheme. A refusal never says whether a file
outside the allowed folders exists. Each fetch yields the content's sha256, the key
of the server's feature cache, before any decoding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import APIError, bad_request

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_SUFFIXES = {"mp4": ".mp4", "webm": ".webm", "quicktime": ".mov", "x-matroska": ".mkv", "x-msvideo": ".avi",
             "gif": ".gif", "png": ".png", "jpeg": ".jpg", "jpg": ".jpg", "webp": ".webp", "bmp": ".bmp"}


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from, and how much of it."""

    allowed_local_paths: tuple[Path, ...] = ()  # resolved directories; file:// only inside these
    allowed_domains: tuple[str, ...] = ()  # exact host names for http(s) URLs (lower case)
    max_bytes: int = 100 * 1024 * 1024  # per media item, whatever its source
    timeout_s: float = 30.0  # whole http(s) download

    @classmethod
    def create(cls, allowed_local_paths=(), allowed_domains=(), max_bytes: int = 100 * 1024 * 1024,
               timeout_s: float = 30.0) -> "MediaPolicy":
        """Resolves and checks the folders (ValueError naming a missing one) and normalises the hosts."""
        folders = []
        for folder in allowed_local_paths:
            path = Path(folder).expanduser()
            if not path.is_dir():
                raise ValueError(f"allowed local media path {folder} is not a directory")
            folders.append(path.resolve())
        hosts = tuple(h.strip().lower() for h in allowed_domains if h.strip())
        if max_bytes <= 0 or timeout_s <= 0:
            raise ValueError("media size limit and timeout must be positive")
        return cls(tuple(folders), hosts, int(max_bytes), float(timeout_s))


@dataclass
class FetchedMedia:
    """One fetched media item: its content hash, and a local file to decode (written on demand)."""

    sha256: str
    size: int
    source: str  # "file", "data" or "http"
    fetch_ms: float
    suffix: str = ""
    _path: str | None = None
    _data: bytes | None = field(default=None, repr=False)
    _temporary: bool = False

    def local_path(self, tmp_dir: str | None = None) -> str:
        """A file holding the content (the original for file://, a temporary copy otherwise)."""
        if self._path is None:
            handle, path = tempfile.mkstemp(prefix="mugstan-media-", suffix=self.suffix, dir=tmp_dir)
            with os.fdopen(handle, "wb") as out:
                out.write(self._data)
            self._path, self._temporary, self._data = path, True, None
        return self._path

    def close(self) -> None:
        """Removes a temporary copy; the original of a file:// URL is never touched."""
        if self._temporary and self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path, self._temporary = None, False
        self._data = None


def describe_url(url: str, limit: int = 80) -> str:
    """A short, log-safe rendering of a URL (data URLs carry megabytes)."""
    if url.startswith("data:"):
        return url[: min(len(url), url.find(",") + 1 if "," in url else 40)][:limit] + "..."
    return url if len(url) <= limit else url[: limit - 3] + "..."


class MediaFetcher:
    """Fetches ``file://``, ``data:`` and ``http(s)://`` URLs under a :class:`MediaPolicy`.

    ``param`` in errors names the message part, e.g. ``messages[0].content[1].video_url``.
    """

    def __init__(self, policy: MediaPolicy):
        self.policy = policy

    def fetch(self, url: str, kind: str = "video", param: str | None = None) -> FetchedMedia:
        """Returns the fetched media or raises :class:`APIError` (400) saying why not."""
        started = time.perf_counter()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "file":
            media = self._fetch_file(url, param)
        elif scheme == "data":
            media = self._fetch_data(url, kind, param)
        elif scheme in ("http", "https"):
            media = self._fetch_http(url, param)
        else:
            shown = f"'{scheme}'" if scheme else "none"
            raise bad_request(f"unsupported {kind} URL scheme {shown} in {describe_url(url)}: use file:// (inside "
                              f"--allowed-local-media-path), data:{kind}/...;base64, or http(s):// (hosts in "
                              "--allowed-media-domains)", param, "unsupported_url_scheme")
        media.fetch_ms = (time.perf_counter() - started) * 1000
        return media

    # ------------------------------------------------------------------ file://

    def _fetch_file(self, url: str, param: str | None) -> FetchedMedia:
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"file URL {describe_url(url)} names host {parsed.netloc!r}: only local files", param,
                              "invalid_media_url")
        raw = urllib.parse.unquote(parsed.path)
        if not self.policy.allowed_local_paths:
            raise APIError(400, "file:// URLs are disabled on this server (start it with --allowed-local-media-path "
                           "DIR)", param=param, code="local_media_not_allowed")
        if not os.path.isabs(raw) or "\x00" in raw:
            raise bad_request(f"file URL {describe_url(url)} must name an absolute path", param, "invalid_media_url")
        resolved = Path(raw).resolve()  # follows every symlink and '..' before the check
        if not any(resolved.is_relative_to(root) for root in self.policy.allowed_local_paths):
            raise APIError(400, f"{describe_url(url)} is outside the allowed local media paths", param=param,
                           code="local_media_not_allowed")
        if not resolved.is_file():
            raise bad_request(f"{describe_url(url)}: no such file", param, "media_not_found")
        try:
            with open(resolved, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                self._check_size(size, url, param)
                digest = hashlib.sha256()
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
        except OSError as error:
            raise bad_request(f"{describe_url(url)}: cannot read ({error.strerror or error})", param,
                              "media_not_found") from error
        return FetchedMedia(digest.hexdigest(), size, "file", 0.0, resolved.suffix, _path=str(resolved))

    # ------------------------------------------------------------------ data:

    def _fetch_data(self, url: str, kind: str, param: str | None) -> FetchedMedia:
        header, comma, payload = url[5:].partition(",")
        parts = [p.strip().lower() for p in header.split(";")]
        mime = parts[0]
        if not comma or "base64" not in parts[1:]:
            raise bad_request(f"data URL {describe_url(url)} must be data:{kind}/TYPE;base64,...", param,
                              "invalid_media_url")
        if not mime.startswith(f"{kind}/"):
            raise bad_request(f"data URL media type {mime or 'none'!r} is not a {kind} type ({kind}/...)", param,
                              "invalid_media_url")
        decoded_size = len(payload) * 3 // 4 - payload[-2:].count("=")
        self._check_size(decoded_size, describe_url(url), param)  # before decoding anything
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise bad_request(f"data URL {describe_url(url)} is not valid base64 ({error})", param,
                              "invalid_media_url") from error
        self._check_size(len(data), describe_url(url), param)
        suffix = _SUFFIXES.get(mime.split("/", 1)[1], "")
        return FetchedMedia(hashlib.sha256(data).hexdigest(), len(data), "data", 0.0, suffix, _data=data)

    # ------------------------------------------------------------------ http(s)://

    def _check_host(self, url: str, param: str | None) -> None:
        host = (urllib.parse.urlparse(url).hostname or "").lower()
        if host not in self.policy.allowed_domains:
            raise APIError(400, f"host {host or '(none)'!r} of {describe_url(url)} is not in the allowed media domains"
                           + ("" if self.policy.allowed_domains else " (http(s) media is off: "
                              "start the server with --allowed-media-domains HOST)"),
                           param=param, code="media_domain_not_allowed")

    def _fetch_http(self, url: str, param: str | None) -> FetchedMedia:
        self._check_host(url, param)
        fetcher = self

        class CheckedRedirects(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                fetcher._check_host(newurl, param)  # a redirect may not leave the allowed hosts
                return super().redirect_request(req, fp, code, msg, headers, newurl)

        opener = urllib.request.build_opener(CheckedRedirects)
        deadline = time.monotonic() + self.policy.timeout_s
        digest, chunks, size = hashlib.sha256(), [], 0
        try:
            with opener.open(urllib.request.Request(url, headers={"User-Agent": "mugstan-chat"}),
                             timeout=self.policy.timeout_s) as response:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit():
                    self._check_size(int(declared), url, param)
                while chunk := response.read(_CHUNK):
                    size += len(chunk)
                    self._check_size(size, url, param)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"download took longer than {self.policy.timeout_s:g} s")
                    digest.update(chunk)
                    chunks.append(chunk)
                content_type = response.headers.get_content_subtype() or ""
        except APIError:
            raise
        except urllib.error.HTTPError as error:
            raise bad_request(f"downloading {describe_url(url)} failed: HTTP {error.code}", param,
                              "media_download_failed") from error
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            raise bad_request(f"downloading {describe_url(url)} failed: {reason}", param,
                              "media_download_failed") from error
        suffix = Path(urllib.parse.urlparse(url).path).suffix or _SUFFIXES.get(content_type, "")
        return FetchedMedia(digest.hexdigest(), size, "http", 0.0, suffix, _data=b"".join(chunks))

    # ------------------------------------------------------------------ limits

    def _check_size(self, size: int, what: str, param: str | None) -> None:
        if size > self.policy.max_bytes:
            limit = self.policy.max_bytes
            shown = f"{limit / 2**20:g} MiB" if limit >= 2**20 else f"{limit} bytes"
            raise bad_request(f"{describe_url(what)} is larger than the media size limit ({shown})", param,
                              "media_too_large")


def open_image(path: str, max_width: int, max_height: int, what: str, param: str | None = None):
    """Opens an image as RGB, refusing (400) non-images and images over the size limits before decoding."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.width > max_width or image.height > max_height:
                raise bad_request(f"{what}: image {image.width}x{image.height} exceeds the limit "
                                  f"{max_width}x{max_height}", param, "media_too_large")
            return image.convert("RGB")
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise bad_request(f"{what}: not a readable image ({type(error).__name__})", param,
                          "invalid_image") from error
