"""Checkpoints in two formats, both written so that a crash mid-write leaves the last one whole.

- full: out_dir/ckpt.pt, one file with the whole model and optimizer state, written by one
  process (single process, DDP and ZeRO-1 after consolidating its optimizer state on rank 0);
  loaded whether or not the model that wrote it was compiled. nanoGPT's own ckpt.pt loads too:
  its parameters are this model's under a "transformer." prefix, in the same order (so its
  AdamW state maps onto this model's groups), and its model_args name only the GPT-2 keys.
- sharded: out_dir/ckpt.dcp, a torch.distributed.checkpoint directory to which every FSDP rank
  writes its own shards, plus train_state.pt (everything but model and optimizer). It loads on
  any number of ranks, or into one process without a process group.

Writing one format removes the other, so out_dir holds one checkpoint.
"""
import os
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import local_optimizer
from .files import remove_abandoned, write_atomic
from .model import GPT, GPTConfig
from .optim import BF16AdamW

FILENAME = "ckpt.pt"
SHARDED = "ckpt.dcp"
# A sharded checkpoint's folder, and where save_sharded keeps the new one and the one before it
# between its two renames.
_SHARDED_FORMS = (SHARDED, f"{SHARDED}.tmp", f"{SHARDED}.old")
TRAIN_STATE = "train_state.pt"  # in a sharded checkpoint: iteration, config, RNG states, ...
_PREFIXES = ("_orig_mod.", "transformer.")  # torch.compile's wrapper's; nanoGPT's and Hugging Face's GPT-2
_MASK_BUFFERS = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # their causal masks, kept by older versions


def _master() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _disk_error(e: BaseException) -> bool:
    """A failed write: an OSError, or torch's file writer's RuntimeError for a short write (a full
    disk: "unexpected pos"), not its other RuntimeErrors (a tensor's copy to the host failing is
    no disk's fault)."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and (
        "unexpected pos" in str(e) or "PytorchStreamWriter failed" in str(e)))


def _writer(obj):
    """torch.save(obj, f) for write_atomic, a short write raised as the OSError it is."""
    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            if not _disk_error(e):
                raise
            raise OSError(f"torch.save could not write it whole ({e})") from e
    return write


def save(checkpoint: dict, out_dir: str | os.PathLike) -> Path:
    """Write `checkpoint` to out_dir/ckpt.pt so that a crash mid-write never leaves a torn file."""
    path = write_atomic(Path(out_dir) / FILENAME, _writer(checkpoint))
    shutil.rmtree(path.with_name(SHARDED), ignore_errors=True)
    return path


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict,
                 out_dir: str | os.PathLike) -> Path:
    """Write model and optimizer with torch.distributed.checkpoint, each rank its own shards, and
    `train_state` from rank 0. A collective: every rank calls it."""
    out = Path(out_dir)
    path, tmp, old = (out / name for name in _SHARDED_FORMS)
    if _master():
        if (tmp / TRAIN_STATE).exists() and not path.exists():
            os.replace(tmp, path)  # a crash between the last save's renames: the newest whole one, kept
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed write's files, maybe of another world size
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    except CheckpointException as e:  # on every rank, with each failed rank's error
        failed = {rank: error for rank, (error, _) in e.failures.items() if _disk_error(error)}
        if not failed:
            raise
        raise OSError(f"torch.distributed.checkpoint could not write the shards of rank(s) "
                      f"{', '.join(map(str, failed))} ({next(iter(failed.values()))})") from None
    if _master():
        # Whole or absent: its presence is what marks the directory's shards complete.
        write_atomic(tmp / TRAIN_STATE, _writer(train_state))
        # A directory cannot replace another in one rename; a crash between the two leaves the
        # new checkpoint whole in ckpt.dcp.tmp, where load finds it.
        shutil.rmtree(old, ignore_errors=True)  # left by a crash in the last save's clean-up
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
        (out / FILENAME).unlink(missing_ok=True)
    _barrier()
    return path


def locate(out_dir: str | os.PathLike) -> Path:
    """The checkpoint in out_dir that load reads, a FileNotFoundError saying so where there is none."""
    out = Path(out_dir)
    found = _found(out)
    if not found:
        earlier = out / "earlier"
        hint = f"; {earlier} holds the one a new run set aside (move it back to resume it)" if _found(earlier) else ""
        raise FileNotFoundError(f"no checkpoint ({FILENAME} or {SHARDED}) in {out}{hint}")
    return max(found, key=lambda p: p.stat().st_mtime)  # both only after a crash: the newer


def load(out_dir: str | os.PathLike, device: str, resume: bool = False) -> dict:
    """The checkpoint in out_dir. A full one whole; a sharded one's train state, with `sharded`
    (its directory) where model and optimizer would be: `restore` and `build_model` read them.
    resume: a run resumes from it, which takes where it stood and its optimizer state too."""
    path = locate(out_dir)
    keys = ("model_args", *(("iter_num", "best_val_loss") if resume else ()))
    if path.name != FILENAME:
        checkpoint = dict(_training_state(path / TRAIN_STATE, keys, map_location=device), sharded=path)
    else:
        # Loaded to the host, the file is mapped, not read: the ranks of a node resuming at once
        # share its pages instead of holding a copy each.
        keys = (*keys, "model", *(("optimizer",) if resume else ()))
        checkpoint = _training_state(path, keys, map_location=device, mmap=device == "cpu")
        checkpoint["model"] = model_state(checkpoint["model"])
    try:
        checkpoint["model_args"] = asdict(GPTConfig(**checkpoint["model_args"]))  # every key (nanoGPT's has few)
    except (TypeError, ValueError) as e:  # a key GPTConfig has not, a value it refuses, or no mapping at all
        raise ValueError(f"{path}: its model_args are not a GPT's ({e})") from None
    return checkpoint


def _training_state(path: Path, keys: tuple[str, ...], **options) -> dict:
    """The dict a training run saved at `path`, with `keys` (another file torch.save wrote, or a
    model's bare state dict, is refused by name)."""
    state = _load(path, **options)
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else keys
    if missing:
        raise ValueError(f"{path} is not a training checkpoint: it has no {' or '.join(missing)}")
    return state


def _load(path: Path, **options):
    """torch.load with weights_only: tensors, numbers, strings and containers of them, all that a
    checkpoint (ours or nanoGPT's) holds; unpickling anything else could run code a downloaded
    file brought. A file it cannot read is a ValueError naming it, whatever torch.load raised:
    a corrupt file can end its unpickler in any of a dozen errors (KeyError, UnicodeDecodeError,
    struct.error, OSError, ...)."""
    try:
        return torch.load(path, weights_only=True, **options)
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError) or isinstance(e, OSError) and e.filename:
            raise  # the device's, or the file system's (no such file, a folder, no permission), not the bytes'
        if str(e).startswith("Weights only load failed") and "GLOBAL" in str(e):  # a class or function it names
            raise ValueError(f"{path} holds more than tensors, numbers and strings: not loaded ({e})") from None
        if options.get("mmap") and str(e).startswith("mmap can only be used"):
            return _load(path, **{**options, "mmap": False})  # torch.save's legacy format: read, not mapped
        reason = ": ".join(filter(None, (type(e).__name__, str(e))))  # an EOFError's text is empty, a KeyError's a byte
        raise ValueError(f"{path} is not a readable checkpoint (cut short or corrupt?): {reason}") from None


