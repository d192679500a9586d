"""gpt/files.py: write_atomic's guarantees (the old file kept on a failure, fsync before the
rename, temporary names unique and created exclusively, nothing left behind on an interrupt, and
what a killed writer left removed by the next write, a living writer's file never)."""
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt import checkpoint, files
from gpt.files import write_atomic

shutil_usage = collections.namedtuple("usage", "total used free")  # shutil.disk_usage's


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


def test_a_failed_write_raises_its_own_error_when_its_clean_up_fails_too(tmp_path, monkeypatch):
    """On a read-only or failing disk the temporary file's removal fails as well: the write's own
    error is the one raised, not the removal's on top of it."""
    def refuse(self, missing_ok=False):
        raise OSError(30, "Read-only file system")

    def write(f):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(OSError, match="No space left on device") as raised:
        write_atomic(tmp_path / "f", write)
    assert raised.value.__context__ is None


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


def aged(path: Path, seconds: float = files.ABANDONED_S + 1) -> Path:
    """`path`, created if missing, last written `seconds` ago."""
    path.touch()
    past = time.time() - seconds
    os.utime(path, (past, past))
    return path


def temp_name(target: str, n: int = 0, host: str = files.HOST) -> str:
    """A temporary file's name as write_atomic makes them, for `target` on `host`."""
    return f".{target}.{host}.4242.{n:012x}.tmp"


def test_a_killed_writer_s_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A writer killed mid-write (SIGKILL: no except clause runs) leaves its temporary file, as
    large as the file; its lock dies with it, and the next write of that path, once the file is
    ABANDONED_S old, removes it. While the writer lives its file stays, however old."""
    path = tmp_path / "train.bin"
    code = ("import sys, time; from gpt.files import write_atomic; "
            "write_atomic(sys.argv[1], lambda f: (f.write(b'half'), f.flush(), time.sleep(60)))")
    writer = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 60
        while not (left := list(tmp_path.glob(".train.bin.*.tmp"))) or left[0].stat().st_size == 0:
            assert time.monotonic() < deadline and writer.poll() is None, "the writer never wrote"
            time.sleep(0.05)
        aged(left[0])
        assert files.remove_abandoned(path) == []
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    left[0].touch()
    write_atomic(path, lambda f: f.write(b"whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [left[0].name, "train.bin"]  # written just now
    aged(left[0])
    write_atomic(path, lambda f: f.write(b"again"))
    assert [p.name for p in tmp_path.iterdir()] == ["train.bin"] and path.read_bytes() == b"again"


def test_a_living_writer_s_file_is_left_to_it_however_old(tmp_path):
    path, removed = tmp_path / "train.bin", []

    def write(f):
        aged(Path(f.name))
        removed.extend(files.remove_abandoned(path))  # as another process would, beside this write
        f.write(b"whole")
    write_atomic(path, write)
    assert removed == [] and path.read_bytes() == b"whole"


def test_only_the_path_s_own_abandoned_files_are_removed(tmp_path):
    """Its name's glob characters match only themselves; other files' temporary files stay, the
    file's own `.old`'s too; a fresh one stays."""
    own = [aged(tmp_path / temp_name("[a].bin", n)) for n in (0, 1)]
    others = [aged(tmp_path / name) for name in (temp_name("a.bin"), temp_name("[a].binx"), temp_name("[a].bin.old"),
                                                 temp_name("[a].bin")[1:], ".[a].bin.1.0.tmp")]
    fresh = tmp_path / temp_name("[a].bin", 2)
    fresh.touch()
    assert files.remove_abandoned(tmp_path / "[a].bin") == own
    assert sorted(tmp_path.iterdir()) == sorted([*others, fresh])


def test_another_machine_s_files_wait_a_day(tmp_path):
    """Its lock may not reach this machine (NFS with local locks): an hour unwritten could be a
    writer on that machine waiting for its download; a day is not."""
    hour = aged(tmp_path / temp_name("train.bin", 0, host="node7"), 3600)
    day = aged(tmp_path / temp_name("train.bin", 1, host="node7"), files.OTHER_HOST_ABANDONED_S + 1)
    assert files.remove_abandoned(tmp_path / "train.bin") == [day] and hour.exists()


def test_the_temporary_file_stays_locked_until_renamed(tmp_path, monkeypatch):
    """An fsync can take long enough on a slow disk for the file to look abandoned: its writer
    holds the lock through the rename, so another process's remove_abandoned leaves it."""
    path, removed, real_replace = tmp_path / "train.bin", [], os.replace

    def replace(tmp, target):
        aged(Path(tmp))
        removed.extend(files.remove_abandoned(path))
        real_replace(tmp, target)
    monkeypatch.setattr(files.os, "replace", replace)
    write_atomic(path, lambda f: f.write(b"whole"))
    assert removed == [] and path.read_bytes() == b"whole"


def test_a_dotted_host_name_s_abandoned_files_are_found(tmp_path, monkeypatch):
    """A cluster node's name has dots, which separate a temporary name's fields: without them
    its files match, and an abandoned one of this machine's goes after ABANDONED_S."""
    host = files.host_field("node1.cluster.example.org")
    assert host == "node1-cluster-example-org"
    monkeypatch.setattr(files, "HOST", host)
    left = aged(tmp_path / temp_name("train.bin", host=host))
    assert files.remove_abandoned(tmp_path / "train.bin") == [left]


def test_a_file_system_without_locks_counts_as_locked(monkeypatch, tmp_path):
    """NFS without a lock daemon (ENOLCK): a lock that cannot be taken is not another run holding
    it, or train.py would refuse every run there as one training beside another."""
    import errno

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    with open(tmp_path / "f", "wb") as f:
        assert files.try_lock(f) is True


def test_a_host_without_a_name_is_localhost():
    """An empty hostname (a bare container) still gives temporary names a host field."""
    assert files.host_field("") == "localhost" and files.host_field("node1.example.org") == "node1-example-org"


def test_the_space_left_is_in_mib(monkeypatch, tmp_path):
    """A failed write says the space left in MiB, as it claims (not GiB with MiB written after)."""
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil_usage(0, 0, 3 * 2**20))
    assert files.unwritten("x", tmp_path, OSError("full")) == f"x could not be written (3 MiB free in {tmp_path}): full"
