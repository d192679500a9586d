"""Files written whole or not at all."""
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """write(f) into a temporary file beside `path`, then rename it to `path`: a crash or an error
    mid-write leaves `path` as it was and no temporary file behind. Each process writes its own
    temporary file, so processes writing the same file at once (ranks preparing one dataset,
    nodes sharing a download cache) never mix their bytes: its name is made unique (pids repeat
    across containers and nodes) and created exclusively."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: after a power cut, old or new, never empty
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
