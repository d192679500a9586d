"""rope, both backends, against the float64 rotation written here.

Tolerance (tests/numerics.py): the error of the output and of dx, ||out - ref|| / ||ref|| against
float64, at most FACTOR (2) x the error of the torch backend (fp32 tables and arithmetic; for
the torch backend itself, the rotation in the input's dtype), plus FLOOR[dtype]
(kernels/accuracy.py: float32 1e-6, float16 2^-12, bfloat16 2^-9).
"""
import pytest
import torch

import kernels
from gpt.model import rope_tables
from kernels import runtime
from tests.devices import compiled, cuda_only, skip_unless_triton_runs, two_gpus
from tests.numerics import assert_as_accurate, assert_rounded_once, rel_err


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(x, cos, sin):
    """Pairs (x[..., i], x[..., i + D/2]) turned by the angles of cos and sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def run(fn, x, cos, sin, dy, cast=lambda t: t):
    """[y, dx] of fn at x (a detached view, so strided layouts reach fn as they are)."""
    leaf = cast(x).detach().requires_grad_()
    y = fn(leaf, cast(cos), cast(sin))
    return [y, *torch.autograd.grad(y, leaf, cast(dy))]


def assert_accurate(backend, x, theta=10000.0, start=0):
    """x (B, H, T, D) at positions start, ..., start + T - 1."""
    T, D = x.shape[-2:]
    cos, sin = (t[start:] for t in rope_tables(D, start + T, theta, x.device))
    dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    outs = run(kernels.get("rope", backend), x, cos, sin, dy)
    # The error a backend is measured against: the torch backend's (fp32 tables and arithmetic),
    # and for the torch backend itself the plain formula's in x's dtype.
    plain = lambda x, c, s: reference(x, c.to(x.dtype), s.to(x.dtype))  # noqa: E731
    base = run(plain if backend == "torch" else kernels.get("rope", "torch"), x, cos, sin, dy)
    ref = run(reference, x, cos, sin, dy, cast=torch.Tensor.double)
    for name, out, baseline, exact in zip(["y", "dx"], outs, base, ref):
        what = f"{backend} rope {name} {tuple(x.shape)} {x.dtype}"
        assert out.dtype == x.dtype and out.shape == x.shape, what
        assert_as_accurate(out, baseline, exact, what)
        if x.dtype in (torch.float16, torch.bfloat16):  # both backends compute in fp32
            assert_rounded_once(out, exact, what, within=1.05)


def test_both_backends_registered():
    assert kernels.ops()["rope"][:2] == ["torch", "triton"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 17, 64), (1, 2, 130, 128), (1, 1, 67, 32), (2, 1, 5, 6),
                                   (1, 1, 1, 2)], ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(backend, dtype, shape, device):
    """Head dims of the presets, and D/2 that is not a power of two (3) or one element; the one
    token at position 7 (at 0 every rotation is exact)."""
    skip_unless_triton_runs(backend, device)
    assert_accurate(backend, (torch.randn(shape, device=device) * 2).to(dtype), start=7 if shape[2] == 1 else 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grouped", [False, True], ids=["mha", "gqa"])
def test_views_of_the_qkv_projection(backend, grouped, device):
    """q and k as the model makes them: strided views of one (B, T, (H + 2*Hkv)*D) output."""
    skip_unless_triton_runs(backend, device)
    B, T, H, Hkv, D = 2, 19, 4, 2 if grouped else 4, 32
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device=device).to(torch.bfloat16)
    q, k, _v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
    for t in (q, k):
        assert_accurate(backend, t.view(B, T, -1, D).transpose(1, 2))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_dim_not_unit_strided(backend, device):
    """x whose elements along D are apart (a transposed view): the kernel reads them by stride."""
    skip_unless_triton_runs(backend, device)
    x = torch.randn(2, 3, 64, 17, device=device).transpose(-1, -2)  # (B, H, T=17, D=64), D stride 17
    assert x.stride(-1) != 1
    assert_accurate(backend, x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_torch_backend_computes_in_fp32_with_16_bit_tables(dtype, device):
    """The torch backend takes tables of any float dtype; in x's own 16 bits, the rotation by those
    tables is still computed in fp32 and rounded once, forward and backward."""
    x = (torch.randn(2, 3, 17, 64, device=device) * 2).to(dtype)
    cos, sin = (t.to(dtype) for t in rope_tables(64, 17, 10000.0, device))
    dy = torch.randn(x.shape, device=device).to(dtype)
    outs = run(kernels.get("rope", "torch"), x, cos, sin, dy)
    exact = run(reference, x, cos, sin, dy, cast=torch.Tensor.double)
    for name, out, r in zip(["y", "dx"], outs, exact):
        assert_rounded_once(out, r, f"torch rope {name} {dtype} tables", within=1.05)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_and_table_layouts(backend, dtype, device):
    """A transposed or expanded (stride 0, as .sum()'s) output gradient, and tables that are
    strided views (the triton backend copies them: constants of T x D/2): the same numbers as
    their contiguous copies give."""
    skip_unless_triton_runs(backend, device)
    rope = kernels.get("rope", backend)
    x = torch.randn(2, 3, 17, 64, device=device).to(dtype)
    cos, sin = rope_tables(64, 17, 10000.0, device)
    tables = [cos.t().contiguous().t(), torch.stack([sin, 0 * sin], 1)[:, 0]]  # column-major, row-strided
    assert not any(t.is_contiguous() for t in tables)
    grads = [torch.randn(2, 17, 3, 64, device=device).to(dtype).transpose(1, 2),
             torch.ones((), device=device, dtype=dtype).expand(x.shape)]
    for dy in grads:
        results = []
        for c, s, g in ((*tables, dy), (cos, sin, dy.contiguous())):
            leaf = x.detach().requires_grad_()
            y = rope(leaf, c, s)
            y.backward(g)
            results.append((y, leaf.grad))
        for strided, contiguous in zip(*results):
            assert torch.equal(strided, contiguous)


def test_output_layout_and_large_positions(device):
    """The output is laid out (B, T, H, D), as attention writes its own; a long-context theta and
    positions up to 4096 keep the fp32 tables' accuracy."""
    skip_unless_triton_runs("triton", device)
    x = torch.randn(1, 2, 4096, 8, device=device)
    y = kernels.get("rope", "triton")(x, *rope_tables(8, 4096, 500000.0, device))
    assert y.transpose(1, 2).is_contiguous()
    assert_accurate("triton", x, theta=500000.0)


def test_rotation_keeps_lengths_and_inverts(device):
    """Each pair is turned, not stretched; turning back with the transpose restores x."""
    skip_unless_triton_runs("triton", device)
    x = torch.randn(2, 3, 33, 64, device=device)
    cos, sin = rope_tables(64, 33, 10000.0, device)
    y = kernels.get("rope", "triton")(x, cos, sin)
    pair_norm = lambda t: torch.hypot(*t.chunk(2, dim=-1))  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    back = kernels.get("rope", "triton")(y, cos, -sin)
    torch.testing.assert_close(back, x)


def test_empty_batch(device):
    skip_unless_triton_runs("triton", device)
    x = torch.randn(0, 2, 5, 8, device=device, requires_grad=True)
    y = kernels.get("rope", "triton")(x, *rope_tables(8, 5, 10000.0, device))
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs(backend):
    fn = kernels.get("rope", backend)
    x = torch.randn(1, 2, 5, 8)
    cos, sin = rope_tables(8, 5, 10000.0)
    cases = {
        "even head dim D": (torch.randn(1, 2, 5, 7), *rope_tables(6, 5, 1.0)),
        r"x must be \(B, H, T, D\)": (torch.randn(2, 5, 8), cos, sin),
        r"must have shape \(T, D/2\)": (x, *rope_tables(8, 6, 1.0)),
        "cos, sin must have the same shape": (x, cos, sin[:, :3]),
        "x must be one of": (torch.ones(1, 2, 5, 8, dtype=torch.int32), cos, sin),
        "cos must be 2-D": (x, cos[None], sin),
        "x, cos, sin must have the same device": (x, cos, sin.to("meta")),
    }
    if backend == "triton":
        cases["x must be one of"] = (x.double(), cos, sin)
        cases["cos must be one of"] = (x, cos.double(), sin)
        cases["must not require grad"] = (x, cos.clone().requires_grad_(), sin)
        if not runtime.INTERPRET:
            cases["runs on CUDA tensors"] = (x, cos, sin)
    for message, args in cases.items():
        with pytest.raises(ValueError, match=rf"^rope: .*{message}"):
            fn(*args)


def test_triton_refuses_past_the_launch_grid(device):
    skip_unless_triton_runs("triton", device)
    cos, sin = rope_tables(8, 5, 10000.0, device)
    x = torch.randn(1, 1, 5, 8, device=device)
    for shape, extent in (((65536, 1, 5, 8), "batch"), ((1, 65536, 5, 8), "heads")):
        with pytest.raises(ValueError, match=f"rope: the triton backend takes at most 65535 {extent}"):
            kernels.get("rope", "triton")(x.expand(shape), cos, sin)


@cuda_only
def test_llama_shapes_on_gpu():
    """LLaMA-3 8B's grouped k at 4096 positions, from the qkv projection's layout."""
    B, T, H, Hkv, D = 2, 4096, 32, 8, 128
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, device="cuda", dtype=torch.bfloat16)
    q, k, _v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
    for t in (q, k):
        assert_accurate("triton", t.view(B, T, -1, D).transpose(1, 2), theta=500000.0)


