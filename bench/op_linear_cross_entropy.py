"""The lm head and the loss as one op (linear_cross_entropy): TFLOPS of forward+backward at the
heads of GPT-2 and LLaMA models, bf16, as a fraction of the GPU's measured bf16 matmul rate.

    python -m bench.op_linear_cross_entropy [--json rows.json]

Shapes: 16k tokens of width x vocabulary in (768 x 50304: GPT-2 124M, 4096 x 32000: LLaMA 2 7B,
4096 x 128256: LLaMA 3 8B). Backends: `torch` = the registry's torch reference (F.linear, then
F.cross_entropy of the logits cast to fp32), `compile` = torch.compile of it, `triton` = the
registry's triton backend (chunks of rows, no logits kept: kernels/cross_entropy.py), and
`linear + triton cross_entropy` = the unfused form with the Triton loss, which keeps the logits
for backward. One pass, forward+backward (forward plus torch.autograd.grad of x and weight): the
triton backend takes the gradients in its forward.

FLOPs credited: the three matmuls, 6 x tokens x width x vocabulary. Memory, the point of the fused
op, is each row's peak MiB (what the pass allocated beyond its inputs); `python -m bench.mfu`
reports each variant's peak in training. `verified`: loss, d_x and d_weight as accurate as
torch's, by the project's rule (kernels/accuracy.py), on the first 2048 tokens.
"""
import sys
from collections.abc import Iterator

import torch.nn.functional as F

import kernels
from bench import backends
from bench.cases import Shapes, case
from bench.measure import Row
from gpt.model import GPTConfig

TOKENS = 16 * 1024
HEADS = ((768, 50304), (4096, 32000), (4096, 128256))
SHAPES = tuple(Shapes(GPTConfig(n_embd=c, n_head=c // 64, n_kv_head=c // 64, vocab_size=v), batch_size=1,
                      seq_len=TOKENS) for c, v in HEADS)


def _unfused(x, weight, targets):
    return kernels.get("cross_entropy", "triton")(F.linear(x, weight), targets)


def run(device: str = "cuda", shapes: tuple[Shapes, ...] = SHAPES) -> Iterator[Row]:
    impls = backends.implementations("linear_cross_entropy") | {"linear + triton cross_entropy": _unfused}
    for s in shapes:
        yield from backends.measure(case("linear_cross_entropy", s, device), impls, device,
                                    checked=case("linear_cross_entropy", s, device, quick=True))


def main(argv: list[str] | None = None) -> int:
    return backends.cli(__doc__, run, f"linear_cross_entropy, {TOKENS} tokens, bf16", argv)


if __name__ == "__main__":
    sys.exit(main())
