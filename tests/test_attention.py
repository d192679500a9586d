"""attention: the torch and triton backends against an independent float64 formula.

On CPU the Triton kernels run in the interpreter (slow): the cases below are a chosen spread of
T, head dim, grouping, causal, dtype and layout rather than their product.
"""
import itertools
import math

import pytest
import torch

import kernels
from gpt.model import rope_tables
from kernels import attention
from tests.devices import compiled, cuda_only, interpreter_only, skip_unless_triton_runs, two_gpus
from tests.numerics import assert_as_accurate, assert_mask_is_random
from tests.test_rope import reference as turned


def reference(q, k, v, causal, keep=None, dropout_p=0.0, rope=None):
    """Attention from its definition, in the inputs' dtype (float64 for the reference);
    `keep` (B, H, T, T) is a dropout mask, `rope` the (cos, sin) tables q and k are turned by."""
    if rope is not None:
        q, k = (turned(t, *(table.to(t.dtype) for table in rope)) for t in (q, k))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        T = q.shape[2]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = s.softmax(-1)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1 - dropout_p)
    return p @ v


def triton_device(device):
    skip_unless_triton_runs("triton", device)
    return device


def make_qkv(B, H, Hkv, T, D, dtype, device, layout="contiguous"):
    """q (B, H, T, D) and k, v (B, Hkv, T, D), leaves that require grad.

    layout "qkv": views of one (B, T, (H + 2 Hkv) D) projection, as the model splits it;
    "transposed": head dim not contiguous (the backend must copy); "mixed": k's only; "v apart": v
    a view with (b, h, t) strides of its own, its head dim contiguous."""
    if layout == "qkv":
        qkv = torch.randn(B, T, (H + 2 * Hkv) * D, dtype=dtype, device=device)
        q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k, v = (t.view(B, T, Hkv, D).transpose(1, 2) for t in (k, v))
    elif layout == "transposed":
        q = torch.randn(B, H, D, T, dtype=dtype, device=device).transpose(-1, -2)
        k, v = (torch.randn(B, Hkv, D, T, dtype=dtype, device=device).transpose(-1, -2) for _ in "kv")
    else:
        q = torch.randn(B, H, T, D, dtype=dtype, device=device)
        k, v = (torch.randn(B, Hkv, T, D, dtype=dtype, device=device) for _ in "kv")
    if layout == "mixed":
        k = torch.randn(B, Hkv, D, T, dtype=dtype, device=device).transpose(-1, -2)
    if layout == "v apart":
        v = torch.randn(B, T, Hkv, D + 6, dtype=dtype, device=device)[..., 3:3 + D].transpose(1, 2)
    return [t.detach().requires_grad_() for t in (q, k, v)]


