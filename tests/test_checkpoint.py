"""Sharded checkpoints (torch.distributed.checkpoint) in one process, no process group: what a
resume finds after a crash mid-save, and an optimizer state restored as the checkpoint holds it."""
import errno
import os
import re
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from gpt import checkpoint, distributed, files
from gpt.model import GPT, GPTConfig
from gpt.optim import BF16AdamW
from tests.devices import cuda_only

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process, no group

CONFIG = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)
WRITE_ITEM = "torch.distributed.checkpoint.filesystem._write_item"  # where dcp.save writes each item: a full disk's


def trained(kahan: bool, steps: int = 3) -> tuple[GPT, BF16AdamW]:
    torch.manual_seed(0)
    model = GPT(CONFIG).to(torch.bfloat16)
    optimizer = BF16AdamW(model.param_groups(0.1), lr=1e-2, kahan_summation=kahan)
    x = torch.randint(CONFIG.vocab_size, (2, CONFIG.block_size))
    for _ in range(steps):
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def save(tmp_path, kahan: bool, iter_num: int = 3):
    model, optimizer = trained(kahan, iter_num)
    checkpoint.save_sharded(model, optimizer, {"iter_num": iter_num, "model_args": vars(CONFIG)}, tmp_path)
    return model, optimizer


def restored(tmp_path, kahan: bool) -> tuple[GPT, BF16AdamW]:
    state = checkpoint.load(tmp_path, "cpu")
    model = GPT(CONFIG).to(torch.bfloat16)
    optimizer = BF16AdamW(model.param_groups(0.1), lr=1e-2, kahan_summation=kahan)
    checkpoint.restore(model, optimizer, state)
    return model, optimizer


def states(optimizer: torch.optim.Optimizer, key: str) -> list[torch.Tensor]:
    return [optimizer.state[p][key] for group in optimizer.param_groups for p in group["params"]
            if key in optimizer.state[p]]


@pytest.mark.parametrize("saved_kahan, kahan", [(True, False), (False, True), (True, True)])
def test_sharded_optimizer_state_comes_back_as_saved(tmp_path, saved_kahan, kahan):
    """Whatever this run's optimizer would keep, the checkpoint's state wins, as with a full
    checkpoint: its Kahan compensation is read back (not left at zero), and a checkpoint without
    it loads into an optimizer that would keep one."""
    _, saved = save(tmp_path, saved_kahan)
    _, optimizer = restored(tmp_path, kahan)
    assert [g["kahan_summation"] for g in optimizer.param_groups] == [saved_kahan] * 2
    for key in ("exp_avg", "exp_avg_sq", "compensation"):
        expected, got = states(saved, key), states(optimizer, key)
        assert len(got) == len(expected), key
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), key
    assert not saved_kahan or any(c.any() for c in states(optimizer, "compensation"))


def test_a_crash_between_the_renames_leaves_a_checkpoint_to_resume(tmp_path):
    save(tmp_path, kahan=False, iter_num=2)
    path = tmp_path / checkpoint.SHARDED
    # save_sharded moved ckpt.dcp aside and died before moving ckpt.dcp.tmp in: the new one loads
    shutil.copytree(path, tmp_path / f"{checkpoint.SHARDED}.old")
    path.rename(tmp_path / f"{checkpoint.SHARDED}.tmp")
    assert checkpoint.load(tmp_path, "cpu")["sharded"].name == f"{checkpoint.SHARDED}.tmp"
    # ... unless its train state, written last, is missing: then the one before it
    (tmp_path / f"{checkpoint.SHARDED}.tmp" / checkpoint.TRAIN_STATE).unlink()
    state = checkpoint.load(tmp_path, "cpu")
    assert state["sharded"].name == f"{checkpoint.SHARDED}.old" and state["iter_num"] == 2
    restored(tmp_path, kahan=False)
    shutil.rmtree(tmp_path / f"{checkpoint.SHARDED}.old")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(tmp_path, "cpu")


