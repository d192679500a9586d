"""Argument checks shared by every op: bad input is a ValueError naming the op, never a crash."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(op: str, name: str, t, dtypes=FLOAT_DTYPES, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
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


def check_dropout(op: str, dropout_p) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
