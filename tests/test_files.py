"""gpt/files.py: write_atomic's guarantees (the old file kept on a failure, fsync before the
rename, temporary names unique and created exclusively, nothing left behind on an interrupt)."""
import os
from pathlib import Path

import pytest

from gpt import checkpoint, files
from gpt.files import write_atomic


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


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "train.bin"
    write_atomic(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["train.bin"]


def test_writers_with_the_same_pid_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Pids repeat across containers and nodes sharing a filesystem: the temporary names differ."""
    monkeypatch.setattr("os.getpid", lambda: 4242)
    path, names = tmp_path / "train.bin", []

    def inner(f):
        names.append(Path(f.name).name)
        write_atomic(path, lambda g: names.append(Path(g.name).name) or g.write(b"inner"))
        f.write(b"outer")
    write_atomic(path, inner)
    assert len(set(names)) == 2 and path.read_bytes() == b"outer"
