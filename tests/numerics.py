"""Error measures shared by the kernel tests.

A backend passes when its error against a float64 reference is no worse than FACTOR times the
error of torch's own implementation in the same dtype, plus a floor per dtype for results
where torch happens to be (nearly) exact.
"""
import torch

FACTOR = 2.0
# Smallest error bound per dtype: a few units of rounding of the storage type.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64 (NaN anywhere gives inf)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_as_accurate(out: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """`out` is within FACTOR of `baseline`'s error (both against the float64 `ref`)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err, base = rel_err(out, ref), rel_err(baseline, ref)
    bound = FACTOR * base + FLOOR[out.dtype]
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (torch's own error {base:.3g})"
