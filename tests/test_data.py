import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.data import Batches, DataError, build_openwebtext, load_meta, prepare, write_documents
from gpt.tokenizer import EOT, gpt2
from tests.test_files import aged, temp_name


def test_tokenizer_is_gpt2_and_offline():
    enc = gpt2()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == EOT
    assert enc.decode(enc.encode(" the quick brown fox<|endoftext|>", allowed_special="all")) == \
        " the quick brown fox<|endoftext|>"


def test_the_tokenizer_writes_no_cache_and_refuses_another_ranks_file(tmp_path, monkeypatch):
    """tiktoken's loader copies even a local ranks file into its cache (a read-only one failed
    the run); ours reads it in place, and a file that is not GPT-2's is refused by name."""
    from gpt import tokenizer
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer.gpt2.cache_clear()
    assert tokenizer.gpt2().encode("Hello world") == [15496, 995] and not (tmp_path / "cache").exists()
    (tmp_path / "ranks").write_bytes(tokenizer.RANKS.read_bytes()[:-10])
    monkeypatch.setattr(tokenizer, "RANKS", tmp_path / "ranks")
    tokenizer.gpt2.cache_clear()
    with pytest.raises(ValueError, match=r"ranks is not GPT-2's ranks file \(its sha256 differs\)"):
        tokenizer.gpt2()
    monkeypatch.undo()
    tokenizer.gpt2.cache_clear()


