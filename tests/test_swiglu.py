"""swiglu(gate, up) = silu(gate) * up: both backends, forward and both gradients, against float64."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import runtime
from tests.devices import compiled, cuda_only, skip_unless_triton_runs, two_gpus
from tests.memory import rows_taken
from tests.numerics import assert_as_accurate, assert_rounded_once

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]
# One element, one row, widths that are not a multiple of the column tile, a 3-D batch.
SHAPES = [(), (1, 4099), (3, 1031), (2, 5, 33)]
SILU_STATIONARY = -1.2785  # silu'(g) = 0 there


def reference(gate, up, dy):
    """Output, d_gate and d_up in float64, from the textbook formulas."""
    g, u, d = gate.double(), up.double(), dy.double()
    s = 1 / (1 + torch.exp(-g))
    return g * s * u, d * u * (s + g * s * (1 - s)), d * g * s


def torch_own(gate, up):
    """torch's own SwiGLU in the inputs' dtype: the error baseline."""
    return F.silu(gate) * up


def forward_backward(fn, gate, up, dy):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    y = fn(gate, up)
    y.backward(dy)
    return y, gate.grad, up.grad


def assert_matches_float64(fn, gate, up, dy, what):
    ref = reference(gate, up, dy)
    base = forward_backward(torch_own, gate, up, dy)
    out = forward_backward(fn, gate, up, dy)
    for name, o, b, r in zip(("y", "d_gate", "d_up"), out, base, ref):
        assert o.dtype == gate.dtype, f"{what} {name}: dtype {o.dtype}"
        assert_as_accurate(o, b, r, f"{what} {name}")
        if o.dtype in (torch.float16, torch.bfloat16):  # both backends compute in fp32
            assert_rounded_once(o, r, f"{what} {name}", within=1.05)


def inputs(shape, dtype, device, gate_scale=4.0):
    # A gate scale of 4 puts a good share of the inputs where sigmoid saturates.
    gate = torch.randn(shape, device=device) * gate_scale
    if gate.numel() == 1 and abs(gate.item() - SILU_STATIONARY) < 0.25:
        # d_gate of one element at silu's minimum is a cancellation to ~0: its relative error
        # measures how two roundings happened to fall, for torch and the kernel alike.
        gate += 0.5
    return gate.to(dtype), torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(backend, dtype, shape, device):
    skip_unless_triton_runs(backend, device)
    gate, up, dy = inputs(shape, dtype, device)
    assert_matches_float64(kernels.get("swiglu", backend), gate, up, dy, f"{backend} {dtype} {shape}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_gate_stays_finite(backend, dtype, device):
    """|gate| up to 30, both ends included: exp(-gate) is huge or tiny, silu and its derivative
    neither overflow nor turn NaN."""
    skip_unless_triton_runs(backend, device)
    gate = torch.cat([torch.tensor([-30.0, 30.0], device=device), torch.rand(1029, device=device) * 60 - 30])
    gate = gate.to(dtype)
    up, dy = (torch.randn(1031, device=device).to(dtype) for _ in range(2))
    out = forward_backward(kernels.get("swiglu", backend), gate, up, dy)
    assert all(torch.isfinite(t).all() for t in out)
    assert_matches_float64(kernels.get("swiglu", backend), gate, up, dy, f"{backend} {dtype} |gate|<=30")


# The interpreter's numpy exp warns where fp32 exp overflows to inf, which is the case tested here.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_fp32_gate(backend, device):
    """Far past where fp32 exp overflows (|gate| > 88): the sigmoid saturates cleanly, also where
    e^-g is just below fp32's largest (gate -88.38 to -88.72: silu a normal fp32 number)."""
    skip_unless_triton_runs(backend, device)
    gate = torch.tensor([-1e4, -100.0, -88.7, -88.5, -88.2, -88.0, -30.0, 0.0, 30.0, 88.0, 100.0, 1e4],
                        device=device)
    up, dy = torch.ones_like(gate), torch.ones_like(gate)
    out = forward_backward(kernels.get("swiglu", backend), gate, up, dy)
    for name, o, r in zip(("y", "d_gate", "d_up"), out, reference(gate, up, dy)):
        # Results below fp32's smallest normal number may flush to zero (the GPU's do).
        torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=torch.finfo(torch.float32).tiny,
                                   msg=f"{backend} {name}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_and_largest_gates_as_torch(backend, device):
    """silu(+-inf), silu(+-3.4e38): where torch's is infinite, NaN or zero, so is the op's (the
    sigmoid must not turn inf - inf or 0 * inf into NaN where torch has a number)."""
    skip_unless_triton_runs(backend, device)
    big = torch.finfo(torch.float32).max
    gate = torch.tensor([float("inf"), -float("inf"), big, -big, 1e4, -1e4], device=device)
    up = torch.ones_like(gate)
    y = kernels.get("swiglu", backend)(gate, up)
    torch.testing.assert_close(y, F.silu(gate) * up, equal_nan=True, rtol=0, atol=0, msg=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_forward_within_a_few_ulp_everywhere(backend, device):
    """Element by element, not only in norm: across gates from -88 to 30 the fp32 forward is
    within 4 ulp of the exact silu (torch's own is within 3) where exp2 and the division are
    exact (the interpreter); a GPU's approximate ones may add a few, so 12 there. A norm is led by
    the large gates, where any sigmoid is exact, so it cannot see the small ones' error."""
    skip_unless_triton_runs(backend, device)
    gate = torch.linspace(-88.0, 30.0, 4099, device=device)
    up = torch.ones_like(gate)
    y = kernels.get("swiglu", backend)(gate, up).double()
    exact = gate.double() * torch.sigmoid(gate.double())
    above = torch.nextafter(exact.float(), torch.tensor(float("inf"), device=device))
    ulp = (above.double() - exact.float().double()).abs()
    worst = ((y - exact).abs() / ulp).max().item()
    assert worst <= (12 if gate.is_cuda else 4), f"{backend}: {worst:.1f} ulp"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_halves_of_one_projection(backend, dtype, device):
    """The model's layout: gate, up = h.chunk(2, -1), views with row stride 2*hidden."""
    skip_unless_triton_runs(backend, device)
    hidden = 1031
    h = (torch.randn(2, 3, 2 * hidden, device=device) * 4).to(dtype).requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    dy = torch.randn(2, 3, hidden, device=device).to(dtype)
    assert_matches_float64(kernels.get("swiglu", backend), gate, up, dy, f"{backend} {dtype} chunked")

    y = kernels.get("swiglu", backend)(gate, up)
    y.backward(dy)
    ref_y, ref_dgate, ref_dup = reference(gate, up, dy)
    base = torch_own(gate, up)
    (base_dh,) = torch.autograd.grad(base, h, dy)
    assert_as_accurate(y, base, ref_y, f"{backend} {dtype} chunked y")
    assert_as_accurate(h.grad, base_dh, torch.cat([ref_dgate, ref_dup], -1), f"{backend} {dtype} d_h")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_backward_buffer_in_the_inputs_dtype(dtype, device):
    """d_gate and d_up come in one buffer of the inputs' dtype: an fp32 one would pass every value
    check (autograd casts the gradients back) at twice the bytes, a cast and a copy at the split."""
    skip_unless_triton_runs("triton", device)
    from kernels.swiglu import _swiglu_backward

    g, u, dy = (torch.randn(3, 40, device=device).to(dtype) for _ in range(3))
    assert _swiglu_backward(g, u, dy).dtype == dtype


def test_chunk_halves_are_read_in_place():
    h = torch.randn(4, 5, 2 * 33)
    for half in h.chunk(2, dim=-1):
        rows = runtime.as_rows(half)
        assert rows.data_ptr() == half.data_ptr() and rows.stride() == (2 * 33, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exotic_layouts(backend, device, monkeypatch):
    """Layouts the kernel cannot stride through are copied first: a transposed gate (column stride
    != 1), leading dimensions that do not collapse to one row stride, and a broadcast gradient
    (y.sum().backward() hands backward a stride-0 dy). A row-strided gradient is read in place."""
    skip_unless_triton_runs(backend, device)
    in_place = rows_taken(monkeypatch)
    gate = (torch.randn(1031, 6, device=device) * 4).t()
    up = torch.randn(6, 5, 1031, device=device)[:, 1:2].squeeze(1)
    gate3 = (torch.randn(2, 5, 1031, device=device) * 4)[:, 1:4]  # strides (5155, 1031, 1)
    up3 = torch.randn(2, 6, 1031, device=device)[:, ::2]
    assert gate3.stride(0) != 3 * gate3.stride(1) and up3.stride(1) != up3.stride(2) * 1031
    gate2, up2 = inputs((5, 1031), torch.float32, device)[:2]
    fn = kernels.get("swiglu", backend)
    for g, u, dy in ((gate, up, torch.randn(6, 1031, device=device)),
                     (gate3, up3, torch.randn(2, 3, 1031, device=device)),
                     (gate2, up2, torch.randn(5, 2 * 1031, device=device)[:, 1031:])):
        assert_matches_float64(fn, g, u, dy, f"{backend} {tuple(g.stride())} {tuple(dy.stride())}")
        g, u = g.detach().requires_grad_(), u.detach().requires_grad_()
        fn(g, u).sum().backward()
        _, ref_dgate, ref_dup = reference(g, u, torch.ones_like(u))
        torch.testing.assert_close(g.grad.double(), ref_dgate, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(u.grad.double(), ref_dup, rtol=1e-5, atol=1e-6)
    assert backend == "torch" or (dy.data_ptr(),) * 2 in in_place  # the last dy: row-strided


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 7)], ids=str)
def test_empty(backend, shape, device):
    skip_unless_triton_runs(backend, device)
    gate, up, dy = inputs(shape, torch.float32, device)
    y, dgate, dup = forward_backward(kernels.get("swiglu", backend), gate, up, dy)
    assert y.shape == dgate.shape == dup.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_can_be_changed_in_place(backend, device):
    """As torch's silu(gate) * up: y.add_() then backward gives the same gradients (an output
    that is a view made inside the autograd Function raised there)."""
    skip_unless_triton_runs(backend, device)
    gate, up, dy = inputs((3, 1031), torch.float32, device)
    results = []
    for fn in (torch_own, kernels.get("swiglu", backend)):
        g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
        y = fn(g, u)
        y.mul_(2)
        y.backward(dy)
        results.append((y, g.grad, u.grad))
    for ours, theirs in zip(*reversed(results)):
        torch.testing.assert_close(ours, theirs)


