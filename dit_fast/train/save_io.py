"""The bytes of one checkpoint save: every file (ours and DeepSpeed's) written through a handle we own,
so a full disk is the OS error it is, and each file's size and CRC-32 are known without reading it back.

``torch.save(obj, "path")`` on a full disk or past the file-size limit ends in
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`` with no errno. Writing
through ``ChecksumFile`` (os.write on a raw descriptor, short writes retried) keeps the ``OSError``
(ENOSPC "No space left on device", EFBIG "File too large", EDQUOT "Disk quota exceeded", EIO);
``SaveRecorder`` notes the first one and lets DeepSpeed's save finish its own collectives (every
later write of this save is skipped), so the ranks can then agree that the checkpoint failed
instead of one of them leaving the others in a barrier.
"""
from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import zlib
from pathlib import Path

import torch


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (on some rank); the previous complete one is intact."""


class ChecksumFile:
    """A write-only binary file for torch.save: every byte reaches the OS, CRC-32 and size kept."""

    def __init__(self, path: Path):
        self.path, self.crc, self.size = Path(path), 0, 0
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # os.write may write less (the byte before a limit): retry the rest
            done += os.write(self.fd, view[done:])
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        """Nothing to do: every write went straight to the OS (no buffer of ours)."""

    def close(self) -> None:
        os.close(self.fd)


def save_file(obj, path: Path) -> tuple[int, int]:
    """torch.save ``obj`` to ``path`` through a ChecksumFile; returns (size, crc32). OSError keeps
    its errno (torch's RuntimeError from a failed write is mapped back to the write's OSError)."""
    out = ChecksumFile(path)
    try:
        torch.save(obj, out)
    except RuntimeError as err:
        raise explain_write_error(path, err) from err
    finally:
        out.close()
    return out.size, out.crc


def explain_write_error(path: Path, err: BaseException) -> OSError:
    """The OSError behind a failed write: itself, or (a torch RuntimeError that dropped it) the
    file-size limit or a full filesystem when either explains it."""
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return cause
        cause = cause.__context__
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    size = path.stat().st_size if path.exists() else 0
    if soft != resource.RLIM_INFINITY and size >= soft:
        return OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    with contextlib.suppress(OSError):
        if shutil.disk_usage(path.parent).free < (1 << 20):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({err})", str(path))


class SaveRecorder:
    """One rank's files of one save: (relative path -> (size, crc32)) or the first failure."""

    def __init__(self, root: Path):
        self.root, self.files, self.failure = Path(root), {}, None

    def save(self, obj, path: Path) -> None:
        """save_file, recorded; after a failure every later write of this save is skipped."""
        if self.failure is not None:
            return
        path = Path(path)
        try:
            self.files[str(path.relative_to(self.root))] = save_file(obj, path)
        except OSError as err:
            self.fail(path, err)

    def fail(self, path: Path, err: OSError) -> None:
        if self.failure is None:
            self.failure = (str(err.filename or path), err.strerror or str(err), err.errno)

    @contextlib.contextmanager
    def on_engine(self, engine):
        """Route DeepSpeed's checkpoint writes (``checkpoint_engine.save(state, path)``) here."""
        ckpt_engine = engine.checkpoint_engine
        ckpt_engine.save = lambda state_dict, path: self.save(state_dict, Path(path))
        with contextlib.ExitStack() as restore:
            restore.callback(delattr, ckpt_engine, "save")  # the class's own method again, always
            yield


def failure_line(failures: dict[int, tuple], rank: int, ckpt: Path, last_complete: Path | None) -> str:
    """One line for this rank: its own failure, else the first failing rank's."""
    who = rank if rank in failures else min(failures)
    path, reason, _ = failures[who]
    last = f"the last complete checkpoint is {last_complete}" if last_complete else \
        "there is no earlier complete checkpoint"
    return (f"checkpoint {ckpt.name} could not be written (rank {who}: {path}: {reason}); the partial "
            f"{ckpt.name}.tmp was removed; {last} (continue with --resume auto once there is room)")
