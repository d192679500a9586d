"""rms_norm and layer_norm: GB/s of the forward and of forward+backward at training shapes.

    python -m bench.op_norm [--json rows.json]

Shapes: 16k tokens x N in (768, 1024, 2048, 4096, 8192); x, weight and bias in bf16: the norm
alone (the issue's benchmark). Then at N = 768 and 4096 (GPT-2 small's width and a 7B model's)
"+residual", the form a pre-norm model runs: (y, s) = (norm(x + residual), x + residual), the
gradient arriving at both y and s. (Fewer widths for it: each shape compiles torch's reference
anew, and device time is scarce.) Last, at N = 768, "+dropout 0.2": s = dropout(x) + residual,
the branch's dropout of a model trained with dropout (nanoGPT's shakespeare-char config): what
the mask's random numbers cost each backend.
Backends: `torch` = the registry's torch reference (computes in fp32), `compile` = torch.compile
of it, `triton` = the registry's triton backend, and `F.rms_norm` / `F.layer_norm` = torch's own
eager op in bf16 (after torch's dropout and add, given a residual). Both passes run with inputs
that require grad, as in training; fwd+bwd times the forward plus torch.autograd.grad of x, the
weight and the bias (and the residual); `bwd` is the fwd+bwd median less the fwd median
(bench.backends.add_backward), what the issue's backward target is about.

Bytes credited, the same for every backend so that rates compare as times do: the minimum
traffic of each pass, every input read once and every output written once (bench/cases.py):
  fwd: x, weight (and bias) read, y written (+residual: and the residual read, s written);
  fwd+bwd: that, then x, weight and dy read, dx, dweight (and dbias) written (+residual: s in
  x's place, and ds read; the residual's gradient is dx, or with dropout a second tensor, written).
The fp32 row statistics, the triton backward's partial sums of dweight (and dbias) and a dropout
mask are a backend's choice, not counted. Roofline: the device-to-device copy bandwidth measured in the same
run. `verified`: every output and gradient as accurate as torch's, by the project's rule
(kernels/accuracy.py), at that shape; with dropout, against the reference given the backend's own
mask (bench/cases.py).
"""
import dataclasses
import sys
from collections.abc import Iterator

import torch.nn.functional as F

from bench import backends
from bench.cases import Shapes, case
from bench.measure import Row
from gpt.model import GPTConfig

TOKENS = 16 * 1024
WIDTHS = (768, 1024, 2048, 4096, 8192)
RESIDUAL_WIDTHS = (768, 4096)
DROPOUT, DROPOUT_WIDTH = 0.2, 768
# A norm sees only the width (n_head=1 lets it be any); the bias gives layer_norm one.
SHAPES = tuple(Shapes(GPTConfig(n_embd=n, n_head=1, bias=True), batch_size=1, seq_len=TOKENS) for n in WIDTHS)


def _eager(norm):
    """torch's own op in bf16 with the registry op's signature: after torch's dropout and add, given
    a residual."""
    def fn(x, *args, residual=None, dropout_p=0.0):
        s = x if residual is None else F.dropout(x, dropout_p) + residual
        y = norm(s, *args)
        return y if residual is None else (y, s)
    return fn


# The eager baseline the issue names: torch's own ops in bf16, beside the fp32 reference.
EAGER = {"rms_norm": {"F.rms_norm": _eager(lambda x, w, eps: F.rms_norm(x, w.shape, w, eps))},
         "layer_norm": {"F.layer_norm": _eager(lambda x, w, b, eps: F.layer_norm(x, w.shape, w, b, eps))}}


def run(device: str = "cuda", shapes: tuple[Shapes, ...] = SHAPES) -> Iterator[Row]:
    for op, eager in EAGER.items():
        impls = backends.implementations(op) | eager
        for residual in (False, True):
            for s in shapes:
                if not residual or s.config.n_embd in RESIDUAL_WIDTHS:
                    yield from backends.measure(case(op, s, device, residual=residual), impls, device)
        for s in shapes:
            if s.config.n_embd == DROPOUT_WIDTH:
                dropped = dataclasses.replace(s, config=dataclasses.replace(s.config, dropout=DROPOUT))
                yield from backends.measure(case(op, dropped, device, residual=True), impls, device)


def main(argv: list[str] | None = None) -> int:
    return backends.cli(__doc__, run, f"rms_norm / layer_norm, {TOKENS} tokens, bf16", argv)


if __name__ == "__main__":
    sys.exit(main())
