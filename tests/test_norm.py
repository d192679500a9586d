"""rms_norm and layer_norm, both backends, against float64 formulas written here.

Tolerance per dtype (tests/numerics.py): the error of a result, ||out - ref|| / ||ref|| against
the float64 formula, must be at most FACTOR (2) x the error of torch's own implementation
(F.rms_norm / F.layer_norm) in the same dtype, plus FLOOR[dtype] (kernels/accuracy.py: float32
1e-6, float16 2^-12, bfloat16 2^-9). This holds for y and for every gradient (dx, dw, db); for
rows of one element, where dx (and LayerNorm's dw) is a residue of cancelling terms, errors are
measured against the size of those terms instead (test_one_element_rows). A triton result in 16
bits is also the exact one rounded once (CPU torch keeps its own in 16 bits, near 1% off in bf16).
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import norm, runtime
from tests.devices import compiled, cuda_only, skip_unless_triton_runs, two_gpus
from tests.memory import rows_taken
from tests.numerics import assert_as_accurate, assert_mask_is_random, assert_rounded_once, rel_err

# torch's own rms_norm warns when weight's dtype differs from x's (it then skips its fused path).
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


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
    """torch's own op in the inputs' dtypes: the error a backend is measured against. fp32 weights
    with a 16-bit x go as CPU's layer_norm and autocast take them, in fp32 rounded to x's dtype:
    CUDA's layer_norm refuses mixed dtypes."""
    if op == "rms_norm":
        return F.rms_norm(x, x.shape[-1:], w, EPS)
    if w.dtype != x.dtype:
        return F.layer_norm(x.float(), x.shape[-1:], w.float(), None if b is None else b.float(), EPS).to(x.dtype)
    return F.layer_norm(x, x.shape[-1:], w, b, EPS)


def backend_fn(backend, op):
    fn = kernels.get(op, backend)
    if op == "rms_norm":
        return lambda x, w, b, eps=EPS, **options: fn(x, w, eps, **options)
    return lambda x, w, b, eps=EPS, **options: fn(x, w, b, eps, **options)


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
        assert_as_accurate(out, baseline, r, what, size=(scales or {}).get(name))
        # The triton kernels compute in fp32 and round once: the rule against torch cannot see an
        # error of 1% where CPU torch's own, kept in 16 bits, is near that.
        if backend == "triton" and out.dtype in (torch.float16, torch.bfloat16) and name not in (scales or {}):
            assert_rounded_once(out, r, what)


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
def test_one_row_and_strided_params(backend, op, bias, dtype, device):
    """A single row (a micro-batch of one token), and weight and bias that are views of stride 2
    (the triton backend copies them: a row's worth)."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(1, 771, device, dtype, bias=bias)
    assert_accurate(backend, op, x, w, b)
    strided = [None if t is None else torch.stack([t, torch.randn_like(t)], dim=1)[:, 0] for t in (w, b)]
    assert strided[0].stride() == (2,)
    assert_accurate(backend, op, x, *strided)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_element_rows(backend, op, bias, dtype, device):
    """With N = 1 dx is a residue of cancelling terms of size rstd*|w*dy|: RMSNorm's is
    w*dy*eps/(x^2+eps)^1.5, a few 1e-6 of them, and LayerNorm's is exactly 0, as is its dw (a
    row is its own mean), whose terms are |dy*x|*rstd; db, a sum of five dy, may cancel too. Any
    fp32 formula's rounding error is a fraction of those terms, so it is measured against them."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(5, 1, device, dtype, bias=bias)
    dy = torch.randn(x.shape, device=device).to(dtype)
    xd, wd, dyd = x.double(), w.double(), dy.double()
    xc = xd if op == "rms_norm" else xd - xd.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + EPS)
    scales = {"dx": (rstd * wd * dyd).norm().item(),
              "dw": (dyd * xd * rstd).abs().sum(0).norm().item(), "db": dyd.abs().sum(0).norm().item()}
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


