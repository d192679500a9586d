"""Causal (or full) multi-head attention with grouped-query heads: torch reference.

q (B, H, T, D); k, v (B, Hkv, T, D) with H % Hkv == 0; scale 1/sqrt(D). The Triton kernel joins here.
"""
import torch
import torch.nn.functional as F

from .checks import check_same, check_tensor
from .registry import register


def check_attention(q, k, v, causal, dropout_p) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor("attention", name, t, ndim=4)
    check_same("attention", "dtype", q=q, k=k, v=v)
    check_same("attention", "device", q=q, k=k, v=v)
    check_same("attention", "shape", k=k, v=v)
    (B, H, T, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(f"attention: q (B, H, T, D) = {tuple(q.shape)} and k, v (B, Hkv, T, D) = "
                         f"{tuple(k.shape)} must agree on B, T and D")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"attention: q's {H} heads must be a multiple of k/v's {Hkv} heads")
    if not isinstance(causal, bool):
        raise ValueError(f"attention: causal must be a bool, got {causal!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")


@register("attention", "torch")
def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    dropout_p: float = 0.0) -> torch.Tensor:
    check_attention(q, k, v, causal, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])
