"""Error measures shared by the kernel tests: the project's accuracy rule (kernels/accuracy.py).

With ACCURACY_LOG set to a file, every check is appended to it as a JSON line, and
`python -m tests.numerics FILE` says how many passed by the rule's floor alone (an error over
FACTOR times torch's): how far "as accurate as torch" is the floor's doing on this machine.
"""
import json
import os
import sys

import torch

from kernels.accuracy import FACTOR, bound, rel_err  # noqa: F401  (rel_err: the tests import it from here)

LOG = os.environ.get("ACCURACY_LOG")


def check(err: float, base: float, dtype: torch.dtype, what: str, terms: int | None = None) -> None:
    """err within the accuracy rule of torch's own error `base` (kernels.accuracy.bound),
    logged to ACCURACY_LOG if set."""
    limit = bound(base, dtype, terms)
    if LOG:
        with open(LOG, "a") as f:  # one short line a write: parts of the suite may append at once
            f.write(json.dumps(dict(what=what, dtype=str(dtype).removeprefix("torch."), err=err, torch=base,
                                    bound=limit)) + "\n")
    assert err <= limit, f"{what}: error {err:.3g} > bound {limit:.3g} (torch's own error {base:.3g})"


def assert_as_accurate(out: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, what: str,
                       size: float | None = None, terms: int | None = None) -> None:
    """`out` is within the accuracy rule of `baseline`'s error (both against the float64 `ref`).
    `size`: for a result that cancelling terms of this size add up to, the errors are taken
    relative to it (at least ||ref||) rather than to the small result; `terms`: how many it sums
    (the rule's floor for such sums)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if size is None:
        check(rel_err(out, ref), rel_err(baseline, ref), out.dtype, what)
        return
    size = max(ref.norm().item(), size)
    err, own = ((t.double() - ref).norm().item() / size for t in (out, baseline))
    check(err, own, out.dtype, f"{what} (error of the terms' size)", terms)


def assert_rounded_once(out: torch.Tensor, ref: torch.Tensor, what: str, within: float = 1.5) -> None:
    """A 16-bit `out` is the exact `ref` rounded once to its dtype: its error is that of the rounding
    alone, within a factor `within`. A long reduction summed in fp32 is within 1.5x; sums kept in 16
    bits add a rounding a term. Where torch's own sum is kept in 16 bits (CPU's bf16 LayerNorm
    weight gradient, 8x the rounding's error), the accuracy rule against torch cannot tell. An
    elementwise op computed in fp32 is within a few percent: two roundings in 16 bits are 1.2x to
    1.5x, which that rule cannot tell either."""
    err, rounding = rel_err(out, ref), rel_err(ref.to(out.dtype), ref)
    assert err <= within * rounding, (f"{what}: error {err:.3g}, {err / rounding:.2f}x that of rounding the "
                                      f"exact result once")


def summary(path: str) -> str:
    with open(path) as f:
        rows = [r for r in map(json.loads, f) if not r["what"].startswith("torch ")]  # other backends'
    by_floor = [r for r in rows if r["err"] > FACTOR * r["torch"]]
    worst = max(by_floor, key=lambda r: r["err"] / max(r["torch"], 1e-300), default=None)
    text = (f"accuracy: {len(by_floor)} of {len(rows)} checks of a non-torch backend passed by the floor alone "
            f"(over {FACTOR:g}x torch's error)")
    if worst:
        text += f"; the most: {worst['what']} ({worst['err']:.3g}, torch {worst['torch']:.3g})"
    return text


def assert_mask_is_random(keep: torch.Tensor, p: float, what: str) -> None:
    """A dropout mask (last two dims: rows and columns) keeps each element with probability 1 - p,
    and neighbours (right, below, diagonal) and the transposed element independently of each
    other: the kept fraction within 6 standard deviations of its expectation (a fresh mask each
    run: 5 failed about once in 2 million), each pair's within 5 of a spread taken as twice that
    of independent pairs (pairs that share an element are not independent draws: their variance
    is 1 + 2q/(1+q) times that, for q = 1 - p)."""
    keep = keep.double()
    q = 1 - p
    n = keep.numel()
    assert abs(keep.mean().item() - q) < 6 * (p * q / n) ** 0.5, f"{what}: keep fraction {keep.mean().item():.4f}"
    T = min(keep.shape[-2:])
    square = keep[..., :T, :T]
    off_diagonal = ~torch.eye(T, dtype=torch.bool, device=keep.device)
    pairs = {"right": keep[..., :, :-1] * keep[..., :, 1:], "below": keep[..., :-1, :] * keep[..., 1:, :],
             "diagonal": keep[..., :-1, :-1] * keep[..., 1:, 1:],
             "transposed": (square * square.transpose(-1, -2))[..., off_diagonal]}
    for name, both in pairs.items():
        sigma = 2 * (q * q * (1 - q * q) / both.numel()) ** 0.5
        assert abs(both.mean().item() - q * q) < 5 * sigma, f"{what}: {name} pairs both kept {both.mean().item():.4f}"


if __name__ == "__main__":
    print(summary(sys.argv[1]))
