"""AdamW through the registry's `adamw` op, for pure-bf16 training.

Moments live in each parameter's own dtype, so a bf16 model keeps bf16 weights and bf16 moments
and no fp32 master copy (8 bytes a parameter of weights, grads and optimizer state, instead of
16 under fp32 weights with torch.optim.AdamW). The math is torch.optim.AdamW's, computed in fp32.

bf16 stores are rounded stochastically by default (`stochastic_rounding=False` gives plain
round-to-nearest), so updates smaller than bf16's resolution still move the weights on average.
`kahan_summation=True` instead keeps, per param, a tensor of what rounding the param lost (2 more
bytes per bf16 param), so small updates add up to about 16 significant bits (the compensation,
bf16 itself, rounds too); the moments still follow `stochastic_rounding`.
Each group's step draws its random bits from a seed derived from (`seed`, group index, step
count); all three are in `state_dict`, so a run resumed from a checkpoint takes exactly the
steps the uninterrupted run would have.

With backend="triton" a step is one kernel launch per param group (per dtype combination), over
every parameter that has a grad. Gradient clipping by global norm is fused into it:
`clip_grad_norm(max_norm)` computes the norm (the `grad_norm` op: two launches for the whole
model) and the clip coefficient on the device, and the next step multiplies each grad by the
coefficient as it reads it, so clipping costs no pass over the grads and no host sync.
FSDP2's DTensor parameters are updated on their local shards: the update is elementwise. (Every
rank then draws the same random bits for the same local positions, as ZeRO-1's ranks do for the
same positions in their lists: different elements of the model, so the rounding stays unbiased,
its errors correlated between those elements.)
"""
import hashlib
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

import kernels
from kernels.adamw import check_settings

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed
    DTensor, Shard = (), ()


def optimizer_ops(optimizer: str) -> set[str]:
    """The registry ops a training step's optimizer side calls under train.py's `optimizer`
    (adamw | bf16_adamw): the grad norm (clipping, and the log every log_interval), and
    bf16_adamw's step."""
    return {"grad_norm"} | ({"adamw"} if optimizer == "bf16_adamw" else set())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def global_grad_norm(params: Iterable[torch.Tensor], grad_norm: Callable) -> torch.Tensor:
    """The L2 norm of all of `params`' grads together, with `grad_norm` (a backend of the op),
    as torch.nn.utils.get_total_norm. Grads sharded by FSDP2 (DTensors on a 1-D mesh) contribute
    their local shards, summed over the mesh's ranks; plain grads are whole on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if not sharded:
        return grad_norm(plain)
    mesh = sharded[0].device_mesh
    if mesh.ndim != 1 or any(g.device_mesh != mesh or not all(isinstance(pl, Shard) for pl in g.placements)
                             for g in sharded):
        raise ValueError("global_grad_norm: DTensor grads must be sharded (Shard placements) on one 1-D mesh")
    squares = grad_norm([g.to_local() for g in sharded]).to(sharded[0].to_local().device).square()
    dist.all_reduce(squares, group=mesh.get_group())  # each rank holds other elements
    if plain:
        squares += grad_norm(plain).to(squares.device).square()
    return squares.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What grads are multiplied by to clip them to `max_norm`, torch.nn.utils.clip_grad_norm_'s
    formula: max_norm / (norm + 1e-6), at most 1 (a NaN or inf norm gives NaN or 0, as there)."""
    return (max_norm / (norm.float() + 1e-6)).clamp(max=1.0)


