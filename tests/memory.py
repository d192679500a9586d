"""Memory measures shared by the model and planning tests."""
import collections
import contextlib
import ctypes
import threading
import time

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


def rows_taken(monkeypatch) -> list[tuple[int, int]]:
    """(address given, address of the rows made) of each runtime.as_rows call from here on: a
    tensor read in place where both are its own."""
    from kernels import runtime
    taken, as_rows = [], runtime.as_rows

    def spied(t):
        rows = as_rows(t)
        taken.append((t.data_ptr(), rows.data_ptr()))
        return rows
    monkeypatch.setattr(runtime, "as_rows", spied)
    return taken


def saved_bytes(model, idx, context=contextlib.nullcontext()) -> tuple[int, int, torch.Tensor]:
    """What autograd saves for the backward of one training forward (idx as its own targets, no
    logits returned, as train.py calls it), each storage once, in bytes: (activations, autocast's
    bf16 copies of fp32 weights: matrices of a weight's shape or its transpose's, which is how
    matmuls save them), and the loss. Of a checkpointed block only its inputs are saved (by the
    checkpoint); its activations are not."""
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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_in_use():
    """glibc's bytes in use (heap and mmapped blocks: torch's CPU tensors), or None off glibc 2.33+."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())


class _SampleAfterEachOp(TorchDispatchMode):
    def __init__(self, sample):
        super().__init__()
        self.sample = sample

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sample()
        return out


def peak_malloc_mib(fn) -> float | None:
    """MiB that `fn()` has allocated at its peak beyond what was in use before it, on CPU, by
    glibc's count: read after every aten op `fn` dispatches (where a sequence of ops peaks: its
    outputs made, its inputs not yet freed) and, for what runs inside an op (a custom op's own
    ops, an interpreted kernel), every half millisecond by a second thread. None where glibc
    cannot say."""
    in_use = _malloc_in_use()
    if in_use is None:
        return None
    before, peak, done, lock = in_use(), [0], threading.Event(), threading.Lock()

    def sample():  # a reading taken before another thread's may land after it: it must not lower the peak
        reading = in_use()
        with lock:
            peak[0] = max(peak[0], reading)

    def sample_until_done():
        while not done.is_set():
            sample()
            time.sleep(0.0005)
    sampler = threading.Thread(target=sample_until_done)
    sampler.start()
    try:
        with _SampleAfterEachOp(sample):
            fn()
    finally:
        done.set()
        sampler.join()
    sample()
    return (peak[0] - before) / 2**20