def row_strided(shape, device, dtype=torch.float32) -> torch.Tensor:
    """Random values in a view whose rows are twice as far apart as they are long."""
    return torch.randn(*shape[:-1], 2 * shape[-1], device=device).to(dtype)[..., :shape[-1]]


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("layout", ["expanded", "row-strided"])
def test_output_gradient_layouts(op, bias, layout, device, monkeypatch):
    """y.sum().backward() hands backward an all-stride-0 gradient; the backward of a slice or a
    concatenation a row-strided one, read in place."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(3, 50, device, bias=bias)
    dy = torch.ones(1, 1, device=device).expand(3, 50) if layout == "expanded" else row_strided((3, 50), device)
    in_place = rows_taken(monkeypatch)
    assert_accurate("triton", op, x, w, b, dy=dy)
    assert layout == "expanded" or (dy.data_ptr(),) * 2 in in_place


# Backward splits rows into contiguous ranges, one per program, walked in tiles of ROWS rows. On
# the CPU stand-in of 4 SMs these shapes give several programs and a ragged last range, the wider
# rows several tiles a program: n=7 -> 256-row tiles, 2 programs of one tile; n=771 -> 4-row
# tiles, 9 programs of 8 rows; n=4099 -> 1-row tiles, 7 programs of 3 rows. The partial sums' reduction then takes 2
# steps of 8 rows (n=771, the second ragged) and 7 of 1 (n=4099, in 3 ragged column strips).
MANY_ROWS = [(300, 7), (70, 771), (20, 4099)]


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("m,n", MANY_ROWS)
# fp32 weights under autocast; 16-bit ones where the whole model is (BF16AdamW's): dw and db summed
# over hundreds of rows in their own dtype would be off by more than one rounding.
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float16)], ids=["bf16-fp32", "bf16", "fp16"])
def test_many_rows_per_program(op, bias, m, n, dtype, wdtype, device):
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(m, n, device, dtype, wdtype=wdtype, bias=bias)
    assert_accurate("triton", op, x, w, b)
    if wdtype != torch.float32:
        dy = torch.randn(x.shape, device=device).to(dtype)
        outs = run(backend_fn("triton", op), x, w, b, dy)[2:]
        refs = run(lambda *t: reference(op, *t), x, w, b, dy, cast=torch.Tensor.double)[2:]
        for name, out, ref in zip(["dw", "db"], outs, refs):
            assert_rounded_once(out, ref, f"triton {op} {name} ({m}, {n}) {wdtype}")


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_backward_tiles_apart_from_the_forward(op, bias, device, monkeypatch):
    """The backward's tile (_BWD_TILE) is its own: the forward launches in _TILE's tiles, the
    backward in _BWD_TILE's, another of which leaves the forward as it was, and the backward in
    its tiles is as accurate."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(70, 771, device, torch.bfloat16, wdtype=torch.float32, bias=bias)
    dy = torch.randn_like(x)
    fn = backend_fn("triton", op)
    y = run(fn, x, w, b, dy)[0]
    monkeypatch.setattr(norm, "_BWD_TILE", 1024)  # 1-row tiles at 771 wide, in 2 warps
    assert norm._tile(771, norm._BWD_TILE)[1:] == (1, 2) != norm._tile(771, norm._TILE)[1:]
    tiles, tile = [], norm._tile
    monkeypatch.setattr(norm, "_tile", lambda n, size: tiles.append(size) or tile(n, size))
    with torch.no_grad():
        fn(x, w, b)
    assert tiles == [norm._TILE]
    assert torch.equal(run(fn, x, w, b, dy)[0], y)
    assert tiles[1] == norm._TILE and set(tiles[2:]) == {1024}
    assert_accurate("triton", op, x, w, b)


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("m,n", MANY_ROWS)
def test_backward_is_deterministic(op, bias, m, n, device):
    skip_unless_triton_runs("triton", device)
    # fp32 weights: dw and db not rounded to bf16, which could hide a differently ordered sum
    x, w, b = inputs(m, n, device, torch.bfloat16, wdtype=torch.float32, bias=bias)
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
    r = torch.randn(3, 8)
    for message, options in [("x, residual must have the same shape", dict(residual=torch.randn(3, 7))),
                             ("residual must be one of", dict(residual=torch.ones(3, 8, dtype=torch.int32))),
                             ("residual must have the same device", dict(residual=torch.randn(3, 8, device="meta"))),
                             ("out_dtype must be one of", dict(out_dtype=torch.int8)),
                             ("out_dtype must be one of .*, got 'bfloat16'", dict(out_dtype="bfloat16")),  # a str
                             (r"dropout_p must be in \[0, 1\), got 1.0", dict(residual=r, dropout_p=1.0)),
                             (r"dropout_p must be in \[0, 1\), got -0.1", dict(residual=r, dropout_p=-0.1)),
                             ("dropout_p applies to x before the residual add", dict(dropout_p=0.1)),
                             ("dropout_p must be a Python number, got str", dict(residual=r, dropout_p="0.1")),
                             ("eps must be a Python number, got NoneType", dict(eps=None)),
                             ("eps must be a Python number, got Tensor", dict(eps=torch.tensor(1e-5))),
                             (r"eps must be in \[0, inf\), got -1.0", dict(eps=-1.0)),
                             (r"eps must be in \[0, inf\), got nan", dict(eps=float("nan")))]:
        with pytest.raises(ValueError, match=rf"^{op}: .*{message}"):
            fn(x, w, b, **options)
    if backend == "triton":
        cases["x must be one of"] = (x.double(), w, b)
        cases["weight must be one of"] = (x, w.double(), b)
        if not runtime.INTERPRET:
            cases["runs on CUDA tensors"] = (x, w, b)
        on_meta = tuple(t if t is None else t.to("meta") for t in (x, w, b))
        cases["runs on CUDA tensors .*got a tensor on meta"] = on_meta
    for message, args in cases.items():
        with pytest.raises(ValueError, match=rf"^{op}: .*{message}"):
            fn(*args)


