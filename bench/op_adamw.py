"""AdamW benchmark: GB/s of one optimizer step over GPT-2 124M's parameters, bf16 everything
(params, grads and both moments), as a fraction of the GPU's measured copy bandwidth; and of the
global grad norm that clipping needs.

    python -m bench.op_adamw [--json adamw.json]

A step reads p, g, m, v and writes p, m, v: the minimum traffic, 7 x 2 bytes per parameter
(bench/cases.py), credited alike to every backend, so GB/s compares time. The parameters are the
model's own (gpt/model.py at the gpt2 preset, lm_head tied to wte). Backends: the triton op with
round-to-nearest stores and with stochastic rounding (`sr`, the default for bf16) and the torch
backend with round-to-nearest (`torch loop`: a Python loop of ~10 tensor ops per parameter, as
torch's for-loop AdamW), each called on ready lists (pass `step`); and whole optimizer steps (pass
`optimizer step`, their loop over the params included): the BF16AdamW optimizer on the triton op
(rounding to nearest, as torch's, and `sr`), torch.optim.AdamW with fused=True and with
foreach=True on the same bf16 params. Every row includes its host-side work (argument checks, the
pointer-table lookup). `verified` (the op's rows): p, m and v after the step as accurate as the
torch backend's rounding the same way, by the project's rule (kernels/accuracy.py), at one tensor
of each parameter shape. The whole-step rows are timed, not checked (their optimizers are the
op's rows above, or torch's own).

Clipping by global norm (nanoGPT clips at 1.0) adds the `grad_norm` op's rows (one read of every
grad, 2 bytes per parameter: triton, the torch backend (torch's multi-tensor norms in fp32; a
loop of one norm a grad before 2026-12-07), and `get_total_norm`, what
torch.nn.utils.clip_grad_norm_ runs, the same norms returned in the grads' dtype) and two whole-step rows: `+ clip`, BF16AdamW's fused clipping
(the norm, then a step that scales the grads as it reads them) against clip_grad_norm_ (the norm,
then an in-place pass over the grads) before torch's fused AdamW. Those rows are credited a step's
7 x 2 bytes per parameter, so their GB/s shows what clipping costs on top; so is the `kahan` row
(its compensation adds a read and a write of 2 bytes per parameter).
"""
import sys
from collections.abc import Iterator

import torch

import kernels
from bench import backends
from bench.cases import ADAMW, Case, Shapes, case
from bench.measure import Row
from gpt.model import GPTConfig, preset
from gpt.optim import BF16AdamW, clip_for_step

SHAPES = (Shapes(GPTConfig(**preset("gpt2")), batch_size=1),)
HYPER = dict(lr=ADAMW["lr"], betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"],
             weight_decay=ADAMW["weight_decay"])
MAX_NORM = 1.0


def _steps(make, clip=None):
    """params -> step(): a step of the optimizer `make` builds, after `clip(optimizer, params)`."""
    def build(params):
        optimizer = make(params)

        def step():
            if clip is not None:
                clip(optimizer, params)
            optimizer.step()
        return step
    return build


def _fused_clip(optimizer, params):  # the step scales the grads as it reads them
    clip_for_step(optimizer, params, MAX_NORM, kernels.get("grad_norm", "triton"))


def _torch_clip(optimizer, params):  # an in-place pass over the grads
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM)


_BF16 = lambda ps: BF16AdamW(ps, backend="triton", **HYPER)  # noqa: E731
_FUSED = lambda ps: torch.optim.AdamW(ps, fused=True, **HYPER)  # noqa: E731
# Whole optimizer steps, their Python loop over the params included: rows of their own pass,
# compared with each other (BF16AdamW rounding to nearest, as torch's do, against torch's).
OPTIMIZER_PASS = "optimizer step"
OPTIMIZERS = {
    "BF16AdamW triton": _steps(lambda ps: BF16AdamW(ps, backend="triton", stochastic_rounding=False, **HYPER)),
    "BF16AdamW triton sr": _steps(_BF16),
    "torch fused": _steps(_FUSED),
    "torch foreach": _steps(lambda ps: torch.optim.AdamW(ps, foreach=True, **HYPER)),
    "BF16AdamW triton sr + clip": _steps(_BF16, _fused_clip),
    "BF16AdamW triton kahan": _steps(lambda ps: BF16AdamW(ps, backend="triton", kahan_summation=True,
                                                          stochastic_rounding=False, **HYPER)),
    "torch fused + clip_grad_norm_": _steps(_FUSED, _torch_clip),
}


def _optimizer_rows(c: Case, device) -> list[Row]:
    inputs = c.make()
    n = len(inputs) // 4  # params, grads, exp_avgs, exp_avg_sqs; the optimizers keep their own moments
    peak = backends.roofline(c.unit, device)
    result = []
    for name, make in OPTIMIZERS.items():
        params = [torch.nn.Parameter(p.clone()) for p in inputs[:n]]
        for p, g in zip(params, inputs[n:2 * n]):
            p.grad = g
        step = make(params)
        ms = backends.median_ms(step)
        rate = c.rate("step", ms)
        result.append(Row("adamw", c.shape, OPTIMIZER_PASS, name, ms, rate, c.unit, rate / peak,
                          peak_mib=backends.peak_mib(step, device), host_ms=backends.host_ms(step, device)))
    return result


def run(device: str = "cuda", shapes: tuple[Shapes, ...] = SHAPES) -> Iterator[Row]:
    triton = kernels.get("adamw", "triton")
    for s in shapes:
        # Round-to-nearest stores (the seed's) checked against torch's rounding to nearest, and
        # stochastic rounding against torch's stochastic: each bound set by the error of its own kind.
        for rounding, impls in ((False, {"triton": triton, "torch loop": kernels.get("adamw", "torch")}),
                                (True, {"triton sr": triton})):
            yield from backends.measure(case("adamw", s, device, stochastic_rounding=rounding), impls, device,
                                        checked=case("adamw", s, device, quick=True, stochastic_rounding=rounding))
        yield from _optimizer_rows(case("adamw", s, device), device)
        yield from backends.measure(case("grad_norm", s, device),
                                    {**backends.implementations("grad_norm"),
                                     "get_total_norm": torch.nn.utils.get_total_norm},
                                    device, checked=case("grad_norm", s, device, quick=True))


def main(argv: list[str] | None = None) -> int:
    return backends.cli(__doc__, run, "adamw, GPT-2 124M, bf16", argv)


if __name__ == "__main__":
    sys.exit(main())
