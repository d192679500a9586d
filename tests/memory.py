"""Memory measures shared by the model and planning tests."""
import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCount(TorchDispatchMode):
    """How many times each aten op ran inside the context (e.g. the copies a step makes). Being a
    dispatch mode, it also sends the triton ops through their registered op (runtime.Op)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def saved_bytes(model, idx, context=contextlib.nullcontext()) -> tuple[int, int, torch.Tensor]:
    """What autograd saves for the backward of one training forward (idx as its own targets, no
    logits returned, as train.py calls it), each storage once, in bytes: (activations, autocast's
    bf16 copies of fp32 weights: matrices of a weight's shape or its transpose's, which is how
    matmuls save them), and the loss. Activation checkpointing's own packing is not seen: a
    checkpointed block's activations are not saved."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    fp32 = next(model.parameters()).dtype == torch.float32
    weight_shapes = {p.shape for p in model.parameters() if p.dim() == 2}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            copy = (fp32 and t.dtype == torch.bfloat16 and t.dim() == 2
                    and (t.shape in weight_shapes or t.shape[::-1] in weight_shapes))
            saved[storage.data_ptr()] = (storage.nbytes(), copy)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        loss = model(idx, idx, return_logits=False)[1]
    return (sum(n for n, copy in saved.values() if not copy), sum(n for n, copy in saved.values() if copy), loss)
