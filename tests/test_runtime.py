"""kernels.runtime.Op: eager calls on plain tensors run the op's function directly (with its
registered autograd formula); traced or intercepted calls go through the registered op. Both ways
must give the same numbers."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import types
from pathlib import Path

import pytest
import torch
import triton

import kernels
from gpt.model import GPT, GPTConfig, model_ops
from kernels import runtime
from tests.devices import skip_unless_triton_runs
from tests.memory import OpCount

ROOT = Path(__file__).resolve().parents[1]


def _leaves(*shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _norm(x, w, b, r):
    return sum(y.square().sum() for y in kernels.get("layer_norm", "triton")(x, w, b, 1e-5, residual=r,
                                                                            dropout_p=0.3))


def _attention(q, k, v, angles=None):
    rope = None if angles is None else (angles.detach().cos(), angles.detach().sin())
    return kernels.get("attention", "triton")(q, k, v, causal=True, dropout_p=0.2, rope=rope).square().sum()


def _swiglu(g, u):
    return kernels.get("swiglu", "triton")(g, u).square().sum()


def _rope(x, angles):
    angles = angles.detach()  # constant tables, as the model's
    return kernels.get("rope", "triton")(x, angles.cos(), angles.sin()).square().sum()


def _cross_entropy(logits):
    return kernels.get("cross_entropy", "triton")(logits, torch.arange(5) % 7)


def _linear_cross_entropy(x, w):
    return kernels.get("linear_cross_entropy", "triton")(x, w, torch.arange(5) % 7)


CASES = {
    "layer_norm": (_norm, [(3, 40), (40,), (40,), (3, 40)]),
    "attention": (_attention, [(1, 2, 19, 32), (1, 1, 19, 32), (1, 1, 19, 32)]),
    "attention with rope": (_attention, [(1, 2, 19, 32), (1, 1, 19, 32), (1, 1, 19, 32), (19, 16)]),
    "swiglu": (_swiglu, [(3, 40), (3, 40)]),
    "rope": (_rope, [(1, 2, 9, 16), (9, 8)]),
    "cross_entropy": (_cross_entropy, [(5, 7)]),
    "linear_cross_entropy": (_linear_cross_entropy, [(5, 8), (7, 8)]),
}


@pytest.mark.parametrize("op", CASES)
def test_direct_and_registered_calls_agree(op):
    """The loss and every gradient, bit for bit, dropout included (its seed drawn alike)."""
    skip_unless_triton_runs("triton", "cpu")
    fn, shapes = CASES[op]
    results = []
    for mode in (None, OpCount()):
        leaves = _leaves(*shapes)
        torch.manual_seed(1)
        if mode is None:
            loss = fn(*leaves)
        else:
            with mode:
                loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for direct, registered in zip(*results):  # (rope's tables get no gradient: None both ways)
        assert (direct is None and registered is None) or torch.equal(direct, registered), op


@pytest.mark.parametrize("registered", [False, True], ids=["direct", "registered"])
@pytest.mark.parametrize("op", CASES)
def test_second_order_gradients_are_refused_not_dropped(op, registered):
    """create_graph=True through an op whose backward is kernels (no graph of its own): an error
    naming it, not gradients silently short of its part, whether the forward ran the function
    directly or the registered op (under a dispatch mode). Rope's backward is rope again: its
    second-order gradient is torch's."""
    skip_unless_triton_runs("triton", "cpu")
    fn, shapes = CASES[op]
    leaves = _leaves(*shapes)
    torch.manual_seed(1)
    with OpCount() if registered else contextlib.nullcontext():
        loss = fn(*leaves)
    if op != "rope":
        with pytest.raises(RuntimeError, match="tritongpt::.*second-order gradient"):
            torch.autograd.grad(loss, leaves[0], create_graph=True)
        return
    (dx,) = torch.autograd.grad(loss, leaves[0], create_graph=True)
    (ddx,) = torch.autograd.grad(dx.square().sum(), leaves[0])
    x, angles = (t.detach().requires_grad_() for t in leaves)
    (dx_ref,) = torch.autograd.grad(kernels.get("rope", "torch")(x, angles.cos(), angles.sin()).square().sum(), x,
                                    create_graph=True)
    (ddx_ref,) = torch.autograd.grad(dx_ref.square().sum(), x)
    torch.testing.assert_close(ddx, ddx_ref)


