"""Files written whole or not at all."""
import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# A temporary file of this machine's left unlocked (its writer is dead: the lock goes with the
# process) and unwritten this long is abandoned; the age spares a writer in the instant between
# creating its file and locking it. Another machine's lock may not reach this one (NFS mounted
# with local locks, Lustre's localflock): its files are abandoned only after a day unwritten.
ABANDONED_S = 60.0
OTHER_HOST_ABANDONED_S = 86400.0


def host_field(hostname: str) -> str:
    """A machine's name as temporary names carry it: no dots, the name's fields being dot-separated
    (a cluster's node1.example.org would otherwise never match, and its files never be removed)."""
    return hostname.replace(".", "-") or "localhost"


HOST = host_field(socket.gethostname())


def try_lock(f) -> bool:
    """Lock open file (or directory) `f`, a file object or descriptor, exclusively and without
    waiting, until it is closed (or its process dies): False when another open of it holds the
    lock. True on a file system without locks, where there is nothing to hold."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def log_record(line: str) -> dict | None:
    """A JSON-lines log's record, or None for a line that is none: blank, or torn by a killed
    write (train.py's log; its resume drops such lines, and the readers of logs pass over them)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def blocking_file(folder: str | os.PathLike) -> Path | None:
    """The file that stands where `folder` or one of the folders above it would be (mkdir's
    NotADirectoryError or FileExistsError, naming neither the setting nor the file), or None."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    return None if existing.is_dir() else existing


def unwritten(what: str, folder: str | os.PathLike, error: OSError) -> str:
    """What a failed write of `what` in `folder` says: the error and the space left there (a full
    disk or a quota is the likely cause, and an error such as numpy's "N requested and M written"
    names neither)."""
    free = shutil.disk_usage(folder).free / 2**20
    return f"{what} could not be written ({free:,.0f} MiB free in {folder}): {error}"


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """write(f) into a temporary file beside `path`, then rename it to `path`: a crash or an error
    mid-write leaves `path` as it was and no temporary file behind. Each process writes its own
    temporary file, so processes writing the same file at once (ranks preparing one dataset,
    nodes sharing a download cache) never mix their bytes: its name is made unique (the machine,
    the pid, a random part: pids repeat across containers and nodes) and created exclusively, and
    it is locked until renamed. What killed writers of `path` left (SIGKILL, out of memory,
    preemption: no chance to remove it; as large as the file) is removed first (remove_abandoned)."""
    path = Path(path)
    remove_abandoned(path)
    tmp = path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            try_lock(f)  # new, so no one else's; on a file system without locks nothing is ever removed
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: after a power cut, old or new, never empty
            os.replace(tmp, path)  # still locked: a slow fsync's file is not taken for abandoned
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only disk refuses even this: not the error to tell
            tmp.unlink(missing_ok=True)
        raise
    return path


def remove_abandoned(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of killed writes of `path` (write_atomic's: unlocked, and
    unwritten for ABANDONED_S, or a day for another machine's); the ones removed. A living
    writer's file is left to it."""
    path = Path(path)
    name = re.compile(rf"\.{re.escape(path.name)}\.(?P<host>[^.]+)\.\d+\.[0-9a-f]{{12}}\.tmp")
    removed = []
    for tmp in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")):
        found = name.fullmatch(tmp.name)
        if found is None:  # another file's (`path`.old's), or not write_atomic's
            continue
        stale_s = ABANDONED_S if found["host"] == HOST else OTHER_HOST_ABANDONED_S
        try:
            # Opened for writing: NFS emulates flock with a lock that needs write access.
            with open(tmp, "r+b") as f:
                if time.time() - os.fstat(f.fileno()).st_mtime < stale_s:
                    continue
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked by its writer, gone meanwhile, or a file system without locks
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
