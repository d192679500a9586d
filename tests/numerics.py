"""Error measures shared by the kernel tests: the project's accuracy rule (kernels/accuracy.py)."""
import torch

from kernels.accuracy import bound, rel_err  # noqa: F401  (rel_err: the tests import it from here)


def assert_as_accurate(out: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """`out` is within the accuracy rule of `baseline`'s error (both against the float64 `ref`)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err, base = rel_err(out, ref), rel_err(baseline, ref)
    limit = bound(base, out.dtype)
    assert err <= limit, f"{what}: error {err:.3g} > bound {limit:.3g} (torch's own error {base:.3g})"
