import re
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import accuracy
from kernels.registry import register
from tests.devices import interpreter_only


def test_every_op_has_a_torch_backend_first():
    registered = kernels.ops()
    assert list(registered) == list(kernels.OPS)
    for op, backends in registered.items():
        assert backends[0] == "torch", op
        assert callable(kernels.get(op, "torch"))


def test_ops_returns_a_copy():
    kernels.ops()["rms_norm"].append("bogus")
    assert "bogus" not in kernels.ops()["rms_norm"]


def test_get_unknown_op_or_backend_names_the_problem():
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        kernels.get("softmax", "torch")
    with pytest.raises(ValueError, match="rms_norm: no 'cuda-graph' backend"):
        kernels.get("rms_norm", "cuda-graph")


def test_register_refuses_unknown_ops_and_duplicates():
    with pytest.raises(ValueError, match="unknown op"):
        register("softmax", "torch")
    with pytest.raises(ValueError, match="already has a 'torch' backend"):
        register("swiglu", "torch")(lambda gate, up: gate)


def test_register_refuses_names_that_mean_something_else_and_what_cannot_be_called():
    """`auto` reads as choose's mode and `compile` as bench's torch.compile of torch in a profile,
    which a backend so named was chosen on; a name that is no identifier (3, "") named nothing."""
    for name in ("auto", "compile", "", "my kernel", 3, None):
        with pytest.raises(ValueError, match="register: swiglu's backend needs a name such as 'triton'"):
            register("swiglu", name)
    with pytest.raises(ValueError, match="register: swiglu's 'mine' backend must be callable, got int"):
        register("swiglu", "mine")(42)
    assert kernels.ops()["swiglu"] == ["torch", "triton"]


@pytest.fixture
def own_backend(monkeypatch):
    """register for a test: a user's backend, gone after it, its self-check too."""
    from bench import profile
    monkeypatch.setattr(kernels.registry, "_impls", {op: dict(b) for op, b in kernels.registry._impls.items()})
    monkeypatch.setattr(profile, "_checked", {})
    return lambda name, fn, op="swiglu": register(op, name)(fn)


def test_a_users_backend_asked_for_is_self_checked_and_measured(own_backend):
    """A backend of the user's (docs/kernels.md, "Adding a backend") runs where asked for once it
    passes the self-check triton's does; a wrong one is refused at the choice, not trained on (it
    was taken unchecked: a loss off by 1% and no word). bench.kernels times and checks it."""
    from bench.backends import implementations
    reference = kernels.get("swiglu", "torch")
    own_backend("mine", lambda gate, up: reference(gate, up))
    own_backend("wrong", lambda gate, up: reference(gate, up) * 1.01)
    assert kernels.choose({"swiglu": "mine"}, "cpu")["swiglu"] == kernels.Choice("mine", "asked for")
    with pytest.raises(ValueError, match=r"swiglu: its wrong backend, asked for, failed its self-check at .*: "
                                         r"fwd result 0: error .* > bound [^(]*$"):
        kernels.choose({"swiglu": "wrong"}, "cpu")
    assert list(implementations("swiglu")) == ["torch", "compile", "triton", "mine", "wrong"]


@interpreter_only
def test_choose_torch_triton_and_auto():
    torch_choice = kernels.choose("torch", "cpu")
    assert {c.backend for c in torch_choice.values()} == {"torch"}
    triton_choice = kernels.choose("triton", "cpu")
    for op, backends in kernels.ops().items():
        expected = "triton" if "triton" in backends else "torch"
        assert triton_choice[op].backend == expected, op
        if expected == "torch":
            assert "falls back to torch" in triton_choice[op].reason
    assert {c.backend for c in kernels.choose("auto", "cpu").values()} == {"torch"}
    # An Apple GPU is named as itself (train.py and gpt.sample took it for the CPU once).
    assert kernels.choose("auto", "mps")["attention"].reason.startswith("auto on mps: the kernels run on CUDA GPUs")


@interpreter_only  # (rope's self-check runs the triton backend on CPU tensors)
def test_choose_mapping_and_bad_modes():
    choice = kernels.choose({"swiglu": "torch"}, "cpu")
    assert choice["swiglu"].reason == "asked for" and choice["attention"].backend == "torch"
    # An op the run does not call runs nowhere, and is not said to run where it was asked.
    choice = kernels.choose({"swiglu": "triton", "rope": "triton"}, "cpu", used={"rope"})
    assert choice["swiglu"] == kernels.Choice("torch", "not used by this run (asked for triton)")
    assert choice["rope"] == kernels.Choice("triton", "asked for")  # (its self-check passed)
    with pytest.raises(ValueError, match="unknown ops"):
        kernels.choose({"softmax": "torch"}, "cpu")
    with pytest.raises(ValueError, match="no 'fast' backend"):
        kernels.choose({"swiglu": "fast"}, "cpu")
    with pytest.raises(ValueError, match=r"kernels: swiglu's backend must be a name such as 'triton', got \['x'\]"):
        kernels.choose({"swiglu": ["x"]}, "cpu")  # (a TypeError's traceback once)
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.choose("fastest", "cpu")


