"""The op -> backend table. Op files register implementations; the model looks them up here."""
from collections.abc import Callable

# The ops the model is built from, in the order they are listed to users.
OPS = ("rms_norm", "layer_norm", "swiglu", "rope", "attention", "cross_entropy", "linear_cross_entropy", "adamw",
       "grad_norm")

_impls: dict[str, dict[str, Callable]] = {op: {} for op in OPS}

# Names that mean something else where backends are named: `auto`, a mode of kernels.choose
# ({op: "auto"} would read as it); `compile`, what bench.kernels calls torch.compile of the torch
# backend in a profile (a backend so named would be chosen on that one's timing).
RESERVED = ("auto", "compile")


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: make `fn` the `backend` implementation of `op` (the torch backend's signature
    and semantics; docs/kernels.md, "Adding a backend")."""
    if op not in _impls:
        raise ValueError(f"register: unknown op {op!r}; ops are {list(OPS)}")
    if not isinstance(backend, str) or not backend.isidentifier() or backend in RESERVED:
        raise ValueError(f"register: {op}'s backend needs a name such as 'triton' (a Python identifier, not "
                         f"{' or '.join(map(repr, RESERVED))}), got {backend!r}")

    def add(fn: Callable) -> Callable:
        if not callable(fn):
            raise ValueError(f"register: {op}'s {backend!r} backend must be callable, got {type(fn).__name__}")
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
