"""Generate text from a checkpoint: python -m gpt.sample --out_dir=out-shakespeare-char [--key=value ...],
or from GPT-2's weights: python -m gpt.sample --init_from=gpt2-xl --start="..."
A config file may come first, a training one too (its out_dir, device, dtype, seed, compile and
kernels are taken, its training keys passed over, as nanoGPT's sample.py runs one, but for a key
close to a sampling key, refused as a misspelling; its init_from as well: that is where training
started, and the checkpoint it wrote is in out_dir). Its lines may use the keys set above them
(a preset's too, as in train.py) and sampling's own, not train.py's defaults (`min_lr =
learning_rate / 10` in a file that does not set learning_rate is an error here, as in nanoGPT's
sample.py).

`start` is the prompt: text, or FILE:path to read it from a file (an empty one starts a GPT-2
BPE model from <|endoftext|>). Character-level checkpoints decode with the vocabulary saved in
them; the others with GPT-2's BPE. Only ids the vocabulary decodes are sampled. temperature=0
takes the likeliest token each time; top_k=None samples from the whole vocabulary.
"""
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

import kernels

from bench.cases import Shapes

from . import checkpoint, pretrained
from .config import (DTYPES, RUN_KEYS, check_device, check_seed, make_current, parse_args, printed_help,
                     quiet_when_the_reader_leaves, reported)
from .data import load_meta
from .model import GPT, GPTConfig, check_sampling, count, model_ops, preset_architecture
from .tokenizer import EOT, gpt2

DEFAULTS = dict(
    init_from="resume",  # resume (out_dir's checkpoint) | gpt2* | a Hugging Face GPT-2 directory (gpt/pretrained.py)
    out_dir="out", start="\n", num_samples=3, max_new_tokens=500, temperature=0.8, top_k=200,  # top_k: int or None
    seed=1337, device=None, dtype=None, compile=False, kernels="torch",
    kv_cache=True,  # keep each layer's keys and values: a new token runs alone, not the whole context again
)

# A training config's init_from is where its run started (a fine-tuning's GPT-2), not the model it wrote.
SKIPPED_INIT_FROM = "where training started; out_dir's checkpoint is sampled (or --init_from's model)"


def codec(meta: dict | None):
    """(encode, decode, size) for a checkpoint's vocabulary: size is how many ids decode. encode
    raises a ValueError naming the characters a character-level vocabulary lacks."""
    if meta is not None:
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(s: str) -> list[int]:
            unknown = sorted(set(s) - stoi.keys())
            if unknown:
                raise ValueError(f"the prompt has characters the checkpoint's vocabulary lacks: {unknown}")
            return [stoi[ch] for ch in s]
        return encode, (lambda ids: "".join(itos[i] for i in ids)), len(itos)
    enc = gpt2()
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"}) or [EOT]), enc.decode, enc.n_vocab


def checkpoint_meta(ckpt: dict) -> dict | None:
    """The character vocabulary a checkpoint was trained with: saved in it (None for GPT-2 BPE),
    or, in nanoGPT's, which do not save it, its dataset's meta.pkl, as nanoGPT's sample.py reads
    it. A meta.pkl of another size than the model's vocabulary, or none where the model is too
    small for GPT-2's BPE, is refused: its ids would decode as garbage."""
    if "meta" in ckpt:
        return ckpt["meta"]
    config, vocab = ckpt.get("config", {}), ckpt["model_args"]["vocab_size"]
    folder = Path(config.get("data_dir", "data")) / config["dataset"] if "dataset" in config else None
    meta = load_meta(folder) if folder else None
    if meta is not None and meta["vocab_size"] != vocab:
        raise ValueError(f"{folder / 'meta.pkl'} has {meta['vocab_size']} characters and the checkpoint's model "
                         f"{vocab} tokens: not the vocabulary it was trained with")
    if meta is None and vocab <= EOT:
        looked = f" (nanoGPT's meta.pkl: none in {folder}; run where training ran)" if folder else ""
        raise ValueError(f"the checkpoint's model has {vocab} tokens, too few for GPT-2's BPE, and no character "
                         f"vocabulary was found{looked}")
    return meta


def prompt_text(start: str) -> str:
    """`start`, or with FILE:path the text of that file."""
    return Path(start[5:]).read_text(encoding="utf-8") if start.startswith("FILE:") else start


def prompt_ids(start: str, encode, vocab_size: int) -> list[int]:
    """The prompt's ids, checked against the model's vocabulary."""
    ids = encode(start)
    if not ids:
        raise ValueError("the prompt is empty (a character-level model has no start token)")
    if max(ids) >= vocab_size:
        raise ValueError(f"the prompt's token {max(ids)} is past the model's {vocab_size}-token vocabulary")
    return ids


