"""linear_cross_entropy(x, weight, targets, ignore_index=-1): the lm head's matmul and the loss
as one op. Both backends, the loss and the gradients of x and weight, against float64; the
triton backend in one chunk of rows and in several (the last one short)."""
import weakref

import pytest
import torch

import kernels
from kernels import cross_entropy
from gpt.model import GPT, GPTConfig
from tests.devices import compiled, cuda_only, interpreter_only, skip_unless_triton_runs, two_gpus
from tests.memory import peak_malloc_mib
from tests.numerics import assert_as_accurate
from tests.test_cross_entropy import reference as cross_entropy_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]
# (batch shape, width, classes): one row, odd widths and vocabularies, a 3-D batch, a single
# token with no batch dimension.
SHAPES = [((1,), 7, 4099), ((3,), 24, 771), ((2, 5), 16, 65), ((), 8, 1031), ((9,), 33, 130)]


@pytest.fixture(params=["one chunk", "chunks of 2 rows"])
def chunks(request, monkeypatch):
    """The triton backend's chunking: all rows at once (the shapes here are far below its budget),
    or two rows a chunk (an odd number of rows leaves the last chunk one row)."""
    if request.param != "one chunk":
        monkeypatch.setattr(cross_entropy, "_chunk_rows", lambda rows, classes, itemsize: 2)
    return request.param