def test_ops_return_the_input_dtype_and_shape():
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    w = torch.ones(8)  # fp32 weights with bf16 activations, as under autocast
    assert kernels.get("rms_norm")(x, w, 1e-5).dtype == torch.bfloat16
    assert kernels.get("layer_norm")(x, w, None, 1e-5).shape == x.shape
    assert kernels.get("swiglu")(x, x).dtype == torch.bfloat16
    q = torch.randn(2, 4, 5, 8, dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 5, 8, dtype=torch.bfloat16)
    assert kernels.get("attention")(q, kv, kv).shape == q.shape


def test_interpreter_version_check():
    from kernels.runtime import interpreter_problem

    assert "numpy<2.4" in interpreter_problem("3.6.0", "2.4.6")
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.7.0", "2.4.6") is None
    assert interpreter_problem("3.8.0", "2.4.6") is None



@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr, VIA_FP32: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(X + i)
    if VIA_FP32:  # as the kernels cast: to fp32 at once, then to the output's dtype at the store
        x = x.to(tl.float32)
    tl.store(Y + i, x.to(Y.dtype.element_ty))


@pytest.mark.parametrize("src, dst, via_fp32", [
    (torch.float32, torch.bfloat16, True), (torch.float64, torch.bfloat16, True),
    (torch.float16, torch.bfloat16, True), (torch.bfloat16, torch.float64, True),
    (torch.float64, torch.bfloat16, False)])
@interpreter_only
def test_bf16_casts_round_as_on_a_gpu(src, dst, via_fp32):
    """In the interpreter a kernel's casts to bf16 round to nearest even, as a GPU's and torch's do
    (the interpreter's own round fp32 toward zero, and cast fp64 as an integer), and a bf16 value
    widens exactly; ties, NaN and inf included."""
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3e38, float("nan"), float("inf"), 0.0, -0.0])
    x = torch.cat([torch.randn(248, dtype=torch.float64), ties.double()]).to(src)
    y = torch.empty(256, dtype=dst)
    _cast_kernel[(1,)](x, y, N=256, VIA_FP32=via_fp32)
    expected = (x.float() if via_fp32 else x).to(dst)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y[~y.isnan()], expected[~expected.isnan()])  # -0.0 == 0.0: the signs below
    assert torch.equal(y.signbit()[~y.isnan()], expected.signbit()[~expected.isnan()])


def test_no_kernel_accumulates_with_atomics():
    """The determinism tests cannot catch an atomic add on the CPU (the interpreter runs the
    programs one after another, in order), so none may be written: reductions are partial sums
    summed in a fixed order, and no torch op that accumulates with atomics on CUDA is called.
    (tests/sm_compile.py looks for atomic instructions in the compiled kernels too.)"""
    code = re.compile(r"\batomic_\w+|\.(index_add|scatter_add|scatter_reduce|index_put)_?\(")
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        found = [m.group() for m in code.finditer(path.read_text())]
        assert not found, f"{path.name}: {found}"


def test_a_sum_s_floor_is_its_random_walk_of_fp32_roundings():
    """An error taken relative to the terms a result sums: sqrt(n) units of fp32 roundoff floor it,
    above fp32's own floor from 282 terms, below fp16's and bf16's up to 16 million."""
    assert accuracy.bound(1e-7, torch.float32, terms=4096) == 2e-7 + 64 * 2.0**-24
    fp32_floor = 2e-7 + accuracy.FLOOR[torch.float32]
    assert accuracy.bound(1e-7, torch.float32, terms=16) == accuracy.bound(1e-7, torch.float32) == fp32_floor
    assert accuracy.bound(0.0, torch.bfloat16, terms=4096) == accuracy.FLOOR[torch.bfloat16]


def test_an_error_is_measured_only_between_tensors_of_one_shape():
    """Broadcast, a result of the wrong shape would match its reference (the self-check, which
    takes the error as its verdict, has no shape check of its own): refused instead."""
    assert accuracy.rel_err(torch.ones(4), torch.ones(4)) == 0.0
    for out, ref in ((torch.ones(1, 4), torch.ones(4)), (torch.ones(4, 1), torch.ones(4))):
        with pytest.raises(ValueError, match="result of shape"):
            accuracy.rel_err(out, ref)


