"""rms_norm and layer_norm, both backends, against float64 formulas written here.

Tolerance per dtype (tests/numerics.py): the error of a result, ||out - ref|| / ||ref|| against
the float64 formula, must be at most FACTOR (2) x the error of torch's own implementation
(F.rms_norm / F.layer_norm) in the same dtype, plus FLOOR[dtype]: float32 1e-6, float16 2e-3,
bfloat16 1.6e-2. This holds for y and for every gradient (dx, dw, db); for rows of one element,
where dx (and LayerNorm's dw) is a residue of cancelling terms, errors are measured against the
size of those terms instead (test_one_element_rows).
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import norm, runtime
from tests.devices import skip_unless_triton_runs
from tests.numerics import assert_as_accurate, bound, rel_err

# torch's own rms_norm warns when weight's dtype differs from x's (it then skips its fused path).
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

EPS = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (op, has_bias): layer_norm both with a bias and with bias=None.
OPS = [("rms_norm", False), ("layer_norm", True), ("layer_norm", False)]
OP_IDS = ["rms", "layer", "layer-nobias"]


def reference(op, x, w, b):
    """The float64 formulas."""
    x, w = x.double(), w.double()
    if op == "rms_norm":
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + EPS) * w
    return y if b is None else y + b.double()


def torch_own(op, x, w, b):
    """torch's own op in the inputs' dtypes: the error a backend is measured against."""
    if op == "rms_norm":
        return F.rms_norm(x, x.shape[-1:], w, EPS)
    return F.layer_norm(x, x.shape[-1:], w, b, EPS)


def backend_fn(backend, op):
    fn = kernels.get(op, backend)
    return (lambda x, w, b: fn(x, w, EPS)) if op == "rms_norm" else (lambda x, w, b: fn(x, w, b, EPS))


def run(fn, x, w, b, dy, cast=lambda t: t):
    """[y, dx, dw(, db)] of fn at (x, w, b), with dy as the output gradient. Inputs are detached
    views, so non-contiguous layouts reach fn as they are."""
    leaves = [cast(t).detach().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves) if b is not None else fn(*leaves, None)
    return [y, *torch.autograd.grad(y, leaves, cast(dy))]


def assert_accurate(backend, op, x, w, b=None, dy=None, scales=None):
    """Forward and every gradient of `backend` within the tolerance of the float64 formula.
    `scales` (name -> size) sets, for outputs that are tiny or zero next to the terms that cancel
    to give them, the size their errors are measured against instead of their own norm."""
    if dy is None:
        dy = torch.randn(x.shape, device=x.device).to(x.dtype)
    outs = run(backend_fn(backend, op), x, w, b, dy)
    base = run(lambda *t: torch_own(op, *t), x, w, b, dy)
    ref = run(lambda *t: reference(op, *t), x, w, b, dy, cast=torch.Tensor.double)
    names = ["y", "dx", "dw", "db"]
    dtypes = [x.dtype, x.dtype, w.dtype, None if b is None else b.dtype]
    for name, dtype, out, baseline, r in zip(names, dtypes, outs, base, ref):
        what = f"{backend} {op} {name} {tuple(x.shape)} {x.dtype}"
        assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
        if scales is None or name not in scales:
            assert_as_accurate(out, baseline, r, what)
            continue
        # numerics' rule, relative to the size of the cancelling terms.
        size = max(r.norm().item(), scales[name])
        err, own = ((t.double() - r).norm().item() / size for t in (out, baseline))
        limit = bound(own, out.dtype)
        assert err <= limit, f"{what}: error {err:.3g} of the terms' size > bound {limit:.3g}"


def inputs(m, n, device, dtype=torch.float32, wdtype=None, bias=True):
    """x offset from zero (LayerNorm must center it), weight and bias not near one."""
    x = (torch.randn(m, n, device=device) + 1.5).to(dtype)
    w = torch.randn(n, device=device).to(wdtype or dtype)
    b = torch.randn(n, device=device).to(wdtype or dtype) if bias else None
    return x, w, b


def test_both_backends_registered():
    assert kernels.ops()["rms_norm"][:2] == ["torch", "triton"]
    assert kernels.ops()["layer_norm"][:2] == ["torch", "triton"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [7, 771, 1536, 4099])
def test_matches_float64(backend, op, bias, dtype, n, device):
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(5, n, device, dtype, bias=bias)
    assert_accurate(backend, op, x, w, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_element_rows(backend, op, bias, dtype, device):
    """With N = 1 dx is a residue of cancelling terms of size rstd*|w*dy|: RMSNorm's is
    w*dy*eps/(x^2+eps)^1.5, a few 1e-6 of them, and LayerNorm's is exactly 0, as is its dw (a
    row is its own mean), whose terms are |dy*x|*rstd. Any fp32 formula's rounding error is a
    fraction of those terms, so it is measured against them."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(5, 1, device, dtype, bias=bias)
    dy = torch.randn(x.shape, device=device).to(dtype)
    xd, wd, dyd = x.double(), w.double(), dy.double()
    xc = xd if op == "rms_norm" else xd - xd.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + EPS)
    scales = {"dx": (rstd * wd * dyd).norm().item(),
              "dw": (dyd * xd * rstd).abs().sum(0).norm().item()}
    assert_accurate(backend, op, x, w, b, dy, scales)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_weights_with_low_precision_x(backend, op, bias, dtype, device):
    """y and dx in x's dtype, dw and db in the fp32 of the weights."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(6, 300, device, dtype, wdtype=torch.float32, bias=bias)
    assert_accurate(backend, op, x, w, b)


def _layouts(device):
    """Inputs that are not one contiguous (M, N) block: name -> x."""
    base = torch.randn(4, 6, 2 * 97, device=device) + 1.0
    return {
        "rows0": torch.randn(0, 97, device=device),
        "one-row": torch.randn(1, 97, device=device),
        "1-D": torch.randn(97, device=device),
        "3-D": torch.randn(2, 3, 97, device=device),
        "strided-last-dim": base[..., ::2],
        "sliced-rows": base[..., :97],  # row stride 194, last dim contiguous: read in place
        "transposed": base[..., :97].transpose(0, 1),
        "expanded-rows": torch.randn(1, 97, device=device).expand(5, 97),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("layout", list(_layouts("cpu")))
def test_shapes_and_layouts(backend, op, bias, layout, device):
    skip_unless_triton_runs(backend, device)
    x = _layouts(device)[layout]
    _, w, b = inputs(1, 97, device, bias=bias)
    assert_accurate(backend, op, x, w, b)


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_expanded_output_gradient(op, bias, device):
    """y.sum().backward() hands backward an all-stride-0 gradient."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(3, 50, device, bias=bias)
    assert_accurate("triton", op, x, w, b, dy=torch.ones(1, 1, device=device).expand(3, 50))


