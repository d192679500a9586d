"""AdamW benchmark: GB/s of one optimizer step over GPT-2 124M's parameters, bf16 everything
(params, grads and both moments), as a fraction of the GPU's measured copy bandwidth.

A step reads p, g, m, v and writes p, m, v: 7 x 2 bytes per parameter, credited alike to every
backend, so GB/s compares time. Backends: the triton op (round to nearest, and stochastic
rounding), the BF16AdamW optimizer on it (stochastic rounding, its default), torch.optim.AdamW
with fused=True and with foreach=True on the same bf16 params, and the torch backend (a Python
loop of ~10 tensor ops per parameter, as the seed's bf16_adamw.py). Every row includes its
host-side work (argument checks, the pointer-table lookup; the optimizers' loop over params).

    python -m bench.op_adamw [--json adamw.json]
"""
import argparse
import json

import torch

from bench.measure import Row, copy_gbs, median_ms, print_rows
from gpt.optim import BF16AdamW
from kernels.adamw import adamw_torch, adamw_triton

VOCAB, BLOCK_SIZE, N_LAYER, N_EMBD = 50304, 1024, 12, 768
DTYPE = torch.bfloat16
BYTES_PER_PARAM = 7 * 2
HYPER = dict(lr=6e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def gpt2_shapes() -> list[tuple[int, ...]]:
    """GPT-2 124M's parameter shapes, in nanoGPT's order (lm_head is tied to wte)."""
    d = N_EMBD
    layer = [(d,), (d,),                    # ln_1 weight, bias
             (3 * d, d), (3 * d,),          # attn.c_attn
             (d, d), (d,),                  # attn.c_proj
             (d,), (d,),                    # ln_2
             (4 * d, d), (4 * d,),          # mlp.c_fc
             (d, 4 * d), (d,)]              # mlp.c_proj
    return [(VOCAB, d), (BLOCK_SIZE, d)] + layer * N_LAYER + [(d,), (d,)]


def _within_one_rounding(outs, refs) -> bool:
    """Each element within one bf16 rounding step of the reference (nearest vs stochastic, or a
    boundary case), or within fp32's error where a moment cancels to near zero."""
    return all(torch.allclose(o.float(), r.float(), rtol=2**-7,
                              atol=1e-6 * r.float().abs().max().item()) for o, r in zip(outs, refs))


def run(device: str = "cuda") -> list[Row]:
    shapes = gpt2_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    params = [torch.randn(s, device=device, dtype=DTYPE) * 0.02 for s in shapes]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    exp_avgs = [torch.randn_like(p) * 1e-4 for p in params]
    exp_avg_sqs = [torch.rand_like(p) * 1e-6 for p in params]

    def fresh():
        return [[t.clone() for t in ts] for ts in (params, grads, exp_avgs, exp_avg_sqs)]

    reference = fresh()
    adamw_torch(*reference, step=10, **HYPER)
    reference = reference[:1] + reference[2:]  # p, m, v after one step

    steps = {}
    for name, sr in (("triton", False), ("triton sr", True)):
        lists = fresh()
        adamw_triton(*lists, step=10, **HYPER, stochastic_rounding=sr, seed=1)
        verified = _within_one_rounding([t for ts in lists[:1] + lists[2:] for t in ts],
                                        [t for ts in reference for t in ts])
        steps[name] = (lambda lists=lists, sr=sr: adamw_triton(
            *lists, step=10, **HYPER, stochastic_rounding=sr, seed=1), verified)
    hyper = dict(lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                 weight_decay=HYPER["weight_decay"])
    optimizers = {
        # The whole optimizer step, Python loop over the params included, as torch's rows are.
        "BF16AdamW triton sr": lambda ps: BF16AdamW(ps, backend="triton", **hyper),
        "torch fused": lambda ps: torch.optim.AdamW(ps, fused=True, **hyper),
        "torch foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **hyper),
    }
    for name, make in optimizers.items():
        torch_params = [torch.nn.Parameter(p.clone()) for p in params]
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        steps[name] = (make(torch_params).step, None)
    loop_lists = fresh()
    steps["torch loop"] = (lambda: adamw_torch(*loop_lists, step=10, **HYPER), None)

    copy = copy_gbs(device)
    shape = f"GPT-2 124M ({len(shapes)} tensors, {n_params / 1e6:.1f}M params) bf16"
    rows = []
    for name, (step, verified) in steps.items():
        ms = median_ms(step)
        gbs = BYTES_PER_PARAM * n_params / ms / 1e6
        rows.append(Row("adamw", shape, "step", name, ms, gbs, "GB/s", gbs / copy, verified))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows to this path as JSON")
    args = parser.parse_args()
    rows = run()
    print_rows(rows, f"adamw on {torch.cuda.get_device_name()}, copy {copy_gbs():.0f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2)