def main(argv: list[str]) -> list[str]:
    if printed_help(argv, __doc__, DEFAULTS):
        return []
    with reported("gpt.sample"):
        c = DEFAULTS | dict(parse_args(argv, DEFAULTS, also={"top_k": type(None), **RUN_KEYS},
                                       implied=preset_architecture, files_set_others=True,
                                       files_skip={"init_from": SKIPPED_INIT_FROM}))
    try:
        check_sampling("gpt.sample", c["temperature"], c["top_k"], c["max_new_tokens"])
        count("gpt.sample: num_samples", c["num_samples"], minimum=1)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if c["dtype"] is not None and c["dtype"] not in DTYPES:
        raise SystemExit(f"gpt.sample: dtype must be float32, bfloat16 or float16, got {c['dtype']!r}")
    # Before a checkpoint is read or a model downloaded: a mistake here says so at once.
    with reported("gpt.sample"):
        check_seed(c["seed"])
        kernels.check_request(c["kernels"])
    with reported("gpt.sample", "start: "):
        start = prompt_text(c["start"])
    device = c["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    with reported("gpt.sample"):  # one it lacks (cuda:3 of two GPUs), before a checkpoint is read
        check_device(device)
    make_current(device)  # before the kernels' self-checks and is_bf16_supported, which ask the current GPU
    device_type = torch.device(device).type  # autocast's and the kernels' (mps's own, not the CPU's)
    torch.manual_seed(c["seed"])
    bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    dtype = c["dtype"] or ("bfloat16" if bf16 else "float32")  # what the ops see, whatever the weights' dtype

    if c["init_from"] == "resume":
        with reported("gpt.sample"):  # mapped on the host: of a training checkpoint, only the weights reach the GPU
            ckpt = checkpoint.load(c["out_dir"], "cpu")
            config, meta = GPTConfig(**ckpt["model_args"]), checkpoint_meta(ckpt)
    elif pretrained.is_pretrained(c["init_from"]):
        with reported("gpt.sample", f"init_from={c['init_from']}: "):
            folder = pretrained.locate(c["init_from"])
            config, meta = pretrained.gpt_config(folder), None
    else:
        raise SystemExit(f"gpt.sample: init_from must be resume, {pretrained.CHOICES}; got {c['init_from']!r}")
    # Per op the backend, Triton's self-checked at this model's shapes (a head size it lacks: torch).
    shapes = Shapes(config, batch_size=1, dtype=getattr(torch, dtype))
    with reported("gpt.sample", f"kernels={c['kernels']}: "):  # an unknown mode, or a profile that cannot be read
        choices = kernels.choose(c["kernels"], device_type, shapes=shapes, compiled=c["compile"],
                                 used=model_ops(config, generation=True), generation=True)
    backends = {op: ch.backend for op, ch in choices.items()}
    if c["init_from"] == "resume":
        with reported("gpt.sample"):
            model = checkpoint.build_model(ckpt, backends)
        del ckpt  # its optimizer state and weights, not kept through generation
    else:
        model = GPT(config, backends)
        with reported("gpt.sample", f"init_from={c['init_from']}: "):
            pretrained.load_weights(model, folder)
    model = model.to(device).eval()
    if c["compile"]:
        model.compile()  # in place: generate's calls of the model run compiled (torch.compile(model) would not)
    if next(model.parameters()).dtype not in (torch.float32, getattr(torch, dtype)):
        model.float()  # a pure-bf16 checkpoint asked for another dtype: fp32 weights, autocast below
    autocast = (nullcontext() if dtype == "float32" or next(model.parameters()).dtype != torch.float32
                else torch.autocast(device_type=device_type, dtype=getattr(torch, dtype)))

    with reported("gpt.sample"):  # GPT-2's BPE ranks unreadable
        encode, decode, decodable = codec(meta)
    with reported("gpt.sample", "start: "):
        ids = prompt_ids(start, encode, model.config.vocab_size)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    samples = []
    with torch.no_grad(), autocast, quiet_when_the_reader_leaves():
        for _ in range(c["num_samples"]):
            y = model.generate(x, c["max_new_tokens"], temperature=c["temperature"], top_k=c["top_k"],
                               kv_cache=c["kv_cache"], vocab_limit=decodable)
            samples.append(decode(y[0].tolist()))
            print(printable(samples[-1]))
            print("---------------")
    return samples


def printable(text: str) -> str:
    """`text` as stdout can encode it: where it cannot (an ASCII or Latin-1 terminal; a BPE model
    samples any character) escaped, not a UnicodeEncodeError once every sample is drawn."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


if __name__ == "__main__":
    main(sys.argv[1:])