# The residual stream's form: norm(x, ..., residual=r, out_dtype) -> (y, s), s = x + r.


def fused_fn(backend, op, out_dtype=None, dropout_p=0.0, seed=None):
    """The op's residual form; with dropout, torch's generator seeded with `seed` before each call,
    so every call draws the same mask."""
    fn = kernels.get(op, backend)
    options = dict(out_dtype=out_dtype, dropout_p=dropout_p)

    def fused(x, r, w, b):
        if seed is not None:
            torch.manual_seed(seed)
        return fn(x, w, EPS, residual=r, **options) if op == "rms_norm" else fn(x, w, b, EPS, residual=r, **options)
    return fused


def dropout_scales(fn, x, r, w, b):
    """The factor (0 or 1 / (1 - p)) fn's dropout gives each element of x: the s it returns for
    x = 1 and a residual of 0. The mask depends on the seed and the shape, not on the values."""
    return fn(torch.ones_like(x), torch.zeros_like(r), w, b)[1]


def run_fused(fn, x, r, w, b, dy, ds, cast=lambda t: t):
    """[y, s, dx, dr, dw(, db)] of fn at (x, r, w, b), with dy and ds the gradients arriving at y
    and s (ds None: s unused, as the last norm's)."""
    leaves = [cast(t).detach().requires_grad_() for t in (x, r, w, b) if t is not None]
    y, s = fn(*leaves) if b is not None else fn(*leaves, None)
    outs, grads = ([y], [cast(dy)]) if ds is None else ([y, s], [cast(dy), cast(ds)])
    return [y, s, *torch.autograd.grad(outs, leaves, grads)]