def _profiled_op_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("tritongpt::")}


def test_eager_calls_skip_the_op_dispatch():
    """On plain tensors neither the forward nor the backward passes through the registered op;
    under a dispatch mode both do."""
    skip_unless_triton_runs("triton", "cpu")
    x, w, b, r = _leaves((3, 40), (40,), (40,), (3, 40))
    w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)  # as a model's norm passes them
    assert _profiled_op_names(lambda: _norm(x, w, b, r).backward()) == set()

    def intercepted():
        with OpCount():
            _norm(x, w, b, r).backward()
    assert _profiled_op_names(intercepted) == {"tritongpt::norm_fwd", "tritongpt::norm_bwd"}


def test_an_eager_training_step_skips_every_op_dispatch():
    """The model's own calls (parameters, views of one projection, recomputed blocks) take the
    direct way too."""
    skip_unless_triton_runs("triton", "cpu")
    config = GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=50, norm="rmsnorm",
                       pos_encoding="rope", mlp="swiglu", dropout=0.1)
    model = GPT(config, {op: "triton" for op in model_ops(config)})
    model.recompute_blocks(True)
    idx = torch.randint(0, 50, (2, 16))
    assert _profiled_op_names(lambda: model(idx, idx)[1].backward()) == set()


OP_KERNELS = {
    "attention_fwd": ["_attn_fwd"], "attention_rope_fwd": ["_attn_fwd", "_rope_kernel"],
    "attention_bwd": ["_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq", "_rope_kernel"],
    "cross_entropy_fwd": ["_cross_entropy_fwd_kernel"], "cross_entropy_bwd": ["_cross_entropy_bwd_kernel"],
    "norm_fwd": ["_norm_fwd_kernel"], "norm_bwd": ["_norm_bwd_kernel", "_norm_sum_partials_kernel"],
    "rope": ["_rope_kernel"],
    "swiglu": ["_swiglu_fwd_kernel"], "swiglu_backward": ["_swiglu_bwd_kernel"],
}


def last_json_line_as_on_a_gpu(*args: str):
    """The last line a `python *args` subprocess prints, as JSON, its kernels compiled JIT
    functions as on a GPU (not the interpreter's)."""
    out = subprocess.run([sys.executable, *args], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.splitlines()[-1])


def test_triton_op_finds_every_ops_kernels():
    """torch.library.triton_op lists the kernels an op launches (read off its source: launches
    written `wrap_triton(_kernel)`), and torch's compile caches key on their sources: an op whose
    list missed a kernel could be served compiled code of an older version of it. Checked as on a
    GPU (kernels registered through triton_op, not the interpreter's custom ops), in a subprocess."""
    code = ("import json, torch._library.triton as t, kernels\n"
            "table = getattr(t, 'triton_ops_to_kernels', None)\n"
            "print(json.dumps(None if table is None else {name.removeprefix('tritongpt::'): "
            "sorted(getattr(k, 'fn', k).__name__ for k in ks) for name, ks in table.items() "
            "if name.startswith('tritongpt::')}))")
    found = last_json_line_as_on_a_gpu("-c", code)
    if found is None:
        pytest.skip(f"torch {torch.__version__} keeps no list of triton_op kernels")
    assert found == OP_KERNELS


def test_inductor_rebuilds_every_kernel_whole():
    """torch.compile's Inductor compiles each kernel from its source and the JIT functions and
    constants it finds it uses, under their bare names: a kernel that read a helper through its
    module (`runtime.tile`) failed to compile on the GPU, under torch.compile only
    (tests/inductor_source.py)."""
    report = last_json_line_as_on_a_gpu("-m", "tests.inductor_source")
    if report is None:
        pytest.skip(f"torch {torch.__version__} has no Inductor rebuilding of Triton kernels to check against")
    assert len(report) >= 30  # every JIT function of kernels/, each checked as a kernel
    assert {name: problems for name, problems in report.items() if problems} == {}


