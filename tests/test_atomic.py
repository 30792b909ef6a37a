"""Atomic writes: the target holds the old contents or the new, and no temporary stays behind."""

from __future__ import annotations

import os
import stat

import pytest

from convshard import atomic


def test_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "m.json"
    assert atomic.write_text(path, "one\n") == path
    atomic.write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    atomic.write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic.atomic_writer(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("mid-write")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_a_killed_write_is_cleared_by_the_next(tmp_path):
    """A temporary left by a process killed mid-write goes with the next write of the same path only."""
    (tmp_path / ".m.json.x1y2.tmp").write_text("half")
    (tmp_path / ".other.json.x1y2.tmp").write_text("another file's write")
    atomic.write_text(tmp_path / "m.json", "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.x1y2.tmp", "m.json"]


def test_a_written_file_takes_the_umask_like_open(tmp_path):
    """Not mkstemp's 0600: others may read a checkpoint or an export where the umask lets them."""
    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "a.json", "{}")
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "b.json").stat().st_mode) \
        == 0o640