def derived_seed(*parts: int | str) -> int:
    """A seed hashed from `parts`, so that neighbouring parts draw unrelated bits, in [0, 2**31)
    as the adamw op and torch.manual_seed take it: the stochastic-rounding seed of one group's
    step (seed, group index, step); train.py's generators on a resume without their state."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


class BF16AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, backend: str = "torch", *,
                 stochastic_rounding: bool = True, kahan_summation: bool = False, seed: int = 0):
        self._take_up(backend)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      stochastic_rounding=stochastic_rounding,
                                      kahan_summation=kahan_summation, seed=seed))

    def _take_up(self, backend: str) -> None:
        """`backend`'s adamw, and its grad_norm for clip_grad_norm: the one of that name, or
        torch's where there is none (a backend of the user's for adamw alone)."""
        self.backend, self.adamw = backend, kernels.get("adamw", backend)
        self._grad_norm = kernels.get("grad_norm", backend if backend in kernels.ops()["grad_norm"] else "torch")
        self._clip = None  # set by clip_grad_norm, taken by the next step (see _clip_for)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        """Also what load_state_dict ends with: groups saved without this optimizer's settings (an
        older checkpoint, or torch.optim.AdamW's) take its defaults, and options of torch's AdamW
        this one does not implement are refused, not ignored. Unpickled or deep-copied (no
        __init__), it takes up its backend again."""
        super().__setstate__(state)
        if "backend" in state:
            self._take_up(self.backend)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            _check_group(group)

    def add_param_group(self, param_group: dict) -> None:
        """torch's, then the group checked (torch's fills in the defaults first); a refused group
        is not kept (torch's has appended it), so no later step half-applies it."""
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    # Both run eagerly inside torch.compile (a graph break): the triton backend's pointer tables
    # cannot be traced, and Dynamo before torch 2.13 cannot trace the clip kept on the optimizer.
    @torch.compiler.disable
    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, parameters: Iterable[torch.Tensor] | None = None,
                       grad_norm: Callable | None = None) -> torch.Tensor:
        """Clip the grads to global norm `max_norm` in the next step, and return their norm
        (a 0-d fp32 tensor on their device, still there: no host sync). The grads are not
        modified: the step multiplies them by the clip coefficient as it reads them.

        parameters: whose grads make the norm; by default this optimizer's. The step scales
        every grad it reads, so they must include all of this optimizer's that have grads (under
        ZeRO-1 each rank's optimizer holds a share of the model: pass all of the model's
        parameters); torch.nn.utils.clip_grad_norm_ clips a subset. The last call before a step
        is the one that step applies.
        grad_norm: the grad_norm op's backend to use; by default the one named like this
        optimizer's adamw backend (_take_up)."""
        own = [p for group in self.param_groups for p in group["params"]]
        parameters = own if parameters is None else list(parameters)
        given = set(map(id, parameters)) if parameters is not own else None
        missing = given is not None and sum(1 for p in own if p.grad is not None and id(p) not in given)
        if missing:
            raise ValueError(f"BF16AdamW.clip_grad_norm: {missing} of this optimizer's params with grads are not "
                             f"among `parameters`, and the step would scale their grads too (clip a subset with "
                             f"torch.nn.utils.clip_grad_norm_)")
        norm = global_grad_norm(parameters, grad_norm or self._grad_norm)
        marks = [(p, None, None) if p.grad is None else (p, weakref.ref(p.grad), _local(p.grad)._version)
                 for p in parameters]
        self._clip = (clip_coefficient(norm, float(max_norm)), marks)
        return norm

    def _clip_for(self, clip: tuple | None) -> torch.Tensor | None:
        """The coefficient of a clip_grad_norm, if the grads are still those it was computed
        from: each the same tensor, not written since (a DTensor's local shard, which FSDP2
        accumulates into, counts its writes). Grads thrown away in between (zero_grad: the
        optimizer's, the model's or ZeRO-1's, which passes this one by; a step GradScaler skipped)
        take their coefficient with them, whose NaN would otherwise turn every weight NaN at the
        next step; grads added to since (a backward between clip and step, which need not reach
        every param, or gives one its first grad) would be scaled by a coefficient computed for
        other values."""
        if clip is None:
            return None
        coefficient, marks = clip
        for param, grad, version in marks:
            now = param.grad
            if now is None:
                if grad is not None:
                    return None
            elif grad is None or now is not grad() or _local(now)._version != version:
                return None
        return coefficient

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, self._clip = self._clip_for(self._clip), None
        for group in self.param_groups:  # before any state changes (a scheduler's lr can be anything);
            _check_settings(group)  # ZeRO-1 copies loaded groups' settings in past __setstate__
        for index, group in enumerate(self.param_groups):
            kahan = group["kahan_summation"]
            states = ("exp_avg", "exp_avg_sq") + (("compensation",) if kahan else ())
            # One op call per distinct step count: in practice one call for the whole group. This
            # loop runs every step over every parameter: a few dict lookups and appends each.
            by_step: dict[int, list[list]] = {}
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = self.state[p]
                if len(state) != 1 + len(states):  # new, or Kahan switched on or off since
                    state.setdefault("step", 0)
                    if not kahan:  # what the last rounding lost, less than a bf16 step: let go
                        state.pop("compensation", None)
                    for name in states:
                        if name not in state:
                            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                count = state["step"]
                if type(count) is not int:  # torch.optim.AdamW's tensor, from a state it saved
                    count = int(count)  # (ZeRO-1's and sharded loads write states directly)
                step = count + 1  # counted once the op has taken the step
                lists = by_step.get(step)
                if lists is None:
                    lists = by_step[step] = [[] for _ in range(3 + len(states))]
                lists[-1].append(state)
                lists[0].append(p)
                lists[1].append(grad)
                for lst, name in zip(lists[2:], states):
                    lst.append(state[name])
            beta1, beta2 = group["betas"]
            for step, lists in by_step.items():
                *lists, counted = lists
                if any(isinstance(p, DTensor) for p in lists[0]):  # FSDP2: the op updates local shards
                    lists = [[_local(t) for t in ts] for ts in lists]
                params, grads, exp_avgs, exp_avg_sqs, *compensations = lists
                self.adamw(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=group["lr"],
                           beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"],
                           stochastic_rounding=group["stochastic_rounding"],
                           seed=derived_seed(group["seed"], index, step),
                           grad_scale=None if grad_scale is None else grad_scale.to(params[0].device),
                           compensations=compensations[0] if kahan else None)
                for state in counted:
                    state["step"] = step
        return loss


