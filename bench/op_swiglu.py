"""SwiGLU benchmark: GB/s of silu(gate) * up at LLaMA MLP shapes, bf16, forward and forward+backward,
as a fraction of the GPU's measured copy bandwidth.

    python -m bench.op_swiglu [--json swiglu.json]

Shapes: 16k tokens x hidden in (2048, 5632, 11008, 14336). gate and up are the two halves of one
projection's output (`h.chunk(2, -1)`), as in the model; fwd+bwd times the forward plus
torch.autograd.grad of gate and up (`bwd`: their medians' difference). Backends: `torch` = the
registry's torch reference (computes in fp32), `compile` = torch.compile of it, `triton` = the
registry's triton backend, and `F.silu(a) * b` = torch eager in bf16, the issue's baseline.

Bytes credited, the same for every backend so that rates compare as times do: the minimum
traffic of each pass, every input read once and every output written once (bench/cases.py):
forward reads gate and up and writes y (3 tensors of y's size); backward reads gate, up and dy and
writes d_gate and d_up (5 more). `verified`: y, d_gate and d_up as accurate as torch's, by the
project's rule (kernels/accuracy.py), at that shape.
"""
import sys
from collections.abc import Iterator

import torch.nn.functional as F

from bench import backends
from bench.cases import Shapes, case
from bench.measure import Row
from gpt.model import GPTConfig

TOKENS = 16 * 1024
HIDDENS = (2048, 5632, 11008, 14336)
SHAPES = tuple(Shapes(GPTConfig(mlp="swiglu", mlp_hidden=h), batch_size=1, seq_len=TOKENS) for h in HIDDENS)
EAGER = {"F.silu(a) * b": lambda gate, up: F.silu(gate) * up}


def run(device: str = "cuda", shapes: tuple[Shapes, ...] = SHAPES) -> Iterator[Row]:
    impls = backends.implementations("swiglu") | EAGER
    for s in shapes:
        yield from backends.measure(case("swiglu", s, device), impls, device)


def main(argv: list[str] | None = None) -> int:
    return backends.cli(__doc__, run, f"swiglu, {TOKENS} tokens, bf16", argv)


if __name__ == "__main__":
    sys.exit(main())
