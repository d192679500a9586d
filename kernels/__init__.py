"""tritongpt's kernel registry: each op the model uses, with a `torch` reference backend and the
hand-written Triton backends that replace it.

    kernels.ops()                      # {"rms_norm": ["torch", "triton"], ...}
    kernels.get("rms_norm", "triton")  # the implementation, with the op's signature
    kernels.choose("auto", "cuda")     # op -> Choice(backend, reason) for a model
    kernels.split(h, sizes, dim)       # h.split's views, their gradients joined without a copy
                                       # where the Triton backwards leave them side by side
"""
from . import runtime  # noqa: F401  (first: switches Triton to its interpreter on CPU-only machines)
from . import adamw, attention, cross_entropy, norm, rope, swiglu  # noqa: F401  (each registers its backends)
from .registry import OPS, get, ops, register
from .select import MODES, Choice, agreed, check_request, choose
from .packed import split

__all__ = ["OPS", "MODES", "Choice", "agreed", "check_request", "choose", "get", "ops", "register", "split"]
