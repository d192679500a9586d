"""The kernel tests' own checks (tests/numerics.py) fail where they should: a check that let
everything pass would leave the kernel tests that call it proving nothing."""
import pytest
import torch

from tests import numerics
from tests.numerics import assert_as_accurate, assert_mask_is_random, assert_rounded_once

B, T, P = 4, 96, 0.25  # masks (B, T, T) keeping 3 in 4


def exactly_kept(*shape: int) -> torch.Tensor:
    """Random masks keeping exactly 1 - P of each last-dimension row: their keep fraction is
    right by construction, so a mask built of them fails only the clause it is made to fail."""
    return torch.rand(shape).argsort(-1).argsort(-1) < (1 - P) * shape[-1]


def test_independent_masks_pass():
    assert_mask_is_random(exactly_kept(B, T, T), P, "rows of exact counts")
    assert_mask_is_random(torch.rand(B, T, T) >= P, P, "bernoulli")


def test_a_mask_keeping_too_many_fails():
    with pytest.raises(AssertionError, match="lenient: keep fraction"):
        assert_mask_is_random(torch.rand(B, T, T) >= P - 0.05, P, "lenient")


def _twin_rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.repeat_interleave(2, dim=-2)  # rows 2i and 2i + 1 the same: half the pairs below equal


@pytest.mark.parametrize("pairs, mask", [
    ("below", lambda: _twin_rows(exactly_kept(B, T // 2, T))),
    ("right", lambda: _twin_rows(exactly_kept(B, T // 2, T)).transpose(-1, -2)),
    ("diagonal", lambda: _diagonal_twins()),
    ("transposed", lambda: _symmetric()),
])
def test_a_mask_with_dependent_neighbours_fails(pairs, mask):
    """Each mask breaks one kind of pair alone, keeping exactly 1 - P of its elements."""
    with pytest.raises(AssertionError, match=f"mask: {pairs} pairs both kept"):
        assert_mask_is_random(mask(), P, "mask")


def _diagonal_twins() -> torch.Tensor:
    """2 × 2 blocks [[a, b], [c, a]] of independent a, b and c: each block's diagonal pair equal."""
    a, b, c = (exactly_kept(B, T // 2, T // 2) for _ in range(3))
    mask = torch.empty(B, T, T, dtype=torch.bool)
    mask[:, 0::2, 0::2], mask[:, 0::2, 1::2], mask[:, 1::2, 0::2], mask[:, 1::2, 1::2] = a, b, c, a
    return mask


def _symmetric() -> torch.Tensor:
    """The upper triangle mirrored, its T (T + 1) / 2 elements keeping exactly 1 - P of them."""
    upper = torch.triu_indices(T, T)
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    mask[:, upper[0], upper[1]] = exactly_kept(B, upper.shape[1])
    return mask | mask.transpose(-1, -2)


def test_as_accurate_is_twice_torch_s_error():
    ref = torch.randn(1000, dtype=torch.float64)
    d = 1e-3 * torch.randn(1000, dtype=torch.float64)
    baseline = (ref + d).float()
    assert_as_accurate((ref + 1.9 * d).float(), baseline, ref, "1.9x")
    with pytest.raises(AssertionError, match="2.2x: error"):
        assert_as_accurate((ref + 2.2 * d).float(), baseline, ref, "2.2x")
    with pytest.raises(AssertionError, match=r"shape: shape \(1000, 1\) != \(1000,\)"):
        assert_as_accurate(ref.float()[:, None], ref.float(), ref, "shape")


def test_as_accurate_relative_to_the_terms_size():
    """A small result of cancelling terms of size 1: the errors are taken relative to the terms,
    with the floor of their number's roundings; never relative to less than the result itself."""
    small = 1e-5 * torch.randn(100, dtype=torch.float64)
    noise = torch.randn(100, dtype=torch.float64)
    out = (small + 2e-6 * noise / noise.norm()).float()
    with pytest.raises(AssertionError):
        assert_as_accurate(out, small.float(), small, "relative to the result")
    assert_as_accurate(out, small.float(), small, "relative to the terms", size=1.0, terms=4096)
    with pytest.raises(AssertionError, match="no terms' floor"):
        assert_as_accurate(out, small.float(), small, "no terms' floor", size=1.0)
    large = 10 * small / small.norm()
    assert_as_accurate((large + 5e-6 * noise / noise.norm()).float(), large.float(), large, "size < ||ref||",
                       size=1e-3)


def test_rounded_once_rejects_a_sum_kept_in_bf16():
    """32 terms summed in bf16: some 2.6 to 3.6 times the error of one rounding (300 seeds)."""
    x = torch.rand(32, 256).bfloat16()
    ref = x.double().sum(0)
    assert_rounded_once(ref.bfloat16(), ref, "rounded once")
    acc = torch.zeros(256, dtype=torch.bfloat16)
    for row in x:
        acc += row
    with pytest.raises(AssertionError, match="kept in bf16: error"):
        assert_rounded_once(acc, ref, "kept in bf16")


def test_accuracy_checks_are_logged_and_counted(tmp_path, monkeypatch):
    """ACCURACY_LOG (bench/gpu_session.sh's tests stage sets it): each check a line, and the
    summary counts the non-torch results that passed by the rule's floor alone."""
    log = tmp_path / "accuracy.jsonl"
    monkeypatch.setattr(numerics, "LOG", str(log))
    numerics.check(3e-3, 1e-3, torch.bfloat16, "triton op y")  # 3x torch's: the floor's doing
    numerics.check(1e-3, 1e-3, torch.bfloat16, "triton op dx")
    numerics.check(1e-3, 1e-4, torch.bfloat16, "torch op y")  # torch's own backend: not counted
    with pytest.raises(AssertionError, match="triton op dw: error 0.5 > bound"):
        numerics.check(0.5, 1e-3, torch.bfloat16, "triton op dw")
    assert numerics.summary(str(log)).startswith("accuracy: 2 of 3 checks of a non-torch backend passed by the floor")
