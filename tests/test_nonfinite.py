"""A NaN or an infinity in an op's input, or in the gradient that reaches it, is non-finite in the
triton backend's results exactly where it is in the reference's: GradScaler (with torch's AdamW or
BF16AdamW) skips a step only when the grads show it, so a kernel that turned it finite (a
NaN-ignoring maximum, a clamped statistic) would train on garbage; one that spread it wider
would throw good steps away.

The references: the torch backend, but for attention the float64 definition (tests/
test_attention.py): torch's CPU SDPA kernel gives finite rows for a NaN query. Some cases' results
may hold more non-finite elements than the reference's, never fewer, and are finite all together
exactly when its are, as GradScaler sees them (SPREADS): causal attention's gradients, as the
diagonal tile's masked entries have probability 0, and a flash backward multiplies that 0 by
dO . v, NaN where dO is, where the definition's masked_fill drops it (the tile's other keys then
get NaN too); attention's dk and dv under an infinite key or value, which the zeros padding the
last query tile to a whole one multiply (0 . inf: NaN) where the definition has no such rows (its
dq is not finite then: a key's infinity reaches every query's gradient); and linear
cross-entropy's d_x under a non-finite loss gradient, which multiplies the ignored rows' zeros
too (computed in the forward, d_x waits for that one factor; torch's leaves those rows 0).
The attention cases are one tile long (T = 9): past a tile, a NaN in a late key's value reaches
only the queries that attend to it in the kernel's results (as in exact arithmetic), and every row
in the reference's, whose masked products 0 * NaN are NaN."""
import math

import pytest
import torch

import kernels
from kernels.cross_entropy import IGNORE_INDEX
from gpt.model import rope_tables
from tests.devices import skip_unless_triton_runs
from tests.test_attention import reference as attention_reference

# Each poison placed at one element; float16's 6e4 is finite but overflows once doubled.
POISONS = [(torch.float32, math.nan), (torch.float32, math.inf), (torch.float32, -math.inf),
           (torch.float16, 6e4)]
POISON_IDS = ["nan", "inf", "-inf", "f16-6e4"]
# Where a poison's non-finite results may spread wider than the reference's, by case.
SPREADS = {"attention": {"input0", "input1", "input2", "dy"}, "attention-full": {"input1", "input2"},
           "linear_cross_entropy": {"dy"}}
# The interpreter computes in numpy, which warns of the NaNs and overflows these tests make.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def _attention(q, k, v, backend, causal):
    if backend == "reference":
        return attention_reference(q.double(), k.double(), v.double(), causal).to(q.dtype)
    return kernels.get("attention", backend)(q, k, v, causal=causal)


def cases(dtype, device):
    """name -> (fn(*inputs, backend), inputs, how many of them lead and take gradients)."""
    def randn(*shape):
        return torch.randn(shape, device=device).to(dtype)

    targets = torch.randint(0, 41, (5,), device=device)
    targets[1] = IGNORE_INDEX  # a row that counts for nothing
    cos, sin = rope_tables(32, 9, 10000.0, device)
    attention = [randn(1, 2, 9, 32) for _ in range(3)]
    return {
        "rms_norm": (lambda x, w, r, be: kernels.get("rms_norm", be)(x, w, 1e-5, residual=r),
                     [randn(3, 37), randn(37), randn(3, 37)], 3),
        "layer_norm": (lambda x, w, b, be: kernels.get("layer_norm", be)(x, w, b, 1e-5),
                       [randn(3, 37), randn(37), randn(37)], 3),
        "swiglu": (lambda g, u, be: kernels.get("swiglu", be)(g, u), [randn(4, 33), randn(4, 33)], 2),
        "rope": (lambda x, be: kernels.get("rope", be)(x, cos, sin), [randn(1, 2, 9, 32)], 1),
        "attention": (lambda q, k, v, be: _attention(q, k, v, be, True), attention, 3),
        "attention-full": (lambda q, k, v, be: _attention(q, k, v, be, False), attention, 3),
        "cross_entropy": (lambda x, t, be: kernels.get("cross_entropy", be)(x, t), [randn(5, 41), targets], 1),
        "linear_cross_entropy": (lambda x, w, t, be: kernels.get("linear_cross_entropy", be)(x, w, t),
                                 [randn(5, 16), randn(41, 16), targets], 2),
    }


