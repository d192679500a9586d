"""The project's accuracy rule, shared by the tests and the start-up self-check.

A backend is as accurate as torch when its error against a float64 reference is no worse than
FACTOR times the error of torch's own implementation in the same dtype, plus a floor per dtype
for results that torch happens to get (nearly) exact: half a unit roundoff of bf16 and fp16
(2^-9, 2^-12 relative: less than one more rounding of every element), eight epsilons of fp32
(1e-6). Where the floor decides, the rule is looser than 2x torch: a result torch gets exact to
rounding (a row of one element) leaves no room for a second rounding, and fp32 sums run in
another order than torch's, whose own error in fp32 is a few units of the last place: a sum of
thousands of rows in another order can be several times that, and not wrong. A result that sums
n products whose error is taken relative to the size of its terms (a sum that cancels) has a
floor of sqrt(n) units of fp32 roundoff too: the random walk of n fp32 roundings, the natural
scale of either backend's error there. (Linear cross-entropy's d_x of one row of 7 over 4099
classes: 2x torch's error plus 1e-6 failed 6 times in 3,000 draws, ours up to 2.4 and torch's up
to 1.9 times sqrt(n) roundoffs; with the sum's floor none did, the worst at 0.60 of the bound.)
"""
import torch

FACTOR = 2.0
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2**-12, torch.bfloat16: 2**-9}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64 on out's device (no copy of a GPU-sized tensor to the
    host); inf when out is not finite. A ValueError when their shapes differ: broadcast, a
    result of the wrong shape could match."""
    if out.shape != ref.shape:
        raise ValueError(f"result of shape {tuple(out.shape)} where the reference's is {tuple(ref.shape)}")
    out, ref = out.detach().double(), ref.detach().to(out.device, torch.float64)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def bound(torch_err: float, dtype: torch.dtype, terms: int | None = None) -> float:
    """The largest error allowed of a backend whose dtype is `dtype`, when torch's is `torch_err`;
    `terms`: the products summed, for an error taken relative to their size."""
    floor = FLOOR[dtype] if terms is None else max(FLOOR[dtype], terms**0.5 * 2.0**-24)
    return FACTOR * torch_err + floor
