"""Atomic file writes: a file a user keeps is either the old one or the complete new one.

Every writer in dit_fast goes through ``atomic_write``: a temporary file in the same directory
(so the rename never crosses filesystems), flushed and fsynced, renamed over the target, then the
directory fsynced so the rename itself survives a power cut. A crash mid-write leaves at most a
hidden ``.<name>.<random>.tmp`` file and never a truncated target.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Callable, IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, text: bool = False) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then ``publish`` it as ``path``.

    ``f`` is a binary file object (a text one with ``text=True``). On any error the temp file is
    removed and an existing ``path`` is untouched. Returns ``path``.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(tmp.unlink, missing_ok=True)  # a no-op once the rename has happened
        # O_EXCL: never write into someone else's file; 0o666 lets the umask decide, as open().
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
        publish(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path.write_text``, atomically."""
    return atomic_write(path, lambda f: f.write(text), text=True)


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """fsync the finished file ``tmp``, rename it over ``final`` and fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable; platforms that cannot open a directory skip it."""
    with contextlib.suppress(OSError), contextlib.ExitStack() as opened:
        fd = os.open(directory, os.O_RDONLY)
        opened.callback(os.close, fd)
        os.fsync(fd)