def test_backward_saves_only_the_inputs(device):
    """Backward recomputes silu: the only saved tensors are gate and up themselves."""
    skip_unless_triton_runs("triton", device)
    gate, up, _ = inputs((3, 1031), torch.bfloat16, device)
    gate.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.get("swiglu", "triton")(gate, up)
    assert len(saved) == 2 and all(t.dtype == torch.bfloat16 and t.shape == (3, 1031) for t in saved)


def test_backward_is_deterministic(device):
    skip_unless_triton_runs("triton", device)
    gate, up, dy = inputs((3, 4099), torch.bfloat16, device)
    first, second = (forward_backward(kernels.get("swiglu", "triton"), gate, up, dy) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend, device):
    fn = kernels.get("swiglu", backend)
    x = torch.randn(3, 4, device=device)
    cases = {
        "same shape": (x, torch.randn(3, 5, device=device)),
        "int32": (x.to(torch.int32), x.to(torch.int32)),
        "same dtype": (x, x.half()),
        "must be a tensor": (x, 1.0),
        "same device": (x, x.to("meta")),
    }
    if backend == "triton":  # (meta tensors reached the interpreter's launch once)
        cases["runs on CUDA tensors .*got a tensor on meta"] = (x.to("meta"), x.to("meta"))
    for problem, (gate, up) in cases.items():
        with pytest.raises(ValueError, match=f"^swiglu: .*{problem}"):
            fn(gate, up)


