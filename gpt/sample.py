"""Generate text from a checkpoint: python -m gpt.sample --out_dir=out-shakespeare-char [--key=value ...],
or from GPT-2's weights: python -m gpt.sample --init_from=gpt2-xl --start="..."

`start` is the prompt: text, or FILE:path to read it from a file. Character-level checkpoints
decode with the vocabulary saved in them; the others with GPT-2's BPE.
"""
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

import kernels

from . import checkpoint, pretrained
from .config import ConfigError, parse_args
from .tokenizer import gpt2

DEFAULTS = dict(
    init_from="resume",  # resume (out_dir's checkpoint) | gpt2* | a Hugging Face GPT-2 directory (gpt/pretrained.py)
    out_dir="out", start="\n", num_samples=3, max_new_tokens=500, temperature=0.8, top_k=200,
    seed=1337, device=None, dtype=None, compile=False, kernels="torch",
    kv_cache=True,  # keep each layer's keys and values: a new token runs alone, not the whole context again
)


def codec(meta: dict | None):
    """(encode, decode) for a checkpoint's vocabulary."""
    if meta is not None:
        stoi, itos = meta["stoi"], meta["itos"]
        return (lambda s: [stoi[ch] for ch in s]), (lambda ids: "".join(itos[i] for i in ids))
    enc = gpt2()
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode


def main(argv: list[str]) -> list[str]:
    try:
        c = DEFAULTS | dict(parse_args(argv, DEFAULTS))
    except ConfigError as e:
        raise SystemExit(f"gpt.sample: {e}") from None
    device = c["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    torch.manual_seed(c["seed"])

    backends = {op: ch.backend for op, ch in kernels.choose(c["kernels"], device_type).items()}
    if c["init_from"] == "resume":
        ckpt = checkpoint.load(c["out_dir"], device)
        model, meta = checkpoint.build_model(ckpt, backends), ckpt.get("meta")
    elif pretrained.is_pretrained(c["init_from"]):
        try:
            model, meta = pretrained.load(c["init_from"], kernels=backends), None
        except (OSError, ValueError) as e:
            raise SystemExit(f"gpt.sample: init_from={c['init_from']}: {e}") from None
    else:
        raise SystemExit(f"gpt.sample: init_from must be resume, {pretrained.CHOICES}; got {c['init_from']!r}")
    model = model.to(device).eval()
    if c["compile"]:
        model.compile()  # in place: generate's calls of the model run compiled (torch.compile(model) would not)
    bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    dtype = c["dtype"] or ("bfloat16" if bf16 else "float32")
    weights_dtype = next(model.parameters()).dtype
    autocast = (nullcontext() if dtype == "float32" or weights_dtype != torch.float32
                else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))

    encode, decode = codec(meta)
    start = c["start"]
    if start.startswith("FILE:"):
        start = Path(start[5:]).read_text(encoding="utf-8")
    x = torch.tensor(encode(start), dtype=torch.long, device=device)[None, ...]
    samples = []
    with torch.no_grad(), autocast:
        for _ in range(c["num_samples"]):
            y = model.generate(x, c["max_new_tokens"], temperature=c["temperature"], top_k=c["top_k"],
                               kv_cache=c["kv_cache"])
            samples.append(decode(y[0].tolist()))
            print(samples[-1])
            print("---------------")
    return samples


if __name__ == "__main__":
    main(sys.argv[1:])
