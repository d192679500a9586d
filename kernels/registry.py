"""The op -> backend table. Op files register implementations; the model looks them up here."""
from collections.abc import Callable

# The ops the model is built from, in the order they are listed to users.
OPS = ("rms_norm", "layer_norm", "swiglu", "rope", "attention", "cross_entropy", "linear_cross_entropy", "adamw",
       "grad_norm")

_impls: dict[str, dict[str, Callable]] = {op: {} for op in OPS}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` the `backend` implementation of `op`."""
    if op not in _impls:
        raise ValueError(f"register: unknown op {op!r}; ops are {list(OPS)}")

    def add(fn: Callable) -> Callable:
        if backend in _impls[op]:
            raise ValueError(f"register: {op!r} already has a {backend!r} backend")
        _impls[op][backend] = fn
        return fn

    return add


def ops() -> dict[str, list[str]]:
    """Each op and the backends registered for it (`torch` first)."""
    return {op: list(backends) for op, backends in _impls.items()}


def get(op: str, backend: str = "torch") -> Callable:
    """The `backend` implementation of `op`."""
    if op not in _impls:
        raise ValueError(f"unknown op {op!r}; ops are {list(OPS)}")
    if backend not in _impls[op]:
        raise ValueError(f"{op}: no {backend!r} backend; registered: {list(_impls[op])}")
    return _impls[op][backend]
