"""AdamW through the registry's `adamw` op, for pure-bf16 training.

Moments live in each parameter's own dtype, so a bf16 model keeps bf16 weights and bf16 moments
and no fp32 master copy (8 bytes of optimizer state per parameter instead of 16 under fp32
weights with torch.optim.AdamW). The math is torch.optim.AdamW's, computed in fp32.

bf16 stores are rounded stochastically by default (`stochastic_rounding=False` gives plain
round-to-nearest), so updates smaller than bf16's resolution still move the weights on average.
Each group's step draws its random bits from a seed derived from (`seed`, group index, step
count); all three are in `state_dict`, so a run resumed from a checkpoint takes exactly the
steps the uninterrupted run would have.

With backend="triton" a step is one kernel launch per param group (per dtype combination), over
every parameter that has a grad. FSDP2's DTensor parameters are updated on their local shards:
the update is elementwise. (Every rank then draws the same random bits for the same local
positions: different elements of the model, so the rounding stays unbiased.)
"""
import hashlib

import torch

import kernels

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def step_seed(seed: int, group_index: int, step: int) -> int:
    """The stochastic-rounding seed of one group's `step`: a hash, so that neighbouring steps and
    groups draw unrelated bits, in [0, 2**31) as the adamw op takes it."""
    digest = hashlib.blake2b(f"{seed}/{group_index}/{step}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


class BF16AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "torch", *,
                 stochastic_rounding: bool = True, seed: int = 0):
        self.adamw = kernels.get("adamw", backend)
        self.backend = backend
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      stochastic_rounding=stochastic_rounding, seed=seed))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            # One op call per distinct step count: in practice one call for the whole group.
            by_step: dict[int, tuple[list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                lists = by_step.setdefault(state["step"], ([], [], [], []))
                for lst, t in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"])):
                    lst.append(_local(t))
            beta1, beta2 = group["betas"]
            for step, (params, grads, exp_avgs, exp_avg_sqs) in by_step.items():
                self.adamw(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"],
                           stochastic_rounding=group["stochastic_rounding"],
                           seed=step_seed(group["seed"], index, step))
        return loss