HELPERS = '''
import triton
import triton.language as tl


@triton.jit
def _pick(x):
    return x + 1


@triton.jit
def _other(x):
    return _pick(x)
'''
KERNELS = '''
import math

import triton
import triton.language as tl
from stand_in_helpers import _other

SCALE: tl.constexpr = 2


@triton.jit
def _pick(x):
    return x * SCALE


@triton.jit
def _kernel(X):
    tl.store(X, _other(_pick(tl.load(X))) * math.pi)
'''
# What Inductor would rebuild of _kernel: its JIT functions and constexpr globals by their bare
# names, the kernel's own source without its decorator, and `math` nowhere.
REBUILT = '''
SCALE = tl.constexpr(2)


@triton.jit
def _pick(x):
    return x * SCALE


def _kernel(X):
    tl.store(X, _pick(tl.load(X)) * math.pi)
'''
PROBE = textwrap.dedent('''
    import json, sys, tempfile
    from pathlib import Path
    import tests.inductor_source as s
    import stand_in_kernels as k
    out = {"clashes": s.clashes(k._kernel), "pick clashes": s.clashes(k._pick)}
    with tempfile.TemporaryDirectory() as where:
        out["missing"] = s.missing(k._kernel, lambda kernel: open(sys.argv[1]).read(), Path(where))
    import contextlib, io
    s.jit_functions = lambda: {"stand_in_kernels._kernel": k._kernel}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        s.main()
    out["main"] = json.loads(printed.getvalue())
    print(json.dumps(out))
''')


def test_inductor_source_finds_a_missing_global_and_a_name_for_two_functions(tmp_path):
    """tests/inductor_source.py's checks on stand-in kernels: a module read through its name, a
    bare name for two functions (in a process of its own, the kernels JIT functions)."""
    (tmp_path / "stand_in_helpers.py").write_text(HELPERS)
    (tmp_path / "stand_in_kernels.py").write_text(KERNELS)
    (tmp_path / "rebuilt.py").write_text(REBUILT)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "rebuilt.py")], env=env, capture_output=True,
                         text=True, check=True, cwd=ROOT)
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["clashes"] == ["_pick names two functions"], report  # the kernel's _pick and _other's
    assert report["pick clashes"] == []
    assert report["missing"] == ["_kernel reads math"], report  # the undecorated kernel is checked too
    # main()'s report, of the source torch's Inductor rebuilds
    assert report["main"] == {"stand_in_kernels._kernel": ["_pick names two functions", "_kernel reads math"]}, report


def _runtime_in_subprocess(**env) -> list[str]:
    """kernels.runtime's INTERPRET in a fresh process whose TRITON_INTERPRET is `env`'s (unset
    where None), with Triton's own reading of it."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update({k: v for k, v in env.items() if v is not None})
    code = ("import os, triton, kernels.runtime as r; "
            "print(r.INTERPRET, triton.knobs.runtime.interpret, os.environ.get('TRITON_INTERPRET'))")
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True,
                         cwd=ROOT)
    return out.stdout.split()[-3:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is switched on only without a GPU")
def test_without_a_gpu_the_interpreter_is_switched_on():
    assert _runtime_in_subprocess(TRITON_INTERPRET=None) == ["True", "True", "1"]


def test_interpret_agrees_with_triton_on_how_the_variable_is_spelled():
    """runtime.INTERPRET decides how the kernels are written (FP32_DOT, CPU tensors, custom ops):
    it must be what Triton itself makes of TRITON_INTERPRET."""
    assert _runtime_in_subprocess(TRITON_INTERPRET="true")[:2] == ["True", "True"]
    assert _runtime_in_subprocess(TRITON_INTERPRET="false")[:2] == ["False", "False"]  # was read as on


def test_capability_of_a_cuda_device_without_index_is_the_current_gpu_s(monkeypatch):
    """torch.device("cuda") (kernels.choose's) means the current GPU, not GPU 0: on a machine whose
    process was moved to another GPU (torch.cuda.set_device), that GPU's capability decides."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(runtime, "_properties_of", lambda index: types.SimpleNamespace(
        major=(7, 9)[index], minor=0, multi_processor_count=(80, 132)[index]))
    assert runtime.capability(torch.device("cuda")) == (9, 0)
    assert runtime.capability(torch.device("cuda", 0)) == (7, 0)
    assert runtime.num_sms(torch.device("cuda")) == 132


