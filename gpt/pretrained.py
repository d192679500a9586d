"""OpenAI's GPT-2 weights, or any Hugging Face GPT-2 checkpoint, as a tritongpt GPT.

train.py and gpt.sample take `init_from=gpt2` (or gpt2-medium, gpt2-large, gpt2-xl), as nanoGPT
does, or `init_from=<directory>` holding a Hugging Face GPT-2 checkpoint (its config.json and
model.safetensors, as `save_pretrained` or `hf download` leave them). The named models are
downloaded once from the Hugging Face hub ($HF_ENDPOINT, https://huggingface.co by default) into
$TRITONGPT_CACHE (~/.cache/tritongpt by default), with the standard library only: no transformers.

The architecture comes from config.json. GPT-2's activation is GELU's tanh approximation
("gelu_new"), which the model runs as activation=gelu_tanh, so the logits are the original
model's (nanoGPT runs exact GELU on these weights). Hugging Face's Conv1D layers store their
weights as (in, out): they are transposed into nn.Linear's (out, in).
"""
import json
import mmap
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import torch

from .checkpoint import model_state
from .files import remove_abandoned, write_atomic
from .model import GPT, GPTConfig

HUB_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
FILES = ("config.json", "model.safetensors")
_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu",
                "silu": "silu", "swish": "silu"}
# The weights' dtypes, and those older checkpoints kept their causal-mask buffers in (skipped).
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "U8": torch.uint8, "BOOL": torch.bool}


CHOICES = f"one of {list(HUB_MODELS)} or a directory with a Hugging Face GPT-2 checkpoint"


# What to do about a file of a checkpoint that is cut short or corrupt.
REDO = "delete it (a hub model's is downloaded again)"


def is_pretrained(init_from: str) -> bool:
    """Whether init_from names GPT-2 weights (a hub model or a checkpoint directory), not scratch/resume."""
    # ('' is no folder here, though Path('') is the working one)
    return init_from in HUB_MODELS or (init_from not in ("", "scratch", "resume") and Path(init_from).is_dir())


def cache_dir() -> Path:
    """Where hub models are kept: TRITONGPT_CACHE, else XDG_CACHE_HOME's (by default the home's
    .cache) tritongpt. The home is looked up only then: a container's user may have none."""
    if os.environ.get("TRITONGPT_CACHE"):
        return Path(os.environ["TRITONGPT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "tritongpt"
    try:
        return Path.home() / ".cache" / "tritongpt"
    except RuntimeError as e:  # no HOME, and no passwd entry for the user
        raise OSError(f"no cache folder for GPT-2's weights ({e}): set TRITONGPT_CACHE") from None


def locate(init_from: str) -> Path:
    """The directory holding init_from's config.json and model.safetensors: init_from itself, or
    a hub model's cache directory, filled by downloading what it lacks."""
    if init_from not in HUB_MODELS:
        missing = [f for f in FILES if not (Path(init_from) / f).is_file()]
        if missing:
            raise ValueError(f"{init_from} lacks {', '.join(missing)} (a Hugging Face GPT-2 checkpoint has "
                             f"config.json and model.safetensors)")
        return Path(init_from)
    folder = cache_dir() / init_from
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    for name in FILES:
        remove_abandoned(folder / name)  # a killed download's: write_atomic's own sweep comes with a write
        if not (folder / name).is_file():
            _download(f"{endpoint}/{HUB_MODELS[init_from]}/resolve/main/{name}", folder / name)
    return folder


# Seconds a download may wait for the server's next bytes (a connection that never answers,
# behind a proxy or a firewall, would otherwise hang the run).
TIMEOUT_S = 60


def _download(url: str, path: Path) -> None:
    """url -> path (write_atomic: an interrupted download leaves nothing behind, nor does one cut
    short: urllib does not check the bytes read against Content-Length)."""
    def copy(f) -> None:
        shutil.copyfileobj(response, f, 1 << 24)
        if size is not None and f.tell() != int(size):
            raise OSError(f"the connection closed after {f.tell():,} of {int(size):,} bytes")

    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            size = response.headers.get("Content-Length")
            print(f"downloading {url} ({int(size) / 1e9:.2f} GB)" if size else f"downloading {url}", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, copy)
    except OSError as e:
        # The cache's disk, not the network (an HTTPError's filename is its URL).
        if e.filename is not None and not isinstance(e, urllib.error.URLError):
            raise OSError(f"could not write {path} (TRITONGPT_CACHE names another folder for downloads): {e}") from e
        raise OSError(f"could not download {url}: {e}") from e


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, read-only views of a copy-on-write map of it (pages are
    read as they are touched). The format: an 8-byte little-endian header length, a JSON header
    (name -> dtype, shape, [begin, end) byte offsets after the header), then the data."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: its header is not JSON ({e}): {REDO}") from None
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its header is not a safetensors one: {REDO}")
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or {"dtype", "shape", "data_offsets"} - entry.keys():
            raise ValueError(f"{path}: tensor {name}'s header entry is not a safetensors one ({entry!r:.80}): {REDO}")
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}; readable: {list(_SAFETENSORS_DTYPES)}")
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if 8 + header_len + end > len(data):
            raise ValueError(f"{path}: tensor {name} ends at byte {8 + header_len + end:,}, past the file's "
                             f"{len(data):,} (a file cut short: {REDO})")
        count = (end - begin) // dtype.itemsize
        flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=8 + header_len + begin) if count
                else torch.empty(0, dtype=dtype))
        tensors[name] = flat.view(entry["shape"])
    return tensors


