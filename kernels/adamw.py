"""AdamW step over lists of tensors, in place: torch reference (the Triton kernel joins here).

torch.optim.AdamW's math (decoupled weight decay p *= 1 - lr*wd, bias-corrected moments, eps
outside the sqrt), computed in fp32 and stored back in each tensor's own dtype, so bf16 params
with bf16 moments train with no fp32 master copy.
"""
import math

import torch

from .checks import check_same, check_tensor
from .registry import register


def check_adamw(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps,
                weight_decay) -> None:
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    lengths = {name: len(ts) for name, ts in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"adamw: params, grads, exp_avgs and exp_avg_sqs must have the same length, "
                         f"got {lengths}")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        names = {f"params[{i}]": p, f"grads[{i}]": g, f"exp_avgs[{i}]": m, f"exp_avg_sqs[{i}]": v}
        for name, t in names.items():
            check_tensor("adamw", name, t)
        check_same("adamw", "shape", **names)
        check_same("adamw", "device", **names)
        check_same("adamw", "dtype", **{f"params[{i}]": p, f"grads[{i}]": g})
    if not step >= 1:
        raise ValueError(f"adamw: step counts from 1, got {step}")
    for name, value, lo, hi in (("lr", lr, 0.0, math.inf), ("beta1", beta1, 0.0, 1.0),
                                ("beta2", beta2, 0.0, 1.0), ("eps", eps, 0.0, math.inf),
                                ("weight_decay", weight_decay, 0.0, math.inf)):
        if not lo <= value < hi:
            raise ValueError(f"adamw: {name} must be in [{lo}, {hi}), got {value}")


@register("adamw", "torch")
@torch.no_grad()
def adamw_torch(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps,
                weight_decay) -> None:
    check_adamw(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay)
    step_size = lr / (1 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        pf, gf, mf, vf = p.float(), g.float(), m.float(), v.float()
        pf.mul_(1 - lr * weight_decay)
        mf.lerp_(gf, 1 - beta1)
        vf.mul_(beta2).addcmul_(gf, gf, value=1 - beta2)
        pf.addcdiv_(mf, (vf.sqrt() / bias_correction2_sqrt).add_(eps), value=-step_size)
        for dst, src in ((p, pf), (m, mf), (v, vf)):
            if dst is not src:
                dst.copy_(src)