def test_the_launch_grid_limit_is_inclusive():
    """65535 programs on a grid's second or third axis is CUDA's limit, and allowed."""
    runtime.check_grid("rope", batch=runtime.GRID_YZ_MAX, heads=1)
    with pytest.raises(ValueError, match="rope: the triton backend takes at most 65535 heads"):
        runtime.check_grid("rope", batch=1, heads=runtime.GRID_YZ_MAX + 1)


def test_host_cdiv_and_next_power_of_2_are_triton_s():
    for n in [*range(1, 300), 1023, 1024, 1025, 4096, 5632, 11008, 50257, 2**31 - 1, 2**31, 2**31 + 1,
              2**32, 2**32 + 1, 2**40 + 3]:
        assert runtime.next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 64, 128, 1024):
            assert runtime.cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_direct_launches_nests_and_is_per_thread():
    """The flag wrap_triton reads: an inner context's exit leaves the outer one's on, and another
    thread (autograd's backward) sees only its own."""
    assert not runtime._direct.on
    seen = []
    with runtime.direct_launches():
        with runtime.direct_launches():
            pass
        assert runtime._direct.on
        worker = threading.Thread(target=lambda: seen.append(runtime._direct.on))
        worker.start()
        worker.join()
    assert seen == [False] and not runtime._direct.on


def test_threads_launch_side_by_side():
    """Kernels launched from several threads at once give each thread the numbers one thread
    alone gets (Triton's interpreter, not thread-safe, runs one launch at a time)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x, w, q, k, v = (torch.randn(s, generator=g).to(device) for s in ((8, 32), (32,), *[(1, 2, 16, 32)] * 3))
    calls = [lambda: kernels.get("rms_norm", "triton")(x, w, 1e-5),
             lambda: kernels.get("attention", "triton")(q, k, v, causal=True),
             lambda: kernels.get("grad_norm", "triton")([x, w, q])]
    alone = [call() for call in calls]
    failures = []

    def worker():
        try:
            for _ in range(4):
                for call, expected in zip(calls, alone):
                    if not torch.equal(call(), expected):
                        failures.append("differs")
        except Exception as e:
            failures.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclasses_take_the_registered_op():
    """Only plain tensors and Parameters skip the op's dispatch (runtime._eager)."""
    skip_unless_triton_runs("triton", "cpu")
    x = torch.randn(3, 8)
    swiglu = kernels.get("swiglu", "triton")
    assert _profiled_op_names(lambda: swiglu(x, x)) == set()
    sub = x.as_subclass(_Subclass)
    assert _profiled_op_names(lambda: swiglu(sub, sub)) == {"tritongpt::swiglu"}