def results(fn, inputs, n_grad, backend, dy_poison, dy_seed):
    """The op's outputs and its inputs' gradients; the gradients reaching its outputs drawn from
    dy_seed, the first's holding dy_poison at one element (when not None)."""
    inputs = [t.clone().requires_grad_(i < n_grad) for i, t in enumerate(inputs)]
    outputs = fn(*inputs, backend)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator(device=outputs[0].device).manual_seed(dy_seed)
    dys = [torch.randn(o.shape, generator=g, device=o.device).to(o.dtype) for o in outputs]
    if dy_poison is not None:
        dys[0].view(-1)[dys[0].numel() // 2] = dy_poison
    torch.autograd.backward(outputs, dys)
    return [o.detach() for o in outputs] + [t.grad for t in inputs[:n_grad]]


def all_finite(results) -> bool:
    """What GradScaler sees of them: whether every element of every result is finite."""
    return all(bool(torch.isfinite(r).all()) for r in results)


# Where a poison goes, per op: each input that takes a gradient, and the gradient reaching it.
PLACES = [(name, place) for name, (_, _, n_grad) in cases(torch.float32, "cpu").items()
          for place in [*(f"input{i}" for i in range(n_grad)), "dy"]]


@pytest.mark.parametrize("dtype,poison", POISONS, ids=POISON_IDS)
@pytest.mark.parametrize("name,place", PLACES)
def test_non_finite_where_the_reference_is(name, place, dtype, poison, device):
    skip_unless_triton_runs("triton", device)
    fn, inputs, n_grad = cases(dtype, device)[name]
    reference = "reference" if name.startswith("attention") else "torch"
    dy_poison = poison if place == "dy" else None
    if place != "dy":
        poisoned = inputs[int(place.removeprefix("input"))]
        poisoned.view(-1)[poisoned.numel() // 2 + 1] = poison
    dy_seed = int(torch.randint(2**31, ()))
    expected = results(fn, inputs, n_grad, reference, dy_poison, dy_seed)
    got = results(fn, inputs, n_grad, "triton", dy_poison, dy_seed)
    assert all_finite(got) == all_finite(expected), f"{name}, {poison} in {place}: finite: {all_finite(got)}"
    for i, (e, o) in enumerate(zip(expected, got)):
        finite, finite_expected = torch.isfinite(o), torch.isfinite(e)
        what = f"{name}, {poison} in {place}: result {i}"
        if place in SPREADS.get(name, ()):
            assert not (finite & ~finite_expected).any(), f"{what}: finite where the reference is not"
        else:
            assert torch.equal(finite, finite_expected), f"{what}: non-finite elsewhere than the reference's"


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("place", ["param", "grad", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("dtype,sr", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["fp32", "bf16", "bf16-sr"])
def test_adamw_non_finite_where_torch_is(place, poison, dtype, sr, device):
    skip_unless_triton_runs("triton", device)
    # p, g, m, v of two tensors (7 and 40 elements); the poison in the second's element 20.
    state = [[torch.randn(n, device=device).to(dtype) for n in (7, 40)] for _ in range(4)]
    state[3] = [v.abs() for v in state[3]]
    state[["param", "grad", "exp_avg", "exp_avg_sq"].index(place)][1][20] = poison
    stepped = {}
    for backend in ("torch", "triton"):
        p, g, m, v = ([t.clone() for t in ts] for ts in state)
        kernels.get("adamw", backend)(p, g, m, v, step=3, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                      weight_decay=0.1, stochastic_rounding=sr, seed=5)
        stepped[backend] = [torch.isfinite(t) for t in p + m + v]
    for i, (e, o) in enumerate(zip(stepped["torch"], stepped["triton"])):
        assert torch.equal(o, e), f"{poison} in the {place}: state {i} non-finite elsewhere than torch's"


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf, 1e20], ids=["nan", "inf", "-inf", "1e20"])
def test_grad_norm_non_finite_where_torch_is(poison, device):
    """One bad element among 3 tensors; 1e20 squared overflows fp32."""
    skip_unless_triton_runs("triton", device)
    grads = [torch.randn(n, device=device) for n in (5, 1000, 33)]
    grads[1][999] = poison
    expected = kernels.get("grad_norm", "torch")(grads)
    got = kernels.get("grad_norm", "triton")(grads)
    assert bool(torch.isfinite(got)) == bool(torch.isfinite(expected)), (got, expected)