# Backward splits rows into contiguous ranges, one per program, walked in tiles of ROWS rows. On
# the CPU stand-in of 4 SMs these shapes give several programs with several tiles each and a
# ragged last range: n=7 -> 256-row tiles, 2 programs; n=771 -> 4-row tiles, 9 programs of 8
# rows; n=4099 -> 1-row tiles, 7 programs of 3 rows.
MANY_ROWS = [(300, 7), (70, 771), (20, 4099)]


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("m,n", MANY_ROWS)
def test_many_rows_per_program(op, bias, m, n, device):
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(m, n, device, torch.bfloat16, wdtype=torch.float32, bias=bias)
    assert_accurate("triton", op, x, w, b)


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("m,n", MANY_ROWS)
def test_backward_is_deterministic(op, bias, m, n, device):
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(m, n, device, torch.bfloat16, bias=bias)
    dy = torch.randn_like(x)
    fn = backend_fn("triton", op)
    first, second = run(fn, x, w, b, dy), run(fn, x, w, b, dy)
    for name, a, c in zip(["y", "dx", "dw", "db"], first, second):
        assert torch.equal(a, c), f"{op} {name} differs between two identical runs"


def test_widest_row(device):
    """MAX_N elements in one block; one more is refused."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(2, norm.MAX_N, device)
    assert_accurate("triton", "layer_norm", x, w, b)
    x, w, _ = inputs(1, norm.MAX_N + 1, device, bias=False)
    with pytest.raises(ValueError, match=rf"rms_norm: .*at most {norm.MAX_N}"):
        kernels.get("rms_norm", "triton")(x, w, EPS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_bad_inputs(backend, op):
    fn = backend_fn(backend, op)
    x, w, b = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    cases = {
        "weight must have shape": (x, torch.randn(7), b),
        "weight must be 1-D": (x, torch.randn(1, 8), b),
        "x must be one of": (torch.ones(3, 8, dtype=torch.int32), w, b),
        "weight must be one of": (x, torch.ones(8, dtype=torch.int64), b),
        "non-empty last dimension": (torch.randn(3, 0), torch.randn(0), b),
        "same device": (x, torch.randn(8, device="meta"), b),
    }
    if op == "layer_norm":
        cases["weight, bias must have the same shape"] = (x, w, torch.randn(9))
        cases["bias must be one of"] = (x, w, torch.ones(8, dtype=torch.int32))
        cases["x, weight, bias must have the same device"] = (x, w, torch.randn(8, device="meta"))
    if backend == "triton":
        cases["x must be one of"] = (x.double(), w, b)
        cases["weight must be one of"] = (x, w.double(), b)
        if not runtime.INTERPRET:
            cases["runs on CUDA tensors"] = (x, w, b)
    for message, args in cases.items():
        with pytest.raises(ValueError, match=rf"^{op}: .*{message}"):
            fn(*args)


@cuda
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_large_gpu_shapes(op, bias):
    x, w, b = inputs(4096, 8192, "cuda", torch.bfloat16, wdtype=torch.float32, bias=bias)
    assert_accurate("triton", op, x, w, b)


@pytest.mark.bigmem
@cuda
@pytest.mark.parametrize("op,bias", [("rms_norm", False), ("layer_norm", True)], ids=["rms", "layer"])
def test_over_2_to_the_31_elements(op, bias):
    """Rows past element 2^31 are read and written where they belong (int64 offsets)."""
    n = 4096
    m = 2**31 // n + 8
    x, w, b = inputs(m, n, "cuda", torch.bfloat16, bias=bias)
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    y, dx, dw, *db = run(backend_fn("triton", op), x, w, b, dy)
    last = slice(m - 8, m)  # the rows wholly past element 2^31
    ref = run(lambda *t: reference(op, *t), x[last], w, b, dy[last], cast=torch.Tensor.double)
    assert rel_err(y[last], ref[0]) < 1e-2
    assert rel_err(dx[last], ref[1]) < 1e-2
    # dw over every row, in float64 chunks of rows.
    dw_ref = torch.zeros(n, dtype=torch.float64, device="cuda")
    for start in range(0, m, 65536):
        rows = slice(start, start + 65536)
        xd = x[rows].double()
        xc = xd if op == "rms_norm" else xd - xd.mean(-1, keepdim=True)
        dw_ref += (dy[rows].double() * xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + EPS)).sum(0)
    assert rel_err(dw, dw_ref) < 1e-2
    if bias:
        assert rel_err(db[0], dy.sum(0, dtype=torch.float64)) < 1e-2


@cuda
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_compiled_matches_eager(op, bias):
    """The ops trace into torch.compile graphs (no graph break) and give eager's results."""
    x, w, b = inputs(300, 1536, "cuda", torch.bfloat16, wdtype=torch.float32, bias=bias)
    dy = torch.randn_like(x)
    fn = backend_fn("triton", op)
    eager = run(fn, x, w, b, dy)
    compiled = run(torch.compile(fn, fullgraph=True), x, w, b, dy)
    for name, e, c in zip(["y", "dx", "dw", "db"], eager, compiled):
        torch.testing.assert_close(c, e, msg=lambda m: f"{op} {name}: {m}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_own_gpu():
    x, w, b = inputs(5, 771, "cuda:1", torch.bfloat16, bias=True)
    with torch.cuda.device(0):
        assert_accurate("triton", "layer_norm", x, w, b)
