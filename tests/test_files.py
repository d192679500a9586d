"""gpt/files.py: write_atomic's guarantees (fsync before the rename, exclusive temporary
names, nothing left behind on an interrupt) tested by what it calls."""
import os
from pathlib import Path

import pytest

from gpt import checkpoint, files


def test_the_bytes_are_on_disk_before_the_rename(tmp_path, monkeypatch):
    seen = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: seen.append(("fsync", os.fstat(fd).st_size)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: seen.append(("replace",)) or real_replace(a, b))
    files.write_atomic(tmp_path / "f", lambda f: f.write(b"x" * 100))
    assert seen == [("fsync", 100), ("replace",)]


def test_a_temporary_name_is_created_exclusively(tmp_path, monkeypatch):
    class U:
        hex = "0" * 32
    monkeypatch.setattr(files.uuid, "uuid4", lambda: U)
    monkeypatch.setattr(os, "getpid", lambda: 1)
    with pytest.raises(FileExistsError):
        files.write_atomic(tmp_path / "f", lambda f: files.write_atomic(tmp_path / "f", lambda g: g.write(b"in")))


def test_an_interrupt_leaves_no_temporary_file(tmp_path):
    def boom(f):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(tmp_path / "f", boom)
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_file_is_beside_the_target_as_remove_torn_finds_it(tmp_path):
    names = []
    files.write_atomic(tmp_path / checkpoint.FILENAME, lambda f: names.append(Path(f.name)))
    assert names[0].parent == tmp_path and names[0].match(f".{checkpoint.FILENAME}.*.tmp")