def test_chunks_are_the_fewest_that_fit_the_budget():
    budget = cross_entropy.CHUNK_BYTES
    assert cross_entropy._chunk_rows(16384, 50304, 2) == 8192  # GPT-2's 1.65 GB of bf16 logits: two chunks
    assert cross_entropy._chunk_rows(16384, 128256, 2) == 4096  # 4.2 GB: four
    assert cross_entropy._chunk_rows(3, 50304, 2) == 3
    assert cross_entropy._chunk_rows(5, budget // 2, 2) == 1  # a row fills the budget: one a chunk
    assert cross_entropy._chunk_rows(0, 50304, 2) == 1


def inputs(batch, width, classes, dtype, device):
    x = torch.randn(*batch, width, device=device).to(dtype)
    weight = (torch.randn(classes, width, device=device) * 3 / width**0.5).to(dtype)  # logits of spread ~3
    targets = torch.randint(0, classes, batch, device=device)
    return x, weight, targets, torch.tensor(0.75, device=device)  # dloss != 1, as under grad accumulation


def loss_and_grads(fn, x, weight, targets, dloss, **kw):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(x, weight, targets, **kw)
    loss.backward(dloss)
    return loss, x.grad, weight.grad


def definition(x, weight, targets, ignore_index=-1):
    """The loss from its definition (for float64 autograd, independent of either backend): the
    mean over counted rows of logsumexp(x @ weight.T) - the target's logit."""
    logits = x @ weight.t()
    counted = targets != ignore_index
    picked = logits.gather(-1, torch.where(counted, targets, 0)[..., None])[..., 0]
    return torch.where(counted, logits.logsumexp(-1) - picked, 0).sum() / counted.sum()


def d_x_terms(x, weight, targets, dloss, ignore_index=-1) -> float:
    """The size of the terms d_x sums, || |d_logits| @ |weight| ||, in float64: d_x = d_logits @
    weight cancels (the target's row of weight against the softmax's mean of them), so that a
    row's few results carry the fp32 sums' rounding relative to these terms, whichever order
    each backend sums in (one row of 7 failed twice in 300 draws as a ratio of two such errors)."""
    d_logits = cross_entropy_reference(x.double() @ weight.double().t(), targets, dloss, ignore_index)[1]
    return (d_logits.abs() @ weight.double().abs()).norm().item()


def assert_matches_float64(fn, x, weight, targets, dloss, what, **kw):
    torch_fn = kernels.get("linear_cross_entropy", "torch")
    ref = loss_and_grads(definition, x.double(), weight.double(), targets, dloss.double(), **kw)
    base = loss_and_grads(torch_fn, x, weight, targets, dloss, **kw)
    out = loss_and_grads(fn, x, weight, targets, dloss, **kw)
    assert out[0].dtype == torch.float32 and out[0].shape == (), f"{what} loss: {out[0].dtype} {out[0].shape}"
    for name, o, b, r in zip(("loss", "d_x", "d_weight"), out, base, ref):
        assert o.dtype == b.dtype, f"{what} {name}: {o.dtype}, torch's {b.dtype}"
        size, terms = (d_x_terms(x, weight, targets, dloss, **kw), weight.shape[0]) if name == "d_x" else (None, None)
        assert_as_accurate(o, b, r, f"{what} {name}", size=size, terms=terms)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch, width, classes", SHAPES, ids=str)
def test_matches_float64(backend, dtype, batch, width, classes, chunks, device):
    skip_unless_triton_runs(backend, device)
    x, weight, targets, dloss = inputs(batch, width, classes, dtype, device)
    assert_matches_float64(kernels.get("linear_cross_entropy", backend), x, weight, targets, dloss,
                           f"{backend} {dtype} {batch}x{width}x{classes} {chunks}")


def test_fp16_gradients_survive_the_mean_over_many_rows(device):
    """fp16 under GradScaler (d_loss 65536), the model's dtype on GPUs without bf16: the mean's
    logit gradients over 32768 rows and 32 near-equal classes are ~1e-6, fp16 subnormals of a few
    bits (at GPT-2's 12k rows and 50k classes, 1e-9: nothing). They must reach d_x and d_weight as
    accurately as torch's, which multiplies them by d_loss before rounding them."""
    skip_unless_triton_runs("triton", device)
    x = torch.randn(32768, 4, device=device).half()
    weight = (torch.randn(32, 4, device=device) * 0.15).half()  # near-uniform softmax: every p ~ 1/32
    targets = torch.randint(0, 32, (32768,), device=device)
    assert_matches_float64(kernels.get("linear_cross_entropy", "triton"), x, weight, targets,
                           torch.tensor(65536.0, device=device), "triton float16 32768 rows, loss scaled")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_under_autocast_with_fp32_weights(backend, x_dtype, chunks, device):
    """As the model runs it under adamw: fp32 weight and x, bf16 autocast. The matmuls run in bf16
    as autocast's would, and each gradient comes back in its input's dtype (a bf16 x beside the
    fp32 weight is taken too, its d_x bf16 and d_weight fp32, not the other way round)."""
    skip_unless_triton_runs(backend, device)
    x, weight, targets, dloss = inputs((3, 4), 24, 771, torch.float32, device)
    x = x.to(x_dtype)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert_matches_float64(kernels.get("linear_cross_entropy", backend), x, weight, targets, dloss,
                               f"{backend} autocast {chunks}")


@pytest.mark.parametrize("ignore_index", [-1, 3])
def test_ignored_rows_count_for_nothing(ignore_index, chunks, device):
    skip_unless_triton_runs("triton", device)
    x, weight, targets, dloss = inputs((4, 3), 16, 130, torch.float32, device)
    targets[0, 1] = targets[2] = ignore_index
    fn = kernels.get("linear_cross_entropy", "triton")
    assert_matches_float64(fn, x, weight, targets, dloss, f"ignore {ignore_index} {chunks}", ignore_index=ignore_index)
    _loss, dx, _dw = loss_and_grads(fn, x, weight, targets, dloss, ignore_index=ignore_index)
    assert (dx[targets == ignore_index] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_row_ignored_or_none_is_nan_with_zero_gradient(backend, dtype, device):
    """A mean over no rows is 0 / 0, as torch: a NaN loss, and no gradient anywhere (fp16's
    gradients, divided by the count in backward, too)."""
    skip_unless_triton_runs(backend, device)
    fn = kernels.get("linear_cross_entropy", backend)
    weight = torch.randn(9, 4, device=device).to(dtype)
    for x, targets in ((torch.randn(3, 4, device=device).to(dtype), torch.full((3,), -1, device=device)),
                       (torch.randn(0, 4, device=device).to(dtype), torch.zeros(0, dtype=torch.int64, device=device))):
        loss, dx, dw = loss_and_grads(fn, x, weight, targets, torch.tensor(1.0, device=device))
        assert loss.isnan() and dx.shape == x.shape and (dx == 0).all() and (dw == 0).all()


def test_is_deterministic(chunks, device):
    skip_unless_triton_runs("triton", device)
    x, weight, targets, dloss = inputs((5, 3), 24, 771, torch.bfloat16, device)
    fn = kernels.get("linear_cross_entropy", "triton")
    first, second = (loss_and_grads(fn, x, weight, targets, dloss) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_weight_gradient_summed_over_chunks_in_fp32(device, monkeypatch):
    """bf16, one row a chunk: d_weight is the chunks' shares summed in fp32 and rounded once, so it
    is (all but a few elements, which the order of an fp32 sum may tip) the one-chunk result;
    summed in bf16 it would differ by a rounding in most elements."""
    skip_unless_triton_runs("triton", device)
    x, weight, targets, dloss = inputs((64,), 24, 130, torch.bfloat16, device)
    fn = kernels.get("linear_cross_entropy", "triton")
    whole = loss_and_grads(fn, x, weight, targets, dloss)[2]
    monkeypatch.setattr(cross_entropy, "_chunk_rows", lambda rows, classes, itemsize: 1)
    chunked = loss_and_grads(fn, x, weight, targets, dloss)[2]
    differ = (chunked != whole).float().mean().item()
    assert differ <= 0.02, f"{differ:.0%} of d_weight differs from the one-chunk result"


def test_keeps_no_logits(chunks, device):
    """What autograd keeps for backward is d_x and d_weight in fp32 (and a number), nothing the
    size of the logits, with or without autocast; and the forward reaches the same loss with or
    without gradients asked for."""
    skip_unless_triton_runs("triton", device)
    fn = kernels.get("linear_cross_entropy", "triton")
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        x, weight, targets, _ = inputs((6,), 24, 771, dtype, device)
        x.requires_grad_(), weight.requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
                torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(x, weight, targets)
            with torch.no_grad():
                assert torch.equal(fn(x, weight, targets), loss)
        # d_x and d_weight in fp32 (rounded once, when scaled), and the factor to scale them by
        assert sorted((t.shape, t.dtype) for t in saved) == sorted(
            [(x.shape, torch.float32), (weight.shape, torch.float32), ((), torch.float32)]), autocast


def test_frozen_weight_or_x(chunks, device, monkeypatch):
    """A gradient only where one is wanted (a frozen lm head when fine-tuning): the other is neither
    computed (no matmul makes it) nor kept (what autograd saves of it is empty)."""
    skip_unless_triton_runs("triton", device)
    x, weight, targets, dloss = inputs((6,), 24, 771, torch.float32, device)
    fn, torch_fn = kernels.get("linear_cross_entropy", "triton"), kernels.get("linear_cross_entropy", "torch")
    made, mm = [], cross_entropy._mm
    monkeypatch.setattr(cross_entropy, "_mm", lambda a, b, out=None: made.append(a.shape[0] == 771) or mm(a, b, out))
    for wants in ("x", "weight"):
        grads = []
        for f in (fn, torch_fn):
            xx, ww = x.clone().requires_grad_(wants == "x"), weight.clone().requires_grad_(wants == "weight")
            made.clear()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                loss = f(xx, ww, targets)
            loss.backward(dloss)
            grads.append(xx.grad if wants == "x" else ww.grad)
            assert (ww.grad if wants == "x" else xx.grad) is None
            if f is fn:  # a matmul a chunk, of d_weight (classes first) or of d_x; kept: that fp32 gradient, a number
                n_chunks = len(range(0, 6, cross_entropy._chunk_rows(6, 771, 4)))
                assert made == [wants == "weight"] * n_chunks
                wanted = xx.shape if wants == "x" else ww.shape
                assert sorted(t.numel() for t in saved) == sorted([0, 1, wanted.numel()])
        # fp32 sums in another order: off by a few ulps of the largest element, not of each one
        torch.testing.assert_close(*grads, rtol=1e-5, atol=1e-5 * grads[1].abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(backend, dtype, chunks, device):
    """x a column slice of a wider buffer (row-strided), x transposed, the weight transposed, and
    targets that are every other element of a buffer."""
    skip_unless_triton_runs(backend, device)
    fn = kernels.get("linear_cross_entropy", backend)
    x, weight, targets, dloss = inputs((7,), 24, 771, dtype, device)
    targets = torch.stack([targets, targets.flip(0)], dim=1)[:, 0]
    assert not targets.is_contiguous()
    wide = torch.cat([x, torch.randn(7, 5, device=device).to(dtype)], dim=1)[:, :24]
    for what, xs, ws in (("row-strided x", wide, weight), ("transposed x", x.t().contiguous().t(), weight),
                         ("transposed weight", x, weight.t().contiguous().t())):
        assert_matches_float64(fn, xs, ws, targets, dloss, f"{backend} {what} {dtype} {chunks}")


@pytest.mark.parametrize("grads", [True, False])
def test_one_chunk_of_logits_at_a_time(monkeypatch, grads, device):
    """A chunk's logits are freed before the next chunk's matmul makes the next: with two chunks
    (GPT-2's 16k tokens), holding the last ones until then would hold all the logits, at the
    step's peak (the forward's, every activation still alive): 0.8 GB more for GPT-2."""
    skip_unless_triton_runs("triton", device)
    monkeypatch.setattr(cross_entropy, "_chunk_rows", lambda rows, classes, itemsize: 4)
    made, alive_at_matmul = [], []
    forward_rows, transpose = cross_entropy._forward_rows, torch.Tensor.t

    def recorded(logits, *args):
        made.append(weakref.ref(logits))
        return forward_rows(logits, *args)

    def watched(t):  # `xc @ w.t()`: w.t() is taken just before each chunk's matmul
        if t.shape == (771, 24):
            alive_at_matmul.append(sum(r() is not None for r in made))
        return transpose(t)
    monkeypatch.setattr(cross_entropy, "_forward_rows", recorded)
    monkeypatch.setattr(torch.Tensor, "t", watched)
    x, weight, targets, _ = inputs((12,), 24, 771, torch.float32, device)
    kernels.get("linear_cross_entropy", "triton")(x.requires_grad_(grads), weight, targets)
    assert alive_at_matmul == [0, 0, 0]


def test_d_x_written_in_place_by_its_matmuls(monkeypatch, device):
    """Each chunk's d_x is the matmul's output written into d_x's rows: not a chunk-sized fp32
    result copied there (for GPT-2's 16k tokens, 100 MB more moved a step)."""
    skip_unless_triton_runs("triton", device)
    monkeypatch.setattr(cross_entropy, "_chunk_rows", lambda rows, classes, itemsize: 4)
    storages, mm = [], cross_entropy._mm

    def recorded(a, b, out=None):
        result = mm(a, b, out=out)
        storages.append(result.untyped_storage().data_ptr())
        return result
    monkeypatch.setattr(cross_entropy, "_mm", recorded)
    x, weight, targets, _ = inputs((10,), 24, 771, torch.float32, device)
    _loss, dx, _dw, _pending = cross_entropy._linear_cross_entropy(x, weight, targets, -1, x.dtype, True, False)
    assert storages == [dx.untyped_storage().data_ptr()] * 3  # chunks of 4, 4 and 2 rows


@interpreter_only
def test_a_training_step_peaks_lower(monkeypatch):
    """Measured (CPU, fp32): the memory a training step of a small model with a large vocabulary
    (8192 classes, 256 tokens: 8 MiB of logits) allocates at its peak. torch's loss holds the
    logits, their log-softmax and their gradient; the triton backend one chunk of logits, in its
    forward, and less with smaller chunks (2026-12-07: 25 to 29, 10.7, and with 1 MiB chunks
    3.8 MiB). Each model first runs a step of 16 tokens: what a first call sets up is not counted."""
    config = GPTConfig(n_layer=2, n_head=1, n_embd=32, block_size=128, vocab_size=8192)
    idx = torch.randint(0, config.vocab_size, (2, 128))
    peaks = {}
    for name, backend, chunk_bytes in (("torch", "torch", None), ("triton", "triton", None),
                                       ("triton, 1 MiB chunks", "triton", 2**20)):
        if chunk_bytes:
            monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", chunk_bytes)
        model = GPT(config, {"linear_cross_entropy": backend})
        model(idx[:, :8], idx[:, :8], return_logits=False)[1].backward()
        model.zero_grad(set_to_none=True)
        peaks[name] = peak_malloc_mib(lambda: model(idx, idx, return_logits=False)[1].backward())  # noqa: B023
        if peaks[name] is None:
            pytest.skip("glibc's malloc statistics are not available here")
    assert peaks["triton"] < 0.6 * peaks["torch"] and peaks["triton, 1 MiB chunks"] < 0.6 * peaks["triton"], peaks


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend, device):
    fn = kernels.get("linear_cross_entropy", backend)
    x, w = torch.randn(3, 4, device=device), torch.randn(9, 4, device=device)
    t = torch.zeros(3, dtype=torch.int64, device=device)
    cases = {
        r"weight must have shape \(classes >= 1, 4\)": (x, torch.randn(9, 5, device=device), t),
        "weight must be 2-D": (x, torch.randn(9, 4, 1, device=device), t),
        r"weight must have shape \(classes >= 1": (x, torch.randn(0, 4, device=device), t),
        r"targets must have shape \(3,\)": (x, w, torch.zeros(3, 1, dtype=torch.int64, device=device)),
        "targets must be one of .int64": (x, w, t.float()),
        "x must be one of": (x.to(torch.int32), w, t),
        "x, weight, targets must have the same device": (x, w.to("meta"), t),
        "x must be a tensor": ([[1.0]], w, t),
        "x must have a non-empty last dimension": (torch.randn(3, 0, device=device), torch.randn(9, 0, device=device), t),
        "x, weight must have the same dtype": (x, w.half(), t),  # (no autocast to cast them)
    }
    for problem, args in cases.items():
        with pytest.raises(ValueError, match=f"linear_cross_entropy: {problem}"):
            fn(*args)
    with pytest.raises(ValueError, match="linear_cross_entropy: ignore_index must be a Python int, got float"):
        fn(x, w, t, ignore_index=-1.0)


def test_meta_tensors_trace_through_torch_and_are_refused_by_triton():
    """Asking autocast about the meta device raised a RuntimeError in both backends."""
    x, w = torch.zeros(4, 8, device="meta"), torch.zeros(10, 8, device="meta")
    t = torch.zeros(4, dtype=torch.int64, device="meta")
    assert kernels.get("linear_cross_entropy", "torch")(x, w, t).device.type == "meta"
    with pytest.raises(ValueError, match="linear_cross_entropy: the triton backend runs on CUDA tensors"):
        kernels.get("linear_cross_entropy", "triton")(x, w, t)


@pytest.mark.parametrize("rows", [4, 0])
def test_the_fake_gives_the_op_s_dtypes_whatever_the_default_dtype(rows, device):
    """torch.compile traces the op through its fake: a real output of another dtype (the counts'
    quotients took the default dtype) would be read as the fake's."""
    skip_unless_triton_runs("triton", device)
    from torch._subclasses.fake_tensor import FakeTensorMode

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        args = (torch.randn(rows, 8, device=device), torch.randn(5, 8, device=device),
                torch.arange(rows, device=device) % 5, -1, torch.float32, True, True)
        real = torch.ops.tritongpt.linear_cross_entropy(*args)
        with FakeTensorMode() as mode:
            fake = torch.ops.tritongpt.linear_cross_entropy(
                *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    finally:
        torch.set_default_dtype(before)
    assert [t.dtype for t in fake] == [t.dtype for t in real]


def test_autocast_leaves_float64_alone(device):
    """Autocast does not cast float64 tensors: the torch backend computes such a loss in float64,
    the triton one refuses it (as without autocast), and float64 beside fp32 is a dtype mismatch
    for both, not a loss computed in autocast's dtype."""
    t = torch.zeros(3, dtype=torch.int64, device=device)
    x, w = torch.randn(3, 4, device=device, dtype=torch.float64), torch.randn(9, 4, device=device, dtype=torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert kernels.get("linear_cross_entropy", "torch")(x, w, t).dtype == torch.float64
        with pytest.raises(ValueError, match="linear_cross_entropy: the matmul dtype must be one of.*float64"):
            kernels.get("linear_cross_entropy", "triton")(x, w, t)
        for backend in BACKENDS:
            with pytest.raises(ValueError, match="linear_cross_entropy: x, weight must have the same dtype"):
                kernels.get("linear_cross_entropy", backend)(x.float(), w, t)


def test_triton_refuses_mixed_dtypes_and_float64(device):
    fn = kernels.get("linear_cross_entropy", "triton")
    t = torch.zeros(3, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="linear_cross_entropy: x, weight must have the same dtype"):
        fn(torch.randn(3, 4, device=device), torch.randn(9, 4, device=device, dtype=torch.bfloat16), t)
    with pytest.raises(ValueError, match="linear_cross_entropy: the matmul dtype must be one of.*float64"):
        fn(torch.randn(3, 4, device=device).double(), torch.randn(9, 4, device=device).double(), t)


def test_torch_compile_matches_eager(chunks, device):
    """In a compiled graph, after an op Inductor generates (an exact one: x * 2), as in the model:
    an opaque op Inductor calls whole."""
    skip_unless_triton_runs("triton", device)
    fn = kernels.get("linear_cross_entropy", "triton")

    def head_loss(x, w, targets):
        return fn(x * 2, w, targets)

    T = 257 if device == "cuda" else 5
    x, weight, targets, dloss = inputs((4, T), 64, 1031, torch.bfloat16, device)
    results = [loss_and_grads(f, x, weight, targets, dloss) for f in (head_loss, compiled(head_loss, device))]
    for eager, graphed in zip(*results):
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)


# GPU-only: training-sized heads (cuBLAS's fp32-output matmul for d_weight), another GPU.

@cuda_only
@pytest.mark.parametrize("width, classes", [(768, 50304), (2048, 32000), (768, 50257)])
def test_training_shapes_cuda(width, classes, monkeypatch):
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 2**26)  # several chunks (of 512 or 1024 rows)
    x, weight, targets, dloss = inputs((2048,), width, classes, torch.bfloat16, "cuda")
    assert_matches_float64(kernels.get("linear_cross_entropy", "triton"), x, weight, targets, dloss,
                           f"2048 x {width} x {classes}")


@two_gpus
def test_second_gpu():
    x, weight, targets, dloss = inputs((3,), 24, 1031, torch.bfloat16, "cuda:1")
    assert_matches_float64(kernels.get("linear_cross_entropy", "triton"), x, weight, targets, dloss, "cuda:1")
