"""Small file helpers shared by the package: atomic writes and content hashes.

Why atomic: a run can be killed at any moment (preemption, Ctrl-C, a Ray worker dying) and resume reads back what
it wrote. Writing to a temp file in the same directory and `os.replace`-ing it over the target means a reader sees
either the old complete file or the new complete file, never a truncated one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; on any error the old file (if any) is left untouched and no temp remains."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Text version of `atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so large checkpoints don't need to fit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(path: str | os.PathLike, full_hash_below: int = 64 << 20) -> str:
    """Hex SHA-256 over a file or folder: every file's relative name, size and content hash.

    Files above `full_hash_below` bytes (model weights) are hashed by their first and last MiB plus their size,
    so fingerprinting a multi-GB checkpoint stays cheap; an in-place edit that keeps the size and both ends
    would go unnoticed there. Hidden files (temp files of atomic writes) are skipped.
    """
    root = Path(path)
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    h = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        h.update(f"{file.relative_to(root) if file != root else file.name}\0{size}\0".encode())
        if size <= full_hash_below:
            h.update(bytes.fromhex(sha256_file(file)))
        else:
            with open(file, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read(1 << 20))
    return h.hexdigest()