def test_shakespeare_char(tmp_path):
    path = prepare("shakespeare_char", tmp_path)
    meta = load_meta(path)
    assert meta["vocab_size"] == 65 and load_meta(str(path)) == meta
    train = np.fromfile(path / "train.bin", dtype=np.uint16)
    val = np.fromfile(path / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (1_003_854, 111_540)  # nanoGPT's counts
    assert "".join(meta["itos"][i] for i in train[:14]) == "First Citizen:"
    before = (path / "train.bin").stat().st_mtime_ns
    prepare("shakespeare_char", tmp_path)  # built once
    assert (path / "train.bin").stat().st_mtime_ns == before


def test_shakespeare_bpe(tmp_path):
    path = prepare("shakespeare", tmp_path)
    assert load_meta(path) is None and load_meta(str(path)) is None
    train = np.fromfile(path / "train.bin", dtype=np.uint16)
    val = np.fromfile(path / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (301_966, 36_059)  # nanoGPT's counts
    assert gpt2().decode(train[:3].tolist()) == "First Citizen:"


def test_openwebtext_preparation_on_a_small_corpus(tmp_path):
    """Into a folder made with its parents: a fresh clone's data_dir does not exist yet (a
    FileNotFoundError after the hours of download and tokenizing)."""
    docs = {"train": [f"document {i}: " + "lorem ipsum " * i for i in range(50)], "val": ["held out", "text"]}
    out = tmp_path / "data" / "openwebtext"
    counts = build_openwebtext(out, {k: iter(v) for k, v in docs.items()})
    enc = gpt2()
    for split, texts in docs.items():
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        expected = [t for text in texts for t in enc.encode_ordinary(text) + [EOT]]
        assert ids.tolist() == expected and counts[split] == len(expected)


def test_unknown_datasets_say_what_to_do(tmp_path):
    """Each names the folder looked in: a data_dir mistyped, or relative to another working
    directory, shows there."""
    looked = re.escape(f"no {tmp_path / 'wikitext'}/train.bin and val.bin, and no builder")
    with pytest.raises(ValueError, match=looked):
        prepare("wikitext", tmp_path)
    with pytest.raises(ValueError, match="python -m gpt.data openwebtext"):
        prepare("openwebtext", tmp_path)


def test_batches_are_shifted_windows_and_resumable(tmp_path):
    path = prepare("shakespeare_char", tmp_path)
    data = np.fromfile(path / "train.bin", dtype=np.uint16)
    batches = Batches(path, block_size=16, batch_size=4, device="cpu", seed=0)
    x, y = batches.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    start = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(data, 16) == x[0].numpy(), axis=1))
    assert len(start) >= 1
    state = batches.state_dict()
    expected = [batches.next() for _ in range(3)]
    batches.next()
    batches.load_state_dict(state)
    for ex in expected:
        got = batches.next()
        assert torch.equal(got[0], ex[0]) and torch.equal(got[1], ex[1])
    first = [b[0] for b in batches.eval_batches("val", 2)]
    again = [b[0] for b in batches.eval_batches("val", 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # The "train" loss is not scored on the very windows training began with.
    fresh = Batches(path, block_size=16, batch_size=4, device="cpu", seed=0)
    assert not torch.equal(next(fresh.eval_batches("train", 1))[0], fresh.next()[0])
    # Batches go to any device, not only cuda's (here meta's), named or a torch.device, from a
    # folder given as a Path or a str.
    for device in ("meta", torch.device("meta")):
        x, y = Batches(str(path), block_size=16, batch_size=4, device=device, seed=0).next()
        assert x.device.type == y.device.type == "meta" and x.shape == (4, 16)
    # Drawn with the host's generator whatever a script's torch.set_default_device says.
    with torch.device("meta"):
        x, _ = Batches(path, block_size=16, batch_size=4, device="cpu", seed=0).next()
    assert torch.equal(x, Batches(path, block_size=16, batch_size=4, device="cpu", seed=0).next()[0])


def test_a_killed_write_s_leftover_goes_when_the_dataset_is_taken_as_built(tmp_path):
    """A rerun made the file whole before the killed write's temporary file was a minute old: no
    write of it follows, so the next run's prepare, which writes nothing, removes it."""
    path = prepare("shakespeare_char", tmp_path)
    killed = [aged(path / temp_name(name)) for name in ("train.bin", "meta.pkl")]
    assert prepare("shakespeare_char", tmp_path) == path and not any(k.exists() for k in killed)


def test_a_token_file_cut_mid_token_is_named(tmp_path):
    path = prepare("shakespeare_char", tmp_path)
    with open(path / "val.bin", "ab") as f:
        f.write(b"\x01")
    with pytest.raises(ValueError, match=r"val.bin is \d+ bytes, not a whole number of uint16 tokens \(cut short\? "
                                         r"delete the dataset's .bin files to build them again\)"):
        Batches(path, block_size=16, batch_size=4, device="cpu", seed=0)


class _Mkdir:
    """Pickled, a call of os.mkdir when it loads."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_meta_pkl_naming_code_is_refused_unrun(tmp_path):
    """meta.pkl is read as plain data (checkpoints load with weights_only): one that names a
    function, as a crafted dataset's could, is refused before the function runs."""
    ran = tmp_path / "ran"
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(dict(vocab_size=65, itos={0: "a"}, payload=_Mkdir(str(ran)))))
    with pytest.raises(ValueError, match=r"meta.pkl: it names (posix|os).mkdir: a meta.pkl is read as plain data"):
        load_meta(tmp_path)
    assert not ran.exists()


def test_a_vocabulary_past_uint16_is_refused(tmp_path):
    """A dataset of more than 65536 ids cannot be uint16 (nanoGPT's layout): its .bin files,
    written wider, would read as garbage ids without complaint."""
    np.array([70000, 99999, 5] * 20, dtype=np.uint32).tofile(tmp_path / "train.bin")
    np.array([70000, 99999, 5] * 20, dtype=np.uint32).tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(dict(vocab_size=100000), f)
    with pytest.raises(ValueError, match="meta.pkl: vocab_size 100000, but the .bin files hold uint16 token ids"):
        Batches(tmp_path, block_size=16, batch_size=4, device="cpu", seed=0)
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump(dict(vocab_size=2**16), f)  # ids 0..65535: uint16 holds them all
    Batches(tmp_path, block_size=16, batch_size=4, device="cpu", seed=0)


def test_the_builder_command_helps_and_leaves_no_folder_when_it_fails(tmp_path, monkeypatch, capsys):
    from gpt import data
    assert data.main(["--help"]) == 0 and "usage: python -m gpt.data" in capsys.readouterr().out
    assert data.main(["shakespeare_char", "-h"]) == 0 and "usage" in capsys.readouterr().out  # (built in ./-h once)
    assert data.main(["nosuch"]) == 2 and "usage" in capsys.readouterr().err
    assert data.main(["shakespeare_char", str(tmp_path), "extra"]) == 2 and "usage" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: the download cannot start
    with pytest.raises(SystemExit, match="needs the `datasets` package"):
        data.main(["openwebtext", str(tmp_path)])
    assert not (tmp_path / "openwebtext").exists()  # was left empty
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit, match=r"^gpt.data: .*Not a directory"):  # a disk's error: a message
        data.main(["shakespeare_char", str(tmp_path / "taken")])


