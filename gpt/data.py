"""Datasets as nanoGPT lays them out: data/<name>/{train,val}.bin, uint16 token ids back to back,
plus meta.pkl (vocab_size, stoi, itos) for character-level data.

shakespeare_char and shakespeare (GPT-2 BPE) are built on first use from the text shipped in
gpt/assets; openwebtext is built by `python -m gpt.data openwebtext` for users who have the
`datasets` package (and the network to fetch it).
"""
import os
import pickle
import sys
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .config import reported
from .files import remove_abandoned, unwritten, write_atomic
from .tokenizer import EOT, gpt2

SHAKESPEARE = Path(__file__).parent / "assets" / "tinyshakespeare.txt"
BUILDERS = ("shakespeare_char", "shakespeare", "openwebtext")


def _write_tokens(path: Path, ids) -> None:
    write_atomic(path, lambda f: np.asarray(ids, dtype=np.uint16).tofile(f))


def _split(text: str) -> tuple[str, str]:
    n = len(text)
    return text[: int(n * 0.9)], text[int(n * 0.9):]  # nanoGPT's 90/10 train/val split


def build_shakespeare_char(out: Path) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = dict(enumerate(chars))
    # meta.pkl first: once train.bin and val.bin exist, prepare() takes the dataset as built.
    meta = {"vocab_size": len(chars), "itos": itos, "stoi": stoi}
    write_atomic(out / "meta.pkl", lambda f: pickle.dump(meta, f))
    for split, part in zip(("train", "val"), _split(text)):
        _write_tokens(out / f"{split}.bin", [stoi[c] for c in part])


def build_shakespeare(out: Path) -> None:
    enc = gpt2()
    for split, part in zip(("train", "val"), _split(SHAKESPEARE.read_text(encoding="utf-8"))):
        _write_tokens(out / f"{split}.bin", enc.encode_ordinary(part))


def usable_cpus() -> int:
    """The CPUs this process may run on: a SLURM job's or a container's share, not the machine's
    (as many threads as the machine has cores would crowd the few it was given)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_documents(path: Path, texts: Iterable[str], batch: int = 1024) -> int:
    """Tokenize documents with GPT-2's BPE, each followed by <|endoftext|>, streaming them to a
    uint16 file in batches (memory stays bounded for corpora of billions of tokens). Returns the
    number of tokens written."""
    enc, total, pending = gpt2(), 0, []

    def flush(f):
        nonlocal total
        for ids in enc.encode_ordinary_batch(pending, num_threads=usable_cpus()):
            ids.append(EOT)
            np.asarray(ids, dtype=np.uint16).tofile(f)
            total += len(ids)
        pending.clear()

    def write(f):
        for text in texts:
            pending.append(text)
            if len(pending) == batch:
                flush(f)
        flush(f)

    write_atomic(path, write)
    return total


@contextmanager
def _written(out: Path):
    """A dataset's build into `out`, a write it failed (a full disk) named with the space left."""
    try:
        yield
    except OSError as e:
        raise OSError(unwritten(f"dataset {out.name}", out, e)) from None


def build_openwebtext(out: Path, splits: Mapping[str, Iterable[str]] | None = None) -> dict[str, int]:
    """nanoGPT's openwebtext preparation: 8M web documents, 0.05% held out for val. `splits`
    (split name -> document texts) replaces the download, for tests and other corpora."""
    if splits is None:
        try:
            from datasets import load_dataset
        except ImportError:
            raise SystemExit("openwebtext needs the `datasets` package: pip install datasets") from None
        ds = load_dataset("openwebtext", num_proc=usable_cpus())["train"]
        ds = ds.train_test_split(test_size=0.0005, seed=2357, shuffle=True)
        splits = {name: (t for rows in ds[key].iter(batch_size=1024) for t in rows["text"])
                  for name, key in (("train", "train"), ("val", "test"))}
    out.mkdir(parents=True, exist_ok=True)  # once there is something to write: a failed download leaves no folder
    with _written(out):
        return {name: write_documents(out / f"{name}.bin", texts) for name, texts in splits.items()}


def prepare(dataset: str, data_dir: str | os.PathLike = "data") -> Path:
    """data_dir/dataset, built first if it has no train.bin and val.bin."""
    out = Path(data_dir) / dataset
    if is_built(dataset, data_dir):
        for name in ("train.bin", "val.bin", "meta.pkl"):  # write_atomic's own sweep comes with a write: none now
            remove_abandoned(out / name)
        return out
    out.mkdir(parents=True, exist_ok=True)
    with _written(out):
        {"shakespeare_char": build_shakespeare_char, "shakespeare": build_shakespeare}[dataset](out)
    return out


def is_built(dataset: str, data_dir: str | os.PathLike = "data") -> bool:
    """Whether data_dir/dataset is built, or else buildable here (by prepare); a ValueError saying
    so where it is neither."""
    out = Path(data_dir) / dataset
    if (out / "train.bin").exists() and (out / "val.bin").exists():
        return True
    if dataset not in BUILDERS:
        raise ValueError(f"dataset {dataset!r}: no {out}/train.bin and val.bin, and no builder for it "
                         f"(builders: {', '.join(BUILDERS)})")
    if dataset == "openwebtext":
        raise ValueError(f"dataset openwebtext is not built yet: run `python -m gpt.data openwebtext {data_dir}` "
                         "(needs the `datasets` package, about 54 GB of disk)")
    return False


