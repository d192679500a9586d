"""Choosing one backend per op for a model, once, before torch.compile."""
from collections.abc import Mapping
from dataclasses import dataclass

from .registry import OPS, get, ops

MODES = ("torch", "triton", "auto")


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def choose(kernels: str | Mapping[str, str], device_type: str) -> dict[str, Choice]:
    """op -> Choice for `kernels`: a mode in MODES, or an explicit {op: backend} mapping
    (ops it leaves out use torch)."""
    registered = ops()
    if isinstance(kernels, Mapping):
        unknown = set(kernels) - set(OPS)
        if unknown:
            raise ValueError(f"kernels: unknown ops {sorted(unknown)}; ops are {list(OPS)}")
        for op, backend in kernels.items():
            get(op, backend)  # raises a ValueError naming the op if it is not registered
        return {op: Choice(kernels.get(op, "torch"), "asked for" if op in kernels else "default")
                for op in OPS}
    if kernels not in MODES:
        raise ValueError(f"kernels must be one of {MODES} or an op -> backend mapping, got {kernels!r}")
    choices = {}
    for op in OPS:
        has_triton = "triton" in registered[op]
        if kernels == "torch":
            choices[op] = Choice("torch", "asked for")
        elif not has_triton:
            choices[op] = Choice("torch", "no triton backend yet: falls back to torch")
        elif kernels == "triton":
            choices[op] = Choice("triton", "asked for")
        elif device_type != "cuda":
            choices[op] = Choice("torch", "auto on CPU: the Triton interpreter is for tests, not speed")
        else:
            choices[op] = Choice("triton", "auto: triton backend registered (no profile for this GPU)")
    return choices
