"""dit_fast.checkpoint.official: the official names, the download cache (a local HTTP server), and the
one decision "official name or path?"."""
import http.server
import io
import socket
import threading

import pytest
import torch

from dit_fast.checkpoint import (OFFICIAL_CHECKPOINTS, CheckpointError, download_official, is_official_name,
                                 load_state_dict, official_checkpoint_name, resolve_official)
from dit_fast.checkpoint import official as ckpt
from tests.checkpoint.tiny_weights import assert_same, tiny_state

NAME = "DiT-XL-2-256x256.pt"


class _Server:
    """A local HTTP server: mode "ok" serves the payload, "cut" sends half of it and hangs up."""

    def __init__(self, payload: bytes):
        self.payload, self.mode, self.requests = payload, "ok", []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path != "/DiT/models/" + NAME:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                if server.mode == "cut":
                    self.wfile.write(server.payload[: len(server.payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(server.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/DiT/models/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    buf = io.BytesIO()
    torch.save(tiny_state(), buf)
    s = _Server(buf.getvalue())
    yield s
    s.close()


def test_official_names():
    assert set(OFFICIAL_CHECKPOINTS) == {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}
    assert official_checkpoint_name(256) == "DiT-XL-2-256x256.pt"
    assert official_checkpoint_name(512) == "DiT-XL-2-512x512.pt"
    with pytest.raises(ValueError, match="256 and 512"):
        official_checkpoint_name(128)
    with pytest.raises(ValueError, match="DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt"):
        download_official("DiT-XL-2-999.pt")


def test_download_once_then_cache(server, tmp_path):
    path = download_official(NAME, cache_dir=tmp_path / "c", base_url=server.url)
    assert path == tmp_path / "c" / NAME and path.read_bytes() == server.payload
    assert server.requests == ["/DiT/models/" + NAME]
    again = download_official(NAME, cache_dir=tmp_path / "c", base_url=server.url)
    assert again == path and len(server.requests) == 1  # served from the cache
    assert_same(load_state_dict(path), tiny_state())


def test_env_overrides_and_name_loading(server, tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.BASE_URL_ENV, server.url.rstrip("/"))  # missing slash is fine
    monkeypatch.setenv(ckpt.CACHE_DIR_ENV, str(tmp_path / "env_cache"))
    assert_same(load_state_dict(NAME), tiny_state())
    assert (tmp_path / "env_cache" / NAME).is_file() and len(server.requests) == 1


def test_cut_off_download_leaves_nothing_and_retry_works(server, tmp_path):
    cache = tmp_path / "c"
    server.mode = "cut"
    with pytest.raises(CheckpointError) as info:
        download_official(NAME, cache_dir=cache, base_url=server.url)
    msg = str(info.value)
    assert server.url + NAME in msg and str(cache / NAME) in msg and "--ckpt PATH" in msg
    assert not (cache / NAME).exists()
    assert list(cache.iterdir()) == []  # no partial file left behind
    server.mode = "ok"
    path = download_official(NAME, cache_dir=cache, base_url=server.url)
    assert path.read_bytes() == server.payload and len(server.requests) == 2
    assert [p.name for p in cache.iterdir()] == [NAME]


def test_http_error_is_clear(server, tmp_path):
    with pytest.raises(CheckpointError, match="404") as info:
        download_official(NAME, cache_dir=tmp_path, base_url=server.url + "missing/")
    assert "--ckpt PATH" in str(info.value) and not (tmp_path / NAME).exists()


def test_offline_is_clear(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/DiT/models/"
    with pytest.raises(CheckpointError) as info:
        download_official(NAME, cache_dir=tmp_path, base_url=url)
    msg = str(info.value)
    assert url + NAME in msg and "offline" in msg and str(tmp_path / NAME) in msg
    assert "--ckpt PATH" in msg and list(tmp_path.iterdir()) == []


def test_a_local_file_of_an_official_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_official_name(NAME) and not is_official_name("DiT-XL-2-999.pt")
    assert not is_official_name(tmp_path / "mine.pt")
    torch.save(tiny_state(), tmp_path / NAME)
    assert not is_official_name(NAME) and resolve_official(NAME).resolve() == tmp_path / NAME
    assert resolve_official("~/x.pt").is_absolute()  # "~" expanded; a non-official path as given
