"""Checkpoint integrity: ``manifest.json`` in every checkpoint lists each file's size and CRC-32, and a
resume checks them before anything is loaded.

The sums are taken while the files are written (train/save_io.py), so a save costs no extra read;
a check reads every byte once (CRC-32 runs at several GB/s, far above disk speed). CRC-32 catches
truncation, a partial copy between clusters and flipped bytes; it is no defence against someone
who edits a file on purpose (the README's "a resume directory is trusted input" still holds).
Checkpoints written before manifests existed are accepted with a note.
"""
from __future__ import annotations

import contextlib
import json
import os
import zlib
from pathlib import Path

from ..atomic import atomic_write_text

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(ckpt: Path, recorded: dict[str, tuple[int, int]]) -> dict:
    """manifest.json for every file under ``ckpt``: the (size, crc) recorded while writing, else
    (files another library copied in, e.g. DeepSpeed's zero_to_fp32.py) read back now."""
    files = {}
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = str(path.relative_to(ckpt))
        size, crc = recorded.get(rel) or (path.stat().st_size, file_crc32(path))
        files[rel] = {"size": size, "crc32": f"{crc:08x}"}
    manifest = {"version": MANIFEST_VERSION, "checksum": "crc32", "files": files}
    atomic_write_text(ckpt / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_checkpoint(ckpt: Path, checksums: bool = True) -> tuple[list[str], str | None]:
    """(problems, note): every way ``ckpt``'s files differ from its manifest (a missing, truncated,
    grown or changed file, an unreadable manifest); the note says a checkpoint has no manifest.
    ``checksums=False`` checks presence and sizes only."""
    ckpt = Path(ckpt)
    path = ckpt / MANIFEST
    if not path.is_file():
        return [], f"{ckpt} has no {MANIFEST} (written before checksums existed): not verified"
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{path}: unreadable manifest ({err})"], None
    problems = []
    for rel, want in files.items():
        problem = _check_file(ckpt / rel, want, checksums)
        if problem:
            problems.append(problem)
    return problems, None


def _check_file(path: Path, want: dict, checksums: bool) -> str | None:
    try:
        size = os.stat(path).st_size
    except OSError:
        return f"{path}: missing"
    if size != want["size"]:
        kind = "truncated" if size < want["size"] else "grown"
        return f"{path}: {kind}, {size} bytes instead of {want['size']}"
    if checksums:
        try:
            crc = f"{file_crc32(path):08x}"
        except OSError as err:
            return f"{path}: unreadable ({err.strerror})"
        if crc != want["crc32"]:
            return f"{path}: contents changed (CRC-32 {crc}, manifest {want['crc32']})"
    return None


def manifest_bytes(ckpt: Path) -> int:
    """Total bytes the manifest lists (0 without one)."""
    with contextlib.suppress(OSError, ValueError, KeyError):  # no or an unreadable manifest: 0
        files = json.loads((Path(ckpt) / MANIFEST).read_text())["files"]
        return sum(f["size"] for f in files.values())
    return 0