# Batched over the first dim of the tensors marked 0 (torch.func.vmap's in_dims); no dropout, whose
# seed vmap's randomness rule would refuse.
FUNC_CASES = {
    "layer_norm": (lambda x, w: kernels.get("layer_norm", "triton")(x, w, None, 1e-5), [(3, 4, 40), (40,)], (0, None)),
    "swiglu": (lambda g, u: kernels.get("swiglu", "triton")(g, u), [(3, 4, 40), (3, 4, 40)], (0, 0)),
    "rope": (lambda x, a: kernels.get("rope", "triton")(x, a.cos(), a.sin()), [(3, 1, 2, 9, 16), (9, 8)], (0, None)),
    "attention": (lambda q, k, v: kernels.get("attention", "triton")(q, k, v),
                  [(3, 1, 2, 19, 32), (3, 1, 1, 19, 32), (3, 1, 1, 19, 32)], (0, 0, 0)),
    "cross_entropy": (lambda z: kernels.get("cross_entropy", "triton")(z, torch.arange(5) % 7), [(3, 5, 7)], (0,)),
    "linear_cross_entropy": (lambda x, w: kernels.get("linear_cross_entropy", "triton")(x, w, torch.arange(5) % 7),
                             [(3, 5, 8), (7, 8)], (0, None)),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap of a custom op: one call a slice
@pytest.mark.parametrize("op", FUNC_CASES)
def test_torch_func_vmap_runs_the_op_on_each_slice_and_grad_is_refused_by_name(op):
    """vmap's batched tensors look like plain ones to the eager path (runtime._eager), whose
    launch read them as the whole batch: a crash in the launcher. torch.func.grad cannot reach the
    ops' autograd formulas: a ValueError naming the op, not torch's error naming neither."""
    skip_unless_triton_runs("triton", "cpu")
    fn, shapes, dims = FUNC_CASES[op]
    args = [t.detach() for t in _leaves(*shapes)]
    slices = [fn(*(a[i] if d == 0 else a for a, d in zip(args, dims))) for i in range(3)]
    torch.testing.assert_close(torch.func.vmap(fn, in_dims=dims)(*args), torch.stack(slices), rtol=0, atol=0)
    first = [a[0] if d == 0 else a for a, d in zip(args, dims)]
    with pytest.raises(ValueError, match=r"tritongpt::.*torch\.func's grad.*use the torch backend"):
        torch.func.grad(lambda x: fn(x, *first[1:]).sum())(first[0])


@pytest.mark.parametrize("op", FUNC_CASES)
def test_forward_mode_gradients_are_refused_not_dropped(op):
    """A forward-mode tangent does not pass through the kernels: torch.func.jvp gave zeros, and an
    eager call on a dual tensor an output without a tangent. Both are a ValueError naming the op."""
    skip_unless_triton_runs("triton", "cpu")
    fn, shapes, dims = FUNC_CASES[op]
    x, *rest = [t.detach()[0] if d == 0 else t.detach() for t, d in zip(_leaves(*shapes), dims)]
    match = r"tritongpt::.*forward-mode gradients.*use the torch backend"
    with pytest.raises(ValueError, match=match):
        torch.func.jvp(lambda x: fn(x, *rest), (x,), (torch.ones_like(x),))
    with torch.autograd.forward_ad.dual_level(), pytest.raises(ValueError, match=match):
        fn(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x)), *rest)


def test_as_rows_and_unit_stride_d_keep_views_where_the_layout_allows():
    h = torch.randn(3, 5, 16)
    for half in h.chunk(2, -1):  # row stride 16, unit column stride: no copy
        rows = runtime.as_rows(half)
        assert rows.shape == (15, 8) and rows.data_ptr() == half.data_ptr() and torch.equal(rows, half.reshape(15, 8))
    q = torch.randn(2, 7, 4, 8).transpose(1, 2)  # (B, H, T, D) heads of a (B, T, H, D) buffer
    assert runtime.unit_stride_d(q) is q
    column = torch.randn(4, 6)[:, 1:2]
    assert torch.equal(runtime.as_rows(column), column) and runtime.as_rows(column).stride(-1) == 1
    assert runtime.as_rows(torch.tensor(2.0)).shape == (1, 1)


def test_a_self_checks_generator_is_its_threads_alone():
    """Inside drawing_from, only the thread that entered it draws its dropout seeds from the
    check's generator: a training step in another thread meanwhile draws from torch's as ever
    (else its masks would be the check's, and torch.manual_seed would not replay them)."""
    seen = []
    other = threading.Thread(target=lambda: seen.append(runtime.drawing_generator()))
    mine = torch.Generator().manual_seed(0)
    with runtime.drawing_from(mine):
        other.start()
        other.join()
        assert runtime.drawing_generator() is mine
        with runtime.drawing_from(torch.Generator()):  # nested: the outer one's again after it
            pass
        assert runtime.drawing_generator() is mine
    assert seen == [None] and runtime.drawing_generator() is None


def test_no_dropout_draws_no_seed():
    """dropout_p = 0 takes nothing from torch's generator: a run without dropout samples alike
    with either backend."""
    torch.manual_seed(0)
    assert runtime.dropout_seed_tensor(0.0, torch.device("cpu")) is None
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)


