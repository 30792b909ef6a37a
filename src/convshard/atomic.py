"""Atomic file writes: a reader finds the previous file or the new one, never a part of one.

``atomic_writer(path)`` yields a binary file in ``path``'s directory under a
temporary name (``.NAME.*.tmp``). When the block ends it is flushed and
fsynced, renamed over ``path`` (``os.replace``: atomic on POSIX within one
filesystem) and the directory is fsynced, so that the rename itself survives
a power loss. The file gets the mode a plain ``open`` would give it (0666
less the umask; ``mkstemp`` alone gives 0600). If the block raises, the
temporary file is deleted and ``path`` is left as it was. A process killed mid-write leaves its temporary
file behind; the next write of the same path deletes it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose contents replace ``path`` atomically when the block ends.
    Creates the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    """This process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_writer(path) as f:
        f.write(text.encode())
    return Path(path)