def run(backend, q, k, v, do, causal, dropout_p=0.0, rope=None):
    """Output and (dq, dk, dv) of `backend` at fresh copies of the leaves."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = kernels.get("attention", backend)(*leaves, causal=causal, dropout_p=dropout_p, rope=rope)
    out.backward(do)
    return out, [t.grad for t in leaves]


def check_against_float64(backend, B, H, Hkv, T, D, causal, dtype, device, layout="contiguous", rope=False):
    q, k, v = make_qkv(B, H, Hkv, T, D, dtype, device, layout)
    # A non-contiguous output gradient too (the model's reshape hands one back).
    do = torch.randn(B, T, H, D, dtype=dtype, device=device).transpose(1, 2)
    tables = rope_tables(D, T, 10000.0, device) if rope else None
    out, grads = run(backend, q, k, v, do, causal, rope=tables)
    torch_out, torch_grads = run("torch", q, k, v, do, causal, rope=tables)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, causal, rope=tables)
    ref.backward(do.double())
    what = f"{backend} B={B} H={H}/{Hkv} T={T} D={D} causal={causal} {dtype} {layout}" + (" rope" if rope else "")
    assert out.dtype == dtype
    assert_as_accurate(out, torch_out, ref, f"{what}: out")
    for name, g, tg, leaf in zip(("dq", "dk", "dv"), grads, torch_grads, leaves):
        assert g.dtype == dtype
        assert_as_accurate(g, tg, leaf.grad, f"{what}: {name}")


# B, H, Hkv, T, D, causal, dtype, layout: every T, head dim, group size (1, 2, 4), both masks,
# every dtype and layout at least once, each row a different mix.
CASES = [
    (2, 4, 2, 17, 96, False, torch.bfloat16, "contiguous"),
    (1, 4, 1, 67, 64, True, torch.float32, "qkv"),
    (1, 2, 2, 130, 32, True, torch.bfloat16, "contiguous"),
    (1, 2, 1, 130, 128, False, torch.float16, "qkv"),
    (1, 2, 2, 67, 128, True, torch.bfloat16, "transposed"),
    (2, 2, 2, 17, 32, False, torch.float32, "contiguous"),
    (1, 4, 1, 67, 96, True, torch.float16, "contiguous"),
    (1, 2, 1, 130, 64, False, torch.float32, "contiguous"),
    (1, 4, 1, 17, 128, True, torch.float32, "transposed"),
    (2, 4, 1, 45, 32, False, torch.float16, "qkv"),
    (1, 2, 2, 17, 64, True, torch.float16, "contiguous"),
    (1, 2, 1, 67, 96, False, torch.float32, "transposed"),
    (1, 4, 1, 45, 64, True, torch.bfloat16, "qkv"),
    (2, 4, 2, 19, 32, True, torch.bfloat16, "v apart"),  # v's strides read as its own (rope copies v: not there)
]


@pytest.mark.parametrize("B,H,Hkv,T,D,causal,dtype,layout", CASES)
def test_triton_matches_float64(B, H, Hkv, T, D, causal, dtype, layout, device):
    check_against_float64("triton", B, H, Hkv, T, D, causal, dtype, triton_device(device), layout)


# With q and k turned by RoPE first (the model's LLaMA attention): layouts, groups, dtypes.
ROPE_CASES = [
    (1, 4, 2, 67, 64, True, torch.bfloat16, "qkv"),
    (2, 2, 1, 17, 32, False, torch.float32, "contiguous"),
    (1, 2, 2, 45, 128, True, torch.float16, "transposed"),
    (1, 2, 1, 19, 32, True, torch.bfloat16, "mixed"),
    (2, 2, 1, 9, 96, False, torch.float16, "v apart"),
]


@pytest.mark.parametrize("B,H,Hkv,T,D,causal,dtype,layout", ROPE_CASES)
def test_triton_with_rope_matches_float64(B, H, Hkv, T, D, causal, dtype, layout, device):
    check_against_float64("triton", B, H, Hkv, T, D, causal, dtype, triton_device(device), layout, rope=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [False, True])
def test_torch_matches_float64(causal, dtype, rope, device):
    check_against_float64("torch", 2, 4, 2, 37, 48, causal, dtype, device, "qkv", rope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_an_expanded_output_gradient_and_strided_tables(dtype, device):
    """dO of stride 0 (as out.sum() gives it) and rope tables that are strided views (copied by
    the triton backend): the same numbers as their contiguous copies give."""
    skip_unless_triton_runs("triton", device)
    q = torch.randn(1, 4, 37, 64, device=device).to(dtype)
    k, v = (torch.randn(1, 2, 37, 64, device=device).to(dtype) for _ in range(2))
    cos, sin = rope_tables(64, 37, 10000.0, device)
    strided = (cos.t().contiguous().t(), torch.stack([sin, 0 * sin], 1)[:, 0])
    expanded = torch.ones((), device=device, dtype=dtype).expand(q.shape)
    assert not any(t.is_contiguous() for t in (*strided, expanded))
    (out, grads), (want, want_grads) = (run("triton", q, k, v, do, True, rope=tables)
                                        for tables, do in ((strided, expanded), ((cos, sin), expanded.contiguous())))
    for got, expected in zip([out, *grads], [want, *want_grads]):
        assert torch.equal(got, expected)


def test_rope_gradients_are_views_of_one_buffer(device):
    """With rope, dq, dk and dv still lie side by side in one (B, T, H + 2*Hkv, D) buffer (dq and dk
    turned back in place), so the model's split of its qkv projection joins them without a copy."""
    device = triton_device(device)
    B, H, Hkv, T, D = 1, 4, 2, 19, 32
    q, k, v = make_qkv(B, H, Hkv, T, D, torch.bfloat16, device)
    out = kernels.get("attention", "triton")(q, k, v, rope=rope_tables(D, T, 10000.0, device))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    base = dq._base
    assert base is not None and base.shape == (B, T, H + 2 * Hkv, D)
    assert dk._base is base and dv._base is base
    assert [t.storage_offset() for t in (dq, dk, dv)] == [0, H * D, (H + Hkv) * D]