def test_the_builder_command_takes_a_data_dir(tmp_path, monkeypatch, capsys):
    """Built in the data_dir given, else in ./data, where train.py's data_dir looks by default;
    the folder built is printed, for a script to take."""
    done = subprocess.run([sys.executable, "-m", "gpt.data", "shakespeare_char", str(tmp_path)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "shakespeare_char" / "train.bin").exists()
    assert done.stdout == f"{tmp_path / 'shakespeare_char'}\n"
    from gpt import data
    monkeypatch.chdir(tmp_path)
    assert data.main(["shakespeare_char"]) == 0
    assert (tmp_path / "data" / "shakespeare_char" / "train.bin").exists()
    assert capsys.readouterr().out == f"{Path('data') / 'shakespeare_char'}\n"


def test_character_ids_are_nanogpts(tmp_path):
    path = prepare("shakespeare_char", tmp_path)
    assert np.fromfile(path / "train.bin", dtype=np.uint16)[:5].tolist() == [18, 47, 56, 57, 58]


def test_a_crash_before_meta_leaves_no_built_dataset(tmp_path, monkeypatch):
    """...and the error names the dataset, its folder and the space left there: numpy's own
    ("1003854 requested and 151552 written") names neither."""
    def disk_full(*args):
        raise OSError("1003854 requested and 151552 written")
    monkeypatch.setattr(pickle, "dump", disk_full)
    with pytest.raises(OSError, match=rf"^dataset shakespeare_char could not be written \([\d,]+ MiB free in "
                                      rf"{tmp_path / 'shakespeare_char'}\): 1003854 requested and 151552 written$"):
        prepare("shakespeare_char", tmp_path)
    monkeypatch.undo()
    assert load_meta(prepare("shakespeare_char", tmp_path))["vocab_size"] == 65


def test_documents_written_over_several_batches_are_each_written_once(tmp_path):
    docs = [f"doc {i}" for i in range(5)]
    n = write_documents(tmp_path / "t.bin", docs, batch=2)
    enc = gpt2()
    expected = [t for d in docs for t in enc.encode_ordinary(d) + [EOT]]
    assert np.fromfile(tmp_path / "t.bin", dtype=np.uint16).tolist() == expected and n == len(expected)


def test_documents_are_tokenized_on_the_cpus_the_process_may_use(tmp_path, monkeypatch):
    """A SLURM job's or a container's CPUs, not the machine's: a tokenizer thread for each of the
    machine's cores crowded the few the job was given."""
    from gpt import data
    enc, threads = gpt2(), []

    class Recorded:
        def encode_ordinary_batch(self, texts, num_threads):
            threads.append(num_threads)
            return enc.encode_ordinary_batch(texts, num_threads=num_threads)
    monkeypatch.setattr(data, "gpt2", Recorded)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5}, raising=False)
    write_documents(tmp_path / "t.bin", ["a", "b"])
    assert threads == [2]


def test_a_half_built_dataset_is_rebuilt(tmp_path):
    path = prepare("shakespeare_char", tmp_path)
    (path / "val.bin").unlink()
    prepare("shakespeare_char", tmp_path)
    assert (path / "val.bin").exists()


def _counting(tmp_path, n):
    for s in ("train", "val"):
        np.arange(n, dtype=np.uint16).tofile(tmp_path / f"{s}.bin")


def test_exactly_block_size_tokens_is_refused(tmp_path):
    _counting(tmp_path, 8)
    with pytest.raises(ValueError, match="too few"):
        Batches(tmp_path, block_size=8, batch_size=2, device="cpu", seed=0)