def gpt_config(folder: Path, block_size: int | None = None, dropout: float = 0.0) -> GPTConfig:
    """The GPTConfig of the checkpoint in `folder` (its config.json), with its position table cut to
    `block_size` when that is shorter (nanoGPT's crop_block_size) and the given dropout."""
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not whole JSON ({e}): {REDO}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is no model's config: not a JSON object")
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{folder}: model_type {hf.get('model_type')!r}; only GPT-2 checkpoints load")
    missing = [key for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd") if key not in hf]
    if missing:
        raise ValueError(f"{path} is no GPT-2 config: it has no {', '.join(missing)}")
    if hf.get("activation_function", "gelu_new") not in _ACTIVATIONS:
        raise ValueError(f"{folder}: activation_function {hf['activation_function']!r} is not one of {list(_ACTIVATIONS)}")
    # Variants whose attention is not plain scaled dot-product attention.
    for key, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False)):
        if hf.get(key, plain) != plain:
            raise ValueError(f"{folder}: {key}={hf[key]} is not supported")
    n_positions = hf["n_positions"]
    if block_size is not None and block_size > n_positions:
        raise ValueError(f"{folder}: block_size {block_size} is longer than the model's {n_positions} positions")
    return GPTConfig(block_size=block_size or n_positions, vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, bias=True,
                     norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                     activation=_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
                     mlp_hidden=hf.get("n_inner"), tie_weights=hf.get("tie_word_embeddings", True))


def _our_names(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under this model's parameter names (Hugging Face's, less the
    "transformer." prefix), Conv1D weights transposed, the causal-mask buffers left out."""
    return {name: tensor.t() if _CONV1D.match(name) else tensor for name, tensor in model_state(checkpoint).items()}


@torch.no_grad()
def load_weights(model: GPT, folder: Path) -> None:
    """Copy the checkpoint in `folder` into `model` (built from gpt_config(folder, ...)), in the
    model's own dtype and device. Every parameter must be found with its shape; nothing may be
    left over."""
    weights = _our_names(read_safetensors(Path(folder) / FILES[1]))
    params = dict(model.named_parameters())  # a tied lm_head is the token embedding, listed once
    if model.config.tie_weights:
        weights.pop("lm_head.weight", None)  # a copy of wte's, in checkpoints that keep both
    missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{folder}: the checkpoint does not fit the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    for name, param in params.items():
        weight = weights[name]
        if name == "wpe.weight":
            weight = weight[:model.config.block_size]  # a shorter block_size keeps the first positions
        if weight.shape != param.shape:
            raise ValueError(f"{folder}: {name} is {tuple(weight.shape)} in the checkpoint, "
                             f"{tuple(param.shape)} in the model")
        if not weight.is_floating_point():
            raise ValueError(f"{folder}: {name} is {weight.dtype} in the checkpoint, not floating point")
        param.copy_(weight)


def load(init_from: str, block_size: int | None = None, dropout: float = 0.0) -> GPT:
    """A GPT holding init_from's weights (see the module docstring), fp32 on the CPU, its ops on
    their torch backends (train.py and gpt.sample build the model with the kernels they chose
    from gpt_config, then load_weights)."""
    folder = locate(init_from)
    model = GPT(gpt_config(folder, block_size, dropout))
    load_weights(model, folder)
    return model