def assert_fused_accurate(backend, op, x, r, w, b=None, out_dtype=None, ds_used=True, dropout_p=0.0,
                          strided_grads=False):
    """y, s and every gradient within the tolerance of the float64 formulas, in their dtypes:
    s and its gradient as torch's add gives them, y in out_dtype (else s's dtype). With dropout,
    the formulas take the backend's own mask (dropout_scales) and torch's own error is that of
    x * mask in x's dtype, then the add. strided_grads: dy and ds row-strided views."""
    s_dtype = torch.promote_types(x.dtype, r.dtype)
    y_dtype = out_dtype or s_dtype
    make = row_strided if strided_grads else lambda shape, device, dtype: torch.randn(shape, device=device).to(dtype)
    dy = make(x.shape, x.device, y_dtype)
    ds = make(x.shape, x.device, s_dtype) if ds_used else None
    fn = fused_fn(backend, op, out_dtype, dropout_p, seed=torch.randint(2**31, ()).item())
    scales = dropout_scales(fn, x, r, w, b).double() if dropout_p else None

    def composed(x, r, w, b, norm_fn, exact=False):  # the unfused ops, as the model ran them before
        s = (x if scales is None else x * scales.to(x.dtype)) + r
        y = norm_fn(s, w, b)
        return (y if exact else y.to(out_dtype or s.dtype)), s  # the reference not rounded to out_dtype

    outs = run_fused(fn, x, r, w, b, dy, ds)
    base = run_fused(lambda *t: composed(*t, lambda *u: torch_own(op, *u)), x, r, w, b, dy, ds)
    ref = run_fused(lambda *t: composed(*t, lambda *u: reference(op, *u), exact=True), x, r, w, b, dy, ds,
                    cast=torch.Tensor.double)
    names = ["y", "s", "dx", "dr", "dw", "db"]
    dtypes = [y_dtype, s_dtype, x.dtype, r.dtype, w.dtype, None if b is None else b.dtype]
    for name, dtype, out, baseline, exact in zip(names, dtypes, outs, base, ref):
        what = f"{backend} {op} fused {name} {tuple(x.shape)} {x.dtype}+{r.dtype}->{y_dtype}"
        assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
        assert_as_accurate(out, baseline, exact, what)


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_the_norm_is_of_the_sum_as_stored(op, bias, device):
    """y is the norm of s as returned (rounded to bf16), the tensor the next block adds to and
    backward reloads, not of the fp32 sum before rounding: a stream far from zero beside its
    spread (a residual of 50, resolution 0.25 in bf16) tells them apart."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(8, 256, device, torch.bfloat16, bias=bias)
    r = (torch.randn(8, 256, device=device) + 50).to(torch.bfloat16)
    errors = {}
    for backend in ("torch", "triton"):
        y, s = fused_fn(backend, op)(x, r, w, b)
        errors[backend] = (y.double() - reference(op, s, w, b)).abs().max().item()
    assert errors["triton"] <= 2 * errors["torch"], errors


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [7, 771, 4099])
def test_residual_matches_float64(backend, op, bias, dtype, n, device):
    skip_unless_triton_runs(backend, device)
    # Of 5 rows, a 7-wide weight gradient's error is that of a few roundings: at times torch's is
    # lucky, and the rule then left less room than one rounding (1 run in 5,000 failed). Of 64,
    # the worst of 12,000 draws a case was at 0.55 of the bound.
    rows = 64 if n < 64 else 5
    x, w, b = inputs(rows, n, device, dtype, bias=bias)
    r = torch.randn(rows, n, device=device).to(dtype) * 3
    assert_fused_accurate(backend, op, x, r, w, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_residual_stream_under_autocast(backend, op, bias, dtype, device):
    """The stream in fp32 (fp32 embeddings under autocast), the branch and y in bf16/fp16: s and
    dr in fp32, dx in the branch's dtype, all from one backward pass."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(9, 300, device, dtype, wdtype=torch.float32, bias=bias)
    r = torch.randn(9, 300, device=device) * 3
    assert_fused_accurate(backend, op, x, r, w, b, out_dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_unused_sum(backend, op, bias, device, monkeypatch):
    """The final norm's s is not used: its gradient is None (not materialized as zeros), and the
    backward kernel reads none."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(4, 96, device, torch.bfloat16, bias=bias)
    r = torch.randn(4, 96, device=device, dtype=torch.bfloat16)
    given, bwd = [], norm._norm_bwd
    monkeypatch.setattr(norm, "_norm_bwd", lambda dy, ds, *args: given.append(ds) or bwd(dy, ds, *args))
    assert_fused_accurate(backend, op, x, r, w, b, ds_used=False)
    assert given == ([None] if backend == "triton" else [])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_unused_y(backend, op, bias, device):
    """Only s used (y not in the graph): the weights get no gradient, None as torch's gives (the
    triton backend gave zeros), and the stream's and x's gradients are ds."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(4, 96, device, bias=bias)
    r, ds = torch.randn(4, 96, device=device), torch.randn(4, 96, device=device)
    leaves = [t.detach().requires_grad_() for t in (x, r, w, b) if t is not None]
    fn = fused_fn(backend, op)
    _, s = fn(*leaves) if b is not None else fn(*leaves, None)
    s.backward(ds)
    assert all(t.grad is None for t in leaves[2:])
    assert torch.equal(leaves[0].grad, ds) and torch.equal(leaves[1].grad, ds)