def test_a_save_after_a_crash_keeps_the_newest_whole_checkpoint(tmp_path):
    """The next save after a crash between the renames (the newest checkpoint whole in
    ckpt.dcp.tmp) must not delete it before the new one is whole; after a crash in the clean-up
    (ckpt.dcp.old left beside ckpt.dcp) the next save must still succeed."""
    save(tmp_path, kahan=False, iter_num=2)
    path, tmp, old = (tmp_path / f"{checkpoint.SHARDED}{s}" for s in ("", ".tmp", ".old"))
    shutil.copytree(path, old)
    torch.save(dict(torch.load(old / checkpoint.TRAIN_STATE), iter_num=1), old / checkpoint.TRAIN_STATE)
    path.rename(tmp)
    model, optimizer = trained(kahan=False)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(RuntimeError, match="disk full"):
        patch.setattr(checkpoint.dcp, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
        checkpoint.save_sharded(model, optimizer, {"iter_num": 4, "model_args": vars(CONFIG)}, tmp_path)
    assert checkpoint.load(tmp_path, "cpu")["iter_num"] == 2  # the crashed save's predecessor, not older
    assert old.exists()  # as after a crash following the second rename, before its removal
    checkpoint.save_sharded(model, optimizer, {"iter_num": 5, "model_args": vars(CONFIG)}, tmp_path)
    assert checkpoint.load(tmp_path, "cpu")["iter_num"] == 5 and not old.exists() and not tmp.exists()


def save_either(model, optimizer, train_state: dict, out, sharded: bool) -> None:
    """A checkpoint of either format, as train.py writes them."""
    if sharded:
        checkpoint.save_sharded(model, optimizer, train_state, out)
    else:
        checkpoint.save(dict(train_state, model=model.state_dict(), optimizer=optimizer.state_dict()), out)


def optimizer_for(name: str, model: GPT) -> torch.optim.Optimizer:
    """train.py's two: torch's AdamW over fp32 weights, BF16AdamW over bf16 ones."""
    if name == "adamw":
        return torch.optim.AdamW(model.float().param_groups(0.1), lr=1e-2)
    return BF16AdamW(model.to(torch.bfloat16).param_groups(0.1), lr=1e-2)


@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
@pytest.mark.parametrize("saved_with, resumed_with", [("adamw", "bf16_adamw"), ("bf16_adamw", "adamw")])
def test_a_run_resumes_under_the_other_optimizer(tmp_path, sharded, saved_with, resumed_with):
    """Step counts are tensors in torch's AdamW, numbers in BF16AdamW: a checkpoint of either
    resumes under the other (a sharded one failed to load both ways, a full one of BF16AdamW
    under AdamW at its first step), its counts going on from the checkpoint's. The states this
    code makes are made on the host whatever a script's torch.set_default_device says (meta here;
    torch's AdamW makes a BF16AdamW checkpoint's counts on the default device itself)."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = optimizer_for(saved_with, model)
    x = torch.randint(CONFIG.vocab_size, (2, CONFIG.block_size))

    def steps(model, optimizer, n):
        for _ in range(n):
            model(x, x)[1].backward()
            optimizer.step()
            optimizer.zero_grad()
    steps(model, optimizer, 3)
    save_either(model, optimizer, {"iter_num": 3, "model_args": vars(CONFIG)}, tmp_path, sharded)
    resumed = GPT(CONFIG)
    optimizer = optimizer_for(resumed_with, resumed)
    saved = checkpoint.load(tmp_path, "cpu")
    with torch.device("meta") if resumed_with == "bf16_adamw" else nullcontext():
        checkpoint.restore(resumed, optimizer, saved)
    steps(resumed, optimizer, 2)
    assert {int(s["step"]) for s in optimizer.state.values()} == {5}
    assert all(torch.isfinite(p).all() for p in resumed.parameters())


@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
def test_kahan_compensation_does_not_outlive_a_run_under_torch_s_adamw(tmp_path, sharded):
    """bf16_adamw with Kahan, then adamw, then bf16_adamw with Kahan again: torch's AdamW kept the
    compensation as it was, and the last run took it up, stale, for weights changed since."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    optimizer = BF16AdamW(model.to(torch.bfloat16).param_groups(0.1), lr=1e-2, kahan_summation=True)
    x = torch.randint(CONFIG.vocab_size, (2, CONFIG.block_size))
    model(x, x)[1].backward()
    optimizer.step()
    save_either(model, optimizer, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path, sharded)
    resumed = GPT(CONFIG)
    theirs = optimizer_for("adamw", resumed)
    checkpoint.restore(resumed, theirs, checkpoint.load(tmp_path, "cpu"))
    assert theirs.state and not any("compensation" in state for state in theirs.state.values())


def _adamw_steps(model, optimizer, device, steps=1):
    for _ in range(steps):
        model(torch.randn(2, 8, device=device)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_fused_step_counts_are_put_where_the_fused_step_reads_them():
    """A checkpoint of an unfused AdamW (a CPU run) resumed fused or capturable, as train.py sets its groups:
    the step counts become fp32 tensors on the params' devices (here the CPU: a float64 count
    stands for one in the wrong place); unfused groups are left as they are."""
    model = torch.nn.Linear(8, 8)
    saved = torch.optim.AdamW(model.parameters())
    _adamw_steps(model, saved, "cpu")
    resumed = torch.optim.AdamW(model.parameters(), fused=True)
    resumed.load_state_dict(saved.state_dict())
    for state in resumed.state.values():
        state["step"] = state["step"].double()
    checkpoint.steps_on_param_devices(resumed)
    assert all(s["step"].dtype == torch.float64 for s in resumed.state.values())  # unfused: as saved
    for setting in ("capturable", "fused"):  # the run's setting: either reads the counts on the device
        for state in resumed.state.values():
            state["step"] = state["step"].double()
        resumed.param_groups[0].update(fused=setting == "fused", capturable=setting == "capturable")
        checkpoint.steps_on_param_devices(resumed)
        assert all(s["step"].dtype == torch.float32 and s["step"].device == p.device
                   for p, s in resumed.state.items())
    _adamw_steps(model, resumed, "cpu")


@cuda_only
def test_zero1_fused_adamw_resumes_on_the_gpu():
    """ZeRO-1's load_state_dict puts AdamW's step counts on the CPU (pytorch/pytorch#124133),
    where the fused step on the GPU fails: train.py's resume puts them back."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda:0"))
    try:
        model = torch.nn.Linear(8, 8).cuda()

        def make():
            return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, fused=True, lr=1e-3)
        saved = make()
        _adamw_steps(model, saved, "cuda")
        saved.consolidate_state_dict(0)
        resumed = make()
        resumed.load_state_dict(saved.state_dict())
        checkpoint.steps_on_param_devices(resumed)
        _adamw_steps(model, resumed, "cuda")
        assert all(s["step"].device == p.device for p, s in resumed.optim.state.items())
    finally:
        dist.destroy_process_group()


def test_a_killed_write_s_temporary_file_is_removed_by_the_next_run(tmp_path):
    """write_atomic removes its temporary file on an error, but a killed process (out of memory,
    preemption) leaves it, as large as a checkpoint: the next run in out_dir removes it."""
    torn = tmp_path / f".{checkpoint.FILENAME}.{files.HOST}.4242.0123456789ab.tmp"
    torn.write_bytes(b"half a checkpoint")
    past = time.time() - files.ABANDONED_S - 1
    os.utime(torn, (past, past))
    (tmp_path / "other.tmp").write_bytes(b"not ours")
    assert checkpoint.remove_torn(tmp_path) == [torn]
    assert not torn.exists() and (tmp_path / "other.tmp").exists()


def test_a_new_run_sets_a_sharded_checkpoint_aside_with_its_log(tmp_path):
    """ckpt.dcp (a folder) and log.jsonl go to out_dir/earlier, replacing an older run's there;
    without a checkpoint nothing moves."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 0}\n')
    assert checkpoint.set_aside(tmp_path, log) is None and log.exists()
    save(tmp_path, kahan=False, iter_num=2)
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "ckpt.pt").write_bytes(b"an older run's")
    earlier = checkpoint.set_aside(tmp_path, log)
    assert earlier == tmp_path / "earlier" and sorted(p.name for p in earlier.iterdir()) == [checkpoint.SHARDED,
                                                                                            "log.jsonl"]
    assert not checkpoint.exists(tmp_path) and not log.exists()
    assert checkpoint.load(earlier, "cpu")["iter_num"] == 2
    # A crash between save_sharded's renames left two (.tmp and .old): both go, or a resume would
    # take the older; an `earlier` that is a file is replaced too.
    save(tmp_path, kahan=False, iter_num=4)
    shutil.copytree(tmp_path / checkpoint.SHARDED, tmp_path / f"{checkpoint.SHARDED}.old")
    (tmp_path / checkpoint.SHARDED).rename(tmp_path / f"{checkpoint.SHARDED}.tmp")
    shutil.rmtree(earlier)
    earlier.write_text("not a folder")
    assert checkpoint.set_aside(tmp_path, log) == earlier and not checkpoint.exists(tmp_path)
    assert checkpoint.load(earlier, "cpu")["iter_num"] == 4


class _Payload:
    """What a planted checkpoint could make torch.load run (here only a marker)."""

    def __reduce__(self):
        return (print, ("code from a checkpoint ran",))


def test_a_checkpoint_holding_code_is_refused(tmp_path, capsys):
    torch.save({"model": {}, "model_args": {}, "payload": _Payload()}, tmp_path / checkpoint.FILENAME)
    with pytest.raises(ValueError, match="ckpt.pt holds more than tensors, numbers and strings: not loaded"):
        checkpoint.load(tmp_path, "cpu")
    assert "code from a checkpoint ran" not in capsys.readouterr().out
    (tmp_path / checkpoint.FILENAME).write_bytes(b"\x80\x02garbage")  # not the refusal's wording
    with pytest.raises(ValueError, match="ckpt.pt is not a readable checkpoint"):
        checkpoint.load(tmp_path, "cpu")


@pytest.mark.parametrize("saved", [{"a": 1}, {"model_args": {}}, torch.zeros(2)])
def test_a_file_torch_saved_that_is_no_training_checkpoint_is_refused_by_name(tmp_path, saved):
    torch.save(saved, tmp_path / checkpoint.FILENAME)
    with pytest.raises(ValueError, match=r"ckpt.pt is not a training checkpoint: it has no (model_args or )?model$"):
        checkpoint.load(tmp_path, "cpu")


@pytest.mark.parametrize("saved", [{"a": 1}, torch.zeros(2)])
def test_a_sharded_checkpoints_train_state_that_is_no_training_runs_is_refused_by_name(tmp_path, saved):
    (tmp_path / checkpoint.SHARDED).mkdir()
    torch.save(saved, tmp_path / checkpoint.SHARDED / checkpoint.TRAIN_STATE)
    with pytest.raises(ValueError, match=r"train_state.pt is not a training checkpoint: it has no model_args$"):
        checkpoint.load(tmp_path, "cpu")


def test_a_checkpoint_that_cannot_resume_or_build_its_model_is_refused_by_name(tmp_path):
    """model_args that are not a GPT's, weights that do not fit them, and, to resume, no iter_num
    or optimizer state: a ValueError naming what (a TypeError, RuntimeError or KeyError once)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    whole = {"model_args": asdict(model.config), "model": model.state_dict(), "iter_num": 3,
             "best_val_loss": 2.0, "optimizer": torch.optim.AdamW(model.parameters()).state_dict()}
    path = tmp_path / checkpoint.FILENAME
    torch.save(dict(whole, model_args=dict(whole["model_args"], n_layers=2)), path)
    with pytest.raises(ValueError, match=r"ckpt.pt: its model_args are not a GPT's \(.*'n_layers'"):
        checkpoint.load(tmp_path, "cpu")
    torch.save(dict(whole, model_args=dict(whole["model_args"], n_head=3)), path)  # GPTConfig's own refusal
    with pytest.raises(ValueError, match=r"ckpt.pt: its model_args are not a GPT's \(.*not a multiple of n_head 3"):
        checkpoint.load(tmp_path, "cpu")
    for left_out in ("iter_num", "best_val_loss", "optimizer"):
        torch.save({k: v for k, v in whole.items() if k != left_out}, path)
        assert checkpoint.load(tmp_path, "cpu")["model_args"] == whole["model_args"]  # enough to sample
        with pytest.raises(ValueError, match=f"ckpt.pt is not a training checkpoint: it has no {left_out}$"):
            checkpoint.load(tmp_path, "cpu", resume=True)
    torch.save(dict(whole, model_args=dict(whole["model_args"], n_embd=32)), path)
    with pytest.raises(ValueError, match="(?s)the checkpoint's weights do not fit its model_args: .*size mismatch"):
        checkpoint.build_model(checkpoint.load(tmp_path, "cpu"))


def test_only_torch_save_s_short_write_reads_as_the_disk_s_error(tmp_path, monkeypatch):
    """A short write (a full disk) is an OSError, which train.py reports with the free space; any
    other RuntimeError of torch.save (a tensor's copy to the host) stays itself."""
    def fails(message):
        def save(obj, f):
            raise RuntimeError(message)
        return save
    monkeypatch.setattr(checkpoint.torch, "save", fails("[enforce fail at inline_container.cc:672] . unexpected pos 9"))
    with pytest.raises(OSError, match="torch.save could not write it whole"):
        checkpoint.save({}, tmp_path)
    monkeypatch.setattr(checkpoint.torch, "save", fails("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        checkpoint.save({}, tmp_path)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9")])
def test_shards_the_disk_cannot_take_are_the_disk_s_error_and_the_last_checkpoint_stays(tmp_path, error):
    """As a full checkpoint's failed write: an OSError, which train.py reports with the free space."""
    m, o = trained(kahan=False, steps=0)
    checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path)
    with mock.patch(WRITE_ITEM, side_effect=error):
        with pytest.raises(OSError, match=r"^torch.distributed.checkpoint could not write the shards of rank\(s\) "
                                          rf"0 \({re.escape(str(error))}\)$"):
            checkpoint.save_sharded(m, o, {"iter_num": 2, "model_args": vars(CONFIG)}, tmp_path)
    assert checkpoint.load(tmp_path, "cpu")["iter_num"] == 1


