"""Where the server may fetch media from (mugstan_chat/entrypoints/openai/media.py): no model, no network
(http(s) is exercised against a local http.server on 127.0.0.1)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from mugstan_chat.entrypoints.openai.media import MediaFetcher, MediaPolicy, open_image
from mugstan_chat.entrypoints.openai.protocol import APIError

ROOT = Path(__file__).resolve().parents[3]
VIDEO = ROOT / "examples" / "red_triangle_growing.mp4"


@pytest.fixture()
def folders(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    (allowed / "clip.mp4").write_bytes(VIDEO.read_bytes())
    (outside / "secret.mp4").write_bytes(b"secret bytes")
    (allowed / "link_out.mp4").symlink_to(outside / "secret.mp4")
    (allowed / "link_dir").symlink_to(outside, target_is_directory=True)
    (allowed / "link_in.mp4").symlink_to(allowed / "clip.mp4")
    return allowed, outside


def _refused(fetcher, url, code, kind="video") -> APIError:
    with pytest.raises(APIError) as caught:
        fetcher.fetch(url, kind, "messages[0].content[0].video_url")
    error = caught.value
    assert error.status == 400 and error.code == code and error.param == "messages[0].content[0].video_url", error
    return error


def test_file_urls_only_inside_the_allowed_folders(folders):
    allowed, outside = folders
    fetcher = MediaFetcher(MediaPolicy.create([allowed]))
    media = fetcher.fetch(f"file://{allowed}/clip.mp4")
    assert media.sha256 == hashlib.sha256(VIDEO.read_bytes()).hexdigest() and media.size == VIDEO.stat().st_size
    assert media.local_path() == str((allowed / "clip.mp4").resolve())
    media.close()
    assert (allowed / "clip.mp4").exists()  # the original is never removed
    assert fetcher.fetch(f"file://{allowed}/link_in.mp4").sha256 == media.sha256  # a link inside stays inside
    assert fetcher.fetch(f"file://localhost{allowed}/clip%2Emp4").sha256 == media.sha256  # percent-decoded
    escapes = (f"file://{outside}/secret.mp4", f"file://{allowed}/link_out.mp4",
               f"file://{allowed}/link_dir/secret.mp4", f"file://{allowed}/../outside/secret.mp4",
               "file:///etc/passwd")
    for url in escapes:
        error = _refused(fetcher, url, "local_media_not_allowed")
        assert "secret bytes" not in error.message
    # outside the folders, a missing file and an existing one get the same answer
    assert _refused(fetcher, f"file://{outside}/nope.mp4", "local_media_not_allowed").message.endswith(
        "is outside the allowed local media paths")
    _refused(fetcher, f"file://{allowed}/nope.mp4", "media_not_found")
    _refused(fetcher, f"file://otherhost{allowed}/clip.mp4", "invalid_media_url")
    _refused(MediaFetcher(MediaPolicy.create([])), f"file://{allowed}/clip.mp4", "local_media_not_allowed")
    tiny = MediaFetcher(MediaPolicy.create([allowed], max_bytes=100))
    _refused(tiny, f"file://{allowed}/clip.mp4", "media_too_large")


def test_policy_checks_its_folders(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        MediaPolicy.create([tmp_path / "missing"])
    assert MediaPolicy.create([tmp_path / "." / ""]).allowed_local_paths == (tmp_path.resolve(),)


def test_data_urls(tmp_path):
    data = VIDEO.read_bytes()
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    fetcher = MediaFetcher(MediaPolicy.create(max_bytes=len(data)))
    media = fetcher.fetch(url)
    assert media.sha256 == hashlib.sha256(data).hexdigest() and media.source == "data"
    path = Path(media.local_path(str(tmp_path)))
    assert path.read_bytes() == data and path.suffix == ".mp4"
    media.close()
    assert not path.exists()  # the temporary copy is removed
    _refused(fetcher, "data:image/png;base64," + base64.b64encode(data).decode(), "invalid_media_url")  # not video/
    _refused(fetcher, "data:video/mp4," + "abc", "invalid_media_url")  # not base64
    _refused(fetcher, "data:video/mp4;base64,@@@@", "invalid_media_url")
    small = MediaFetcher(MediaPolicy.create(max_bytes=len(data) - 1))
    _refused(small, url, "media_too_large")
    error = _refused(fetcher, "gopher://x/y.mp4", "unsupported_url_scheme")
    assert "'gopher'" in error.message
    _refused(fetcher, "just-a-path.mp4", "unsupported_url_scheme")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/clip.mp4":
            data = VIDEO.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/redirect":  # to the same server under a host name that is not allowed
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.server_port}/clip.mp4")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture()
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_only_from_allowed_hosts(web):
    fetcher = MediaFetcher(MediaPolicy.create(allowed_domains=["127.0.0.1"], timeout_s=10))
    media = fetcher.fetch(f"{web}/clip.mp4")
    assert media.sha256 == hashlib.sha256(VIDEO.read_bytes()).hexdigest() and media.source == "http"
    media.close()
    _refused(fetcher, f"{web}/redirect", "media_domain_not_allowed")  # a redirect may not leave the allowed hosts
    _refused(fetcher, f"{web}/missing.mp4", "media_download_failed")
    _refused(MediaFetcher(MediaPolicy.create()), f"{web}/clip.mp4", "media_domain_not_allowed")  # off by default
    small = MediaFetcher(MediaPolicy.create(allowed_domains=["127.0.0.1"], max_bytes=1000))
    _refused(small, f"{web}/clip.mp4", "media_too_large")


def test_open_image_limits(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "a.png")
    assert open_image(str(tmp_path / "a.png"), 64, 48, "a.png").size == (64, 48)
    with pytest.raises(APIError, match="exceeds the limit 63x48"):
        open_image(str(tmp_path / "a.png"), 63, 48, "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(APIError, match="not a readable image"):
        open_image(str(tmp_path / "b.png"), 64, 64, "b.png")
