"""Argument checks shared by every op: bad input is a ValueError naming the op, never a crash."""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = FLOAT_DTYPES[:3]  # what the Triton kernels compute in (a GPU's tl.dot has no fp64)


def dtype_name(dtype) -> str:
    """'bfloat16' of torch.bfloat16: the name a config, a message or a result file gives it."""
    return str(dtype).removeprefix("torch.")


def dtype_names(dtypes) -> str:
    return ", ".join(map(dtype_name, dtypes))


def check_tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a dense tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must be one of ({dtype_names(dtypes)}), got {dtype_names([t.dtype])}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same(op: str, attr: str, **tensors: torch.Tensor) -> None:
    """All `tensors` agree on `attr` ("device", "dtype" or "shape")."""
    values = {name: getattr(t, attr) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{n} {tuple(v) if attr == 'shape' else v}" for n, v in values.items())
        raise ValueError(f"{op}: {', '.join(values)} must have the same {attr}; got {listed}")


def check_number(op: str, name: str, value, lo: float = -math.inf, hi: float = math.inf,
                 integer: bool = False) -> None:
    """`value` a Python number (an int if `integer`, in int64's range) in [lo, hi). Not a tensor:
    that would cost a host sync, or reach a kernel as a pointer. torch.compile's symbolic numbers
    pass. Other integral types (numpy's) pass too: a kernel takes int(value)."""
    kinds = (numbers.Integral, torch.SymInt) if integer else (numbers.Real, torch.SymFloat, torch.SymInt)
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ValueError(f"{op}: {name} must be a Python {'int' if integer else 'number'}, got "
                         f"{type(value).__name__}")
    if integer and not -2**63 <= value < 2**63:
        raise ValueError(f"{op}: {name} must fit in int64, got {value}")
    if not lo <= value < hi:
        raise ValueError(f"{op}: {name} must be in [{lo:g}, {hi:g}), got {value}")


def check_dropout(op: str, dropout_p) -> None:
    check_number(op, "dropout_p", dropout_p, 0.0, 1.0)


def check_list(op: str, name: str, tensors) -> None:
    """A list or tuple: the ops index their tensor lists (a generator would be used up)."""
    if not isinstance(tensors, (list, tuple)):
        raise ValueError(f"{op}: {name} must be a list or tuple of tensors, got {type(tensors).__name__}")


def disjoint_elements(shape, stride) -> bool:
    """Whether no two elements of a view with `shape` and `stride` share an address: sorted by
    stride, each dimension steps past the whole extent of the ones inside it (sufficient: a rare
    interleaving that happens not to collide is taken as overlapping)."""
    if 0 in shape:  # no elements to share
        return True
    extent = 1
    for size, step in sorted((d for d in zip(shape, stride) if d[0] > 1), key=lambda d: d[1]):
        if step < extent:
            return False
        extent = step * size
    return True


def has_overlap(t: torch.Tensor) -> bool:
    """Some element of `t` is another's too (an expanded view, or strides inside another
    dimension's extent): an in-place write would race, or land more than once."""
    return not disjoint_elements(t.shape, t.stride())