def test_a_shard_s_failure_that_is_no_disk_s_stays_itself(tmp_path):
    m, o = trained(kahan=False, steps=0)
    with mock.patch(WRITE_ITEM, side_effect=ValueError("a bug")):
        with pytest.raises(CheckpointException, match="a bug"):
            checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path)


@pytest.mark.parametrize("saved_by, resumed_by", [("bf16_adamw", "adamw"), ("adamw", "bf16_adamw")])
@pytest.mark.parametrize("zero1", [False, True], ids=["one process", "zero1"])
def test_a_full_checkpoint_resumes_under_the_other_optimizer(saved_by, resumed_by, zero1, request):
    """The state another optimizer saved is the one this optimizer keeps, as torch's
    load_state_dict makes it and ZeRO-1's (which copies each state as saved) does not: moments in
    the params' dtype, torch's AdamW's step a tensor (BF16AdamW counts in an int)."""
    if zero1:
        request.getfixturevalue("one_process_group")
    world = distributed.World(parallel="zero1" if zero1 else None)

    def built(name):
        torch.manual_seed(0)
        model = GPT(CONFIG).to(torch.bfloat16 if name == "bf16_adamw" else torch.float32)
        cls = BF16AdamW if name == "bf16_adamw" else torch.optim.AdamW
        return model, distributed.optimizer(world, model.param_groups(0.1), cls, lr=1e-2)

    def step(model, optimizer):
        x = torch.randint(CONFIG.vocab_size, (2, CONFIG.block_size))
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer = built(saved_by)
    step(model, optimizer)
    saved = dict(model=model.state_dict(), optimizer=distributed.optimizer_state(optimizer))
    model, optimizer = built(resumed_by)
    checkpoint.restore(model, optimizer, saved)
    local = distributed.local_optimizer(optimizer)
    for param, state in local.state.items():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == param.dtype
        assert float(state["step"]) == 1 and (resumed_by == "bf16_adamw" or torch.is_tensor(state["step"]))
    step(model, optimizer)
    assert all(float(state["step"]) == 2 for state in local.state.values())


