"""RMSNorm and LayerNorm over the last dimension: torch reference (Triton kernels join here)."""
import torch
import torch.nn.functional as F

from .checks import check_same, check_tensor
from .registry import register


def check_norm(op: str, x, weight, bias=None) -> None:
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight, ndim=1)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight must have shape ({x.shape[-1]},) to match x's last "
                         f"dimension, got {tuple(weight.shape)}")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
        check_same(op, "shape", weight=weight, bias=bias)
        tensors["bias"] = bias
    check_same(op, "device", **tensors)


@register("rms_norm", "torch")
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_norm("rms_norm", x, weight)
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


@register("layer_norm", "torch")
def layer_norm_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    check_norm("layer_norm", x, weight, bias)
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), weight.shape, weight.float(), b, eps).to(x.dtype)
