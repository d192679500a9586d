"""Cross-entropy loss benchmark: GB/s of the forward and of forward+backward at the logits a GPT's
training makes, bf16, as a fraction of the GPU's measured copy bandwidth.

    python -m bench.op_cross_entropy [--json rows.json]

Shapes: 16k tokens x vocabulary in (32000: LLaMA 2, 50304: GPT-2 padded as nanoGPT does,
128256: LLaMA 3), logits in bf16 with one int64 target per token. Backends: `torch` = the
registry's torch reference, F.cross_entropy of the logits cast to fp32 (what the model computed
before this op had a Triton backend), `compile` = torch.compile of it, `triton` = the registry's
triton backend, and `F.cross_entropy` = torch's own eager op on the bf16 logits. fwd+bwd times the
forward plus torch.autograd.grad of the logits (`bwd`: their medians' difference).

Bytes credited, the same for every backend so that rates compare as times do (bench/cases.py):
forward reads the logits and the targets; forward+backward then reads them again and writes the
logits' gradient. `verified`: the loss and the gradient as accurate as torch's, by the project's
rule (kernels/accuracy.py), on the first 2048 tokens of the same vocabulary (float64 logits of
all 16k tokens would not fit beside the timed ones).
"""
import sys
from collections.abc import Iterator

import torch.nn.functional as F

from bench import backends
from bench.cases import Shapes, case
from bench.measure import Row
from gpt.model import GPTConfig

TOKENS = 16 * 1024
VOCABS = (32000, 50304, 128256)
SHAPES = tuple(Shapes(GPTConfig(vocab_size=v), batch_size=1, seq_len=TOKENS) for v in VOCABS)
EAGER = {"F.cross_entropy": lambda logits, targets: F.cross_entropy(logits, targets, ignore_index=-1)}


def run(device: str = "cuda", shapes: tuple[Shapes, ...] = SHAPES) -> Iterator[Row]:
    impls = backends.implementations("cross_entropy") | EAGER
    for s in shapes:
        yield from backends.measure(case("cross_entropy", s, device), impls, device,
                                    checked=case("cross_entropy", s, device, quick=True))


def main(argv: list[str] | None = None) -> int:
    return backends.cli(__doc__, run, f"cross_entropy, {TOKENS} tokens, bf16 logits", argv)


if __name__ == "__main__":
    sys.exit(main())
