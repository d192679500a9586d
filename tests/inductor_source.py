"""Each Triton kernel's source as torch.compile rebuilds it: `python -m tests.inductor_source`.

Under torch.compile a triton_op's kernels are not launched as the JIT functions defined here:
Inductor writes each kernel's source into a module of its own, with what it finds the kernel uses
(torch._inductor.codegen.wrapper.user_defined_triton_kernel_transitive_closure_source_code): the
JIT functions it calls and its int, str, bool and constexpr globals, each under its bare name.
Anything else a kernel reads from its module is missing there, a module above all
(`runtime.tile(...)`): compiling fails then, on a GPU only (Triton's code generator raises
NameError; an H200 run of 2026-12-04 did, for every op under torch.compile). This builds every
kernel's source that way, imports it beside triton alone, and prints, per kernel, the globals its
functions read that the rebuilt module lacks, and bare names that stood for two different
functions (the rebuilt module keeps the first).
"""
import builtins
import dis
import importlib.util
import json
import os
import pkgutil
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the kernels as JIT functions, as Inductor takes them

from triton.runtime.jit import JITFunction  # noqa: E402

import kernels  # noqa: E402

HEADER = "import triton\nimport triton.language as tl\n"


def jit_functions() -> dict[str, JITFunction]:
    """Every JIT function defined in the kernels package, by module.name."""
    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        name = info.name
        module = importlib.import_module(f"kernels.{name}")
        for attr, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                found[f"{name}.{attr}"] = obj
    return found


def globals_read(fn) -> set[str]:
    return {i.argval for i in dis.get_instructions(fn) if i.opname == "LOAD_GLOBAL"}


def clashes(kernel: JITFunction) -> list[str]:
    """Bare names that stand for different JIT functions among those `kernel` reaches."""
    seen, problems, todo = {}, [], [kernel]
    while todo:
        fn = todo.pop()
        for name in globals_read(fn.fn):
            callee = fn.fn.__globals__.get(name)
            if not isinstance(callee, JITFunction):
                continue
            if name not in seen:
                seen[name] = callee
                todo.append(callee)
            elif seen[name] is not callee:
                problems.append(f"{name} names two functions")
    return problems


def missing(kernel: JITFunction, rebuild, where: Path) -> list[str]:
    """The globals that the functions of `kernel`'s source rebuilt by `rebuild` read and cannot find."""
    path = where / f"{kernel.fn.__name__}.py"
    path.write_text(HEADER + rebuild(kernel))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # triton.jit reads the source back from the file
    known = set(vars(module)) | set(vars(builtins))
    # The kernel's own source comes without its decorator (Inductor wraps it), the rest as JIT functions.
    functions = [getattr(fn, "fn", fn) for fn in vars(module).values()
                 if isinstance(fn, JITFunction) or getattr(fn, "__module__", None) == module.__name__]
    return sorted(f"{fn.__name__} reads {name}" for fn in functions for name in globals_read(fn) - known)


def main() -> None:
    """Prints {module.kernel: [problems]} as JSON, or null where torch has no such rebuilding."""
    try:
        from torch._inductor.codegen.wrapper import \
            user_defined_triton_kernel_transitive_closure_source_code as rebuild
    except ImportError:
        print(json.dumps(None))
        return
    with tempfile.TemporaryDirectory() as where:
        report = {name: clashes(fn) + missing(fn, rebuild, Path(where)) for name, fn in jit_functions().items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
