"""The adamw op (both backends) and the BF16AdamW optimizer: against torch.optim.AdamW and a
float64 reference, stochastic rounding's bias and reproducibility, state_dict round trips and bad
input."""
import copy
import io
import math

import pytest
import torch

import kernels
from gpt.optim import BF16AdamW, clip_coefficient, clip_for_step, global_grad_norm, derived_seed
from kernels import adamw as adamw_module
from tests.devices import cuda_only, no_host_syncs, skip_unless_triton_runs, two_gpus
from tests.memory import OpCount
from tests.numerics import assert_as_accurate

BACKENDS = ["torch", "triton"]
# One element, a few, a prime that is not a multiple of the kernel's block, a 2-D weight.
SHAPES = [(1,), (7,), (10007,), (33, 65)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
STEPS = 4


def states(params, state_dtype=None):
    """Zero moments for `params`, in `state_dtype` (default: each param's own)."""
    return ([torch.zeros_like(p, dtype=state_dtype) for p in params],
            [torch.zeros_like(p, dtype=state_dtype) for p in params])


def reference(p, g, m, v, *, step, lr, beta1, beta2, eps, weight_decay):
    """AdamW in float64 from the stored values: the new p, m and v, and for each the sum of the
    magnitudes of its terms (what fp32 math's error scales with). The update is linear in m, so
    p's terms take m's apart: where m's two terms cancel (a grad against the momentum), fp32's
    error in m is of their size, not m's, and so is the update's (the kernel's fp32 math off by
    15 eps of p's two terms at 1% of seeds, within 8 of these)."""
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    m_terms = beta1 * m, (1 - beta1) * g
    v_terms = beta2 * v, (1 - beta2) * g * g
    v = sum(v_terms)
    denom = v.sqrt() / math.sqrt(1 - beta2 ** step) + eps
    p_terms = p * (1 - lr * weight_decay), *(-lr / (1 - beta1 ** step) * t / denom for t in m_terms)
    return [(sum(terms), sum(t.abs() for t in terms)) for terms in (p_terms, m_terms, v_terms)]


def reference_step(params, grads, exp_avgs, exp_avg_sqs, **hyper):
    """`reference`, each result rounded once to its tensor's dtype."""
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        for t, (new, _) in zip((p, m, v), reference(p, g, m, v, **hyper)):
            t.copy_(new)


def test_registered():
    assert kernels.ops()["adamw"] == ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_momentum_the_moment_is_the_grad_itself(backend, device):
    """beta1 = 0 (no momentum): m is g exactly, as torch's lerp gives it, which weighs from the
    nearer end. Computed as m + (g - m), g lost the low bits that the old m's size took from
    g - m (a grad 1000x smaller than m: 0.6% off)."""
    skip_unless_triton_runs(backend, device)
    g = torch.randn(1000, device=device) * 1e-3
    p, m, v = torch.ones_like(g), torch.randn_like(g), torch.zeros_like(g)
    kernels.get("adamw", backend)([p], [g], [m], [v], step=1, **{**HYPER, "beta1": 0.0})
    assert torch.equal(m, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_at_half_momentum_the_moment_is_torch_s_lerp_bit_for_bit(backend, device):
    """beta1 = 0.5 is lerp's weight 0.5, which torch computes from g's end (g - (g - m) / 2): the
    kernel takes that form from 0.5 on, not past it. The halving is exact, so bit for bit."""
    skip_unless_triton_runs(backend, device)
    g, m = torch.randn(1000, device=device), torch.randn(1000, device=device)
    p, v = torch.ones_like(g), torch.zeros_like(g)
    expected = m.lerp(g, 0.5)
    kernels.get("adamw", backend)([p], [g], [m], [v], step=1, **{**HYPER, "beta1": 0.5})
    assert torch.equal(m, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_writes_nothing_past_its_tensors(backend, device):
    """Tensors that are the head of larger buffers: a tensor's last, partial block is masked at
    its end (what follows it in memory may be another tensor's)."""
    skip_unless_triton_runs(backend, device)
    n = 1000
    buffers = [torch.full((n + 16,), 7.0, device=device) for _ in range(4)]
    p, g, m, v = (b[:n] for b in buffers)
    p.copy_(torch.randn(n)), g.copy_(torch.randn(n))
    kernels.get("adamw", backend)([p], [g], [m], [v], step=1, **HYPER)
    assert all(torch.equal(b[n:], torch.full((16,), 7.0, device=device)) for b in buffers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_a_nan_of_any_bit_pattern_stays_nan_in_bf16(backend, stochastic_rounding, device):
    """A GPU's NaN is 0x7FFFFFFF (the CPU's 0x7FC00000): rounded to bf16 by adding to its bits,
    its payload carries into the sign and the result reads -0.0, a NaN step hidden as zeros."""
    skip_unless_triton_runs(backend, device)
    p, g = (torch.randn(64, device=device, dtype=torch.bfloat16) for _ in range(2))
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    gpu_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32, device=device).view(torch.float32)
    kernels.get("adamw", backend)([p], [g], [m], [v], step=1, **HYPER, grad_scale=gpu_nan,
                                  stochastic_rounding=stochastic_rounding)
    assert all(t.isnan().all() for t in (p, m, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_torch_adamw(backend, device):
    """Several steps with a changing lr: torch.optim.AdamW's results to fp32 rounding, and the
    update as accurate as torch's against float64."""
    skip_unless_triton_runs(backend, device)
    params = [torch.randn(s, device=device) for s in SHAPES]
    ours, ref64 = [p.clone() for p in params], [p.double() for p in params]
    (m, v), (m64, v64) = states(ours), states(ref64)
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(theirs, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], foreach=False)
    g_max = [0.0] * len(params)  # each param's largest |grad| over the steps
    for step in range(1, STEPS + 1):
        lr = HYPER["lr"] / step
        opt.param_groups[0]["lr"] = lr
        grads = [torch.randn_like(p) for p in params]
        g_max = [max(a, g.abs().max().item()) for a, g in zip(g_max, grads)]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        kernels.get("adamw", backend)(ours, grads, m, v, step=step, **{**HYPER, "lr": lr})
        reference_step(ref64, grads, m64, v64, step=step, **{**HYPER, "lr": lr})
    eps32 = torch.finfo(torch.float32).eps
    for i, (p, t) in enumerate(zip(ours, theirs)):
        state = opt.state[t]
        # A value that ends near zero got there by cancellation: its rounding scales with the
        # terms that cancelled (where the param started; the grads the moments average).
        for name, out, expected, scale in (
                ("param", p, t.detach(), max(t.abs().max().item(), params[i].abs().max().item())),
                ("exp_avg", m[i], state["exp_avg"], g_max[i]),
                ("exp_avg_sq", v[i], state["exp_avg_sq"], g_max[i] ** 2)):
            torch.testing.assert_close(out, expected, rtol=4 * eps32, atol=4 * eps32 * scale,
                                       msg=lambda s: f"{backend} {SHAPES[i]} {name}: {s}")
    # The params barely move: their error is judged on the update, p - p0, of all the tensors at
    # once. A tensor of a few elements alone would compare a few roundings with as many of torch's
    # (its ulp-level agreement is checked above); 12,000 elements make the norms a statistic.
    def updates(ps):
        return torch.cat([(q.detach().double() - p0).flatten() for q, p0 in zip(ps, params)])

    assert_as_accurate(updates(ours), updates(theirs), updates(ref64), f"{backend} update")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, state_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float32)], ids=str)
def test_16_bit_params_match_float64_rounded_each_step(backend, dtype, state_dtype, device):
    """Stochastic rounding off: every step, from the same stored values, is the float64 math
    rounded to nearest in each tensor's dtype, up to fp32's error: each result is within half a
    unit of its dtype of a value within fp32's error of the exact one (so only where the exact
    value lies that close to a rounding boundary may it differ from float64 rounded once)."""
    skip_unless_triton_runs(backend, device)
    eps32 = torch.finfo(torch.float32).eps
    params = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
    m, v = states(params, state_dtype)
    for step in range(1, STEPS + 1):
        grads = [torch.randn_like(p) for p in params]
        exact = [reference(*ts, step=step, **HYPER) for ts in zip(params, grads, m, v)]
        kernels.get("adamw", backend)(params, grads, m, v, step=step, **HYPER)
        differ, total = 0, 0
        for i, shape in enumerate(SHAPES):
            for name, out, (value, scale) in zip(("param", "exp_avg", "exp_avg_sq"),
                                                 (params[i], m[i], v[i]), exact[i]):
                what = f"{backend} step {step} {shape} {name}"
                stored = dtype if name == "param" else state_dtype
                assert out.dtype == stored, what
                out, info = out.double(), torch.finfo(stored)
                # Half a unit in the last place of out: eps * 2^(e - 1) for out in [2^e, 2^(e+1)),
                # and half the spacing of the subnormals below the smallest normal.
                half_ulp = torch.ldexp(torch.full_like(out, info.eps), torch.frexp(out).exponent - 2)
                half_ulp = half_ulp.clamp_min(info.smallest_normal * info.eps / 2)
                error = (out - value).abs() - (half_ulp + 8 * eps32 * scale)
                assert (error <= 0).all(), f"{what}: off by up to {error.max().item():.3g}"
                if stored != torch.float32:
                    differ += (out != value.to(stored).double()).sum().item()
                    total += out.numel()
        # Rounding boundaries within fp32's error are rare: nearly every 16-bit result is exact.
        assert differ <= 0.02 * total, f"{backend} step {step}: {differ} of {total} differ"


def sub_resolution_step(backend, sizes, device, **rounding):
    """One step in which every element's exact results fall strictly between two bf16 values:
    p = 1 moves down by lr = 1e-3 (bf16's step below 1 is 2^-8), m = 0.1 g and v = 0.001 g^2
    with g = 1/3. Returns p, m and v (each flattened over the tensors) and their exact values."""
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    params = [torch.ones(n, device=device, dtype=torch.bfloat16) for n in sizes]
    grads = [torch.full_like(p, 1 / 3) for p in params]
    m, v = states(params)
    kernels.get("adamw", backend)(params, grads, m, v, step=1, **hyper, **rounding)
    g = grads[0][0].double().item()  # 1/3 as stored in bf16
    exact = [torch.tensor([value], dtype=torch.float64) for value in (1.0, g, 0.0, 0.0)]
    reference_step(*([t] for t in exact), step=1, **hyper)
    flat = [torch.cat([t.flatten() for t in ts]).double().cpu() for ts in (params, m, v)]
    return flat, [exact[0].item(), exact[2].item(), exact[3].item()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_is_unbiased(backend, device):
    """The mean of many stochastically rounded results is the exact value, within 6 standard
    errors (one rounding has a standard deviation of at most half a bf16 step); round to nearest
    misses it by far more."""
    skip_unless_triton_runs(backend, device)
    sizes = [1, 7, 10007, 9985]  # 20000 draws over tensors of odd sizes
    rounded, exact = sub_resolution_step(backend, sizes, device, stochastic_rounding=True, seed=1)
    nearest, _ = sub_resolution_step(backend, sizes, device, stochastic_rounding=False)
    for name, r, n, x in zip(("param", "exp_avg", "exp_avg_sq"), rounded, nearest, exact):
        ulp = 2.0 ** (math.floor(math.log2(x)) - 7)  # bf16's step at x
        assert (r - x).abs().max().item() < ulp, f"{backend} {name}: not a neighbour of {x}"
        bound = 6 * (ulp / 2) / math.sqrt(r.numel())
        assert abs(r.mean().item() - x) <= bound, f"{backend} {name}: mean {r.mean().item()} vs {x}"
        assert abs(n.mean().item() - x) > 2 * bound, f"{backend} {name}: test too weak"
    # The three stores draw their own bits: whether one rounds up says nothing of the others.
    ups = torch.stack([(r > x).double() for r, x in zip(rounded, exact)])
    correlations = torch.corrcoef(ups)[torch.triu_indices(3, 3, 1).unbind()]
    assert correlations.abs().max() < 7 / math.sqrt(ups.shape[1]), f"{backend}: {correlations.tolist()}"
    # Round to nearest loses the update to p entirely: the failure SR is there to prevent.
    assert (nearest[0] == 1).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_is_reproducible(backend, device):
    """A seed gives the same bits every time; another seed, and every tensor of one call, other
    bits."""
    skip_unless_triton_runs(backend, device)
    sizes = [4099, 4099]

    def rounded(seed):
        (p, m, v), _ = sub_resolution_step(backend, sizes, device, stochastic_rounding=True,
                                           seed=seed)
        return torch.cat([p, m, v])

    a, b, c = rounded(5), rounded(5), rounded(6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    first, second = rounded(5)[: 2 * 4099].split(4099)  # the two params of one call
    assert not torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fp32", "fp16", "bf16 params, fp32 moments", "kahan"])
def test_stochastic_rounding_leaves_other_stores_alone(backend, kind, device):
    """Only bf16 stores are rounded stochastically: fp32 and fp16 results are identical either
    way, in a call of fp32 or fp16 tensors and in one whose bf16 params are (so the launch rounds
    stochastically) beside fp32 moments. A Kahan-compensated bf16 param is rounded to nearest
    either way, what that rounding lost kept in its compensation."""
    skip_unless_triton_runs(backend, device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(kind, torch.bfloat16)

    def step(sr: bool):
        torch.manual_seed(0)
        p = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
        m, v = states(p, torch.float16 if kind == "fp16" else torch.float32)
        g = [torch.randn_like(t) for t in p]
        extra = {"compensations": [torch.zeros_like(t) for t in p]} if kind == "kahan" else {}
        kernels.get("adamw", backend)(p, g, m, v, step=1, **HYPER, stochastic_rounding=sr, seed=3, **extra)
        return p, m + v + extra.get("compensations", [])

    (p_nearest, rest_nearest), (p_sr, rest_sr) = step(False), step(True)
    assert all(torch.equal(a, b) for a, b in zip(rest_nearest, rest_sr))
    same_params = all(torch.equal(a, b) for a, b in zip(p_nearest, p_sr))
    assert same_params == (kind != "bf16 params, fp32 moments")


def test_triton_matches_torch_on_mixed_and_strided_lists():
    """One call with fp32 and bf16 params (two launches), a non-contiguous param and an empty one:
    the triton backend gives the torch backend's results (rounding to nearest, both)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = [torch.randn(7, 5, device=device).t(), torch.randn(33, device=device).bfloat16(),
              torch.randn(0, device=device), torch.randn(10007, device=device).bfloat16()]
    grads = [torch.randn(7, 5, device=device).t()] + [torch.randn_like(p) for p in params[1:]]
    results = []
    for backend in BACKENDS:
        p = [t.clone() for t in params]
        m, v = states(p)
        for step in (1, 2):
            kernels.get("adamw", backend)(p, grads, m, v, step=step, **HYPER)
        results.append(p + m + v)
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            continue
        # bf16, both rounded to nearest from fp32 math: equal but where an exact value lies within
        # fp32's error of a rounding boundary, and there one unit in the last place apart: rare,
        # but one such element in 33 came in about one run of 250 (triton 3.6's interpreter).
        ulp = torch.ldexp(torch.full_like(a, 2**-7, dtype=torch.float64), torch.frexp(a.double()).exponent - 1)
        assert ((a.double() - b.double()).abs() <= ulp).all()
        assert (a != b).sum() <= max(1, 0.02 * a.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tensors_is_no_update(backend, device):
    """Empty lists (a group whose params got no grads) update nothing; the triton backend's plan
    divided by the count of tensors."""
    skip_unless_triton_runs(backend, device)
    kernels.get("adamw", backend)([], [], [], [], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                  weight_decay=0.1, compensations=[], grad_scale=torch.ones(1, device=device))


def test_triton_refuses_a_grad_scale_in_memory_it_writes(device):
    """Every program reads grad_scale, and one writes a param or moment it lies in: a race on a
    GPU (in the interpreter the result depended on the order the programs ran in)."""
    skip_unless_triton_runs("triton", device)
    p, g, m, v = ([torch.rand(2, 300, device=device)] for _ in range(4))
    settings = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    for inside in (p[0][1, 7:8], v[0][0, :1]):
        with pytest.raises(ValueError, match="adamw: grad_scale lies in memory the call writes"):
            kernels.get("adamw", "triton")(p, g, m, v, grad_scale=inside, **settings)
    kernels.get("adamw", "triton")(p, g, m, v, grad_scale=g[0][0, :1], **settings)  # in a grad: only read
    after = torch.ones(601, device=device)  # the element just past a param: apart from it
    kernels.get("adamw", "triton")([after[:600].view(2, 300)], g, m, v, grad_scale=after[600:], **settings)


def test_triton_refuses_meta_tensors_by_their_device():
    """A meta tensor's address is 0, as every other's: it was refused as sharing memory."""
    t = [torch.zeros(3, device="meta") for _ in range(8)]
    with pytest.raises(ValueError, match="adamw: the triton backend needs .* tensors here, got tensor 0 on meta"):
        kernels.get("adamw", "triton")(t[:2], t[2:4], t[4:6], t[6:], step=1, lr=1e-3, beta1=0.9, beta2=0.999,
                                       eps=1e-8, weight_decay=0.0)


def test_triton_plan_is_cached():
    """Calls on the same tensors reuse the cached pointer table and block map."""
    p = [torch.randn(s) for s in SHAPES]
    g = [torch.randn_like(t) for t in p]
    m, v = states(p)
    if torch.cuda.is_available():
        p, g, m, v = ([t.cuda() for t in ts] for ts in (p, g, m, v))
    adamw_module._plan.cache_clear()
    for step in (1, 2, 3):
        kernels.get("adamw", "triton")(p, g, m, v, step=step, **HYPER)
    info = adamw_module._plan.cache_info()
    assert (info.misses, info.hits) == (1, 2) and adamw_module.tables_made() == 1


def test_triton_plan_is_made_on_the_host_whatever_the_default_device():
    """A script's torch.set_default_device (cuda, a notebook habit; meta here) does not move the
    pointer tables, made on the host and uploaded: made on it, the upload's pin_memory refused a
    CUDA table, and a meta one could not be read."""
    skip_unless_triton_runs("triton", "cpu")
    p = [torch.randn(s) for s in SHAPES]
    g = [torch.randn_like(t) for t in p]
    m, v = states(p)
    want = [t.clone() for t in p]
    kernels.get("adamw", "triton")(want, g, *states(p), step=1, **HYPER)
    adamw_module._plan.cache_clear()
    with torch.device("meta"):
        norm = kernels.get("grad_norm", "triton")(g)
        kernels.get("adamw", "triton")(p, g, m, v, step=1, **HYPER)
    assert norm.device.type == "cpu" and all(torch.equal(a, b) for a, b in zip(p, want))


@cuda_only
def test_triton_new_plan_does_not_sync():
    """Grads at new addresses make a new pointer table: its upload must be queued, not wait for
    the GPU to drain (a pageable copy does), in grad_norm and in the optimizer step alike."""
    p = [torch.randn(s, device="cuda") for s in SHAPES]
    m, v = states(p)

    kept = []  # every step's grads, so that each step's come at new addresses: a new plan

    def step(count):
        g = [torch.randn_like(t) for t in p]
        kept.append(g)
        kernels.get("grad_norm", "triton")(g)
        kernels.get("adamw", "triton")(p, g, m, v, step=count, **HYPER)
    step(1)  # compiles and loads the kernels
    adamw_module._plan.cache_clear()
    with no_host_syncs():
        step(2)
        step(3)
    assert adamw_module._plan.cache_info().misses >= 2


def test_triton_plan_says_whether_every_numel_is_even():
    """EVEN (every numel of a launch a multiple of EVEN_NUMEL) lets the kernels vectorize a last
    block's masked accesses; one odd tensor in the launch must turn it off."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def even(*sizes):
        ts = [torch.zeros(n, device=device) for n in sizes]
        return [launch.even for launch in adamw_module._plan("grad_norm", adamw_module._key([ts], typed=(0,)))]
    assert even(768, 2304, 16) == [True]
    assert even(768, 7, 2304) == [False]


class LaunchSpy:
    """A kernel whose launches record their EVEN flag, then run."""

    def __init__(self, kernel, flags: list):
        self.kernel, self.flags = kernel, flags

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.flags.append(kwargs["EVEN"])
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_triton_launches_carry_the_plan_s_even_flag(monkeypatch):
    """Each launch takes its plan's EVEN: a launch told its sizes are all even when one is not
    would vectorize that tensor's masked last block past its end."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flags = []
    for name in ("_adamw_kernel", "_sum_squares_kernel"):
        monkeypatch.setattr(adamw_module, name, LaunchSpy(getattr(adamw_module, name), flags))
    for sizes in ((768, 7), (768, 16)):
        p = [torch.randn(n, device=device) for n in sizes]
        g = [torch.randn_like(t) for t in p]
        kernels.get("grad_norm", "triton")(g)
        kernels.get("adamw", "triton")(p, g, *states(p), step=1, **HYPER)
    assert flags == [False, False, True, True]


def make_model(device, dtype):
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.LayerNorm(31),
                               torch.nn.Linear(31, 7)).to(device, dtype)


def param_groups(model, weight_decay=0.1):
    """nanoGPT's grouping: decay the matrices, not the 1-D params."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def train(model, optimizer, steps, seed, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 13, generator=gen).to(next(model.parameters()))
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_matches_torch_adamw_with_groups_and_schedule(backend, device):
    """fp32: the same trajectory as torch.optim.AdamW over two groups (one without weight decay)
    and a learning-rate schedule."""
    skip_unless_triton_runs(backend, device)
    ours = make_model(device, torch.float32)
    theirs = copy.deepcopy(ours)
    opts = [BF16AdamW(param_groups(ours), lr=1e-2, betas=(0.9, 0.95), backend=backend),
            torch.optim.AdamW(param_groups(theirs), lr=1e-2, betas=(0.9, 0.95), foreach=False)]
    seed = torch.randint(2**31, ()).item()
    for model, opt in zip((ours, theirs), opts):
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 / (1 + i))
        train(model, opt, steps=5, seed=seed, scheduler=schedule)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_matches_torch_adamw_per_group_and_with_steps_skipped(backend, device):
    """fp32: each group its own lr, betas and weight decay, and a param left without a grad every
    third step, so that its step count falls behind and one step updates params at two counts."""
    skip_unless_triton_runs(backend, device)
    ours = make_model(device, torch.float32)
    theirs = copy.deepcopy(ours)

    def groups(model):
        first, *rest = model.parameters()
        return [dict(params=[first], lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1),
                dict(params=rest, weight_decay=0.0)]
    opts = [BF16AdamW(groups(ours), lr=1e-2, backend=backend),
            torch.optim.AdamW(groups(theirs), lr=1e-2, foreach=False)]
    seed = torch.randint(2**31, ()).item()
    for model, opt in zip((ours, theirs), opts):
        gen = torch.Generator().manual_seed(seed)
        for step in range(7):
            model(torch.randn(16, 13, generator=gen).to(device)).square().mean().backward()
            if step % 3 == 1:
                model[2].weight.grad = None
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert opts[0].state[ours[2].weight]["step"] == 5 and opts[0].state[ours[0].weight]["step"] == 7
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_skips_params_without_grads(backend, device):
    skip_unless_triton_runs(backend, device)
    model = make_model(device, torch.bfloat16)
    frozen = model[1].weight
    frozen.requires_grad_(False)
    before = frozen.clone()
    opt = BF16AdamW(param_groups(model), lr=1e-2, backend=backend)
    train(model, opt, steps=2, seed=torch.randint(2**31, ()).item())
    assert torch.equal(frozen, before)
    assert frozen not in opt.state
    assert all(opt.state[p]["step"] == 2 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stochastic_rounding", [True, False])
def test_optimizer_state_dict_resumes_exactly(backend, stochastic_rounding, device):
    """Resuming from a checkpoint gives bit for bit the steps the uninterrupted run takes,
    stochastic rounding included (its seeds derive from state_dict contents)."""
    skip_unless_triton_runs(backend, device)
    model = make_model(device, torch.bfloat16)
    opt = BF16AdamW(param_groups(model), lr=1e-2, backend=backend, seed=7,
                    stochastic_rounding=stochastic_rounding)
    before, after = torch.randint(2**31, (2,)).tolist()  # seeds of the inputs
    train(model, opt, steps=3, seed=before)
    model_ckpt, opt_ckpt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, steps=2, seed=after)

    resumed = make_model(device, torch.bfloat16)
    resumed.load_state_dict(model_ckpt)
    resumed_opt = BF16AdamW(param_groups(resumed), lr=1.0, backend=backend)  # lr from the ckpt
    resumed_opt.load_state_dict(opt_ckpt)
    train(resumed, resumed_opt, steps=2, seed=after)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.fixture
def mesh(device, one_process_group):
    """A 1-D device mesh over one_process_group: a DTensor's shard is the whole tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device, (1,))


def test_a_clip_of_dtensor_grads_is_dropped_when_their_shards_change(mesh):
    """FSDP2 accumulates into a grad's local shard, which the DTensor's own version does not
    count: the clip coefficient's mark is the shard's."""
    from torch.distributed.tensor import DTensor, Shard

    p = torch.nn.Parameter(DTensor.from_local(torch.ones(4), mesh, [Shard(0)]))
    for accumulate in (False, True):
        p.grad = DTensor.from_local(torch.full((4,), float("nan")), mesh, [Shard(0)])
        opt = BF16AdamW([p], lr=0.0)
        opt.clip_grad_norm(1.0)
        if accumulate:
            p.grad.to_local().zero_()  # grads of the next micro-batches, the skipped step's thrown away
        assert opt._clip_for(opt._clip) is None if accumulate else opt._clip_for(opt._clip).isnan()


def test_zero1_resumes_torch_adamw_state(one_process_group):
    """ZeRO-1's load_state_dict writes the inner optimizer's states directly (no __setstate__):
    torch.optim.AdamW's tensor step counts reach BF16AdamW's step, which counts on from them."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    params = [torch.randn(4, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    saved = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        saved.step()
    bf16 = [p.detach().bfloat16().requires_grad_() for p in params]
    zero = ZeroRedundancyOptimizer(bf16, optimizer_class=BF16AdamW, lr=1e-2)
    zero.load_state_dict(saved.state_dict())
    for p in bf16:
        p.grad = torch.randn_like(p)
    zero.step()
    assert [zero.optim.state[p]["step"] for p in bf16] == [3, 3]
    # ZeRO-1 copies the loaded groups' settings into the inner optimizer past its checks: the
    # step refuses what it does not implement.
    zero.load_state_dict(torch.optim.AdamW(params, amsgrad=True).state_dict())
    with pytest.raises(ValueError, match="BF16AdamW: amsgrad=True"):
        zero.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_updates_dtensor_local_shards(backend, device, mesh):
    """FSDP2 parameters are DTensors: the optimizer updates their local shards, as it would
    plain tensors."""
    from torch.distributed.tensor import DTensor, Shard

    skip_unless_triton_runs(backend, device)
    values = [torch.randn(s, device=device).bfloat16() for s in ((33, 7), (5,))]
    grads = [torch.randn_like(t) for t in values]

    def shard(t):  # from_local: no collective, so any process-group backend will do
        return DTensor.from_local(t, mesh, [Shard(0)])

    sharded = [torch.nn.Parameter(shard(t.clone())) for t in values]
    plain = [torch.nn.Parameter(t.clone()) for t in values]
    for params, wrap in ((sharded, shard), (plain, lambda g: g)):
        for p, g in zip(params, grads):
            p.grad = wrap(g.clone())
        BF16AdamW(params, lr=1e-2, backend=backend, seed=3).step()
    for s, p in zip(sharded, plain):
        assert torch.equal(s.to_local(), p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises(backend, device):
    skip_unless_triton_runs(backend, device)
    adamw = kernels.get("adamw", backend)
    p = [torch.randn(5, device=device), torch.randn(3, device=device)]
    g = [torch.randn_like(t) for t in p]
    m, v = states(p)
    cases = {
        "same length": (p, g[:1], m, v, {}),
        "same dtype": (p, [g[0].bfloat16(), g[1]], m, v, {}),
        "same shape": (p, [g[0], torch.randn(4, device=device)], m, v, {}),
        r"grads\[1\], exp_avgs\[1\], exp_avg_sqs\[1\] must have the same device": (
            p, [g[0], torch.randn(3, device="meta")], m, v, {}),
        r"step must be in \[1, inf\), got 0": (p, g, m, v, {"step": 0}),
        "step must be a Python int, got float": (p, g, m, v, {"step": 1.5}),
        "step must be a Python int, got Tensor": (p, g, m, v, {"step": torch.tensor(1)}),
        "params must be a list or tuple of tensors, got generator": ((t for t in p), g, m, v, {}),
        # Written in place, an expanded param would take its update more than once.
        r"params\[1\] has elements that share memory": (
            [p[0], torch.randn(1, 3, device=device).expand(2, 3)], [g[0], torch.randn(2, 3, device=device)],
            [m[0], torch.zeros(2, 3, device=device)], [v[0], torch.zeros(2, 3, device=device)], {}),
        r"exp_avgs\[1\] has elements that share memory": (p, g, [m[0], torch.zeros(1, device=device).expand(3)], v, {}),
        # Overlapping without a zero stride: rows of 3 that start one element apart.
        r"params\[1\] has elements that share memory \(an expanded or overlapping view, strides \(1, 1\)\)": (
            [p[0], torch.zeros(9, device=device).as_strided((3, 3), (1, 1))], [g[0], torch.ones(3, 3, device=device)],
            [m[0], torch.zeros(3, 3, device=device)], [v[0], torch.zeros(3, 3, device=device)], {}),
        r"grads\[0\] must be a tensor, got NoneType": (p, [None, g[1]], m, v, {}),
        r"exp_avg_sqs\[1\] must be one of .*, got int64": (p, g, m, [v[0], torch.zeros(3, device=device, dtype=torch.int64)], {}),
        "lr must be": (p, g, m, v, {"lr": -1.0}),
        "lr must be a Python number": (p, g, m, v, {"lr": torch.tensor(1e-2)}),  # not a kernel pointer
        "stochastic_rounding must be a bool": (p, g, m, v, {"stochastic_rounding": 1}),
        "seed must be an int": (p, g, m, v, {"seed": 2**31}),
        r"seed must be an int in \[0, 2\*\*31\), got True": (p, g, m, v, {"seed": True}),  # not manual_seed's error
        r"grads\[1\] must be a dense tensor, got layout torch.sparse_coo": (p, [g[0], g[1].to_sparse()], m, v, {}),
    }
    for message, (ps, gs, ms, vs, override) in cases.items():
        kwargs = {"step": 1, **HYPER, **override}
        with pytest.raises(ValueError, match=f"adamw: .*{message}"):
            adamw(ps, gs, ms, vs, **kwargs)


def test_triton_refuses_tensors_that_share_memory(device):
    """The kernel updates every tensor of a call at once: a param listed twice, two states in one
    buffer, or a grad lying on something written would race. Grads may share memory (they are
    only read), and neighbouring tensors of one buffer do not overlap. Non-contiguous tensors
    (staged through contiguous copies, written back one after another) are checked by extent."""
    skip_unless_triton_runs("triton", device)
    adamw = kernels.get("adamw", "triton")
    flat = torch.randn(12, device=device)
    p = [flat[:5], flat[5:8]]  # neighbours in one buffer
    g0 = torch.randn(5, device=device)
    g = [g0, g0[:3]]  # grads sharing memory
    m, v = states(p)
    adamw(p, g, m, v, step=1, **HYPER)
    column = torch.randn(5, 2, device=device)[:, 0]  # strided: staged
    adamw([column, p[1]], g, m, v, step=1, **HYPER)
    zeros, state = (lambda: torch.zeros(5, device=device)), torch.zeros(10, device=device)
    end = torch.zeros(13, device=device)  # a strided param's last element, 8, is an exp_avg's first
    cases = [
        (r"params\[0\] and params\[1\]", [p[0], p[0]], [g0, g0], [zeros(), zeros()], [zeros(), zeros()]),
        (r"exp_avgs\[1\] and exp_avg_sqs\[1\]", p, g, [m[0], state[:3]], [v[0], state[2:5]]),
        (r"exp_avgs\[0\] and grads\[0\]", p, [m[0], g[1]], m, v),
        (r"params\[1\] and grads\[0\]", p, [flat[4:9], g[1]], m, v),
        (r"params\[0\] and params\[1\]", [column, column], [g0, g0], [zeros(), zeros()], [zeros(), zeros()]),
        (r"params\[0\] and exp_avgs\[0\]", [state[:5], p[1]], g, [state[::2], m[1]], v),
        (r"params\[0\] and exp_avgs\[0\]", [end[:9:2], p[1]], g, [end[8:], m[1]], v),
    ]
    for message, ps, gs, ms, vs in cases:
        with pytest.raises(ValueError, match=f"adamw: {message} share memory"):
            adamw(ps, gs, ms, vs, step=1, **HYPER)


@pytest.mark.bigmem
@cuda_only
def test_triton_int64_offsets():
    """A tensor of more than 2^31 elements: the elements past 2^31 are updated as the torch
    backend updates them (checked on the last few thousand)."""
    n = 2**31 + 4099
    p, g = torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.randn(n, device="cuda",
                                                                              dtype=torch.bfloat16)
    m, v = states([p])
    tail = [t[-8192:].clone() for t in (p, g, m[0], v[0])]
    kernels.get("adamw", "triton")([p], [g], m, v, step=1, **HYPER)
    kernels.get("adamw", "torch")(*([t] for t in tail), step=1, **HYPER)
    for out, expected in zip((p, m[0], v[0]), (tail[0], tail[2], tail[3])):
        torch.testing.assert_close(out[-8192:], expected, rtol=2**-7,
                                   atol=1e-6 * expected.abs().max().item())


# --- grad_norm and clipping -----------------------------------------------------------------

def grad_lists(device, dtype):
    """Odd sizes, a tensor of each other dtype, strided views: the grads of a mixed model."""
    ts = [torch.randn(s, device=device, dtype=dtype) for s in SHAPES]
    others = [d for d in (torch.float32, torch.bfloat16, torch.float16) if d != dtype]
    ts += [torch.randn(3001, device=device, dtype=d) * 10 for d in others]
    ts.append(torch.randn(40, 9, device=device, dtype=dtype).t())
    ts.append(torch.randn(40, 18, device=device, dtype=dtype)[:, ::2])  # every other column: read as is, half wrong
    return ts


def test_grad_norm_registered():
    assert kernels.ops()["grad_norm"] == ["torch", "triton"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_norm_matches_float64(dtype, device):
    skip_unless_triton_runs("triton", device)
    ts = grad_lists(device, dtype)
    ref = kernels.get("grad_norm", "torch")([t.double() for t in ts])
    base = kernels.get("grad_norm", "torch")(ts)
    out = kernels.get("grad_norm", "triton")(ts)
    assert out.dtype == base.dtype == torch.float32 and out.shape == () and out.device == ts[0].device
    assert_as_accurate(out, base, ref, f"grad_norm {dtype}")
    assert torch.equal(kernels.get("grad_norm", "triton")(ts), out)  # bit-identical rerun


def test_a_plan_past_the_rounding_keys_bounds_is_refused():
    """Stochastic rounding tells tensors and their blocks apart by 24 + 40 bits: a tensor of over
    2^40 elements (described, not allocated) is refused by name."""
    device = torch.device("cpu" if adamw_module.runtime.CPU_TENSORS else "cuda")  # the plan's own check
    key = ((0, 2**50, 2**51, 2**52), (2**40 + 1,), (torch.bfloat16,) * 3, (device,))
    with pytest.raises(ValueError, match=r"adamw: at most 16777216 tensors of at most 2\^40 elements"):
        adamw_module._plan("adamw", key)


@pytest.mark.parametrize("tensors", [4, 5])
def test_the_tensor_count_bound_is_inclusive(monkeypatch, tensors):
    """List indices take 32 - HIGH_OFFSET_BITS bits of the keys: with 2 bits, 4 tensors (indices 0 to 3)
    fit and 5 do not."""
    monkeypatch.setattr(adamw_module, "HIGH_OFFSET_BITS", adamw_module.tl.constexpr(30))
    device = torch.device("cpu" if adamw_module.runtime.CPU_TENSORS else "cuda")
    addresses = tuple((j * tensors + i + 1) << 20 for j in range(4) for i in range(tensors))  # p, g, m, v lists
    key = (addresses, (8,) * tensors, (torch.bfloat16,) * 4 * tensors, (device,) * tensors)
    if tensors == 4:
        assert adamw_module._plan("adamw", key)
    else:
        with pytest.raises(ValueError, match="adamw: at most 4 tensors"):
            adamw_module._plan("adamw", key)


def test_the_torch_grad_norm_is_torchs_own(device):
    """The torch backend is the baseline the triton one is timed against, and what kernels=torch
    clips with: it takes the norms as torch's clip_grad_norm_ does (its value; a handful of ops
    for any number of grads, not one a grad: multi-tensor launches on a GPU), in fp32 for 16-bit
    grads."""
    grads = [torch.randn(n, 3, device=device) for n in range(1, 31)]
    with OpCount() as count:
        norm = kernels.get("grad_norm", "torch")(grads)
    assert sum(count.calls.values()) <= 4 and torch.equal(norm, torch.nn.utils.get_total_norm(grads))
    grads = [torch.full((4,), 0.1, dtype=torch.bfloat16, device=device)] * 3
    assert kernels.get("grad_norm", "torch")(grads).dtype == torch.float32


def test_grad_norm_writes_every_partial_it_sums(monkeypatch, device):
    """Its buffer of per-block partial sums is not zeroed first: each block writes its own slot.
    Buffers handed over full of NaN give the same norm."""
    skip_unless_triton_runs("triton", device)
    ts = grad_lists(device, torch.bfloat16)
    expected = kernels.get("grad_norm", "triton")(ts)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
    assert torch.equal(kernels.get("grad_norm", "triton")(ts), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_norm_of_nothing_is_zero(backend, device):
    skip_unless_triton_runs(backend, device)
    assert kernels.get("grad_norm", backend)([]).item() == 0.0
    assert kernels.get("grad_norm", backend)([torch.zeros(0, device=device)]).item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_norm_bad_input_raises(backend, device):
    skip_unless_triton_runs(backend, device)
    grad_norm = kernels.get("grad_norm", backend)
    with pytest.raises(ValueError, match=r"grad_norm: tensors\[1\] must be a tensor"):
        grad_norm([torch.randn(3, device=device), [1.0]])
    with pytest.raises(ValueError, match=r"grad_norm: tensors\[0\] must be one of"):
        grad_norm([torch.ones(3, dtype=torch.int32, device=device)])
    with pytest.raises(ValueError, match="grad_norm: tensors must be a list or tuple of tensors, got generator"):
        grad_norm(t for t in [torch.randn(3, device=device)])
    with pytest.raises(ValueError, match="grad_norm: tensors must be a list or tuple of tensors, got Tensor"):
        grad_norm(torch.randn(3, device=device))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="grad_norm: tensors must be on one device"):
            grad_norm([torch.randn(3, device="cuda"), torch.randn(3)])


@two_gpus
def test_second_gpu():
    """The step and the grad norm launched on their tensors' GPU while another is current."""
    with torch.cuda.device(0):
        test_16_bit_params_match_float64_rounded_each_step("triton", torch.bfloat16, torch.bfloat16, "cuda:1")
        test_stochastic_rounding_is_reproducible("triton", "cuda:1")
        test_grad_norm_matches_float64(torch.bfloat16, "cuda:1")


@pytest.mark.bigmem
@cuda_only
def test_grad_norm_int64_offsets():
    """A tensor of more than 2^31 elements: ones, and the last 8192 (past 2^31) threes."""
    n, tail = 2**31 + 4099, 8192
    t = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    t[-tail:] = 3
    expected = math.sqrt(n + 8 * tail)
    assert kernels.get("grad_norm", "triton")([t]).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_multiplies_the_grads(backend, device):
    """adamw with grad_scale takes the step adamw takes on the grads multiplied by it."""
    skip_unless_triton_runs(backend, device)
    adamw = kernels.get("adamw", backend)
    p = [torch.randn(s, device=device) for s in SHAPES]
    g = [torch.randn_like(t) for t in p]
    m, v = states(p)
    p.append(torch.randn((), device=device))  # 0-d: a (1,) scale must not broadcast it to (1,)
    g.append(torch.randn((), device=device))
    m, v = states(p)
    scale = torch.rand(1, device=device)
    scaled = [t.clone() for t in p], [(t * scale).reshape(t.shape) for t in g], *states(p)
    adamw(p, g, m, v, step=1, **HYPER, grad_scale=scale)
    adamw(*scaled, step=1, **HYPER)
    for ours, theirs in zip((*p, *m, *v), (*scaled[0], *scaled[2], *scaled[3])):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_bad_input_raises(backend, device):
    skip_unless_triton_runs(backend, device)
    p = [torch.randn(5, device=device)]
    g, (m, v) = [torch.randn(5, device=device)], states(p)
    for scale, message in ((torch.ones(2, device=device), "grad_scale must hold one element"),
                           (torch.ones((), dtype=torch.float64, device=device), "grad_scale must be one of"),
                           (1.0, "grad_scale must be a tensor"),
                           (torch.ones((), device="meta"), "grad_scale must be on the params' device")):
        with pytest.raises(ValueError, match=f"adamw: {message}"):
            kernels.get("adamw", backend)(p, g, m, v, step=1, **HYPER, grad_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_norm", [1e-2, 1e3, torch.tensor(1e-2, dtype=torch.float64)],  # float() as torch's
                         ids=["clipping", "never", "tensor"])
def test_fused_clipping_matches_torch(backend, max_norm, device):
    """fp32: BF16AdamW.clip_grad_norm then step follows torch's clip_grad_norm_ then
    torch.optim.AdamW, and returns the same norms; clip_for_step does it for torch's optimizer."""
    skip_unless_triton_runs(backend, device)
    ours = make_model(device, torch.float32)
    theirs, scaled = copy.deepcopy(ours), copy.deepcopy(ours)
    opts = [BF16AdamW(param_groups(ours), lr=1e-2, backend=backend),
            torch.optim.AdamW(param_groups(theirs), lr=1e-2, foreach=False),
            torch.optim.AdamW(param_groups(scaled), lr=1e-2, foreach=False)]
    gen = torch.Generator().manual_seed(torch.randint(2**31, ()).item())
    for _ in range(4):
        x = torch.randn(16, 13, generator=gen).to(device)
        norms = []
        for model, opt in zip((ours, theirs, scaled), opts):
            model(x).square().mean().backward()
            if opt is opts[1]:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            else:
                norms.append(clip_for_step(opt, model.parameters(), max_norm, kernels.get("grad_norm", backend)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.testing.assert_close(norms[0], norms[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(norms[2], norms[1], rtol=1e-6, atol=0)
    for a, b, c in zip(ours.parameters(), theirs.parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e-7])
def test_the_clip_coefficient_is_torch_s_to_the_bit(max_norm):
    """clip_coefficient(norm) scales grads as clip_grad_norm_ does at that norm, bit for bit
    (its 1e-6 moves a coefficient of 0.5 by 2^-22 and one of 1e-7 by a tenth)."""
    grads = [torch.randn(7, 5) * 0.3, torch.randn(11)]
    clipped = [g.clone() for g in grads]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in clipped]
    for p, g in zip(params, clipped):
        p.grad = g
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    coefficient = clip_coefficient(norm, max_norm)
    assert all(torch.equal(p.grad, g * coefficient) for p, g in zip(params, grads))
    assert coefficient.dtype == torch.float32 and clip_coefficient(torch.tensor(0.0), 1.0) == 1.0


def test_bf16_adamw_defaults_are_torch_s_with_stochastic_rounding():
    """Hyperparameters as torch.optim.AdamW's; bf16 stores rounded at random, no Kahan state."""
    param = torch.nn.Parameter(torch.zeros(3))
    ours, theirs = BF16AdamW([param]).defaults, torch.optim.AdamW([param]).defaults
    assert {k: ours[k] for k in ("lr", "betas", "eps", "weight_decay")} == {
        k: theirs[k] for k in ("lr", "betas", "eps", "weight_decay")}
    assert ours["stochastic_rounding"] is True and ours["kahan_summation"] is False


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("thrown_away", ["optimizer", "model", "model_in_place", "kept_elsewhere"])
def test_a_skipped_steps_clipping_is_dropped_with_its_grads(backend, bad, thrown_away, device):
    """Grads with a NaN or inf norm are thrown away (zero_grad, no step), as a guard against bad
    batches or GradScaler's skipped step does: their clip coefficient (NaN, or 0) goes with them,
    not into the next step, whichever zero_grad threw them away (ZeRO-1's is the model's: it
    does not call this optimizer's), even one that zeroes them in place, or where something
    else still holds them."""
    skip_unless_triton_runs(backend, device)
    ours = make_model(device, torch.float32)
    theirs = copy.deepcopy(ours)
    opt = BF16AdamW(param_groups(ours), lr=1e-2, backend=backend)
    reference_opt = BF16AdamW(param_groups(theirs), lr=1e-2, backend=backend)
    for p in ours.parameters():
        p.grad = torch.full_like(p, bad)
    assert not opt.clip_grad_norm(1.0).isfinite()
    held = [p.grad for p in ours.parameters()] if thrown_away == "kept_elsewhere" else []  # noqa: F841 (a logger's)
    if thrown_away == "optimizer":
        opt.zero_grad(set_to_none=True)
    else:
        ours.zero_grad(set_to_none=thrown_away != "model_in_place")
    for model, optimizer in ((ours, opt), (theirs, reference_opt)):
        train(model, optimizer, steps=1, seed=3)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["added_to", "first_grad", "one_dropped"])
def test_a_clip_is_dropped_when_any_grad_changes_before_the_step(backend, change, device):
    """A backward between clip_grad_norm and the step that reaches only some params (not the
    first), adding to a grad or giving one its first, or one param's grad thrown away: the
    coefficient was computed for other grads, and the step takes them unclipped, as a step
    without a clip does."""
    skip_unless_triton_runs(backend, device)
    params = [torch.nn.Parameter(torch.randn(5, device=device)) for _ in range(2)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, unclipped = (BF16AdamW(ps, lr=1e-2, backend=backend) for ps in (params, twins))
    for ps, optimizer in ((params, opt), (twins, unclipped)):
        for p in ps:  # a first step, after which the moments make the update depend on the grads' scale
            p.grad = torch.ones_like(p)
        optimizer.step()
        optimizer.zero_grad()
        for p in ps[:1 if change == "first_grad" else 2]:
            p.grad = torch.ones_like(p)
    assert opt.clip_grad_norm(0.5) > 0.5  # a coefficient below 1
    for ps in (params, twins):
        if change == "one_dropped":
            ps[1].grad = None
        else:
            (ps[1] * 100).sum().backward()
    opt.step()
    unclipped.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twins))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_copied_or_pickled_optimizer_steps_as_the_original(backend, device):
    """copy.deepcopy and a whole-object torch.save keep the backend (torch's Optimizer pickles
    only its defaults, state and groups) and step on as the original does."""
    skip_unless_triton_runs(backend, device)
    model = make_model(device, torch.bfloat16)
    opt = BF16AdamW(param_groups(model), lr=1e-2, backend=backend)
    train(model, opt, steps=1, seed=1)
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    buffer.seek(0)
    copies = [copy.deepcopy((model, opt)), torch.load(buffer, weights_only=False)]
    train(model, opt, steps=1, seed=2)
    for twin, twin_opt in copies:
        assert twin_opt.backend == backend
        train(twin, twin_opt, steps=1, seed=2)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("settings, message", [
    (dict(lr=-1.0), r"lr must be in \[0, inf\)"), (dict(betas=(1.0, 0.9)), r"beta1 must be in \[0, 1\)"),
    (dict(betas=(0.9,)), "betas must be a pair"), (dict(eps=-1e-8), "eps must be in"),
    (dict(weight_decay=-0.1), "weight_decay must be in"), (dict(lr=torch.tensor(0.1)), "lr must be a Python number"),
])
def test_settings_are_checked_when_the_optimizer_is_made(settings, message):
    """As torch's AdamW, at construction (or add_param_group), not at the first step, which a
    group whose params never get grads never reaches."""
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=f"BF16AdamW: {message}"):
        BF16AdamW([p], **settings)
    opt = BF16AdamW([p])
    with pytest.raises(ValueError, match=f"BF16AdamW: {message}"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], **settings})
    assert len(opt.param_groups) == 1  # refused, not kept (a later step half-applied it, then raised)


def test_torch_adamw_options_it_lacks_are_refused():
    """amsgrad and maximize change torch's AdamW's update: a group asking for them, or torch's
    state dict with them, is refused, not stepped as plain AdamW."""
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="BF16AdamW: maximize=True .* not supported"):
        BF16AdamW([{"params": [p], "maximize": True}])
    opt = BF16AdamW([p])
    with pytest.raises(ValueError, match="BF16AdamW: amsgrad=True .* not supported"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "amsgrad": True})
    theirs = torch.optim.AdamW([p], amsgrad=True)
    p.grad = torch.randn(4)
    theirs.step()
    with pytest.raises(ValueError, match="BF16AdamW: amsgrad=True .* not supported"):
        BF16AdamW([p]).load_state_dict(theirs.state_dict())
    # capturable would replay a captured step (its lr and step count are the host's); Adam's weight
    # decay is an L2 penalty; foreach and fused are torch's own implementation choices
    for option, message in (({"capturable": True}, "capturable=True"), ({"differentiable": True}, "differentiable"),
                            ({"decoupled_weight_decay": False},
                             r"decoupled_weight_decay=False \(torch.optim.Adam's L2 penalty\)")):
        with pytest.raises(ValueError, match=f"BF16AdamW: {message}"):
            BF16AdamW([{"params": [p], **option}])
    BF16AdamW([{"params": [p], "foreach": True, "fused": False}])
    with (pytest.warns(UserWarning, match="duplicate parameters"),  # torch's, which still steps them
          pytest.raises(ValueError, match="BF16AdamW: a param group lists a parameter more than once")):
        BF16AdamW([p, p])
    for setting, message in (({"kahan_summation": "no"}, "kahan_summation must be a bool, got 'no'"),
                             ({"seed": 1.5}, "seed must be an int >= 0, got 1.5")):
        with pytest.raises(ValueError, match=f"BF16AdamW: {message}"):
            BF16AdamW([p], **setting)