def exists(out_dir: str | os.PathLike) -> bool:
    """Whether out_dir holds a checkpoint, of either format, that load would read."""
    return bool(_found(Path(out_dir)))


def remove_torn(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of full checkpoints whose write was killed, each as large as a
    checkpoint (files.remove_abandoned); the ones removed. For a run starting in out_dir: its own
    first save would remove them, but hours later."""
    return remove_abandoned(Path(out_dir) / FILENAME)


def set_aside(out_dir: str | os.PathLike, log: Path) -> Path | None:
    """For a new training run in out_dir: move the last run's checkpoint (either format) and its
    `log` into out_dir/earlier (what an older run left there goes), and return that folder; None
    when there is no checkpoint. Left in place, the old checkpoint would sit beside the new run's
    log until the new run first saves (never, if no evaluation improves on its first and
    always_save_checkpoint is off), and a resume would continue the old run on the new log."""
    out = Path(out_dir)
    if not _found(out):
        return None
    earlier = out / "earlier"
    if earlier.is_dir() and not earlier.is_symlink():
        shutil.rmtree(earlier)
    else:
        earlier.unlink(missing_ok=True)
    earlier.mkdir()
    # Every form a checkpoint can be left in (a crash between save_sharded's renames leaves two).
    for path in [*(out / name for name in (FILENAME, *_SHARDED_FORMS)), log]:
        if path.exists():
            os.replace(path, earlier / path.name)
    return earlier


def _found(out: Path) -> list[Path]:
    return [p for p in (out / FILENAME, _sharded_dir(out)) if p is not None and p.exists()]


def _sharded_dir(out: Path) -> Path | None:
    """ckpt.dcp; after a crash between save_sharded's two renames, the new checkpoint in
    ckpt.dcp.tmp (whole once its train state, written last, is there), else the one before it
    in ckpt.dcp.old."""
    return next((d for d in (out / name for name in _SHARDED_FORMS) if (d / TRAIN_STATE).exists()), None)


def model_state(state: dict) -> dict:
    """A model state dict under this model's names: torch.compile's and nanoGPT's prefixes
    removed, causal-mask buffers left out."""
    renamed = {}
    for name, tensor in state.items():
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if not _MASK_BUFFERS.match(name):
            renamed[name] = tensor
    return renamed


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: dict) -> None:
    """Load a checkpoint's model and optimizer states. A full checkpoint needs an unsharded
    model (any optimizer, ZeRO-1's included); a sharded one loads into a model sharded by FSDP2
    on any number of ranks, or a whole one, with a plain torch optimizer (not ZeRO-1's)."""
    if "sharded" not in checkpoint:
        _load_weights(model, checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    else:
        _restore_sharded(model, optimizer, checkpoint["sharded"])
    local = local_optimizer(optimizer)
    for param, state in local.state.items():
        # As torch's load_state_dict leaves them, and ZeRO-1's, which copies each state as saved,
        # does not: moments in the param's dtype (the other optimizer's are fp32 or bf16).
        for name in ("exp_avg", "exp_avg_sq", "compensation"):
            if name in state and state[name].dtype != param.dtype:
                state[name] = state[name].to(param.dtype)
        if not isinstance(local, BF16AdamW):
            # BF16AdamW's Kahan compensation (what rounding its bf16 params lost) means nothing to
            # torch's AdamW over fp32 weights, which would keep it as it is: were the run to switch
            # back, the compensation would be that of weights long since changed. It starts at zero.
            state.pop("compensation", None)
            if "step" in state and not torch.is_tensor(state["step"]):  # BF16AdamW's count, an int
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device="cpu")


def _restore_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    # The state dicts of this model and optimizer, as torch.distributed.checkpoint keys them
    # (parameter names, not positions), are the template that dcp.load fills from the files,
    # resharding from whatever world size wrote them.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    _like_the_checkpoint(optimizer_state, path)
    state = {"model": model_state, "optimizer": optimizer_state}
    _dcp_load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def steps_on_param_devices(optimizer: torch.optim.Optimizer) -> None:
    """Put the step counts of `optimizer`'s fused or capturable groups on their params' devices, as
    fp32 tensors, where those kernels read them. torch's load_state_dict does so by the saved
    groups' settings, which the run's own then replace (a checkpoint from a CPU run, unfused,
    resumed on a GPU, fused); ZeRO-1's load_state_dict moves every 0-d state to the CPU
    (pytorch/pytorch#124133): either way the fused AdamW step then fails on the device mismatch.
    Call it once the groups hold the run's settings."""
    local = local_optimizer(optimizer)
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            state = local.state.get(p, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor) and (step.device != p.device or step.dtype != torch.float32):
                state["step"] = step.to(p.device, torch.float32)


def _like_the_checkpoint(optimizer_state: dict, path: Path) -> None:
    """Make the template's optimizer state the one the checkpoint holds, as load_state_dict of a
    full checkpoint would: its groups' settings come back with it, so a state its optimizer kept
    and this one would not (BF16AdamW's Kahan compensation) is read into a zero tensor of the
    moments' layout, one this optimizer keeps but the checkpoint lacks is left out (dcp.load
    would fail on it), and so is a group setting; a step count is read as the checkpoint keeps
    it, a tensor (torch's optimizers) or a number (BF16AdamW): load_state_dict makes numbers
    tensors for torch's, and BF16AdamW's step takes either."""
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for name, param_state in optimizer_state["state"].items():
        prefix = f"optimizer.state.{name}."
        for key in [key for key in param_state if prefix + key not in saved]:
            del param_state[key]
        kept = {key.removeprefix(prefix) for key in saved if key.startswith(prefix)}
        for key in kept - param_state.keys() - {"step"}:  # the step below: a tensor or a number
            param_state[key] = torch.zeros_like(param_state["exp_avg"])
        step = saved.get(prefix + "step")
        tensor = isinstance(step, TensorStorageMetadata)
        if step is not None and ("step" not in param_state or tensor != isinstance(param_state["step"], torch.Tensor)):
            param_state["step"] = torch.zeros((), dtype=step.properties.dtype, device="cpu") if tensor else 0
    for i, group in enumerate(optimizer_state["param_groups"]):
        for key in [key for key in group if f"optimizer.param_groups.{i}.{key}" not in saved]:
            del group[key]


def _whole_model_state(path: Path) -> dict:
    """The model weights of a sharded checkpoint, gathered into whole tensors in this process."""
    tensors = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype, device="cpu")
             for key, meta in tensors.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    _dcp_load({"model": state}, path)
    return state


def _dcp_load(state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        # One process with no process group is meant here, not the slip dcp warns of.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)


def build_model(checkpoint: dict, kernels=None) -> GPT:
    """The checkpoint's model (either format), weights loaded, in the dtype it was saved in."""
    model = GPT(GPTConfig(**checkpoint["model_args"]), kernels)
    state = _whole_model_state(checkpoint["sharded"]) if "sharded" in checkpoint else checkpoint["model"]
    model.to(next(iter(state.values())).dtype)
    _load_weights(model, state)
    return model


def _load_weights(model: torch.nn.Module, state: dict) -> None:
    """A ValueError where the weights do not fit the model their own model_args build."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing, unexpected or misshapen weights
        raise ValueError(f"the checkpoint's weights do not fit its model_args: {e}") from None
