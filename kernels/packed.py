"""Splitting one projection's output into the views ops read, with a backward that joins their
gradients without a copy when they already lie side by side in one buffer.

torch's own split (and chunk) always concatenates the parts' gradients in backward: a read and a
write of the whole projection output's gradient. The Triton backwards of attention and SwiGLU
write their input gradients into one buffer laid out as the projection's output (d_qkv, d_h), so
that copy would only move bytes to where they already are: `split` hands the buffer on instead.
"""
import torch

from .checks import disjoint_elements


# Dynamo cannot trace the layout checks (ints from tensor methods in an autograd.Function's
# backward): it leaves the call in the graph, and AOT autograd runs it on the traced tensors, which
# keep their views' bases, so a compiled backward gets the view (an as_strided) too.
@torch._dynamo.allow_in_graph
def join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat(parts, dim), as a view when the parts are adjacent slices of one tensor along dim
    (same base, strides and other sizes, each starting where the previous one ends), and no part
    needs a gradient of its own (a double backward: autograd would link the view to the first
    part alone, and the others' second-order gradients would be lost)."""
    first = parts[0]
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return torch.cat(parts, dim)
    dim %= first.dim()
    base, stride = first._base, first.stride()
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    offset = first.storage_offset()
    for p in parts:
        if (p._base is None or p._base is not base or p.stride() != stride or p.dtype != first.dtype
                or p.shape[:dim] != first.shape[:dim] or p.shape[dim + 1:] != first.shape[dim + 1:]
                or p.storage_offset() != offset):
            return torch.cat(parts, dim)
        offset += p.shape[dim] * stride[dim]
    if not disjoint_elements(shape, stride):
        return torch.cat(parts, dim)
    return first.as_strided(shape, stride, first.storage_offset())


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, dim):
        # A gradient autograd keeps (a leaf's .grad, or retain_grad's) may be the tensor handed
        # back, which then aliases the parts' buffer: someone else's (torch.cat's backward hands
        # on views of its caller's gradient), which the next accumulation into .grad would write.
        ctx.dim, ctx.kept = dim, x.is_leaf or x.retains_grad
        return x.split(sizes, dim)

    @staticmethod
    def backward(ctx, *grads):
        return (torch.cat if ctx.kept else join)(list(grads), ctx.dim), None, None


def split(x: torch.Tensor, sizes: int | list[int], dim: int = -1) -> tuple[torch.Tensor, ...]:
    """x.split(sizes, dim) (views of x; sizes a list, or one size for every part but the last),
    whose backward is `join` instead of torch.cat."""
    return _Split.apply(x, sizes if isinstance(sizes, int) else list(sizes), dim)