def test_interpreter_problem_is_an_older_triton_with_numpy_2_4_or_later():
    """Triton before 3.7 with numpy 2.4 or later, the versions compared as numbers, major and
    minor (3.10 is newer than 3.7, numpy 2.10 than 2.4)."""
    problem = runtime.interpreter_problem("3.6.0", "2.4.0")
    assert problem is not None and "Triton 3.6.0" in problem and "numpy 2.4.0" in problem
    assert runtime.interpreter_problem("3.6.1+git0123abc", "2.10.1") is not None
    for triton_version, numpy_version in (("3.7.0", "2.4.0"), ("3.10.0", "2.4.1"), ("4.0.0", "3.0.0"),
                                          ("3.6.0", "2.3.5"), ("3.5.1", "1.26.4")):
        assert runtime.interpreter_problem(triton_version, numpy_version) is None, (triton_version, numpy_version)


def test_the_triton_backends_refuse_gpus_older_than_ampere_and_rocm_ones(monkeypatch):
    """unsupported_gpu and check_gpu, the GPU's capability stood in."""
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.version, "hip", None)
    for cc, refused in (((7, 5), True), ((7, 0), True), ((8, 0), False), ((8, 9), False), ((9, 0), False),
                        ((12, 0), False)):
        monkeypatch.setattr(runtime, "capability", lambda device, cc=cc: cc)
        assert (runtime.unsupported_gpu(gpu) is not None) == refused, cc
        if refused:
            with pytest.raises(ValueError, match=rf"^rope: .*compute capability 8\.0 or newer.*cuda:0 is "
                                                 rf"{cc[0]}\.{cc[1]}: use the torch backend"):
                runtime.check_gpu("rope", gpu)
        else:
            runtime.check_gpu("rope", gpu)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # torch calls an AMD GPU "cuda" too
    assert "ROCm" in runtime.unsupported_gpu(gpu)
    with pytest.raises(ValueError, match="^rope: .*ROCm.*use the torch backend"):
        runtime.check_gpu("rope", gpu)


def test_check_device_refuses_an_unsupported_gpu_and_cpu_tensors_without_the_interpreter(monkeypatch):
    """check_device reads only the tensor's device: a stand-in on "cuda" reaches the GPU check
    without a GPU."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(runtime, "capability", lambda device: (7, 5))
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match=r"^swiglu: .*compute capability 8\.0 or newer"):
        runtime.check_device("swiglu", on_gpu)
    monkeypatch.setattr(runtime, "capability", lambda device: (9, 0))
    runtime.check_device("swiglu", on_gpu)
    monkeypatch.setattr(runtime, "CPU_TENSORS", False)
    with pytest.raises(ValueError, match="^swiglu: the triton backend runs on CUDA tensors.*got a tensor on cpu"):
        runtime.check_device("swiglu", torch.zeros(1))
    monkeypatch.setattr(runtime, "CPU_TENSORS", True)
    runtime.check_device("swiglu", torch.zeros(1))


def test_capability_and_num_sms_off_the_gpu():
    """Any device but CUDA (meta too, as shapes are traced) has no capability and the
    interpreter's stand-in SM count, without asking torch.cuda."""
    for device in (torch.device("cpu"), torch.device("meta")):
        assert runtime.capability(device) is None
        assert runtime.num_sms(device) == runtime._INTERPRETER_SMS
        assert runtime.unsupported_gpu(device) is None


def test_an_eager_call_takes_the_gradient_formula_when_any_argument_wants_a_gradient():
    """Not just the first: here only swiglu's second input requires a gradient."""
    skip_unless_triton_runs("triton", "cpu")
    g, u = _leaves((3, 40), (3, 40))
    g = g.detach()
    kernels.get("swiglu", "triton")(g, u).square().sum().backward()
    u_ref = u.detach().requires_grad_()
    kernels.get("swiglu", "torch")(g, u_ref).square().sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad)


def test_other_runtime_errors_under_torch_func_pass_through_call_op():
    """Only torch's refusal of an autograd.Function under a torch.func transform becomes the
    ValueError naming grad and jacrev; another RuntimeError there (here under vmap) is left as
    it is."""
    class Failing:
        _qualname = "tritongpt::stand_in"

        def __call__(self, *args):
            raise RuntimeError("stand-in failure")
    with pytest.raises(RuntimeError, match="stand-in failure"):
        torch.func.vmap(lambda x: runtime.call_op(Failing(), x))(torch.randn(2, 3))