def test_a_gradient_given_for_the_empty_sum_of_a_norm_without_residual(device):
    """Without a residual the op's s is an empty stand-in: a gradient given for it (as
    torch.library.opcheck gives one) adds nothing, and is not read past its end (a crash once)."""
    skip_unless_triton_runs("triton", device)
    x, w, _ = inputs(6, 40, device, bias=False)
    x, w = x.requires_grad_(), w.requires_grad_()
    y, s, _, _ = torch.ops.tritongpt.norm_fwd(x, None, w, None, 1e-5, True, None, 0.0, None)
    dy = torch.randn_like(y)
    given = torch.autograd.grad((y, s), (x, w), (dy, torch.zeros_like(s)), retain_graph=True)
    for got, want in zip(given, torch.autograd.grad(y, (x, w), dy)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_frozen_weights_get_no_gradient_and_cost_no_sums(op, bias, residual, device, monkeypatch):
    """A weight or bias that needs no gradient (frozen) gets None, as torch's does, while the
    others' gradients and dx stay bit for bit those of a run where all are trained; the backward
    leaves out the frozen ones' sums: with none wanted, its second launch too."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(37, 771, device, torch.bfloat16, bias=bias)
    r = torch.randn(37, 771, device=device, dtype=torch.bfloat16) if residual else None
    dy = torch.randn(37, 771, device=device, dtype=torch.bfloat16)
    fn = backend_fn("triton", op)
    launched = []
    wrap = norm.wrap_triton
    monkeypatch.setattr(norm, "wrap_triton", lambda kernel: launched.append(kernel.fn.__name__) or wrap(kernel))

    def grads(trained):
        """x's, w's and b's gradients with `trained` of (w, b) needing one, and the kernels launched."""
        launched.clear()
        xl = x.detach().requires_grad_()
        params = [None if t is None else t.detach().requires_grad_(need) for t, need in zip((w, b), trained)]
        options = {} if r is None else {"residual": r}
        y = fn(xl, *params, **options)
        y = y if r is None else y[0]
        y.backward(dy)
        return [t if t is None else t.grad for t in (xl, *params)], launched[1:]  # [0]: the forward

    (dx, dw, db), kernels_all = grads((True, True))
    assert kernels_all == ["_norm_bwd_kernel", "_norm_sum_partials_kernel"]
    for trained in [(False, True), (True, False), (False, False)]:
        (dx_f, dw_f, db_f), kernels_f = grads(trained)
        assert torch.equal(dx_f, dx)
        assert dw_f is None if not trained[0] else torch.equal(dw_f, dw)
        if bias:
            assert db_f is None if not trained[1] else torch.equal(db_f, db)
        wanted = trained[0] or (bias and trained[1])
        assert kernels_f == ["_norm_bwd_kernel"] + ["_norm_sum_partials_kernel"] * wanted, (trained, kernels_f)
    # x frozen (an adapter's input), the weight trained: autograd still sees the call (it once
    # asked only the first argument whether it needs a gradient: the weight got None).
    weight = w.detach().requires_grad_()
    y = fn(x.detach(), weight, None if b is None else b.detach(), **({} if r is None else {"residual": r}))
    (y if r is None else y[0]).backward(dy)
    assert torch.equal(weight.grad, dw)


def test_frozen_weight_through_the_registered_op(device):
    """The same through torch.compile's path (the op's registered autograd, traced by AOTAutograd;
    aot_eager runs it without Inductor, so on a CPU too): a frozen weight gets None, the trained
    bias and x their eager gradients."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(5, 96, device, torch.float32)
    fn = kernels.get("layer_norm", "triton")
    dy = torch.randn(5, 96, device=device)
    grads = []
    for call in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        xl, wl, bl = x.detach().requires_grad_(), w.detach(), b.detach().requires_grad_()
        call(xl, wl, bl, EPS).backward(dy)
        assert wl.grad is None
        grads.append((xl.grad, bl.grad))
    assert all(torch.equal(eager, compiled) for eager, compiled in zip(*grads))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_out_dtype(backend, op, bias, device):
    """y straight in bf16 from fp32 x: the numbers of the fp32 y cast to bf16, as autocast does."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(6, 200, device, bias=bias)
    fn = kernels.get(op, backend)
    args = (x, w) if op == "rms_norm" else (x, w, b)
    y32, y16 = fn(*args, EPS), fn(*args, EPS, out_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    same = y16 == y32.to(torch.bfloat16)
    assert same.all(), f"{op}: {(~same).sum()} elements differ from the fp32 result cast to bf16"


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_residual_layouts(op, bias, device):
    """A transposed residual, a row-sliced x and row-sliced gradients at y and s, 3-D, many rows
    per backward program."""
    skip_unless_triton_runs("triton", device)
    x = row_strided((3, 40, 771), device, torch.bfloat16)
    r = (torch.randn(40, 3, 771, device=device) * 2).to(torch.bfloat16).transpose(0, 1)
    _, w, b = inputs(1, 771, device, torch.bfloat16, wdtype=torch.float32, bias=bias)
    assert_fused_accurate("triton", op, x, r, w, b, strided_grads=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_dropout_matches_float64(backend, op, bias, dtype, device):
    """s = r + dropout(x): every output and gradient against the float64 formulas with the same
    mask, the branch's gradient scaled by it."""
    skip_unless_triton_runs(backend, device)
    x, w, b = inputs(6, 771, device, dtype, bias=bias)
    r = torch.randn(6, 771, device=device).to(dtype) * 3
    assert_fused_accurate(backend, op, x, r, w, b, dropout_p=0.2)


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_residual_dropout_under_autocast(op, bias, device):
    """The model's case: an fp32 stream, a bf16 branch dropped out, y in bf16."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(9, 300, device, torch.bfloat16, wdtype=torch.float32, bias=bias)
    r = torch.randn(9, 300, device=device) * 3
    assert_fused_accurate("triton", op, x, r, w, b, out_dtype=torch.bfloat16, dropout_p=0.1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_residual_dropout_statistics(backend, p, device):
    """Kept with probability 1 - p, neighbours independently (assert_mask_is_random), kept
    elements scaled by 1 / (1 - p); the same seed draws the same mask, each call a new one, and
    rows are not copies of each other (the row enters the hash)."""
    skip_unless_triton_runs(backend, device)
    m, n = 64, 1031
    x, w, _ = inputs(m, n, device, bias=False)
    r = torch.zeros(m, n, device=device)
    scales = dropout_scales(fused_fn(backend, "rms_norm", dropout_p=p, seed=7), x, r, w, None)
    kept = scales != 0
    assert torch.equal(scales[kept], torch.full_like(scales[kept], 1 / (1 - p)))
    assert_mask_is_random(kept, p, f"{backend} p={p}")
    assert len({tuple(row.tolist()) for row in kept}) == m
    again = dropout_scales(fused_fn(backend, "rms_norm", dropout_p=p, seed=7), x, r, w, None)
    assert torch.equal(scales, again)
    fn = fused_fn(backend, "rms_norm", dropout_p=p)
    assert not torch.equal(dropout_scales(fn, x, r, w, None), dropout_scales(fn, x, r, w, None))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_residual_dropout_near_one_scales_as_torch(backend, device):
    """Kept elements get torch's fp32 1 / (1 - p): 999.99994 at p = 0.999 (from fp32(p) the
    kernels gave 1000.0129), and a p that rounds to 1 in fp32 still gives finite sums (its scale
    was 1 / 0)."""
    skip_unless_triton_runs(backend, device)
    m, n = 64, 1031
    x, w, _ = inputs(m, n, device, bias=False)
    r = torch.zeros(m, n, device=device)
    scales = dropout_scales(fused_fn(backend, "rms_norm", dropout_p=0.999, seed=7), x, r, w, None)
    kept = scales[scales != 0]
    assert len(kept) and torch.equal(kept, torch.full_like(kept, 1 / torch.tensor(1 - 0.999).item()))
    for seed in range(4):
        y, s_ = fused_fn(backend, "rms_norm", dropout_p=1 - 2**-26, seed=seed)(x, r, w, None)
        assert torch.isfinite(s_).all() and not y.isnan().any()


def test_layer_norm_of_rows_whose_spread_is_small_beside_their_mean(device):
    """fp32 rows of a large mean (the rule against torch's own error) and a constant row, which
    normalizes to the bias exactly: a mean an ulp off came out as bias + ulp * rstd, 1 / sqrt(eps)
    there."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(64, 300, device)  # dw sums 64 rows: 4 left its error ratio to chance (1 in 150 failed)
    x = x * 0.1 + 1e4
    x[1] = 3.3
    assert_accurate("triton", "layer_norm", x, w, b)
    assert torch.equal(kernels.get("layer_norm", "triton")(x, w, b, EPS)[1], b)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
def test_layer_norm_of_rows_whose_squares_overflow_is_torchs(device):
    """A row of 1e30s (a model blowing up) has a variance past fp32's range: inf, so rstd 0 and the
    row normalizes to the bias, as in torch. Taken as mean square less squared mean, it was inf - inf,
    NaN, clamped to 0: y of 1e31 (finite, so no divergence seen) and inf in dx."""
    skip_unless_triton_runs("triton", device)
    x, w, b = inputs(3, 37, device)
    x[1] = 1e30 + 1e29 * x[1]
    dy = torch.randn_like(x)
    want = run(backend_fn("torch", "layer_norm"), x, w, b, dy)
    got = run(backend_fn("triton", "layer_norm"), x, w, b, dy)
    assert torch.equal(got[0][1], b)
    for name, g, t in zip(["y", "dx", "dw", "db"], got, want):
        torch.testing.assert_close(g, t, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_residual_backward_is_deterministic(op, bias, dropout_p, device):
    skip_unless_triton_runs("triton", device)
    m, n = MANY_ROWS[1]
    x, w, b = inputs(m, n, device, torch.bfloat16, wdtype=torch.float32, bias=bias)
    r, dy, ds = (torch.randn(m, n, device=device) for _ in range(3))
    fn = fused_fn("triton", op, out_dtype=torch.bfloat16, dropout_p=dropout_p, seed=3)
    first, second = (run_fused(fn, x, r, w, b, dy.bfloat16(), ds) for _ in range(2))
    for name, a, c in zip(["y", "s", "dx", "dr", "dw", "db"], first, second):
        assert torch.equal(a, c), f"{op} fused {name} differs between two identical runs"


@cuda_only
@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_large_gpu_shapes(op, bias):
    x, w, b = inputs(4096, 8192, "cuda", torch.bfloat16, wdtype=torch.float32, bias=bias)
    assert_accurate("triton", op, x, w, b)


@pytest.mark.bigmem
@cuda_only
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


def compile_shape(device):
    """Rows and width of the torch.compile tests: a training-like width on a GPU, a small odd one in
    the interpreter."""
    skip_unless_triton_runs("triton", device)
    return (300, 1536) if device == "cuda" else (7, 771)


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_compiled_matches_eager(op, bias, device):
    """The ops trace into torch.compile graphs (no graph break) and give eager's results."""
    x, w, b = inputs(*compile_shape(device), device, torch.bfloat16, wdtype=torch.float32, bias=bias)
    dy = torch.randn_like(x)
    fn = backend_fn("triton", op)
    eager = run(fn, x, w, b, dy)
    graphed = run(compiled(fn, device), x, w, b, dy)
    for name, e, c in zip(["y", "dx", "dw", "db"], eager, graphed):
        torch.testing.assert_close(c, e, msg=lambda m: f"{op} {name}: {m}")


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_compiled_residual_matches_eager(op, bias, device):
    """The residual form as the model runs it under autocast traces into a torch.compile graph."""
    m, n = compile_shape(device)
    x, w, b = inputs(m, n, device, torch.bfloat16, wdtype=torch.float32, bias=bias)
    r = torch.randn(m, n, device=device)
    dy, ds = torch.randn_like(x), torch.randn_like(r)
    fn = fused_fn("triton", op, out_dtype=torch.bfloat16)
    eager = run_fused(fn, x, r, w, b, dy, ds)
    graphed = run_fused(compiled(fn, device), x, r, w, b, dy, ds)
    for name, e, c in zip(["y", "s", "dx", "dr", "dw", "db"], eager, graphed):
        torch.testing.assert_close(c, e, msg=lambda m: f"{op} fused {name}: {m}")


@pytest.mark.parametrize("op,bias", OPS, ids=OP_IDS)
def test_compiled_residual_dropout(op, bias, device):
    """Dropout traces too (the seed is drawn inside the graph; on a GPU by Inductor's own
    generator, so the mask is not eager's): the backward scales the branch's gradient by the
    forward's mask."""
    m, n = compile_shape(device)
    x, w, b = inputs(m, n, device, torch.bfloat16, wdtype=torch.float32, bias=bias)
    r = torch.zeros(m, n, device=device)  # s = x * scale exactly, in fp32
    dy, ds = torch.randn_like(x), torch.randn_like(r)
    fn = compiled(fused_fn("triton", op, out_dtype=torch.bfloat16, dropout_p=0.5), device)
    y, s, dx, dr, *_ = run_fused(fn, x, r, w, b, dy, ds)
    scale = torch.where(s != 0, 2.0, 0.0)
    # A fresh mask each run: within 5 standard deviations failed about once in 2 million.
    assert abs((scale != 0).float().mean().item() - 0.5) < 6 * (0.25 / (m * n)) ** 0.5
    torch.testing.assert_close(s, x.float() * scale, rtol=0, atol=0)
    # Within a bf16 rounding; another mask would be off by 100%.
    torch.testing.assert_close(dx.float(), dr * scale, rtol=2**-7, atol=0)


@two_gpus
def test_runs_on_the_tensors_own_gpu():
    x, w, b = inputs(5, 771, "cuda:1", torch.bfloat16, bias=True)
    with torch.cuda.device(0):
        assert_accurate("triton", "layer_norm", x, w, b)


def test_residual_dropout_of_a_keep_probability_that_rounds_to_1_keeps_every_element():
    """A tiny dropout_p: keep_p rounds to 1 in fp32 and keep_p * 2^32 to 2^32, which as a uint32
    threshold would wrap to 0 and drop everything (runtime.dropout_scale clamps it)."""
    skip_unless_triton_runs("triton", "cpu")
    m, n = 16, 257
    x, w, _ = inputs(m, n, "cpu", bias=False)
    r = torch.zeros(m, n)
    scales = dropout_scales(fused_fn("triton", "rms_norm", dropout_p=1e-9, seed=7), x, r, w, None)
    assert torch.equal(scales, torch.ones_like(scales))
