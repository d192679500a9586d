"""Attention benchmark: forward and backward TFLOPS of each backend, causal, bf16.

Shapes keep B*T = 16k tokens and H*D = 2048 (a GPT layer's width) for T from 512 to 16k and head
dims 64 and 128. FLOPs count the useful work: forward 4*B*H*T^2*D (two matmuls), halved when
causal; backward 2.5x the forward (five matmuls to the forward's two). The roofline is the bf16
matmul rate measured in the same run. `verified`: the triton output (forward) and gradients
(backward) agree with torch SDPA at that shape.

    python -m bench.op_attention --json attention.json
"""
import argparse
import json

import torch

import kernels
from bench.measure import Row, matmul_tflops, median_ms, print_rows

TOKENS = 16 * 1024
WIDTH = 2048  # H * D
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
# Two bf16 computations of the same attention differ by a few of their own roundings.
TOLERANCE = 2e-2


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _verify(fn, reference, q, k, v, do) -> dict[str, bool]:
    """Whether `fn`'s output ("fwd") and gradients ("bwd") agree with `reference`'s."""
    results = []
    for f in (fn, reference):
        out = f(q, k, v, causal=True)
        results.append((out, torch.autograd.grad(out, (q, k, v), do)))
    (out, grads), (ref, ref_grads) = results
    return {"fwd": _rel_err(out, ref) <= TOLERANCE,
            "bwd": all(_rel_err(g, r) <= TOLERANCE for g, r in zip(grads, ref_grads))}


def run(device: str = "cuda") -> list[Row]:
    peak = matmul_tflops(device)
    torch_attention = kernels.get("attention", "torch")
    backends = {"torch": torch_attention, "compile": torch.compile(torch_attention),
                "triton": kernels.get("attention", "triton")}
    rows = []
    for D in HEAD_DIMS:
        for T in SEQ_LENS:
            B, H = TOKENS // T, WIDTH // D
            q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            fwd_flops = 4 * B * H * T * T * D / 2  # causal: half the score matrix
            verified = _verify(backends["triton"], torch_attention, q, k, v, do)
            for name, fn in backends.items():
                out = fn(q, k, v, causal=True)
                fwd_ms = median_ms(lambda: fn(q, k, v, causal=True))
                # autograd.grad, not .backward: no accumulation into .grad inside the timing.
                bwd_ms = median_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
                for pass_, ms, flops in (("fwd", fwd_ms, fwd_flops), ("bwd", bwd_ms, 2.5 * fwd_flops)):
                    tflops = flops / ms / 1e9
                    rows.append(Row("attention", f"B={B} H={H} T={T} D={D} causal", pass_, name, ms,
                                    tflops, "TFLOPS", tflops / peak,
                                    verified[pass_] if name == "triton" else None))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args()
    rows = run()
    print_rows(rows, f"attention, causal bf16, B*T = {TOKENS} tokens, H*D = {WIDTH}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=1)
