"""Checkpoints: written atomically, loaded whether or not the model that wrote them was compiled."""
import os
from pathlib import Path

import torch

from .model import GPT, GPTConfig

FILENAME = "ckpt.pt"
_COMPILED_PREFIX = "_orig_mod."  # torch.compile's wrapper prefixes every key with this


def save(checkpoint: dict, out_dir: str | os.PathLike) -> Path:
    """Write `checkpoint` to out_dir/ckpt.pt so that a crash mid-write never leaves a torn file."""
    path = Path(out_dir) / FILENAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def load(out_dir: str | os.PathLike, device: str) -> dict:
    path = Path(out_dir) / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    checkpoint = torch.load(path, map_location=device, weights_only=False)
    checkpoint["model"] = model_state(checkpoint["model"])
    return checkpoint


def model_state(state: dict) -> dict:
    """A model state dict with torch.compile's key prefix removed."""
    return {k.removeprefix(_COMPILED_PREFIX): v for k, v in state.items()}


def build_model(checkpoint: dict, kernels=None) -> GPT:
    """The checkpoint's model, weights loaded, in the dtype it was saved in."""
    model = GPT(GPTConfig(**checkpoint["model_args"]), kernels)
    state = checkpoint["model"]
    model.to(next(iter(state.values())).dtype)
    model.load_state_dict(state)
    return model
