"""SwiGLU gating, silu(gate) * up: torch reference (the Triton kernel joins here)."""
import torch
import torch.nn.functional as F

from .checks import check_same, check_tensor
from .registry import register


def check_swiglu(gate, up) -> None:
    check_tensor("swiglu", "gate", gate)
    check_tensor("swiglu", "up", up)
    check_same("swiglu", "shape", gate=gate, up=up)
    check_same("swiglu", "dtype", gate=gate, up=up)
    check_same("swiglu", "device", gate=gate, up=up)


@register("swiglu", "torch")
def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_swiglu(gate, up)
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