def test_rope_keeps_nothing_of_the_projection_output(device):
    """With rope, what the backward keeps of q, k and v is one buffer of the turned q and k and
    a copy of v: nothing that would keep the model's qkv projection output (whose views they
    are) alive to the backward, its unturned q and k dead."""
    device = triton_device(device)
    B, H, Hkv, T, D = 1, 4, 2, 19, 32
    qkv = torch.randn(B, T, H + 2 * Hkv, D, device=device, requires_grad=True)
    q, k, v = qkv.transpose(1, 2).split([H, Hkv, Hkv], dim=1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.get("attention", "triton")(q, k, v, rope=rope_tables(D, T, 10000.0, device))
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert qkv.untyped_storage().data_ptr() not in storages


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_single_token(dtype, causal, device):
    """T = 1: a softmax over one key is 1, so the output is v (exactly in 16 bits; in fp32 within
    the few ulps of a GPU's approximate exp2 and division), dv is dO summed over the group, and
    dq, dk are zero in exact arithmetic. The kernel's dS = dO.v - rowsum(dO * o) is
    the difference of two fp32 sums of the same D products (o == v), so it must vanish to
    within fp32 summation error: a few ulps of sum |dO * v|, far below any real gradient."""
    device = triton_device(device)
    B, H, Hkv, D = 2, 4, 2, 128
    q, k, v = make_qkv(B, H, Hkv, 1, D, dtype, device)
    do = torch.randn_like(q)
    out, (dq, dk, dv) = run("triton", q, k, v, do, causal=causal)
    q, k, v = (t.detach() for t in (q, k, v))
    fp32_ulps = 4 * torch.finfo(torch.float32).eps if dtype == torch.float32 else 0
    torch.testing.assert_close(out, v.repeat_interleave(H // Hkv, 1), rtol=fp32_ulps, atol=0)
    grouped = do.view(B, Hkv, H // Hkv, 1, D)
    assert_as_accurate(dv, grouped.sum(2), grouped.double().sum(2), "dv")
    ds = 3e-5 * (do.float() * v.float().repeat_interleave(H // Hkv, 1)).abs().sum(-1, keepdim=True)
    dq_bound = ds * k.float().abs().repeat_interleave(H // Hkv, 1) / math.sqrt(D)
    dk_bound = (ds * q.float().abs()).view(B, Hkv, H // Hkv, 1, D).sum(2) / math.sqrt(D)
    assert (dq.float().abs() <= dq_bound).all(), (dq.float().abs() / dq_bound).max()
    assert (dk.float().abs() <= dk_bound).all(), (dk.float().abs() / dk_bound).max()


@pytest.mark.parametrize("rope", [False, True])
def test_deterministic(rope, device):
    """Two runs give bit-identical outputs and gradients: no atomics, and dk/dv of a kv head are
    summed over its 4 query heads in a fixed order."""
    device = triton_device(device)
    q, k, v = make_qkv(1, 4, 1, 67, 64, torch.bfloat16, device)
    do = torch.randn_like(q)
    tables = rope_tables(64, 67, 10000.0, device) if rope else None
    first, second = (run("triton", q, k, v, do, causal=True, rope=tables) for _ in range(2))
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


def dropout_mask(B, H, Hkv, T, D, causal, p, seed, device):
    """The kernel's keep mask (B, H, T, T) for `seed`, read off a run with v = identity: then
    out[..., i, j] = p_ij * keep_ij / (1 - p), and every visible p_ij is positive. The mask
    depends only on the seed and the (batch, head, row, col) position, never on the values."""
    assert T <= D
    q, k, _ = make_qkv(B, H, Hkv, T, D, torch.float32, device)
    v = torch.eye(T, D, device=device).expand(B, Hkv, T, D)
    torch.manual_seed(seed)
    out = kernels.get("attention", "triton")(q, k, v, causal=causal, dropout_p=p)
    return (out[..., :T] != 0).double()


def test_dropout_keep_fraction(device):
    device = triton_device(device)
    B, H, T, p = 2, 2, 128, 0.2
    keep = dropout_mask(B, H, H, T, 128, False, p, 1234, device)
    assert_mask_is_random(keep, p, "attention")
    # Not the same mask for every head, batch or row.
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0], keep[1])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_dropout_seeded(device):
    """torch.manual_seed reproduces the mask (forward and backward); another seed changes it."""
    device = triton_device(device)
    q, k, v = make_qkv(1, 2, 1, 40, 32, torch.float16, device)
    do = torch.randn_like(q)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(run("triton", q, k, v, do, causal=True, dropout_p=0.3))
    (o1, g1), (o2, g2), (o3, _) = runs
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(o1, o3)


@pytest.mark.parametrize("causal,rope,dtype", [(True, False, torch.float32), (False, False, torch.float32),
                                               (True, True, torch.float32), (True, False, torch.bfloat16),
                                               (False, False, torch.float16)])
def test_dropout_gradients(causal, rope, dtype, device):
    """With dropout, forward and backward use one mask. The mask of a seed is read off the kernel
    (dropout_mask); a float64 formula with that mask must then give the kernel's output and all
    three gradients at random inputs and the same seed. A backward that regenerated a different
    mask would miss dq, dk and dv by far more than rounding (two sequences: the mask is keyed on
    the batch index too)."""
    device = triton_device(device)
    B, H, Hkv, T, D, p, seed = 2, 4, 2, 45, 64, 0.25, 99
    keep = dropout_mask(B, H, Hkv, T, D, causal, p, seed, device)
    q, k, v = make_qkv(B, H, Hkv, T, D, dtype, device)
    do = torch.randn_like(q)
    tables = rope_tables(D, T, 10000.0, device) if rope else None
    torch.manual_seed(seed)
    out, grads = run("triton", q, k, v, do, causal, dropout_p=p, rope=tables)
    # torch's own error: the same formula evaluated in the inputs' dtype.
    leaves_own = [t.detach().requires_grad_() for t in (q, k, v)]
    torch_out = reference(*leaves_own, causal, keep, p, tables)
    torch_out.backward(do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*leaves, causal, keep, p, tables)
    ref.backward(do.double())
    assert_as_accurate(out, torch_out, ref, "dropout out")
    for name, g, leaf_own, leaf in zip(("dq", "dk", "dv"), grads, leaves_own, leaves):
        assert_as_accurate(g, leaf_own.grad, leaf.grad, f"dropout {name}")


# --- TMA (tensor-descriptor) loads -----------------------------------------------------------------

def force_tma(monkeypatch, tma: bool) -> None:
    """Every launch of the op asks for TMA loads, or for none. The tables choose them per GPU by
    measurement (sm90's take them everywhere): tests of one path or the other set it."""
    config = attention._config
    monkeypatch.setattr(attention, "_config",
                        lambda q, which, *dropout: config(q, which, *dropout)._replace(tma=tma))


@pytest.fixture
def tma_loads(monkeypatch):
    """The descriptor path itself, wherever it runs (the interpreter, sm90+)."""
    force_tma(monkeypatch, True)


def tma_runs(q) -> bool:
    return attention._use_tma(attention._config(q, "fwd"), q)


def test_short_sequences_take_their_own_table_where_it_has_a_pass(monkeypatch):
    """Up to SHORT_T a pass takes _SHORT_T_CONFIGS' entry for its GPU and D where there is one,
    else (and past SHORT_T) _GPU_CONFIGS': on sm90 at D = 64 the forward alone has a short entry."""
    monkeypatch.setattr(attention.runtime, "capability", lambda device: (9, 0))
    short, long = (torch.empty(1, 1, T, 64, dtype=torch.bfloat16) for T in (attention.SHORT_T, attention.SHORT_T + 1))
    tables = attention._SHORT_T_CONFIGS[9][64], attention._GPU_CONFIGS[9][64]
    assert attention._config(short, "fwd") == tables[0]["fwd"] != tables[1]["fwd"]
    assert attention._config(long, "fwd") == tables[1]["fwd"]
    for which in ("dkdv", "dq"):
        assert attention._config(short, which) == attention._config(long, which) == tables[1][which]
    d128 = torch.empty(1, 1, 16, 128, dtype=torch.bfloat16)
    assert attention._config(d128, "fwd") == attention._GPU_CONFIGS[9][128]["fwd"]


def test_fp32_takes_small_unpipelined_tiles_in_8_warps(monkeypatch):
    """The fp32 checking path's configuration, whatever the 16-bit tables hold (some tuned entries
    have 4 warps, at which its fp32 tiles spill hundreds of bytes a thread)."""
    for major in (8, 9, 10, 12):
        monkeypatch.setattr(attention.runtime, "capability", lambda device, major=major: (major, 0))
        for D in (64, 96, 128):
            q = torch.empty(1, 1, 4096, D, dtype=torch.float32)
            for which in ("fwd", "dkdv", "dq"):
                cfg = attention._config(q, which)
                assert (cfg.num_warps, cfg.num_stages) == (8, 1) and max(cfg.block_m, cfg.block_n) <= 32


def test_dropout_takes_at_least_8_warps(monkeypatch):
    """The mask's hashing takes registers: at the 4 warps some tuned entries (long and short T)
    have, they spill; at 8 they do not (tests/sm_compile.py's counts)."""
    for major in (8, 9, 10, 12):
        monkeypatch.setattr(attention.runtime, "capability", lambda device, major=major: (major, 0))
        for D, T in itertools.product((64, 96, 128), (512, 4096)):
            q = torch.empty(1, 1, T, D, dtype=torch.bfloat16)
            assert all(attention._config(q, which, dropout=True).num_warps >= 8 for which in ("fwd", "dkdv", "dq"))


# Causal and not, grouped and not, every power-of-two head dim, T off the tile, the model's views
TMA_CASES = [
    (1, 2, 2, 130, 32, True, torch.bfloat16, "contiguous"),
    (1, 4, 2, 67, 64, True, torch.bfloat16, "qkv"),
    (2, 2, 1, 45, 128, False, torch.float16, "qkv"),
]


@pytest.mark.parametrize("B,H,Hkv,T,D,causal,dtype,layout", TMA_CASES)
def test_tma_matches_float64(B, H, Hkv, T, D, causal, dtype, layout, device, tma_loads):
    device = triton_device(device)
    q = make_qkv(B, H, Hkv, T, D, dtype, device, layout)[0]
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        assert not tma_runs(q)  # the pointer path, checked by the other tests
    else:
        assert tma_runs(q)
    check_against_float64("triton", B, H, Hkv, T, D, causal, dtype, device, layout)


@interpreter_only
@pytest.mark.parametrize("causal,dropout_p", [(True, 0.3), (False, 0.0)])
def test_tma_loads_the_same_tiles(causal, dropout_p):
    """In the interpreter both paths load the same values and do the same arithmetic: every output
    of all three passes is bit-identical, rows past T (zero padding) and dropout included."""
    cfgs = attention._INTERPRETER_CONFIGS
    q, k, v = (t.detach() for t in make_qkv(2, 4, 2, 37, 32, torch.bfloat16, "cpu", "qkv"))
    seed = torch.tensor([1234]) if dropout_p else None
    results = []
    for tma in (False, True):
        fwd, dkdv, dq = (cfgs[w]._replace(tma=tma) for w in ("fwd", "dkdv", "dq"))
        assert attention._use_tma(fwd, q, k, v) == tma
        o, lse = attention._launch_fwd(q, k, v, causal, dropout_p, seed, fwd)
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(o.dtype)
        grads = attention._launch_bwd(do, q, k, v, o, lse, causal, dropout_p, seed, fwd, dkdv, dq)
        results.append((o, lse, *attention._split_qkv(grads, q.shape[1])))
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), name


def test_tma_only_where_the_copy_engine_can():
    """Layouts the copy engine cannot take load through pointers with the same configuration."""
    cfg = attention._INTERPRETER_CONFIGS["fwd"]._replace(tma=True)
    x = torch.zeros(2, 37, 3 * 4 * 64, dtype=torch.bfloat16)
    q = x[..., :256].view(2, 37, 4, 64).transpose(1, 2)
    assert attention._use_tma(cfg, q, q, q)
    assert not attention._use_tma(cfg._replace(tma=False), q)
    assert not attention._use_tma(cfg, q.float())  # fp32: the checking path
    assert not attention._use_tma(cfg, torch.zeros(1, 1, 8, 96, dtype=torch.bfloat16))  # D not 2^k
    shifted = x[..., 1:257].view(2, 37, 4, 64).transpose(1, 2)  # starts 2 bytes in
    assert not attention._use_tma(cfg, q, shifted, q)
    odd_rows = torch.zeros(2, 37, 4 * 64 + 1, dtype=torch.bfloat16)[..., :256]  # rows 514 bytes apart
    assert not attention._use_tma(cfg, odd_rows.view(2, 37, 4, 64).transpose(1, 2))
    expanded = torch.ones(1, 1, 1, 64, dtype=torch.bfloat16).expand(2, 4, 37, 64)  # e.g. dO of a sum
    assert not attention._use_tma(cfg, q, q, q, expanded)
    assert attention._use_tma(cfg, torch.zeros(1, 4, 37, 64, dtype=torch.bfloat16)[:, :1])  # one head


@pytest.mark.parametrize("major, tma", [(8, False), (9, True), (10, True), (12, True)])
def test_tma_only_on_gpus_with_a_tensor_memory_accelerator(major, tma, monkeypatch):
    """sm90 and later have the copy engine; sm80-89 load through pointers: bench/tune_attention.py's
    TMA candidates must not try it there."""
    monkeypatch.setattr(attention.runtime, "capability", lambda device: (major, 0))
    cfg = attention._INTERPRETER_CONFIGS["fwd"]._replace(tma=True)
    assert attention._use_tma(cfg, torch.zeros(1, 4, 37, 64, dtype=torch.bfloat16)) == tma


def test_warpgroup_mma_gpus_take_the_sm90_tables():
    assert [attention._generation(major) for major in (8, 9, 10, 11, 12)] == [8, 9, 9, 9, 8]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B, T", [(0, 8), (2, 0)], ids=["no batch", "no tokens"])
def test_empty_inputs(backend, B, T, device):
    """No sequences, or sequences of no tokens, give empty outputs and gradients of the inputs'
    shapes, with rope and dropout too (the launches have empty grids: none runs)."""
    skip_unless_triton_runs(backend, device)
    f = kernels.get("attention", backend)
    q = torch.randn(B, 4, T, 32, device=device, requires_grad=True)
    k, v = (torch.randn(B, 2, T, 32, device=device, requires_grad=True) for _ in range(2))
    angles = torch.randn(T, 16, device=device)
    for rope in (None, (angles.cos(), angles.sin())):
        out = f(q, k, v, causal=True, dropout_p=0.1, rope=rope)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_bad_inputs(device):
    skip_unless_triton_runs("triton", device)
    f = kernels.get("attention", "triton")
    q = torch.randn(1, 4, 8, 64, device=device)
    kv = torch.randn(1, 3, 8, 64, device=device)
    with pytest.raises(ValueError, match="attention: .*multiple of k/v's 3 heads"):
        f(q, kv, kv)
    with pytest.raises(ValueError, match=r"attention: .*head dims \(32, 64, 96, 128\), got 48"):
        x = torch.randn(1, 2, 8, 48, device=device)
        f(x, x, x)
    with pytest.raises(ValueError, match="attention: the triton backend needs at least one query head"):
        f(q[:, :0], kv, kv)  # 0 heads: a multiple of 3, but no group for the kv heads' gradients
    with pytest.raises(ValueError, match="attention: .*same dtype"):
        f(q, q.half(), q)
    with pytest.raises(ValueError, match="attention: .*same device"):
        f(q, q.to("meta"), q)
    with pytest.raises(ValueError, match=r"attention: .*one of \(float16, bfloat16, float32\), got float64"):
        x = q.double()
        f(x, x, x)
    for shape, extent in (((65536, 1, 8, 64), "batch"), ((1, 65536, 8, 64), "heads")):
        x = q[:1, :1].expand(shape)  # no memory: refused before any launch
        with pytest.raises(ValueError, match=f"attention: the triton backend takes at most 65535 {extent} "
                                             f".a launch grid's limit., got 65536"):
            f(x, x, x)
    x = q[:1, :1].expand(1, 21846, 8, 64)  # with rope one launch takes q's, k's and v's heads, 65,538 here
    with pytest.raises(ValueError, match="attention: the triton backend takes at most 65535 heads .*, got 65538"):
        f(x, x, x, rope=rope_tables(64, 8, 10000.0, device))
    with pytest.raises(ValueError, match=r"attention: dropout_p must be in \[0, 1\), got 1.0"):
        f(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="attention: dropout_p must be a Python number, got NoneType"):
        f(q, q, q, dropout_p=None)
    cos, sin = (t.to(device) for t in rope_tables(64, 8, 10000.0))
    with pytest.raises(ValueError, match=r"attention: rope must be a \(cos, sin\) pair"):
        f(q, q, q, rope=cos)
    with pytest.raises(ValueError, match=r"attention: cos and sin must have shape \(T, D/2\) = \(8, 32\)"):
        f(q, q, q, rope=(cos[:7], sin[:7]))
    with pytest.raises(ValueError, match="attention: the triton backend takes the cos table as a constant"):
        f(q, q, q, rope=(cos.clone().requires_grad_(), sin))
    with pytest.raises(ValueError, match="attention: cos must be one of"):
        f(q, q, q, rope=(cos.double(), sin))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_shapes_and_flags(backend):
    """Checks both backends share: shapes that do not pair up would otherwise be read out of
    bounds (triton) or broadcast (torch)."""
    f = kernels.get("attention", backend)
    q, kv = torch.randn(2, 4, 8, 64), torch.randn(2, 2, 8, 64)
    cases = {
        r"k, v must have the same shape; got k \(2, 2, 8, 64\), v \(2, 2, 16, 64\)": (q, kv, torch.randn(2, 2, 16, 64)),
        r"\(2, 2, 16, 64\) must agree on B, T and D": (q, torch.randn(2, 2, 16, 64), torch.randn(2, 2, 16, 64)),
        r"\(1, 2, 8, 64\) must agree on B, T and D": (q, torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)),
        r"\(2, 2, 8, 32\) must agree on B, T and D": (q, torch.randn(2, 2, 8, 32), torch.randn(2, 2, 8, 32)),
        r"q must be 4-D, got shape \(4, 8, 64\)": (q[0], kv, kv),
        r"v must be 4-D": (q, kv, kv[None]),
    }
    for message, args in cases.items():
        with pytest.raises(ValueError, match=f"^attention: .*{message}"):
            f(*args)
    with pytest.raises(ValueError, match="^attention: causal must be a bool, got 1"):
        f(q, kv, kv, causal=1)


def test_long_sequence(device):
    """32 key tiles of the interpreter's 16 (the CASES above have at most 9): o and dq accumulated
    in bf16 between tiles instead of fp32 would be some 3x torch's error here, and pass there."""
    check_against_float64("triton", 1, 1, 1, 512, 64, False, torch.bfloat16, triton_device(device))


# --- CUDA only -----------------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("T,causal,D", [(1024, True, 128), (4096, True, 64),
                                        # float64 references of 4 GiB score matrices, several alive
                                        pytest.param(16384, True, 128, marks=pytest.mark.bigmem),
                                        (3000, False, 64)])
def test_long_sequences_cuda(T, causal, D):
    check_against_float64("triton", 1, 2, 1, T, D, causal, torch.bfloat16, "cuda", "qkv")


@two_gpus
@pytest.mark.parametrize("rope", [False, True])
def test_second_gpu(rope):
    """Launched on q's GPU while another is current: the passes, rope's copy, dropout's seed."""
    with torch.cuda.device(0):
        check_against_float64("triton", 1, 4, 2, 67, 64, True, torch.bfloat16, "cuda:1", "qkv", rope)
        test_dropout_gradients(True, rope, torch.bfloat16, "cuda:1")


@pytest.mark.bigmem
@cuda_only
@pytest.mark.parametrize("tma", [False, True])
def test_over_2_to_the_31_elements_cuda(tma, monkeypatch):
    """q, k and v views of one qkv projection of over 2^31 elements: the last batch, which lies
    past element 2^31, is read and written where it belongs (int64 offsets, or the descriptors'
    int64 strides with TMA) and matches that batch computed alone."""
    force_tma(monkeypatch, tma)
    H, T, D = 4, 1024, 128
    B = 2**31 // (T * 3 * H * D) + 1
    q, k, v = make_qkv(B, H, H, T, D, torch.bfloat16, "cuda", "qkv")
    do = torch.randn_like(q)
    out, grads = run("triton", q, k, v, do, causal=True)
    alone = run("triton", q[-1:], k[-1:], v[-1:], do[-1:], causal=True)
    for name, o, a in zip(("out", "dq", "dk", "dv"), (out, *grads), (alone[0], *alone[1])):
        torch.testing.assert_close(o[-1:], a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("tma,rope", [(False, False), (True, False), (False, True)])
def test_torch_compile_matches_eager(tma, rope, device, monkeypatch):
    """Under torch.compile the ops run the same kernels: same output and gradients as eager, and
    dropout compiles without a graph break (the seed is drawn on the device). With TMA loads and
    without: the descriptors are made inside the traced op."""
    device = triton_device(device)
    force_tma(monkeypatch, tma)
    f = kernels.get("attention", "triton")
    q, k, v = make_qkv(2, 8, 2, 300, 64, torch.bfloat16, device, "qkv") if device == "cuda" else \
        make_qkv(1, 2, 1, 19, 32, torch.bfloat16, device, "qkv")
    do = torch.randn_like(q)
    tables = rope_tables(q.shape[-1], q.shape[2], 10000.0, device) if rope else None
    eager = run("triton", q, k, v, do, causal=True, rope=tables)

    def step(q, k, v, dropout_p=0.0):
        return f(q, k, v, causal=True, dropout_p=dropout_p, rope=tables)

    graphed = compiled(step, device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = graphed(*leaves)
    out.backward(do)
    torch.testing.assert_close(out, eager[0], rtol=0, atol=0)
    for g, e in zip((t.grad for t in leaves), eager[1]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    dropped = graphed(*leaves, 0.2)
    dropped.sum().backward()
    assert torch.isfinite(dropped).all()


@pytest.mark.parametrize("use_rope", [False, True], ids=["plain", "rope"])
def test_autocast_runs_it_in_sdpa_s_dtype(use_rope):
    """Under autocast SDPA (the torch backend) casts fp32 q, k and v to autocast's dtype and
    returns that dtype; so does the triton backend, the gradients fp32 again (it computed in fp32
    and returned fp32)."""
    skip_unless_triton_runs("triton", "cpu")
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(s, generator=g) for s in [(1, 2, 19, 32), (1, 1, 19, 32), (1, 1, 19, 32)]]
    rope = rope_tables(32, 19, 10000.0) if use_rope else None
    results = {}
    for backend in ("torch", "triton"):
        inputs = [t.clone().requires_grad_() for t in leaves]
        with torch.autocast("cpu", torch.bfloat16):
            out = kernels.get("attention", backend)(*inputs, rope=rope)
        out.float().square().sum().backward()
        results[backend] = [out] + [t.grad for t in inputs]
    for ours, theirs in zip(results["triton"], results["torch"]):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.05, atol=0.05)