def test_a_refused_step_changes_no_state():
    """A step refused (here a scheduler's lr that is a tensor: every group's settings are checked
    first; or a sparse grad: the op checks its tensors before it updates any) leaves the step
    counts as they were: a retry after the fix takes the bias correction of the right step."""
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    opt = BF16AdamW([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(1e-2)
    with pytest.raises(ValueError, match="BF16AdamW: lr must be a Python number, got Tensor"):
        opt.step()
    assert opt.state[p]["step"] == 1
    opt.param_groups[0]["lr"] = 1e-2
    p.grad = p.grad.to_sparse()
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"adamw: grads\[0\] must be a dense tensor, got layout torch.sparse_coo"):
        opt.step()
    assert opt.state[p]["step"] == 1 and torch.equal(p, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_continues_from_torch_adamw_state(backend, device):
    """A run begun with torch's AdamW (train.py's optimizer=adamw) resumes under BF16AdamW: the
    groups take its own settings where torch's have none, torch's tensor step counts become
    ints, and the steps match torch's AdamW continuing (fp32, so no rounding differs)."""
    skip_unless_triton_runs(backend, device)
    model = make_model(device, torch.float32)
    theirs = torch.optim.AdamW(param_groups(model), lr=1e-2, foreach=False)
    train(model, theirs, steps=2, seed=1)
    ours_model = copy.deepcopy(model)
    ours = BF16AdamW(param_groups(ours_model), lr=1.0, backend=backend)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    train(model, theirs, steps=2, seed=2)
    train(ours_model, ours, steps=2, seed=2)
    assert {type(s["step"]) for s in ours.state.values()} == {int}
    for a, b in zip(ours_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_global_grad_norm_sums_dtensor_shards(device, mesh):
    """FSDP2's grads are DTensors: their local shards enter the norm, beside plain grads."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    grads = [torch.randn(s, device=device) for s in ((33, 7), (5,), (4, 4))]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params[:2], grads[:2]):  # two sharded, one plain
        p.grad = DTensor.from_local(g, mesh, [Shard(0)])
    params[2].grad = grads[2]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(global_grad_norm(params, kernels.get("grad_norm", "torch")), expected)
    params[0].grad = DTensor.from_local(grads[0], mesh, [Replicate()])
    with pytest.raises(ValueError, match="global_grad_norm: DTensor grads must be sharded"):
        global_grad_norm(params, kernels.get("grad_norm", "torch"))


# --- Kahan-compensated params ---------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_matches_float64_compensated_each_step(backend, device):
    """Every step works on p + c: the stored param is the float64 result rounded to nearest bf16
    (up to fp32's error at rounding boundaries), and p + c is the float64 result to within
    half a unit of c's last place and fp32's error."""
    skip_unless_triton_runs(backend, device)
    eps32 = torch.finfo(torch.float32).eps
    params = [torch.randn(s, device=device).bfloat16() for s in SHAPES]
    comps = [torch.zeros_like(p) for p in params]
    m, v = states(params)
    for step in range(1, STEPS + 1):
        grads = [torch.randn_like(p) for p in params]
        exact = [reference(p.double() + c.double(), g, mi, vi, step=step, **HYPER)[0]
                 for p, c, g, mi, vi in zip(params, comps, grads, m, v)]
        kernels.get("adamw", backend)(params, grads, m, v, step=step, **HYPER, compensations=comps)
        differ, total = 0, 0
        for p, c, (value, scale) in zip(params, comps, exact):
            half_ulp = torch.ldexp(torch.full_like(value, torch.finfo(torch.bfloat16).eps),
                                   torch.frexp(c.double()).exponent - 2)
            error = (p.double() + c.double() - value).abs() - (half_ulp + 8 * eps32 * scale)
            assert (error <= 0).all(), f"{backend} step {step}: off by up to {error.max().item():.3g}"
            differ += (p != value.bfloat16()).sum().item()
            total += p.numel()
        assert differ <= 0.02 * total, f"{backend} step {step}: {differ} of {total} differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_adds_up_updates_below_bf16_resolution(backend, device):
    """Params at 1 (bf16's step there is 2^-8) take 200 updates of about 1e-4: to nearest they
    never move; compensated, p + c follows the fp32 trajectory (fp32 moments in all three, so
    that the params' storage is the only difference)."""
    skip_unless_triton_runs(backend, device)
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    fp32, plain, kahan = ([torch.ones(1031, device=device, dtype=dtype)]
                          for dtype in (torch.float32, torch.bfloat16, torch.bfloat16))
    comps = [torch.zeros_like(kahan[0])]
    lists = [(fp32, *states(fp32), {}), (plain, *states(plain, torch.float32), {}),
             (kahan, *states(kahan, torch.float32), {"compensations": comps})]
    for step in range(1, 201):
        g = torch.rand(1031, device=device) + 0.5
        for p, m, v, extra in lists:
            kernels.get("adamw", backend)(p, [g.to(p[0].dtype)], m, v, step=step, **hyper, **extra)
    assert torch.equal(plain[0], torch.ones_like(plain[0]))
    moved = 1 - fp32[0]
    assert (moved > 0.015).all()
    torch.testing.assert_close(kahan[0].float() + comps[0].float(), fp32[0], rtol=0, atol=0.01 * moved.min().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_with_kahan_resumes_exactly(backend, device):
    skip_unless_triton_runs(backend, device)
    model = make_model(device, torch.bfloat16)
    opt = BF16AdamW(param_groups(model), lr=1e-2, backend=backend, kahan_summation=True,
                    stochastic_rounding=False)
    train(model, opt, steps=2, seed=1)
    assert all(opt.state[p]["compensation"].dtype == torch.bfloat16 for p in model.parameters())
    model_ckpt, opt_ckpt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, steps=2, seed=2)
    resumed = make_model(device, torch.bfloat16)
    resumed.load_state_dict(model_ckpt)
    resumed_opt = BF16AdamW(param_groups(resumed), lr=1.0, backend=backend)  # settings from the ckpt
    resumed_opt.load_state_dict(opt_ckpt)
    train(resumed, resumed_opt, steps=2, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_optimizer_refuses_float16_params():
    with pytest.raises(ValueError, match="BF16AdamW: float16 params are not supported"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])
    opt = BF16AdamW([torch.nn.Parameter(torch.zeros(3))])  # a group added later too
    with pytest.raises(ValueError, match="BF16AdamW: float16 params are not supported"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))]})


def test_optimizer_takes_kahan_switched_on_and_off_between_steps(device):
    """A group's kahan_summation changed by hand (or by a resumed run's config) between steps:
    the compensation starts at zero when switched on, and is dropped when switched off (its
    memory freed; what it held is less than a bf16 step of each weight)."""
    model = make_model(device, torch.bfloat16)
    opt = BF16AdamW(param_groups(model), lr=1e-2, stochastic_rounding=False)
    train(model, opt, steps=1, seed=1)
    for group in opt.param_groups:
        group["kahan_summation"] = True
    train(model, opt, steps=1, seed=2)
    assert all(opt.state[p]["step"] == 2 and "compensation" in opt.state[p] for p in model.parameters())
    for group in opt.param_groups:
        group["kahan_summation"] = False
    train(model, opt, steps=1, seed=3)
    assert all(opt.state[p]["step"] == 3 and "compensation" not in opt.state[p] for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kahan_bad_input_raises(backend, device):
    skip_unless_triton_runs(backend, device)
    p = [torch.randn(5, device=device), torch.randn(3, device=device)]
    g = [torch.randn_like(t) for t in p]
    m, v = states(p)
    for comps, message in (([torch.zeros(5, device=device)], "same length"),
                           ([torch.zeros(5, device=device), torch.zeros(4, device=device)], "same shape"),
                           ([torch.zeros(5, device=device), torch.zeros(3, dtype=torch.int32, device=device)],
                            r"compensations\[1\] must be one of"),
                           ([0.0, torch.zeros(3, device=device)], r"compensations\[0\] must be a tensor, got float"),
                           ([torch.zeros(5, device=device), torch.zeros(1, device=device).expand(3)],
                            r"compensations\[1\] has elements that share memory")):
        with pytest.raises(ValueError, match=f"adamw: .*{message}"):
            kernels.get("adamw", backend)(p, g, m, v, step=1, **HYPER, compensations=comps)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_training_step_steps_as_eagerly(backend, device):
    """torch.compile of a step that clips and steps BF16AdamW: both run eagerly inside it (Dynamo
    failed on the triton backend's pointer tables, and before torch 2.13 on the clip the optimizer
    keeps), with the same result."""
    skip_unless_triton_runs(backend, device)
    torch.manual_seed(0)
    params = [torch.randn(n, device=device, dtype=torch.bfloat16) for n in (7, 33)]
    grads = [torch.randn_like(p) for p in params]
    results = []
    for compiled in (False, True):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        optimizer = BF16AdamW(ps, lr=1e-2, backend=backend)

        def step():
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            optimizer.clip_grad_norm(0.5)
            optimizer.step()
        for _ in range(2):
            (torch.compile(step, backend="eager") if compiled else step)()
        results.append([p.detach().clone() for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_clipping_fused_into_the_step_refuses_a_subset_of_its_params():
    """The step scales every grad it reads by the clip: a norm of some of them would clip the
    others too (torch.nn.utils.clip_grad_norm_ is the way to clip a subset)."""
    ps = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn_like(p)
    optimizer = BF16AdamW(ps, lr=1e-2, backend="torch")
    with pytest.raises(ValueError, match="1 of this optimizer's params with grads are not among `parameters`"):
        optimizer.clip_grad_norm(1.0, ps[:1])
    with pytest.raises(ValueError, match="not among `parameters`"):
        clip_for_step(optimizer, ps[1:], 1.0, kernels.get("grad_norm", "torch"))
    ps[1].grad = None  # a param without a grad is not stepped: leaving it out is fine
    optimizer.clip_grad_norm(1.0, ps[:1])
    optimizer.clip_grad_norm(1.0, [*ps, torch.nn.Parameter(torch.ones(2))])  # more (ZeRO-1's whole model): fine


def test_schedulers_hooks_and_grad_scaler_work_as_with_torch_adamw():
    """fp32 params (no rounding): under OneCycleLR, which cycles the betas as well as lr, with a
    state_dict round trip of both mid-run, BF16AdamW steps as torch.optim.AdamW does; step hooks
    fire around each step; GradScaler skips a step with an inf grad."""
    torch.manual_seed(0)
    start = torch.randn(6)
    grads = [torch.randn(6) for _ in range(6)]
    results = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False), lambda ps: BF16AdamW(ps, lr=1e-2)):
        p = torch.nn.Parameter(start.clone())
        opt = make([p])
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        for i, g in enumerate(grads):
            if i == 3:
                state = copy.deepcopy((opt.state_dict(), schedule.state_dict()))
                opt = make([p])
                schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
                opt.load_state_dict(state[0])
                schedule.load_state_dict(state[1])
            p.grad = g.clone()
            opt.step()
            schedule.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)

    p = torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    opt = BF16AdamW([p], lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    scaler = torch.amp.GradScaler("cpu")
    before = p.detach().clone()
    for weight in (torch.full((4,), float("inf")), torch.randn(4)):  # the first step is skipped
        scaler.scale((p.float() * weight).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if not calls:
            assert torch.equal(p, before) and scaler.get_scale() < 65536.0
    assert not torch.equal(p, before) and calls == ["pre", "post"]



def test_step_seeds_differ_by_group_and_step():
    assert len({derived_seed(0, g, s) for g in range(3) for s in range(1, 4)}) == 9


def test_identical_groups_round_independently():
    ps = [torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16)) for _ in range(2)]
    opt = BF16AdamW([{"params": [ps[0]]}, {"params": [ps[1]]}], lr=1e-3, weight_decay=0.0)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(ps[0], ps[1])


def test_a_kahan_step_fills_the_compensation():
    p = torch.nn.Parameter(torch.ones(1024, dtype=torch.bfloat16))
    opt = BF16AdamW([p], lr=1e-4, weight_decay=0.0, kahan_summation=True, stochastic_rounding=False)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["compensation"].any()


@pytest.mark.parametrize("setting", [dict(seed=True), dict(seed=-1), dict(stochastic_rounding="no")])
def test_bad_switches_and_seeds_are_refused(setting):
    with pytest.raises(ValueError, match="BF16AdamW"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(2))], **setting)