@pytest.mark.bigmem
@cuda_only
def test_over_2_to_the_31_elements():
    """Positions past element 2^31 are read and written where they belong (int64 offsets)."""
    H, D = 16, 128
    T = 2**31 // (H * D) + 8
    x = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = rope_tables(D, T, 10000.0, "cuda")
    y = kernels.get("rope", "triton")(x, cos, sin)
    last = slice(T - 8, T)
    ref = reference(x[:, :, last].double(), cos[last].double(), sin[last].double())
    assert rel_err(y[:, :, last], ref) < 1e-2


def test_compiled_matches_eager(device):
    """The op traces into a torch.compile graph (no graph break) and gives eager's results."""
    skip_unless_triton_runs("triton", device)
    T = 300 if device == "cuda" else 19
    x = torch.randn(2, 4, T, 64, device=device, dtype=torch.bfloat16)
    cos, sin = rope_tables(64, T, 10000.0, device)
    dy = torch.randn_like(x)
    fn = kernels.get("rope", "triton")
    eager = run(fn, x, cos, sin, dy)
    graphed = run(compiled(fn, device), x, cos, sin, dy)
    for name, e, c in zip(["y", "dx"], eager, graphed):
        torch.testing.assert_close(c, e, msg=lambda m: f"rope {name}: {m}")


