"""SwiGLU benchmark: GB/s of silu(gate) * up at LLaMA MLP shapes, bf16, forward and forward+backward,
as a fraction of the GPU's measured copy bandwidth.

gate and up are the two halves of one projection's output (`h.chunk(2, -1)`), as in the model.
Every backend is credited with the same minimum traffic, so GB/s compares time: forward reads gate
and up and writes y; backward reads gate, up and dy and writes d_gate and d_up.

    python -m bench.op_swiglu [--json swiglu.json]
"""
import argparse
import json

import torch
import torch.nn.functional as F

from bench.measure import Row, copy_gbs, median_ms, print_rows
from kernels.swiglu import swiglu_torch, swiglu_triton

TOKENS = 16384
HIDDENS = (2048, 5632, 11008, 14336)
DTYPE = torch.bfloat16
# Tensors of the output's size that each pass must read or write at least.
MIN_TENSORS = {"fwd": 3, "fwd+bwd": 8}
# The triton and torch reference outputs each round an fp32 result once: they may differ by
# about a unit of bf16 rounding, no more.
TOLERANCE = 2.0**-8


def _close(outs, refs) -> bool:
    return all(((o.float() - r.float()).norm() / r.float().norm()).item() <= TOLERANCE
               for o, r in zip(outs, refs))


def _passes(fn, gate, up, dy):
    """pass -> a callable running it and returning its outputs: the forward as in training (graph
    recorded), and forward plus backward to gate and up."""
    def fwd_bwd():
        y = fn(gate, up)
        return (y, *torch.autograd.grad(y, (gate, up), dy))

    return {"fwd": lambda: (fn(gate, up),), "fwd+bwd": fwd_bwd}


def run(device: str = "cuda") -> list[Row]:
    backends = {"torch": lambda a, b: F.silu(a) * b,
                "compile": torch.compile(swiglu_torch, dynamic=False),
                "triton": swiglu_triton}
    copy = copy_gbs(device)
    rows = []
    for hidden in HIDDENS:
        h = torch.randn(TOKENS, 2 * hidden, device=device, dtype=DTYPE).requires_grad_()
        gate, up = h.chunk(2, dim=-1)
        dy = torch.randn(TOKENS, hidden, device=device, dtype=DTYPE)
        shape = f"{TOKENS}x{hidden} bf16"
        reference = _passes(swiglu_torch, gate, up, dy)
        for name, fn in backends.items():
            for pass_, step in _passes(fn, gate, up, dy).items():
                verified = _close(step(), reference[pass_]()) if name == "triton" else None
                ms = median_ms(step)
                gbs = MIN_TENSORS[pass_] * gate.numel() * gate.element_size() / ms / 1e6
                rows.append(Row("swiglu", shape, pass_, name, ms, gbs, "GB/s", gbs / copy, verified))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this path as JSON")
    args = parser.parse_args()
    rows = run()
    print_rows(rows, f"swiglu on {torch.cuda.get_device_name()}, copy {copy_gbs():.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)