def test_each_step_rounds_with_its_own_bits():
    """A step's stochastic rounding draws bits of its own (its seed derived from the step): the
    same bits every step would round each weight the same way each time, biased, not unbiased."""
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt, seeds = BF16AdamW([p]), []
    step = opt.adamw
    opt.adamw = lambda *args, **kwargs: seeds.append(kwargs["seed"]) or step(*args, **kwargs)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    assert len(set(seeds)) == 3


def test_seeds_derived_from_neighbouring_parts_differ():
    """The parts a seed is derived from stay apart: (1, 23) and (12, 3) are other streams."""
    assert derived_seed(0, 1, 23) != derived_seed(0, 12, 3)


def test_a_clip_applies_to_the_next_step_only():
    """clip_grad_norm scales the grads of the step after it, not of every step after (a second
    step on the same grads, unclipped, as torch's AdamW after clip_grad_norm_ once)."""
    torch.manual_seed(0)
    g = torch.randn(64) * 10
    ours, ref = (torch.nn.Parameter(torch.ones(64)) for _ in range(2))
    opt, torch_opt = BF16AdamW([ours], lr=0.1, weight_decay=0.0), torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0)
    ours.grad, ref.grad = g.clone(), g.clone()
    opt.clip_grad_norm(1.0)
    torch.nn.utils.clip_grad_norm_([ref], 1.0)
    opt.step()
    torch_opt.step()
    ref.grad = g.clone()
    opt.step()
    torch_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach())