class _PlainData(pickle.Unpickler):
    """Reads dicts, strings and numbers, never a class or function by name: a pickle naming one
    runs it as it loads (a dataset folder from elsewhere could run any code; the reason
    checkpoints load with weights_only)."""

    def find_class(self, module: str, name: str):
        raise ValueError(f"it names {module}.{name}: a meta.pkl is read as plain data only (its vocab_size, "
                         f"stoi and itos), never a pickled object, which could run code as it loads")


def load_meta(path: Path) -> dict | None:
    """meta.pkl of a character-level dataset, else None (GPT-2 BPE)."""
    meta = Path(path) / "meta.pkl"
    if not meta.exists():
        return None
    with open(meta, "rb") as f:
        try:
            value = _PlainData(f).load()
        except ValueError as e:
            raise ValueError(f"{meta}: {e}") from None
        except Exception as e:  # a corrupt pickle fails as whatever its bytes make of it (MemoryError too)
            raise ValueError(f"{meta} is not a readable meta.pkl (cut short or corrupt?): {e!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{meta} holds a {type(value).__name__}, not a meta.pkl's dict (vocab_size, stoi, itos)")
    return value


class DataError(ValueError):
    """Data that training cannot use, found while drawing batches."""


class Batches:
    """Random (x, y) windows of a dataset, drawn from a generator whose state is saved in
    checkpoints so a resumed run sees the same batches. Eval batches come from their own
    generator (its own seed), reset for each evaluation, so every evaluation scores the same windows.

    Under several processes every rank seeds the same generator and draws the windows of the
    whole global batch (world_size × batch_size), then reads only its own slice: no two ranks
    ever take the same draw, and N ranks see exactly the windows that one process with an N
    times larger batch would."""

    def __init__(self, path: Path, block_size: int, batch_size: int, device: str, seed: int,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None):
        """vocab_size: the model's; a batch holding an id at or past it is refused (the embedding's
        lookup would fail on it: an IndexError on the CPU, a device-side assert on a GPU)."""
        self.path, self.block_size, self.batch_size, self.device = Path(path), block_size, batch_size, str(device)
        self.vocab_size = vocab_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.eval_seed = seed + 1  # not the training draws': "train" loss would score the first batches trained on
        vocab_size = (load_meta(self.path) or {}).get("vocab_size", 0)
        if vocab_size > 2**16:  # ids written wider (uint32) would read as pairs of wrong uint16 ids
            raise ValueError(f"{path}/meta.pkl: vocab_size {vocab_size}, but the .bin files hold uint16 token ids "
                             f"(at most 65536 ids), as nanoGPT's prepare.py writes them")
        for split in ("train", "val"):
            size = os.path.getsize(self.path / f"{split}.bin")
            if size % 2:
                raise ValueError(f"{path}/{split}.bin is {size} bytes, not a whole number of uint16 tokens (cut "
                                 f"short? delete the dataset's .bin files to build them again)")
            n = size // 2
            if n <= block_size:
                raise ValueError(f"{path}/{split}.bin holds {n} tokens, too few for block_size {block_size}")

    def _draw(self, split: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        # A fresh memmap per batch: numpy's memmap otherwise grows resident memory (nanoGPT's note).
        data = np.memmap(self.path / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - self.block_size, (self.world_size * self.batch_size,), generator=generator,
                           device="cpu")  # the generator's, whatever torch.set_default_device says
        ix = ix[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]
        windows = torch.from_numpy(np.stack([data[i: i + 1 + self.block_size] for i in ix.tolist()]).astype(np.int64))
        if self.vocab_size is not None and (top := int(windows.max())) >= self.vocab_size:
            raise DataError(f"{self.path / split}.bin holds token id {top}, past the model's {self.vocab_size}-token "
                             f"vocabulary (written with another tokenizer, or meta.pkl's vocab_size too small?)")
        if self.device.startswith("cuda"):
            # Whole windows, contiguous and pinned: a non-contiguous or pageable copy would go
            # through a staging buffer and wait for the GPU to finish the step before it.
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        elif self.device != "cpu":  # mps, xpu, ...
            windows = windows.to(self.device)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def next(self, split: str = "train"):
        return self._draw(split, self.generator)

    def eval_batches(self, split: str, count: int):
        generator = torch.Generator().manual_seed(self.eval_seed)
        for _ in range(count):
            yield self._draw(split, generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def main(argv: list[str]) -> int:
    usage = f"usage: python -m gpt.data {{{','.join(BUILDERS)}}} [data_dir (default: data)]"
    if "-h" in argv or "--help" in argv:
        print(usage)
        return 0
    if len(argv) not in (1, 2) or argv[0] not in BUILDERS:
        print(usage, file=sys.stderr)
        return 2
    name, data_dir = argv[0], argv[1] if len(argv) == 2 else "data"
    with reported("gpt.data"):  # a data_dir on a full or read-only disk, no network for openwebtext
        print(build_openwebtext(Path(data_dir) / name) if name == "openwebtext" else prepare(name, data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
