"""RoPE benchmark: GB/s of rotating q and k at LLaMA attention shapes, bf16, forward and
forward+backward, as a fraction of the GPU's measured copy bandwidth.

    python -m bench.op_rope [--json rope.json]

Shapes: 16k tokens (8 sequences of 2048) x (query heads / key-value heads, head dim) in
(12/12, 64) (the llama preset), (32/32, 128) (LLaMA-2 7B) and (32/8, 128) (LLaMA-3 8B). q and k are
views of one qkv projection's output, as in the model, and both are rotated (two calls of the
rope op, as generation's KV-cache path makes them; training's attention runs the same kernel
once for q, k and a copy of v); fwd+bwd times the forward plus torch.autograd.grad of q and k
(`bwd`: their medians' difference).
Backends: `torch` = the registry's torch reference (the model's former eager code: fp32, about
eight passes a tensor), `compile` = torch.compile of it, `triton` = the registry's triton backend.

Bytes credited, the same for every backend so that rates compare as times do (bench/cases.py):
forward reads q, k and the fp32 cos and sin tables and writes the rotated q and k; backward reads
the gradients of the rotated q and k and the tables and writes q's and k's. `verified`: outputs
and gradients as accurate as torch's, by the project's rule (kernels/accuracy.py), at that shape.
"""
import sys
from collections.abc import Iterator

from bench import backends
from bench.cases import Shapes, case
from bench.measure import Row
from gpt.model import GPTConfig

BATCH, SEQ = 8, 2048
HEADS = ((12, 12, 64), (32, 32, 128), (32, 8, 128))  # (n_head, n_kv_head, head_dim)
SHAPES = tuple(Shapes(GPTConfig(n_head=h, n_kv_head=kv, n_embd=h * d, pos_encoding="rope", block_size=SEQ),
                      batch_size=BATCH) for h, kv, d in HEADS)


def run(device: str = "cuda", shapes: tuple[Shapes, ...] = SHAPES) -> Iterator[Row]:
    impls = backends.implementations("rope")
    for s in shapes:
        yield from backends.measure(case("rope", s, device), impls, device)


def main(argv: list[str] | None = None) -> int:
    return backends.cli(__doc__, run, f"rope, {BATCH}x{SEQ} tokens, bf16", argv)


if __name__ == "__main__":
    sys.exit(main())
