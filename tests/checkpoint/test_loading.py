"""dit_fast.checkpoint: download cache, safe loading, key handling, strict fitting, atomic save."""
import argparse
import http.server
import io
import os
import socket
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from dit_fast.checkpoint import official as ckpt
from dit_fast.checkpoint import (
    OFFICIAL_CHECKPOINTS,
    CheckpointError,
    UnsafeCheckpointError,
    atomic_save,
    download_official,
    load_into_model,
    load_state_dict,
    official_checkpoint_name,
    safe_torch_load,
)

NAME = "DiT-XL-2-256x256.pt"


class Tiny(nn.Module):
    """Stands in for DiT: a few named submodules with weights and a buffer."""

    def __init__(self, width=4):
        super().__init__()
        self.x_embedder = nn.Linear(3, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.register_buffer("pos_embed", torch.zeros(1, 5, width))


def _tiny_state(seed=0, width=4):
    torch.manual_seed(seed)
    return Tiny(width).state_dict()


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    # No test may read the user's cache or reach the real server.
    monkeypatch.setenv(ckpt.CACHE_DIR_ENV, str(tmp_path / "default_cache"))
    monkeypatch.setenv(ckpt.BASE_URL_ENV, "http://127.0.0.1:9/never-used/")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


# --------------------------------------------------------------------------- download

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
    torch.save(_tiny_state(), buf)
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
    _assert_same(load_state_dict(path), _tiny_state())


def test_env_overrides_and_name_loading(server, tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.BASE_URL_ENV, server.url.rstrip("/"))  # missing slash is fine
    monkeypatch.setenv(ckpt.CACHE_DIR_ENV, str(tmp_path / "env_cache"))
    _assert_same(load_state_dict(NAME), _tiny_state())
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


# --------------------------------------------------------------------------- loading

def test_dit_training_checkpoint_with_args(tmp_path):
    model, ema = _tiny_state(0), _tiny_state(1)
    opt = torch.optim.AdamW(Tiny().parameters()).state_dict()
    args = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000)
    path = tmp_path / "0050000.pt"
    torch.save({"model": model, "ema": ema, "opt": opt, "args": args}, path)
    raw = safe_torch_load(path)
    assert raw["args"] == args  # the Namespace survives, as DiT's sample.py expects
    _assert_same(load_state_dict(path), ema)
    _assert_same(load_state_dict(path, prefer_ema=False), model)


def test_own_training_checkpoint_with_rng_state(tmp_path):
    state = {
        "model": _tiny_state(), "step": 7, "config": {"model": {"depth": 2}},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": __import__("random").getstate()},
    }
    atomic_save(state, tmp_path / "own.pt")
    raw = safe_torch_load(tmp_path / "own.pt")
    np.random.set_state(raw["rng"]["numpy"])
    assert raw["step"] == 7
    _assert_same(load_state_dict(tmp_path / "own.pt"), state["model"])


def test_safetensors_roundtrip(tmp_path):
    state = _tiny_state()
    atomic_save(state, tmp_path / "w.safetensors")
    _assert_same(load_state_dict(tmp_path / "w.safetensors"), state)
    with pytest.raises(TypeError, match="flat"):
        atomic_save({"step": 1}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_prefixes_are_stripped(tmp_path):
    state = _tiny_state()
    wrapped = OrderedDict()
    for i, (k, v) in enumerate(state.items()):
        prefix = ["module.", "_orig_mod.", "module._orig_mod."][i % 3]
        wrapped[prefix + k.replace("blocks.1.", "blocks.1._orig_mod.")] = v
    torch.save({"module": wrapped}, tmp_path / "ds.pt")
    _assert_same(load_state_dict(tmp_path / "ds.pt"), state)


def test_missing_and_not_a_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="official names"):
        load_state_dict(tmp_path / "nope.pt")
    torch.save({"step": 3, "notes": "x"}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="top-level keys are: notes, step"):
        load_state_dict(tmp_path / "odd.pt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(1), "payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="arbitrary Python objects") as info:
        load_state_dict(tmp_path / "evil.pt")
    assert "NOT loaded" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()  # the payload never ran


def test_not_a_checkpoint_is_clear(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="Could not read .*junk.pt: it is not a torch checkpoint"):
        load_state_dict(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="Could not read .*junk.safetensors"):
        load_state_dict(tmp_path / "junk.safetensors")


# --------------------------------------------------------------------------- fitting

def test_load_into_model_strict_and_compiled_names():
    src = Tiny()
    dst = Tiny()
    load_into_model(dst, src.state_dict())
    _assert_same(dst.state_dict(), src.state_dict())
    # A wrapped target (as torch.compile's OptimizedModule names it) still loads a plain checkpoint.
    holder = nn.Module()
    holder._orig_mod = Tiny()
    load_into_model(holder, src.state_dict())
    torch.testing.assert_close(holder._orig_mod.x_embedder.weight, src.x_embedder.weight)


def test_mismatch_is_one_clear_message():
    state = Tiny(width=4).state_dict()
    del state["blocks.1.bias"]
    state["y_embedder.embedding_table.weight"] = torch.zeros(3, 4)
    model = Tiny(width=6)
    before = model.x_embedder.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_into_model(model, state)
    msg = str(info.value)
    assert "1 missing, 1 unexpected and 6 wrong-shape keys" in msg
    assert "missing (1): blocks.1.bias" in msg
    assert "unexpected (1): y_embedder.embedding_table.weight" in msg
    assert "x_embedder.weight: checkpoint (4, 3) vs model (6, 3)" in msg
    assert "--model" in msg and "--image-size" in msg
    torch.testing.assert_close(model.x_embedder.weight, before)  # nothing half-loaded


def test_mismatch_message_is_truncated():
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(200)])
    with pytest.raises(CheckpointError) as info:
        load_into_model(big, {})
    msg = str(info.value)
    assert "400 missing" in msg and "and 388 more" in msg and len(msg) < 2000


# --------------------------------------------------------------------------- saving

def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": _tiny_state(0)}, path)
    old = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"model": _tiny_state(1)}, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # temp file removed


def test_atomic_save_replaces_and_creates_dirs(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "0000100.pt"
    atomic_save({"step": 1}, path)
    atomic_save({"step": 2}, path)
    assert safe_torch_load(path) == {"step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["0000100.pt"]


# --------------------------------------------------------------------------- with the real DiT

def _small_dit(**kwargs):
    from dit_fast.models import DiT
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=4, hidden_size=48, depth=2, num_heads=2,
                      **kwargs).eval()  # eval: no random label dropout


def test_dit_training_checkpoint_roundtrip(tmp_path):
    src = _small_dit(num_classes=10)
    with torch.no_grad():  # adaLN-Zero starts at zero: perturb so the outputs test something
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    atomic_save({"model": wrapped, "ema": src.state_dict(), "args": argparse.Namespace(a=1)},
                tmp_path / "0000010.pt")
    dst = load_into_model(_small_dit(num_classes=10), load_state_dict(tmp_path / "0000010.pt"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([3, 7])
    torch.testing.assert_close(dst(x, t, y), src(x, t, y), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"y_embedder.embedding_table.weight: checkpoint "
                                              r"\(11, 48\) vs model \(1001, 48\)"):
        load_into_model(_small_dit(), src.state_dict())
