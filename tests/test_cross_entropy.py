"""cross_entropy(logits, targets, ignore_index=-1): both backends, the loss and the logits'
gradient, against float64."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import cross_entropy
from tests.devices import compiled, cuda_only, skip_unless_triton_runs, two_gpus
from tests.numerics import assert_as_accurate, assert_rounded_once

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]
# (batch shape, classes): one row, vocabularies that are not a multiple of any block (771, 4099,
# GPT-2's 50257), a row too wide for one step of the forward, narrow rows stacked in a tile (65),
# a 3-D batch, a single token with no batch dimension, and rows starting at every offset from a
# 16-byte boundary (9 x 4099: the kernels walk such rows from the boundary before their start),
# and power-of-two rows stacked in whole tiles, which the forward loads without a mask (4 x 32 x 64:
# two tiles of 64 rows; 20 x 256: a whole tile of 16 rows, then a part of one); rows just short of
# a power of two, which their lead pushes past it (9 x 4095: a second forward step; 9 x 127: a
# second tile column).
SHAPES = [((1,), 4099), ((3,), 771), ((2, 5), 65), ((2,), 50257), ((), 1031), ((9,), 4099), ((4, 32), 64),
          ((20,), 256), ((9,), 4095), ((9,), 127)]


def reference(logits, targets, dloss, ignore_index=-1):
    """Loss and d_logits in float64, from the formulas: the mean over counted rows of
    logsumexp(row) - row[target]; d_row = (softmax(row) - onehot(target)) * dloss / counted."""
    x = logits.double().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    counted = t != ignore_index
    safe = torch.where(counted, t, 0)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, safe[:, None])[:, 0]
    n = counted.sum()
    loss = torch.where(counted, lse - picked, 0).sum() / n
    onehot = F.one_hot(safe, x.shape[-1]).double()
    grad = (torch.softmax(x, dim=-1) - onehot) * counted[:, None] * dloss.double() / n
    return loss, grad.view(logits.shape)


def loss_and_grad(fn, logits, targets, dloss, **kw):
    logits = logits.detach().requires_grad_()
    loss = fn(logits, targets, **kw)
    loss.backward(dloss)
    return loss, logits.grad


def assert_matches_float64(fn, logits, targets, dloss, what, **kw):
    ref = reference(logits, targets, dloss, **kw)
    base = loss_and_grad(kernels.get("cross_entropy", "torch"), logits, targets, dloss, **kw)
    out = loss_and_grad(fn, logits, targets, dloss, **kw)
    assert out[0].dtype == torch.float32 and out[0].shape == (), f"{what} loss: {out[0].dtype} {out[0].shape}"
    assert out[1].dtype == logits.dtype, f"{what} d_logits: {out[1].dtype}"
    for name, o, b, r in zip(("loss", "d_logits"), out, base, ref):
        assert_as_accurate(o, b, r, f"{what} {name}")


def inputs(batch, classes, dtype, device, scale=3.0):
    logits = (torch.randn(*batch, classes, device=device) * scale).to(dtype)
    targets = torch.randint(0, classes, batch, device=device)
    return logits, targets, torch.tensor(0.75, device=device)  # dloss != 1, as under grad accumulation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, classes", SHAPES, ids=str)
def test_matches_float64(backend, dtype, batch, classes, device):
    skip_unless_triton_runs(backend, device)
    logits, targets, dloss = inputs(batch, classes, dtype, device)
    assert_matches_float64(kernels.get("cross_entropy", backend), logits, targets, dloss,
                           f"{backend} {dtype} {batch}x{classes}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-1, -100, 3])
def test_ignored_rows_count_for_nothing(backend, ignore_index, device):
    """Rows whose target is ignore_index leave the mean and get zero gradient; any value works
    as the marker, a valid class included."""
    skip_unless_triton_runs(backend, device)
    logits, targets, dloss = inputs((4, 7), 130, torch.float32, device)
    targets[0, 1] = targets[2, ::2] = ignore_index
    fn = kernels.get("cross_entropy", backend)
    assert_matches_float64(fn, logits, targets, dloss, f"{backend} ignore {ignore_index}", ignore_index=ignore_index)
    loss, grad = loss_and_grad(fn, logits, targets, dloss, ignore_index=ignore_index)
    assert (grad[targets == ignore_index] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored_or_none_is_nan_with_zero_gradient(backend, device):
    """A mean over no rows is 0 / 0, as torch: a NaN loss, and no gradient anywhere."""
    skip_unless_triton_runs(backend, device)
    fn = kernels.get("cross_entropy", backend)
    for logits, targets in ((torch.randn(3, 9, device=device), torch.full((3,), -1, device=device)),
                            (torch.randn(0, 9, device=device), torch.zeros(0, dtype=torch.int64, device=device))):
        loss, grad = loss_and_grad(fn, logits, targets, torch.tensor(1.0, device=device))
        assert loss.isnan() and grad.shape == logits.shape and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend, device):
    """Logits far past where exp overflows or underflows, and -inf (a masked class): the loss and
    gradient stay finite, in every row whatever the order the maximum is met in."""
    skip_unless_triton_runs(backend, device)
    x = torch.randn(4, 5000, device=device)
    # Row 2 masked past the forward's first step (4096 columns): a step whose maximum is -inf.
    x[0, 10], x[1, 4999], x[2, :4500] = 1e4, -1e4, float("-inf")
    x[3] *= 1e3
    targets = torch.tensor([10, 4999, 4600, 7], device=device)
    loss, grad = loss_and_grad(kernels.get("cross_entropy", backend), x, targets, torch.tensor(1.0, device=device))
    ref_loss, ref_grad = reference(x, targets, torch.tensor(1.0))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_far_from_zero(backend, device):
    """Logits around 1e4 with the targets off the maximum: the loss is (max - x_target) +
    log_sum, two small numbers, where (max + log_sum) - x_target would lose digits to 1e4. Row by
    row: a mean over rows averages such errors down."""
    skip_unless_triton_runs(backend, device)
    logits, targets, dloss = inputs((8,), 771, torch.float32, device)
    for i in range(8):
        assert_matches_float64(kernels.get("cross_entropy", backend), logits[i] + 1e4, targets[i], dloss,
                               f"{backend} offset 1e4, row {i}")


@pytest.mark.parametrize("classes, stride, align", [
    (1031, 1042, 8), (127, 138, 8),  # 8 bf16 elements in 16 bytes: rows start 3, 6, 1, ... past a boundary
    (1023, 1024, 1),  # aligned rows one element wider than the classes: a full tile ends at the row's end
])
def test_backward_writes_only_its_rows(classes, stride, align, device):
    """Rows a slice of a wider buffer, at a stride that starts them at every offset from a 16-byte
    boundary (the kernel walks each from the boundary before it) or at aligned rows one element
    past the classes: every gradient element is written, and nothing between the rows (the
    padding of the tiles stays masked, and an unmasked tile ends at its row's last class)."""
    skip_unless_triton_runs("triton", device)
    x = (torch.randn(9, stride, device=device) * 3).to(torch.bfloat16)[:, :classes]
    targets = torch.randint(0, classes, (9,), device=device)
    sentinel = torch.full((9, stride), 7.0, device=device, dtype=torch.bfloat16)
    buffer = sentinel.clone()
    dx = buffer[:, :classes]
    assert cross_entropy._align(x, dx) == align
    row_loss, stats = cross_entropy._forward_rows(x, targets, -1)
    cross_entropy._backward_rows(x, targets, stats, torch.tensor(1 / 9, device=device), dx, -1)
    assert torch.equal(buffer[:, classes:], sentinel[:, classes:]), "written between the rows"
    _, expected = reference(x, targets, torch.tensor(1.0, device=device))
    assert_rounded_once(dx, expected, "d_logits")  # every element written, and right
    # One stride for both is what lets the kernel walk x's and dx's rows alike; else no ALIGN.
    assert cross_entropy._align(x, x.contiguous()) == 1
    assert cross_entropy._align(torch.empty(3, 1024, device=device)) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(backend, dtype, device):
    """Logits that are a slice of a wider buffer (read through their row stride), transposed
    logits (copied first) and non-contiguous targets."""
    skip_unless_triton_runs(backend, device)
    wide = (torch.randn(6, 1100, device=device) * 3).to(dtype)
    targets = torch.randint(0, 1031, (6, 2), device=device)[:, 0]
    fn = kernels.get("cross_entropy", backend)
    dloss = torch.tensor(1.0, device=device)
    assert_matches_float64(fn, wide[:, :1031], targets, dloss, f"{backend} row-strided {dtype}")
    transposed = (torch.randn(1031, 6, device=device) * 3).to(dtype).t()
    assert_matches_float64(fn, transposed, targets, dloss, f"{backend} transposed {dtype}")


def test_backward_saves_no_logits_sized_buffer(device):
    """Backward recomputes the softmax: besides the logits (which the model returns anyway) and
    the targets, only two fp32 numbers a row and the count of rows the mean is over are saved."""
    skip_unless_triton_runs("triton", device)
    logits, targets, _ = inputs((3,), 4099, torch.bfloat16, device)
    logits.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.get("cross_entropy", "triton")(logits, targets)
    assert sorted(t.numel() for t in saved) == [1, 3, 2 * 3, 3 * 4099]
    assert any(t is logits or t.data_ptr() == logits.data_ptr() for t in saved)


def test_is_deterministic(device):
    skip_unless_triton_runs("triton", device)
    logits, targets, dloss = inputs((5, 3), 4099, torch.bfloat16, device)
    fn = kernels.get("cross_entropy", "triton")
    first, second = (loss_and_grad(fn, logits, targets, dloss) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_target_out_of_range_is_nan_not_garbage(device):
    """A class outside [0, classes) that is not ignore_index: NaN loss and NaN in that row's
    gradient (a range check on the host would sync the GPU every step)."""
    skip_unless_triton_runs("triton", device)
    logits = torch.randn(3, 50, device=device)
    for bad in (50, -2):
        targets = torch.tensor([1, bad, 2], device=device)
        loss, grad = loss_and_grad(kernels.get("cross_entropy", "triton"), logits, targets, torch.tensor(1.0))
        assert loss.isnan() and grad[1].isnan().all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend, device):
    fn = kernels.get("cross_entropy", backend)
    x, t = torch.randn(3, 5, device=device), torch.zeros(3, dtype=torch.int64, device=device)
    cases = {
        "targets must be one of .int64": (x, t.float()),
        "targets must have shape .3,.": (x, torch.zeros(3, 1, dtype=torch.int64, device=device)),
        "logits must be one of": (x.to(torch.int32), t),
        "logits must have a non-empty last dimension": (torch.randn(3, 0, device=device), t),
        "logits, targets must have the same device": (x, t.to("meta")),
        "logits must be a tensor": ([[1.0]], t),
    }
    for problem, (logits, targets) in cases.items():
        with pytest.raises(ValueError, match=f"cross_entropy: {problem}"):
            fn(logits, targets)
    for bad, kind in ((None, "NoneType"), (2.0, "float"), (torch.tensor(2), "Tensor"), (True, "bool")):
        with pytest.raises(ValueError, match=f"cross_entropy: ignore_index must be a Python int, got {kind}"):
            fn(x, t, ignore_index=bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_of_any_integer_type_in_int64_range(backend, device):
    """A numpy integer works as a Python int does (the kernel takes int(value)); one past int64's
    range is refused, where the kernel's loss was NaN."""
    skip_unless_triton_runs(backend, device)
    np = pytest.importorskip("numpy")
    fn = kernels.get("cross_entropy", backend)
    logits, targets = torch.randn(3, 5, device=device), torch.tensor([1, -1, 2], device=device)
    torch.testing.assert_close(fn(logits, targets, ignore_index=np.int64(-1)), fn(logits, targets))
    for bad in (2**63, -2**63 - 1):
        with pytest.raises(ValueError, match="cross_entropy: ignore_index must fit in int64"):
            fn(logits, targets, ignore_index=bad)


def test_torch_backend_names_a_target_out_of_range():
    """On the CPU torch finds it (the triton backend's loss is NaN instead, tested above)."""
    with pytest.raises(ValueError, match="cross_entropy: Target 5 is out of bounds"):
        kernels.get("cross_entropy", "torch")(torch.randn(3, 5), torch.tensor([0, 5, 2]))
    with pytest.raises(ValueError, match="linear_cross_entropy: Target 9 is out of bounds"):
        kernels.get("linear_cross_entropy", "torch")(torch.randn(3, 4), torch.randn(9, 4), torch.tensor([0, 9, 2]))


def test_triton_refuses_float64(device):
    x = torch.randn(3, 4, device=device, dtype=torch.float64)
    with pytest.raises(ValueError, match="^cross_entropy: .*float64"):
        kernels.get("cross_entropy", "triton")(x, torch.zeros(3, dtype=torch.int64, device=device))


# GPU-only: training-sized logits, offsets past 2^31, another GPU, torch.compile.

@cuda_only
@pytest.mark.parametrize("classes", [32000, 50257, 50304, pytest.param(128256, marks=pytest.mark.bigmem)])
def test_training_shapes_cuda(classes):
    logits, targets, dloss = inputs((2048,), classes, torch.bfloat16, "cuda", scale=2.0)
    assert_matches_float64(kernels.get("cross_entropy", "triton"), logits, targets, dloss, f"2048 x {classes}")


@pytest.mark.bigmem
@cuda_only
def test_over_2_to_the_31_elements():
    """Logits of more than 2^31 elements (4 GiB of bf16): the rows past element 2^31 are read and
    their gradient written where they belong (int64 offsets), as when computed alone."""
    classes = 50304
    rows = 2**31 // classes + 8
    logits = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, classes, (rows,), device="cuda")
    targets[: rows - 8] = -1  # only the last rows count, so that their loss is the whole loss
    fn = kernels.get("cross_entropy", "triton")
    one = torch.tensor(1.0, device="cuda")
    loss, grad = loss_and_grad(fn, logits, targets, one)
    alone_loss, alone_grad = loss_and_grad(fn, logits[-8:], targets[-8:], one)
    torch.testing.assert_close(loss, alone_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[-8:], alone_grad, rtol=0, atol=0)


@two_gpus
def test_second_gpu():
    logits, targets, dloss = inputs((3,), 1031, torch.bfloat16, "cuda:1")
    assert_matches_float64(kernels.get("cross_entropy", "triton"), logits, targets, dloss, "cuda:1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_compile_matches_eager(dtype, device):
    """In a compiled graph with the lm head's matmul before it, as in the model: the same up to a
    few roundings, as Inductor compiles the op's own torch arithmetic around the kernels (the
    loss's sum over rows and its mean, the gradient's scale) in another order, with a GPU's
    approximate fp32 division."""
    skip_unless_triton_runs("triton", device)
    fn = kernels.get("cross_entropy", "triton")

    def head_loss(x, w, targets):
        return fn(x @ w.t(), targets)

    T = 257 if device == "cuda" else 5
    x = torch.randn(4, T, 64, device=device).to(dtype)
    w = torch.randn(1031, 64, device=device).to(dtype)
    targets = torch.randint(0, 1031, (4, T), device=device)
    results = []
    # Inductor would pad the fp32 matmul's odd sizes (compiling happens at the first call), and
    # another cuBLAS kernel rounds otherwise.
    with torch._inductor.config.patch(shape_padding=False):
        for f in (head_loss, compiled(head_loss, device)):
            xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
            loss = f(xx, ww, targets)
            loss.backward()
            results.append((loss, xx.grad, ww.grad))
    for eager, graphed in zip(*results):
        eps = torch.finfo(eager.dtype).eps
        torch.testing.assert_close(graphed, eager, rtol=2 * eps, atol=2 * eps * eager.abs().max().item())