def _check_group(group: dict) -> None:
    """A group's settings in range when it is made or loaded (as torch's AdamW checks them), not
    at the first step, and its params of a dtype BF16AdamW steps."""
    _check_settings(group)
    if len(set(map(id, group["params"]))) != len(group["params"]):
        # torch's optimizers step a repeated param once per listing; one op call would take both
        # listings' updates of the moments at one step count (or refuse the shared memory)
        raise ValueError("BF16AdamW: a param group lists a parameter more than once")
    if any(p.dtype == torch.float16 for p in group["params"]):
        # Moments live in the param's dtype: in fp16, (1 - beta2) * g^2 flushes to zero (steps
        # many times too large), and fp16 grads would need a loss scale GradScaler cannot unscale.
        raise ValueError("BF16AdamW: float16 params are not supported (their second moment underflows); "
                         "use bfloat16 or float32 params")


def _check_settings(group: dict) -> None:
    """A group's numbers in range and its switches bools; and torch.optim.AdamW's options that
    BF16AdamW does not implement, which may come in a group of its own or in a state dict of
    torch's (or of torch.optim.Adam's, whose weight decay is not decoupled), refused where set.
    Its implementation choices (foreach, fused) are torch's own: passed over."""
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"BF16AdamW: betas must be a pair, got {betas!r}")
    check_settings("BF16AdamW", group["lr"], *betas, group["eps"], group["weight_decay"])
    for switch in ("stochastic_rounding", "kahan_summation"):
        if not isinstance(group[switch], bool):
            raise ValueError(f"BF16AdamW: {switch} must be a bool, got {group[switch]!r}")
    if not isinstance(group["seed"], int) or isinstance(group["seed"], bool) or group["seed"] < 0:
        raise ValueError(f"BF16AdamW: seed must be an int >= 0, got {group['seed']!r}")
    for option in ("amsgrad", "maximize", "capturable", "differentiable"):
        if group.get(option):
            raise ValueError(f"BF16AdamW: {option}=True (an option of torch.optim.AdamW) is not supported")
    if group.get("decoupled_weight_decay") is False:
        raise ValueError("BF16AdamW: decoupled_weight_decay=False (torch.optim.Adam's L2 penalty) is not supported: "
                         "its weight decay is AdamW's")


def clip_for_step(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], max_norm: float,
                  grad_norm: Callable) -> torch.Tensor:
    """Clip `params`' grads to global norm `max_norm` for `optimizer`'s next step, as
    torch.nn.utils.clip_grad_norm_ does, and return their norm before clipping. BF16AdamW folds
    the clipping into its step (so `params` must hold all the params it steps: see its
    clip_grad_norm); other optimizers get their grads scaled in place."""
    if isinstance(optimizer, BF16AdamW):
        return optimizer.clip_grad_norm(max_norm, params, grad_norm)
    params = list(params)
    norm = global_grad_norm(params, grad_norm)
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, clip_coefficient(norm, max_norm).to(grads[0].device))
    return norm