def test_block_size_plus_one_tokens_give_their_one_window(tmp_path):
    _counting(tmp_path, 9)
    x, y = Batches(tmp_path, block_size=8, batch_size=2, device="cpu", seed=0).next()
    assert x[0].tolist() == list(range(8)) and y[0].tolist() == list(range(1, 9))


def test_an_id_equal_to_the_vocabulary_size_is_refused(tmp_path):
    _counting(tmp_path, 9)
    with pytest.raises(DataError):
        Batches(tmp_path, block_size=8, batch_size=2, device="cpu", seed=0, vocab_size=8).next()


def test_batches_are_contiguous(tmp_path):
    _counting(tmp_path, 100)
    x, y = Batches(tmp_path, 8, 2, "cpu", seed=0).next()
    assert x.is_contiguous() and y.is_contiguous()


def test_every_window_start_is_drawn(tmp_path):
    """20 tokens, block_size 8: windows start at 0 to 11 (the last one's target is the last
    token), and each is drawn: none of the data left out of training, none past it read."""
    _counting(tmp_path, 20)
    batches = Batches(tmp_path, block_size=8, batch_size=64, device="cpu", seed=0)
    starts = set()
    for _ in range(4):
        x, _ = batches.next()
        starts |= set(x[:, 0].tolist())
    assert starts == set(range(12))


def test_the_seed_decides_the_batches(tmp_path):
    """Two runs of one seed see the same batches, of two seeds other ones (a seed sweep would
    otherwise train every run on the same windows)."""
    _counting(tmp_path, 1000)

    def first(seed):
        return Batches(tmp_path, block_size=8, batch_size=4, device="cpu", seed=seed).next()[0]
    assert torch.equal(first(3), first(3)) and not torch.equal(first(3), first(4))


def test_bpe_ids_past_int16_read_as_themselves(tmp_path):
    """GPT-2's ids reach 50256: read as signed 16-bit numbers, those past 32767 turn negative."""
    for split in ("train", "val"):
        np.array([40000, 50256] * 10, dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    x, y = Batches(tmp_path, block_size=8, batch_size=2, device="cpu", seed=0, vocab_size=50257).next()
    assert set(x.flatten().tolist()) | set(y.flatten().tolist()) == {40000, 50256}


@pytest.mark.parametrize("content", [b"", pickle.dumps(dict(vocab_size=65))[:-3], b"N)R."],
                         ids=["empty", "cut short", "None called"])
def test_a_meta_pkl_cut_short_or_corrupt_is_named(tmp_path, content):
    """Whatever a corrupt pickle's bytes make it fail with (EOFError, MemoryError, ...): the file
    named, not a traceback from the unpickler."""
    (tmp_path / "meta.pkl").write_bytes(content)
    with pytest.raises(ValueError, match=r"meta.pkl is not a readable meta.pkl \(cut short or corrupt\?\)"):
        load_meta(tmp_path)


def test_a_meta_pkl_of_something_else_than_a_dict_is_named(tmp_path):
    """A list pickled as meta.pkl ended in "'list' object has no attribute 'get'", no file named."""
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(["vocab"]))  # (as a byte flipped in one can make it)
    with pytest.raises(ValueError, match=r"meta.pkl holds a list, not a meta.pkl's dict"):
        load_meta(tmp_path)


def test_a_killed_write_of_val_bin_goes_too(tmp_path):
    """A write of val.bin that was killed leaves a file as large as it: removed as train.bin's is."""
    path = prepare("shakespeare_char", tmp_path)
    killed = aged(path / temp_name("val.bin"))
    prepare("shakespeare_char", tmp_path)
    assert not killed.exists()


def test_an_openwebtext_write_that_fails_names_the_dataset_and_the_space_left(tmp_path):
    """Hours into the download a full disk is told with the space left, not as a bare OSError."""
    def texts():
        yield "a document"
        raise OSError("No space left on device")
    with pytest.raises(OSError, match=r"^dataset openwebtext could not be written \([\d,]+ MiB free in .*\): No space"):
        build_openwebtext(tmp_path / "openwebtext", {"train": texts()})