def test_triton_refuses_float64(device):
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="^swiglu: .*float64"):
        kernels.get("swiglu", "triton")(x, x)


# GPU-only: benchmark-sized inputs, offsets past 2^31, another GPU, torch.compile.

@cuda_only
@pytest.mark.parametrize("hidden", [2048, 5632, *(pytest.param(h, marks=pytest.mark.bigmem) for h in (11008, 14336))])
def test_llama_shapes_cuda(hidden):  # the wide ones' float64 references take 13 and 17 GB
    h = (torch.randn(16384, 2 * hidden, device="cuda") * 4).bfloat16()
    gate, up = h.chunk(2, dim=-1)
    dy = torch.randn(16384, hidden, device="cuda").bfloat16()
    assert_matches_float64(kernels.get("swiglu", "triton"), gate, up, dy, f"16k x {hidden}")


@cuda_only
@pytest.mark.bigmem
def test_offsets_past_int32_cuda():
    """gate and up rows of a projection whose buffer has more than 2^31 elements (4 GiB of bf16):
    row * row_stride overflows int32 in the last rows."""
    rows, hidden = (1 << 20) + 3, 1024
    h = torch.randn(rows, 2 * hidden, device="cuda", dtype=torch.bfloat16).requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    y = kernels.get("swiglu", "triton")(gate, up)
    dy = torch.randn_like(y)
    y.backward(dy)
    tail = slice(rows - 4, rows)
    dgate, dup = h.grad[tail].chunk(2, dim=-1)
    base = forward_backward(torch_own, gate[tail], up[tail], dy[tail])
    ref = reference(gate[tail], up[tail], dy[tail])
    for name, o, b, r in zip(("y", "d_gate", "d_up"), (y[tail], dgate, dup), base, ref):
        assert_as_accurate(o, b, r, f"last rows {name}")