def test_a_missing_checkpoint_s_message_points_to_the_one_a_new_run_set_aside(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint \(ckpt.pt or ckpt.dcp\) in \S+$"):
        checkpoint.load(tmp_path, "cpu")
    (tmp_path / checkpoint.FILENAME).write_bytes(b"a checkpoint")
    assert checkpoint.set_aside(tmp_path, tmp_path / "log.jsonl") == tmp_path / "earlier"
    with pytest.raises(FileNotFoundError, match=r"; \S+/earlier holds the one a new run set aside \(move it back"):
        checkpoint.load(tmp_path, "cpu")

# Each format's save replaces the other's, a load takes the newer, and a crash's leftovers never
# enter or stand for a checkpoint.

def full(model, optimizer, iter_num: int) -> dict:
    """A full checkpoint's contents, as train.py saves them."""
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), iter_num=iter_num,
                model_args=vars(CONFIG))


def test_a_full_save_removes_a_sharded_checkpoint(tmp_path):
    m, o = trained(kahan=False, steps=0)
    checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path)
    checkpoint.save(full(m, o, 2), tmp_path)
    assert not (tmp_path / checkpoint.SHARDED).exists()


def test_a_sharded_save_removes_a_full_checkpoint(tmp_path):
    m, o = trained(kahan=False, steps=0)
    checkpoint.save(full(m, o, 1), tmp_path)
    checkpoint.save_sharded(m, o, {"iter_num": 2, "model_args": vars(CONFIG)}, tmp_path)
    assert not (tmp_path / checkpoint.FILENAME).exists()


