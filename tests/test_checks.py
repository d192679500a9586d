"""kernels.checks: the argument checks every op makes (numbers, tensor lists, overlapping
memory), beyond the ValueErrors each op's tests pin."""
from fractions import Fraction

import pytest
import torch

import kernels
from kernels import checks
from tests.devices import interpreter_only, skip_unless_triton_runs


def test_int64_s_whole_range_is_an_integer_argument():
    checks.check_number("cross_entropy", "ignore_index", -2**63, integer=True)
    checks.check_number("cross_entropy", "ignore_index", 2**63 - 1, integer=True)
    logits, targets = torch.randn(3, 5), torch.tensor([1, 0, 2])
    for backend in ("torch", "triton"):
        skip_unless_triton_runs(backend, "cpu")
        fn = kernels.get("cross_entropy", backend)
        torch.testing.assert_close(fn(logits, targets, ignore_index=-2**63), fn(logits, targets))


def test_numpy_floats_are_numbers():
    np = pytest.importorskip("numpy")
    for value in (np.float32(1e-5), np.float16(1e-5), np.float64(1e-5)):
        checks.check_number("rms_norm", "eps", value, 0.0)


def _number_calls(f, i):
    """Each op that takes numbers, called with them as made by `f` (floats) and `i` (ints), on
    fresh inputs: functions of the backend that return the op's results."""
    x, w, b, head = torch.randn(3, 8), torch.randn(8), torch.randn(8), torch.randn(5, 8)
    logits, targets = torch.randn(3, 5), torch.tensor([1, 0, 2])
    q = torch.randn(1, 2, 5, 32)
    p, g = torch.randn(7, dtype=torch.bfloat16), torch.randn(7, dtype=torch.bfloat16)  # stochastic rounding
    yield lambda be: kernels.get("rms_norm", be)(x, w, f(1e-5), residual=x, dropout_p=f(0.25))
    yield lambda be: kernels.get("layer_norm", be)(x, w, b, f(1e-5))
    yield lambda be: kernels.get("cross_entropy", be)(logits, targets, ignore_index=i(2))
    yield lambda be: kernels.get("linear_cross_entropy", be)(x, head, targets, ignore_index=i(0))
    yield lambda be: kernels.get("attention", be)(q, q, q, dropout_p=f(0.25))

    def adamw(be, step):
        out, m, v = p.clone(), torch.zeros(7), torch.zeros(7)
        kernels.get("adamw", be)([out], [g], [m], [v], step=step, lr=f(1e-2), beta1=f(0.9), beta2=f(0.95),
                                 eps=f(1e-8), weight_decay=f(0.1), stochastic_rounding=True, seed=i(5))
        return out, m, v
    yield lambda be: adamw(be, i(3))
    yield lambda be: adamw(be, 3)  # float32 ** int stays float32 in numpy: its arithmetic, not the op's


@pytest.mark.parametrize("kind", ["numpy", "fraction"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_other_numbers_are_taken_as_python_s(backend, kind):
    """Every op's numbers may be numpy's (a schedule computed with numpy) or any other real
    numbers.Real takes: the same results as Python's numbers, dropout's mask included, not a crash
    in Triton's launcher or a TypeError in torch's ops."""
    np = pytest.importorskip("numpy")
    skip_unless_triton_runs(backend, "cpu")
    makers = {"numpy": (np.float32, np.int64),  # no Python float, nor int
              "fraction": (lambda v: Fraction(float(np.float32(v))), int)}  # ints: Fraction is not Integral
    torch.manual_seed(0)
    python_s = list(_number_calls(lambda v: float(np.float32(v)), int))  # the same values
    torch.manual_seed(0)
    others = list(_number_calls(*makers[kind]))
    for call_python_s, call_other_s in zip(python_s, others):
        torch.manual_seed(1)
        expected = call_python_s(backend)
        torch.manual_seed(1)
        torch.testing.assert_close(call_other_s(backend), expected, rtol=0, atol=0)


def test_tensor_lists_may_be_tuples():
    ts = (torch.randn(5), torch.randn(3, 2))
    for backend in ("torch", "triton"):
        skip_unless_triton_runs(backend, "cpu")
        torch.testing.assert_close(kernels.get("grad_norm", backend)(ts), kernels.get("grad_norm", backend)(list(ts)))


def test_overlap_is_found_by_extent_and_size_one_dims_are_ignored():
    assert checks.has_overlap(torch.zeros(9).as_strided((3, 3), (2, 1)))  # rows of 3 two apart
    assert checks.has_overlap(torch.zeros(9).as_strided((3, 3), (1, 2)))
    assert not checks.has_overlap(torch.zeros(9).as_strided((3, 3), (3, 1)))
    for t in (torch.zeros(3, 1), torch.zeros(1, 3), torch.zeros(3, 1, 2), torch.zeros(4, 6)[:, :1],
              torch.zeros(4, 6)[:, :3].unsqueeze(-1), torch.zeros(0, 1).expand(0, 3)):  # (the last: no elements)
        assert not checks.has_overlap(t), (tuple(t.shape), t.stride())


def test_overlap_counts_the_whole_extent_of_the_inner_dims():
    """Each dimension must step past everything inside it: the next one's stride times its size,
    not its size alone nor its last element alone."""
    base = torch.zeros(64)
    assert checks.has_overlap(base.as_strided((3, 3, 2), (1, 5, 10)))  # (0, 2, 0) and (0, 0, 1) are both 10
    assert checks.has_overlap(base.as_strided((2, 2, 2), (1, 2, 3)))  # (1, 1, 0) and (0, 0, 1) are both 3
    assert not checks.has_overlap(base.as_strided((3, 3, 2), (1, 5, 15)))
    assert not checks.has_overlap(base.as_strided((2, 2, 2), (1, 2, 4)))


@interpreter_only
def test_adamw_takes_a_strided_parameter_with_a_size_one_dim():
    """A non-contiguous parameter (staged by the triton backend, so checked for overlap) whose
    trailing size-1 dim has stride 1, inside its rows' extent: that dim steps nowhere and must not
    read as overlapping."""
    from tests.test_adamw import HYPER, states

    p = [torch.randn(4, 6)[:, :3].unsqueeze(-1), torch.randn(3, 1)]
    g = [torch.randn_like(t) for t in p]
    out = [t.clone() for t in p]
    kernels.get("adamw", "torch")(out, g, *states(out), step=1, **HYPER)
    kernels.get("adamw", "triton")(p, g, *states(p), step=1, **HYPER)
    for ours, theirs in zip(p, out):
        torch.testing.assert_close(ours, theirs)