@two_gpus
def test_second_gpu():
    gate, up, dy = inputs((3, 1031), torch.bfloat16, "cuda:1")
    assert_matches_float64(kernels.get("swiglu", "triton"), gate, up, dy, "cuda:1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_compile_matches_eager(dtype, device):
    """The op traces into a torch.compile graph (no graph break), after the projection's chunk
    as in the model, and gives eager's results."""
    skip_unless_triton_runs("triton", device)
    fn = kernels.get("swiglu", "triton")

    def mlp_gate(h):
        gate, up = h.chunk(2, dim=-1)
        return fn(gate, up)

    T = 257 if device == "cuda" else 5
    h = (torch.randn(4, T, 2 * 1031, device=device) * 4).to(dtype)
    dy = torch.randn(4, T, 1031, device=device).to(dtype)
    results = []
    for f in (mlp_gate, compiled(mlp_gate, device)):
        x = h.detach().requires_grad_()
        y = f(x)
        y.backward(dy)
        results.append((y, x.grad))
    for eager, graphed in zip(*results):
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


@pytest.mark.bigmem
@cuda_only
def test_over_2_to_the_31_elements():
    """The halves of one projection's output h (rows, 2*cols) whose last rows lie past element
    2^31 of h: those rows are read and written where they belong (int64 offsets), and match the
    same rows computed alone."""
    cols = 4096
    rows = 2**31 // (2 * cols) + 8
    h = torch.randn(rows, 2 * cols, device="cuda", dtype=torch.bfloat16)
    gate, up = h.chunk(2, dim=-1)
    dy = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    out = forward_backward(kernels.get("swiglu", "triton"), gate, up, dy)
    last = slice(rows - 8, rows)
    alone = forward_backward(kernels.get("swiglu", "triton"), gate[last], up[last], dy[last])
    for name, o, a in zip(("y", "d_gate", "d_up"), out, alone):
        torch.testing.assert_close(o[last], a, rtol=0, atol=0, msg=name)
