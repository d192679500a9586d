"""rms_norm and layer_norm: GB/s of the forward and of forward+backward at training shapes.

    python -m bench.op_norm [--json rows.json]

Shapes: 16k tokens x N in (768, 1024, 2048, 4096, 8192); x, weight and bias in bf16.
Backends: `torch` = torch eager (F.rms_norm / F.layer_norm), `compile` = torch.compile of the
registry's torch reference, `triton` = the registry's triton backend. Both passes run with
inputs that require grad, as in training; fwd+bwd times forward plus torch.autograd.grad.

Bytes counted, the same for every backend so that rates compare as times do:
  fwd: x read, y written, weight (and bias) read;
  bwd: x and dy read, dx written, weight read, dw (and db) written, plus the triton backward's
       fp32 per-program partial sums of dw (and db), each written once and read once;
  fwd+bwd: both.
The fp32 row statistics (4-8 bytes a row, under 0.3% of the traffic) are left out.
Roofline: the device-to-device copy bandwidth measured in the same run.
`verified`: the triton results (y; for fwd+bwd also dx, dw, db) agree with the torch
reference at that shape to bf16 rounding (relative Frobenius error under 1%).
"""
import argparse
import json

import torch
import torch.nn.functional as F

from bench.measure import Row, copy_gbs, median_ms, print_rows
from kernels import norm

TOKENS = 16 * 1024
WIDTHS = (768, 1024, 2048, 4096, 8192)
DTYPE = torch.bfloat16
EPS = 1e-5


def _backends(op: str) -> dict:
    """backend -> fn(x, w, b): y. compile is static-shape: one graph per width, as in training."""
    if op == "rms_norm":
        compiled = torch.compile(norm.rms_norm_torch, dynamic=False)
        return {"torch": lambda x, w, b: F.rms_norm(x, w.shape, w, EPS),
                "compile": lambda x, w, b: compiled(x, w, EPS),
                "triton": lambda x, w, b: norm.rms_norm_triton(x, w, EPS)}
    compiled = torch.compile(norm.layer_norm_torch, dynamic=False)
    return {"torch": lambda x, w, b: F.layer_norm(x, w.shape, w, b, EPS),
            "compile": lambda x, w, b: compiled(x, w, b, EPS),
            "triton": lambda x, w, b: norm.layer_norm_triton(x, w, b, EPS)}


def _bytes(op: str, x: torch.Tensor, w: torch.Tensor, device: str) -> tuple[int, int]:
    """(forward bytes, backward bytes) for `op` at x's shape."""
    m, n = x.shape
    act = m * n * x.element_size()
    params = 2 if op == "layer_norm" else 1  # weight, and bias for layer_norm
    param = n * w.element_size()
    programs, _ = norm.backward_programs(m, n, torch.device(device))
    partials = 2 * programs * n * 4  # fp32, written then read
    fwd = 2 * act + params * param
    bwd = 3 * act + param + params * (param + partials)
    return fwd, bwd


def _reference(op: str):
    if op == "rms_norm":
        return lambda x, w, b: norm.rms_norm_torch(x, w, EPS)
    return lambda x, w, b: norm.layer_norm_torch(x, w, b, EPS)


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    out, ref = out.float(), ref.float()
    return bool(torch.isfinite(out).all()) and ((out - ref).norm() / ref.norm()).item() < 1e-2


def run(device: str = "cuda") -> list[Row]:
    rows = []
    roof = copy_gbs(device)
    for op in ("rms_norm", "layer_norm"):
        fns = _backends(op)
        reference = _reference(op)
        for n in WIDTHS:
            x = torch.randn(TOKENS, n, device=device, dtype=DTYPE, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, device=device, dtype=DTYPE)).requires_grad_()
            b = (0.1 * torch.randn(n, device=device, dtype=DTYPE)).requires_grad_()
            dy = torch.randn_like(x)
            inputs = (x, w, b) if op == "layer_norm" else (x, w)
            fwd_bytes, bwd_bytes = _bytes(op, x, w, device)

            def fwd_bwd(fn):
                y = fn(x, w, b)
                return [y, *torch.autograd.grad(y, inputs, dy)]

            expected = fwd_bwd(reference)
            got = fwd_bwd(fns["triton"])
            checks = {"fwd": _close(got[0], expected[0]),
                      "fwd+bwd": all(_close(g, e) for g, e in zip(got, expected))}
            for backend, fn in fns.items():
                for pass_, nbytes, timed in (("fwd", fwd_bytes, lambda: fn(x, w, b)),
                                             ("fwd+bwd", fwd_bytes + bwd_bytes, lambda: fwd_bwd(fn))):
                    ms = median_ms(timed)
                    gbs = nbytes / ms / 1e6
                    rows.append(Row(op, f"{TOKENS}x{n}", pass_, backend, ms, gbs, "GB/s", gbs / roof,
                                    checks[pass_] if backend == "triton" else None))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows, as dicts, to this path")
    args = parser.parse_args()
    result = run()
    print_rows(result, f"rms_norm / layer_norm, bf16, copy bandwidth {copy_gbs():.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in result], f, indent=1)