@pytest.mark.parametrize("newer", ["full", "sharded"])
def test_load_takes_the_newer_of_two_formats(tmp_path, newer):
    m, o = trained(kahan=False, steps=0)
    checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path)
    torch.save(full(m, o, 2), tmp_path / checkpoint.FILENAME)
    old = time.time() - 100
    os.utime(tmp_path / (checkpoint.SHARDED if newer == "full" else checkpoint.FILENAME), (old, old))
    assert checkpoint.load(tmp_path, "cpu")["iter_num"] == (2 if newer == "full" else 1)


def test_a_save_after_a_crash_before_the_first_rename(tmp_path):
    m, o = trained(kahan=False, steps=0)
    checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path)
    shutil.copytree(tmp_path / checkpoint.SHARDED, tmp_path / f"{checkpoint.SHARDED}.tmp")  # both whole
    checkpoint.save_sharded(m, o, {"iter_num": 3, "model_args": vars(CONFIG)}, tmp_path)
    assert checkpoint.load(tmp_path, "cpu")["iter_num"] == 3


def test_a_failed_first_sharded_save_leaves_no_checkpoint(tmp_path):
    m, o = trained(kahan=False, steps=0)
    with mock.patch.object(checkpoint.dcp, "save", side_effect=RuntimeError("disk full")), \
         pytest.raises(RuntimeError):
        checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path)
    assert not checkpoint.exists(tmp_path)