def test_compiled_with_symbolic_strides_matches_eager(device):
    """Under dynamic shapes a stride is a symbol (which cannot be hashed): the launch's host code
    takes an x whose head dim is not contiguous, alone (the rope op) or beside contiguous k and v
    (attention's rotation)."""
    skip_unless_triton_runs("triton", device)
    T = 300 if device == "cuda" else 19
    x = torch.randn(2, 4, 64, T, device=device, dtype=torch.bfloat16).transpose(-1, -2)
    cos, sin = rope_tables(64, T, 10000.0, device)
    dy = torch.randn(2, 4, T, 64, device=device, dtype=torch.bfloat16)
    fn = kernels.get("rope", "triton")
    graphed = run(compiled(fn, device, dynamic=True), x, cos, sin, dy)
    for name, e, c in zip(["y", "dx"], run(fn, x, cos, sin, dy), graphed):
        torch.testing.assert_close(c, e, msg=lambda m: f"rope {name}: {m}")
    kv = torch.randn(2, 4, T, 64, device=device, dtype=torch.bfloat16)
    attention = kernels.get("attention", "triton")

    def attend(q):
        return attention(q, kv, kv, rope=(cos, sin))
    torch.testing.assert_close(compiled(attend, device, dynamic=True)(x), attend(x))


@two_gpus
def test_runs_on_the_tensors_own_gpu():
    x = torch.randn(2, 3, 17, 64, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        assert_accurate("triton", x)