def test_the_accuracy_rule_s_constants():
    """The rule the docstring states: 2x torch's error plus half a unit roundoff of bf16 and fp16,
    eight epsilons of fp32."""
    assert accuracy.FACTOR == 2.0
    assert accuracy.FLOOR == {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2**-12, torch.bfloat16: 2**-9}
    assert accuracy.bound(1e-3, torch.bfloat16) == 2e-3 + 2**-9
    assert accuracy.bound(1e-3, torch.float16) == 2e-3 + 2**-12
    assert accuracy.bound(0.0, torch.float64) == 1e-12


def test_rel_err_of_nonfinite_zero_and_float64_results():
    ref = torch.randn(100, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        out = ref.clone()
        out[3] = bad
        assert accuracy.rel_err(out, ref) == float("inf")
    assert accuracy.rel_err(torch.zeros(4), torch.zeros(4)) == 0.0  # a zero gradient, exactly right
    assert accuracy.rel_err(torch.ones(4), torch.zeros(4)) > 1e20
    out = ref * (1 + 1e-10)  # float64 results measured in float64
    assert accuracy.rel_err(out, ref) == pytest.approx(1e-10, rel=1e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_list_or_an_integer_tensor_where_a_float_tensor_goes_is_refused_by_name(backend):
    x, w, b, q, table = torch.randn(3, 8), torch.ones(8), torch.zeros(8), torch.randn(1, 2, 5, 32), torch.randn(5, 16)
    calls = [("layer_norm: x must be a tensor, got list", "layer_norm", (x.tolist(), w, b, 1e-5), {}),
             ("rms_norm: weight must be a tensor, got list", "rms_norm", (x, w.tolist(), 1e-5), {}),
             ("layer_norm: residual must be a tensor, got list", "layer_norm", (x, w, b, 1e-5),
              dict(residual=x.tolist())),
             ("attention: q must be a tensor, got list", "attention", (q.tolist(), q, q), dict(causal=True)),
             ("attention: q must be one of .*, got int32", "attention", (q.int(), q.int(), q.int()), dict(causal=True)),
             ("rope: cos must be a tensor, got list", "rope", (q, table.tolist(), table), {}),
             ("grad_norm: tensors must be on one device, got tensors\\[0\\] on cpu and tensors\\[1\\] on meta",
              "grad_norm", ([torch.randn(3), torch.randn(3, device="meta")],), {})]
    for message, op, args, options in calls:
        with pytest.raises(ValueError, match=f"^{message}"):
            kernels.get(op, backend)(*args, **options)


def test_an_optimizer_on_a_users_adamw_backend_clips_with_torchs_grad_norm(own_backend):
    """BF16AdamW takes the grad_norm backend named as its adamw one: a user's adamw alone (no
    grad_norm of that name) clips with torch's, where clip_grad_norm refused it."""
    from gpt.optim import BF16AdamW
    own_backend("mine", kernels.get("adamw", "torch"), op="adamw")
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    p.grad = torch.full_like(p, 3.0)
    optimizer = BF16AdamW([p], lr=0.1, weight_decay=0.0, stochastic_rounding=False, backend="mine")
    assert optimizer.clip_grad_norm(1.0).item() == 6.0
    optimizer.step()
    assert torch.equal(p, torch.full_like(p, 1 - 0.1))  # 1 - lr to nearest bf16: a first step is the sign


@interpreter_only
def test_a_users_backend_whose_dropout_the_check_cannot_replay_is_told_why(own_backend):
    """The self-check replays a backend's dropout by seeding its own generator, which
    runtime.dropout_seed_tensor draws from: a backend drawing from torch's (torch's own norm,
    called here) is refused with that said, not with an error a hundred times its bound alone."""
    from bench.cases import Shapes
    from gpt.model import GPTConfig
    own_backend("torchs", kernels.get("layer_norm", "torch"), op="layer_norm")
    shapes = Shapes(GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=64, block_size=16, dropout=0.1), 1,
                    dtype=torch.float32)
    with pytest.raises(ValueError, match="its dropout mask differs between two calls from the same seed"):
        kernels.choose({"layer_norm": "torchs"}, "cpu", shapes=shapes)
    choices = kernels.choose("triton", "cpu", shapes=shapes, used={"layer_norm", "attention"})
    assert choices["layer_norm"].backend == choices["attention"].backend == "triton"  # theirs replayed


def test_register_returns_the_function_it_registers(monkeypatch):
    """@register is a decorator: the decorated name still names the function."""
    monkeypatch.setattr(kernels.registry, "_impls", {op: dict(b) for op, b in kernels.registry._impls.items()})

    def mine(gate, up):
        return gate
    assert kernels.registry.register("swiglu", "mine")(mine) is mine
    assert kernels.get("swiglu", "mine") is mine