def test_stale_temporary_shards_do_not_enter_the_checkpoint(tmp_path):
    (tmp_path / f"{checkpoint.SHARDED}.tmp").mkdir()
    (tmp_path / f"{checkpoint.SHARDED}.tmp" / "__3_0.distcp").write_bytes(b"x" * 10)
    m, o = trained(kahan=False, steps=0)
    checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path)
    assert not (tmp_path / checkpoint.SHARDED / "__3_0.distcp").exists()


def test_an_empty_file_is_named_unreadable_off_the_cpu(tmp_path):
    for cut in (b"", b"\x80"):  # the second a traceback once (IndexError)
        (tmp_path / checkpoint.FILENAME).write_bytes(cut)
        with pytest.raises(ValueError, match="not a readable checkpoint"):
            checkpoint.load(tmp_path, "meta")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, for a corrupt protocol byte
@pytest.mark.parametrize("legacy", [False, True], ids=["zipfile", "legacy"])
@pytest.mark.parametrize("device", ["cpu", "meta"])  # the cpu's load is memory-mapped
def test_every_corruption_of_a_checkpoint_is_named_unreadable(tmp_path, legacy, device):
    """A corrupt file ends torch.load's unpickler in KeyError, UnicodeDecodeError, struct.error,
    AssertionError, OSError, ... (each a traceback once), or GPTConfig in its refusal of a value:
    each is the file's ValueError."""
    rng = torch.Generator().manual_seed(int(torch.randint(2**31, ())))  # fresh each run: trained() seeds torch's
    model, _ = trained(kahan=False, steps=0)
    whole = tmp_path / "whole.pt"
    torch.save({"model": model.state_dict(), "model_args": vars(CONFIG)}, whole,
               _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    for _ in range(100):
        cut, at, byte = (int(torch.randint(n, (1,), generator=rng)) for n in (len(data), len(data), 256))
        corrupt = data[:cut] if byte < 32 else data[:at] + bytes([byte]) + data[at + 1:]
        (tmp_path / checkpoint.FILENAME).write_bytes(corrupt)
        try:
            checkpoint.load(tmp_path, device)
        except ValueError as e:
            assert str(e).startswith(str(tmp_path / checkpoint.FILENAME)), e
        except Exception as e:
            pytest.fail(f"{type(e).__name__}: {e}")


def test_a_checkpoint_in_torch_saves_legacy_format_loads_on_the_cpu(tmp_path):
    """torch.load cannot map it (its mmap refuses with advice to save it again): read instead."""
    model, _ = trained(kahan=False)
    torch.save({"model": model.state_dict(), "model_args": vars(CONFIG)}, tmp_path / checkpoint.FILENAME,
               _use_new_zipfile_serialization=False)
    loaded = checkpoint.load(tmp_path, "cpu")["model"]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_a_folder_named_ckpt_pt_is_named_not_read_as_a_sharded_checkpoint(tmp_path):
    (tmp_path / checkpoint.FILENAME).mkdir()
    with pytest.raises(IsADirectoryError, match="ckpt.pt"):  # was: No such file .../ckpt.pt/train_state.pt
        checkpoint.load(tmp_path, "cpu")


def test_a_symlinked_earlier_is_replaced_not_followed(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier").symlink_to(keep)
    m, o = trained(kahan=False, steps=0)
    checkpoint.save(full(m, o, 1), out)
    assert checkpoint.set_aside(out, out / "log.jsonl") == out / "earlier"
    assert (keep / "precious").exists()


def test_restore_refuses_a_model_state_missing_a_weight(tmp_path):
    m, o = trained(kahan=False, steps=0)
    state = m.state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="(?s)the checkpoint's weights do not fit its model_args: .*Missing key"):
        checkpoint.restore(GPT(CONFIG), torch.optim.AdamW(GPT(CONFIG).parameters()),
                           dict(model=state, optimizer=o.state_dict()))


@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
def test_a_model_is_built_in_the_dtype_it_was_saved_in(tmp_path, sharded):
    """A pure-bf16 run's checkpoint gives a bf16 model (gpt.sample's, a resumed run's), its
    weights as saved: not fp32 copies of them."""
    m, o = trained(kahan=False, steps=1)
    if sharded:
        checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG)}, tmp_path)
    else:
        checkpoint.save(full(m, o, 1), tmp_path)
    model = checkpoint.build_model(checkpoint.load(tmp_path, "cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m.parameters()))


def test_torch_save_s_failed_file_write_reads_as_the_disk_s_error(tmp_path, monkeypatch):
    """torch's zip writer says a full disk either way: "unexpected pos" or "PytorchStreamWriter
    failed writing file ...": both are the OSError train.py reports with the free space."""
    def save(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed "
                           "writing file data/0: file write failed")
    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(OSError, match="torch.save could not write it whole"):
        checkpoint.save({}, tmp_path)
    assert not checkpoint.exists(tmp_path) and list(tmp_path.iterdir()) == []


def test_an_earlier_folder_without_a_checkpoint_gets_no_hint(tmp_path):
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "log.jsonl").write_text('{"iter": 0}\n')
    with pytest.raises(FileNotFoundError, match=r"no checkpoint \(ckpt.pt or ckpt.dcp\) in \S+$"):
        checkpoint.load(tmp_path, "cpu")


def test_a_sharded_checkpoint_s_train_state_goes_to_the_device_asked_for(tmp_path):
    m, o = trained(kahan=False, steps=0)
    checkpoint.save_sharded(m, o, {"iter_num": 1, "model_args": vars(CONFIG), "rng": [torch.ones(3)]}, tmp_path)
    assert checkpoint.load(tmp_path, "meta")["rng"][0].device.type == "meta"


def test_a_full_checkpoint_is_mapped_on_the_host_not_read(tmp_path, monkeypatch):
    """The ranks of a node resuming at once share the file's pages (mmap); off the host it is read."""
    m, o = trained(kahan=False, steps=0)
    checkpoint.save(full(m, o, 1), tmp_path)
    seen, load = [], torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: seen.append(k.get("mmap")) or load(*a, **k))
    checkpoint.load(tmp_path, "cpu")
    checkpoint.load(tmp_path, "meta")
    assert seen == [True, False]


def test_running_out_of_memory_while_loading_is_not_called_a_corrupt_file(tmp_path, monkeypatch):
    m, o = trained(kahan=False, steps=0)
    checkpoint.save(full(m, o, 1), tmp_path)

    def load(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(checkpoint.torch, "load", load)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        checkpoint.load(tmp_path, "cpu")


def test_an_unreadable_file_s_reason_names_the_error_even_when_its_text_is_empty(tmp_path):
    (tmp_path / checkpoint.FILENAME).write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a readable checkpoint \(cut short or corrupt\?\): EOFError$"):
        checkpoint.load(tmp_path, "cpu")
    (tmp_path / checkpoint.FILENAME).write_bytes(b"\x80")
    with pytest.raises(ValueError, match=r"corrupt\?\): IndexError: index out of range$"):
        checkpoint.load(tmp_path, "cpu")


def test_exists_sees_a_sharded_checkpoint_in_every_form_load_reads(tmp_path):
    save(tmp_path, kahan=False, iter_num=1)
    assert checkpoint.exists(tmp_path)
    (tmp_path / checkpoint.SHARDED).rename(tmp_path / f"{checkpoint.SHARDED}.tmp")
    assert checkpoint.exists(tmp_path) and checkpoint.load(tmp_path, "cpu")["iter_num"] == 1
    (tmp_path / f"{checkpoint.SHARDED}.tmp" / checkpoint.TRAIN_STATE).unlink()
    assert not checkpoint.exists(tmp_path)


def test_zero1_gives_torch_s_adamw_fp32_host_step_counts_from_a_bf16_adamw_checkpoint(one_process_group):
    """ZeRO-1's load_state_dict copies the state as saved: BF16AdamW's int step must become the
    fp32 host tensor torch's own load_state_dict makes (the fused and capturable kernels read it),
    whatever the default device."""
    world = distributed.World(parallel="zero1")
    torch.manual_seed(0)
    model = GPT(CONFIG).to(torch.bfloat16)
    optimizer = distributed.optimizer(world, model.param_groups(0.1), BF16AdamW, lr=1e-2)
    x = torch.randint(CONFIG.vocab_size, (2, CONFIG.block_size))
    model(x, x)[1].backward()
    optimizer.step()
    saved = dict(model=model.state_dict(), optimizer=distributed.optimizer_state(optimizer))
    resumed = GPT(CONFIG)
    theirs = distributed.optimizer(world, resumed.param_groups(0.1), torch.optim.AdamW, lr=1e-2)
    with torch.device("meta"):
        checkpoint.restore(resumed, theirs, saved)
    states = distributed.local_optimizer(theirs).state.values()
    assert {(s["step"].dtype, s["step"].device.type, float(s["step"])) for s in states} == {(torch.float32, "cpu", 1.0)}


def test_a_sharded_checkpoint_loads_in_one_process_without_a_warning(tmp_path):
    save(tmp_path, kahan=False, iter_num=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint.build_model(checkpoint.load(tmp_path, "cpu"))
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


@pytest.mark.parametrize("crash_at", [1, 2, 3])
def test_a_crash_in_any_of_save_sharded_s_deletions_leaves_a_whole_checkpoint(tmp_path, monkeypatch, crash_at):
    """The old ckpt.dcp is renamed aside before it is deleted: deleted in place, a crash midway
    would leave a torn one (its train_state.pt still there) that load takes. Here each deletion
    removes one shard and then the process dies."""
    save(tmp_path, kahan=False, iter_num=2)
    calls, rmtree = [], shutil.rmtree

    def dies_midway(path, ignore_errors=False):
        calls.append(path)
        if len(calls) < crash_at:
            return rmtree(path, ignore_errors=ignore_errors)
        for shard in sorted(path.glob("*.distcp"))[:1]:
            shard.unlink()
        raise KeyboardInterrupt  # killed mid-delete
    monkeypatch.setattr(checkpoint.shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, kahan=False, iter_num=4)
    monkeypatch.undo()
    state = checkpoint.load(tmp_path, "cpu")
    assert state["iter_num"] in (2, 4)
    checkpoint.build_model(state)  # every shard there


def test_a_sharded_save_killed_while_writing_its_train_state_leaves_no_checkpoint(tmp_path, monkeypatch):
    """train_state.pt's presence marks the shards whole: a torn one must never be there."""
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        if not (isinstance(obj, dict) and "iter_num" in obj):  # dcp's own writes of the shards
            return real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
        f.write(b"half a train state")
        f.flush()
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, kahan=False, iter_num=1)
    assert not checkpoint.exists(tmp_path)
