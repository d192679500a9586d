"""nanoGPT's configurator without exec: `[config.py] [--key=value ...]` over a dict of defaults.

A config file is plain assignments (`batch_size = 12`, `gradient_accumulation_steps = 5 * 8`,
`wandb_run_name = 'gpt2-' + '124M'`, `beta1, beta2 = 0.9, 0.95`, `max_iters *= 2`): literals,
arithmetic, comparisons and `and`/`or`/`not`, `x if c else y`, f-strings, keys already set (the
defaults, earlier files and arguments, earlier lines), and the few calls nanoGPT's own configs
make (`import time` and `str(time.time())` in finetune_shakespeare.py; see _CALLS). Anything else
(other imports and calls, statements) is refused with the line it is on, since reading a config
must never run arbitrary code; an expression that fails (a division by zero, 'a' + 1) is an
error naming its line. Unknown keys are errors that name the key; values keep their default's
type (or a second type a key is given: train.py's recompute is True, False or a number of
blocks), a whole-number float taken by an int key (`max_iters = 5e3`, which nanoGPT's exec
takes as it is).
"""
import ast
import copy
import difflib
import math
import operator
import os
import re
import stat
import sys
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

# A config's values are numbers of a few digits and short strings: a larger one is a mistake, and
# `10 ** 10 ** 10` or `'a' * 10 ** 10` would take the machine's memory for hours before saying so.
# Every value an expression makes is held to them (_bounded), so that no line can build on the one
# before past them (`s += s`, line after line), and no text made of a value (str(), an f-string)
# can be more than a few times MAX_LENGTH; the values one line makes, all told, to LINE_LENGTH (an
# f-string of many wide fields, a list of many long strings: each part within the limit); what
# would be past them from the start is refused before it is made.
MAX_BITS, MAX_LENGTH = 4096, 1 << 20
LINE_LENGTH = 4 * MAX_LENGTH


def _length(value, limit: int = MAX_LENGTH) -> int:
    """About the characters `value` takes written out: a string's, an int's digits (a third of
    its bits, at least), one a float or other scalar, a container's items' plus one each. Counted
    no further than just past `limit` (the same items may stand many times over in a list)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    if isinstance(value, dict):
        value = (*value.keys(), *value.values())
    if not isinstance(value, (list, tuple)):
        return 1
    total = len(value)
    for item in value:
        if total > limit:
            break
        total += _length(item, limit - total)
    return total


def _bounded(value) -> int:
    """`value`'s _length, or an OverflowError if it is past a config's limits."""
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise OverflowError(f"the result would have over {MAX_BITS} bits")
    length = _length(value)
    if length > MAX_LENGTH:
        raise OverflowError(f"the result would be over {MAX_LENGTH} long")
    return length


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent * (abs(base).bit_length() - 1) > MAX_BITS:
        raise OverflowError(f"the result would have over {MAX_BITS} bits")
    return base ** exponent


def _times(a, b, multiply=operator.mul):
    times, sequence = (a, b) if isinstance(a, int) else (b, a)
    sized = isinstance(sequence, (str, bytes, list, tuple)) and isinstance(times, int)
    if sized and _length(sequence) * times > MAX_LENGTH:
        raise OverflowError(f"the result would be over {MAX_LENGTH} long")
    return multiply(a, b)


def _round(number, ndigits=None):
    """round(); an int rounded to -n digits computes 10 ** n: n held to the limit on bits."""
    if isinstance(ndigits, int) and ndigits < -MAX_BITS:
        raise OverflowError(f"round's ndigits must be within {MAX_BITS}, got {ndigits}")
    return round(number, ndigits)


def _check_widths(numbers: list[str]) -> None:
    """Widths and precisions of a format (`{0:>1000000000}`, `'%.1000000000f' % x`), refused past
    MAX_LENGTH before the text is made."""
    if any(len(digits) > 7 or int(digits) > MAX_LENGTH for digits in numbers):
        raise OverflowError(f"the result would be over {MAX_LENGTH} long")


def _formatted(convert, value, spec: str) -> str:
    """An f-string's field."""
    _check_widths(re.findall(r"\d+", spec))  # any decimal digits, as format reads them
    return convert(value, spec)


# A printf-style conversion's width and precision (none for `%%`, a % sign); a width or precision
# `*` is taken from the values (`'%*d' % (10 ** 9, 1)`), where the limit cannot see it first: refused.
_PRINTF = re.compile(r"%%|%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?")


def _modulo(a, b):
    """a % b; for a string or bytes, printf-style formatting, its widths held to the limit."""
    if isinstance(a, (str, bytes)):
        text = a.decode("latin-1") if isinstance(a, bytes) else a
        numbers = [n for conversion in _PRINTF.findall(text) for n in conversion if n]
        if "*" in numbers:
            raise ValueError("a printf-style width or precision of `*` is not taken in a config: write it in")
        _check_widths(numbers)
    return a % b


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _times, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: _modulo, ast.Pow: _power}
# `a += b` and `a *= b` as Python's: a list changed in place, seen through every key holding it
# (`b = a` before), and extended by any sequence.
_IN_PLACE = {ast.Add: operator.iadd, ast.Mult: lambda a, b: _times(a, b, operator.imul)}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_CONVERSIONS = {-1: format, ord("s"): lambda v, spec: format(str(v), spec),
                ord("r"): lambda v, spec: format(repr(v), spec), ord("a"): lambda v, spec: format(ascii(v), spec)}
# The functions a config may call, by the name it calls them; "module.name" ones need `import module`.
_CALLS = {"str": str, "int": int, "float": float, "round": _round, "min": min, "max": max, "abs": abs,
          "time.time": time.time, "math.sqrt": math.sqrt, "math.ceil": math.ceil, "math.floor": math.floor}
_MODULES = {name.partition(".")[0] for name in _CALLS if "." in name}
# difflib's similarity at and above which an unknown key is taken for a misspelling of a known one
MISSPELT = 0.75
DTYPES = ("float32", "bfloat16", "float16")  # the `dtype` values train.py and gpt.sample take
OPTIMIZERS = ("adamw", "bf16_adamw")  # train.py's `optimizer`: torch's AdamW, or gpt.optim.BF16AdamW
# torch.compile's modes (torch._inductor.list_mode_options(), torch 2.11 to 2.13): train.py's
# `compile_mode`. "reduce-overhead" replays the compiled graphs as CUDA graphs, so a step's many
# short kernels cost the host no launch each.
COMPILE_MODES = ("default", "lite", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes that take CUDA graphs: a replay overwrites the last one's outputs, the grads among them.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# The keys both programs take with a second type (parse_args' `also`): device and dtype, whose
# default None means "chosen for this machine", and kernels, a mode or an {op: backend} mapping.
RUN_KEYS = {"device": str, "dtype": str, "kernels": dict}


def training_dtype(device: str) -> str:
    """train.py's dtype on `device` when none is given: gpu_dtype's on a GPU, fp32 on a CPU."""
    import torch  # on use: reading a config needs no torch

    if not device.startswith("cuda"):
        return "float32"
    return gpu_dtype(torch.cuda.get_device_capability(device))


def gpu_dtype(capability: tuple[int, int]) -> str:
    """train.py's dtype on a GPU of compute capability `capability` (the benchmarks' too): bf16
    where its tensor cores do it (Ampere on; not where torch would emulate it), else fp16."""
    return "bfloat16" if tuple(capability) >= (8, 0) else "float16"


class ConfigError(ValueError):
    pass


def check_seed(seed: int) -> None:
    """train.py's and gpt.sample's seed, one range for both: torch's generators take 64 bits,
    BF16AdamW's rounding seed none below 0."""
    if not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be in [0, 2**63), got {seed}")


def optimizer_dtype(optimizer: str, dtype: str | None) -> str | None:
    """The dtype a run of `optimizer` trains in, `dtype` asked: bf16_adamw's weights and moments
    are bf16, so it trains in bfloat16 whatever else was asked, float16 excepted (refused: a
    float16 run needs fp32 master weights for its loss scale)."""
    if optimizer != "bf16_adamw":
        return dtype
    if dtype == "float16":
        raise ConfigError("optimizer=bf16_adamw trains in bfloat16, and dtype is float16 (set so, or the default "
                          "on a GPU without native bfloat16); set dtype=bfloat16")
    return "bfloat16"


def check_device(device: str) -> None:
    """train.py's and gpt.sample's `device`: one this machine has, else a ConfigError (torch's own
    messages for one it lacks are tracebacks from deep in the set-up, an assertion, a missing
    attribute, or a checkpoint that seems corrupt)."""
    import torch  # on use, as training_dtype

    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r} is not a device: {e}") from None
    if d.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r}: a model trains and samples on cpu, cuda or mps")
    if d.type == "cpu" and d.index is not None:  # torch.load cannot map a checkpoint to cpu:0
        raise ConfigError(f"device {device!r}: the CPU is 'cpu'")
    count = {"cuda": torch.cuda.device_count, "mps": lambda: int(torch.backends.mps.is_available())}.get(d.type)
    if count and (d.index or 0) >= count():
        raise ConfigError(f"device {device!r}: this machine has {count()} {d.type} device(s)")


def make_current(device: str) -> None:
    """An indexed CUDA device (cuda:1) becomes the current one: the kernels' profile and
    self-checks are the current device's, as are torch.cuda's answers asked of no device."""
    import torch  # on use, as training_dtype

    d = torch.device(device)
    if d.type == "cuda" and d.index is not None:
        torch.cuda.set_device(device)


def printed_help(argv: list[str], doc: str, defaults: dict) -> bool:
    """Whether `argv` asks for -h/--help; if so, help_text is printed."""
    if not any(arg in ("-h", "--help") for arg in argv):
        return False
    with quiet_when_the_reader_leaves():
        print(help_text(doc, defaults))
    return True


def help_text(doc: str, defaults: dict) -> str:
    """A program's --help: its docstring, then every key it takes with its default."""
    pairs = [f"{key}={value!r}" for key, value in defaults.items()]
    lines, line = [], ""
    for pair in pairs:
        if line and len(line) + 2 + len(pair) > 98:
            lines.append(line)
            line = ""
        line = f"{line}  {pair}" if line else pair
    keys = "\n".join("  " + line for line in [*lines, line])
    return (f"{doc.strip()}\n\nConfig files hold plain `key = value` assignments, applied in order, then\n"
            f"--key=value arguments. The keys, with their defaults (docs/training.md says what they do):\n{keys}")


@contextmanager
def quiet_when_the_reader_leaves():
    """Printing to a reader that stops early (`| head`) ends the program quietly, as a shell tool
    ends, not in a BrokenPipeError traceback: around the prints alone, so that a broken socket's
    error is still told. What is left to flush goes nowhere."""
    try:
        yield
        sys.stdout.flush()  # the reader may have gone with the last lines still buffered
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise SystemExit(1) from None


@contextmanager
def reported(program: str, context: str = "", errors: tuple[type[Exception], ...] = (OSError, ValueError)):
    """A user's mistake, raised as one of `errors` that names it (by default a ValueError or
    OSError: ConfigError is one), ends `program` with that message instead of a traceback."""
    try:
        yield
    except errors as e:
        raise SystemExit(f"{program}: {context}{e}") from None


def _evaluate(node: ast.AST, names: dict, modules: set, where: str, made: list[int]):
    """The value of expression `node`, held to the limits as each part is made: itself to
    _bounded's, and with the values its line has `made` (a running count) to LINE_LENGTH."""
    result = _value(node, names, modules, where, made)
    made[0] += _bounded(result)
    if made[0] > LINE_LENGTH:
        raise OverflowError(f"the line's values would be over {LINE_LENGTH} long in all")
    return result


def _value(node: ast.AST, names: dict, modules: set, where: str, made: list[int]):
    def value(n):
        return _evaluate(n, names, modules, where, made)

    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [value(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict) and None not in node.keys:  # (None: a ** unpacking)
        return {value(k): value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ConfigError(f"{where}: `{node.id}` is not a key set before this line")
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](value(node.left), value(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](value(node.operand))
    if isinstance(node, ast.Compare):
        left = value(node.left)
        for op, right in zip(node.ops, map(value, node.comparators)):
            if isinstance(op, (ast.Is, ast.IsNot)) and not {type(left), type(right)} & {type(None), bool}:
                # Python's answer for other values depends on how its compiler shared constants
                raise ConfigError(f"{where}: `is` compares identity, which only None, True and False have "
                                  f"here: use == in `{ast.unparse(node)}`")
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):  # `and`/`or`, short-circuit: the value Python's would be
        for operand in node.values:
            result = value(operand)
            if bool(result) == isinstance(node.op, ast.Or):
                return result
        return result
    if isinstance(node, ast.IfExp):
        return value(node.body) if value(node.test) else value(node.orelse)
    if isinstance(node, ast.JoinedStr):
        return "".join(value(part) for part in node.values)
    if isinstance(node, ast.FormattedValue):
        spec = value(node.format_spec) if node.format_spec else ""
        return _formatted(_CONVERSIONS[node.conversion], value(node.value), spec)
    if isinstance(node, ast.Call) and not node.keywords:
        name = ast.unparse(node.func)
        first = name.partition(".")[0]
        if first in names:
            raise ConfigError(f"{where}: `{first}` is a key set before this line, not what `{ast.unparse(node)}` calls")
        if name in _CALLS and ("." not in name or first in modules):
            return _CALLS[name](*[value(a) for a in node.args])
    raise ConfigError(f"{where}: only literals, arithmetic, earlier keys and the calls {sorted(_CALLS)} "
                      f"are allowed, not `{ast.unparse(node)}`")


def _read_text(path: str | Path) -> str:
    """A config file's text; refused unless a regular file: a FIFO (its open waits for a writer)
    or a link to /dev/zero (read until the memory is gone) named as a config hung train.py."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ConfigError(f"{path}: not a regular file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def read_config_file(path: str | Path, known: dict | None = None, implied=None) -> list[tuple[str, object, str]]:
    """The assignments of a config file, in order, as (key, value, "path:line"); its expressions
    may use the keys of `known` (the config so far, as nanoGPT's exec of a config sees train.py's
    globals). `implied(key, value)`: the keys an assignment sets with it (a preset's
    architecture), seen by the lines after it."""
    text = _read_text(path)
    scope = {key: copy.copy(value) for key, value in (known or {}).items()}  # a caller's list is not the `+=`'s
    values: list = []
    modules: set = set()
    try:
        body = ast.parse(text, filename=str(path)).body
    except SyntaxError as e:  # (a NUL byte's has no line)
        raise ConfigError(f"{path}{'' if e.lineno is None else f':{e.lineno}'}: not Python: {e.msg}") from None
    except (RecursionError, MemoryError):  # nested past the parser's stack
        raise ConfigError(f"{path}: nested too deeply to read") from None
    for stmt in body:
        where = f"{path}:{stmt.lineno}"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare string
        if isinstance(stmt, ast.Import) and all(a.name in _MODULES and a.asname is None for a in stmt.names):
            modules.update(a.name for a in stmt.names)
            continue
        try:
            assigned = _assignments(stmt, scope, modules, where)
        except ConfigError:
            raise
        except RecursionError:  # (unparsing it would recurse as deep)
            raise ConfigError(f"{where}: nested too deeply to read") from None
        except (ArithmeticError, TypeError, ValueError, AttributeError, KeyError, IndexError, MemoryError) as e:
            raise ConfigError(f"{where}: `{ast.unparse(stmt)}` fails: {type(e).__name__}: {e}") from None
        for key, value in assigned:
            for also_key, also in [(key, value), *_implied(implied, key, value, where)]:
                scope[also_key] = also
                values.append((also_key, also, where))
    return values


def _implied(implied, key: str, value, source: str) -> list[tuple[str, object]]:
    """implied(key, value)'s assignments (none without `implied`), its errors naming `source`."""
    try:
        return list(implied(key, value).items()) if implied else []
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _assignments(stmt: ast.stmt, scope: dict, modules: set, where: str) -> list[tuple[str, object]]:
    """The (key, value) pairs a config statement assigns: `a = b = v`, `a, b = v, w`, `a += v`,
    `a: t = v` (the annotation unread, as exec stores it aside; `a: t` alone assigns nothing)."""
    def names(target) -> list[str] | str | None:
        if isinstance(target, ast.Name):
            return target.id
        if isinstance(target, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Name) for e in target.elts):
            return [e.id for e in target.elts]
        return None

    made = [0]
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.target, ast.Name) and type(stmt.op) in _BINARY:
        if stmt.target.id not in scope:
            raise ConfigError(f"{where}: {stmt.target.id} is not set before `{ast.unparse(stmt)}`")
        operation = _IN_PLACE.get(type(stmt.op), _BINARY[type(stmt.op)])
        value = operation(scope[stmt.target.id], _evaluate(stmt.value, scope, modules, where, made))
        _bounded(value)
        return [(stmt.target.id, value)]
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        if stmt.value is None:
            return []
        stmt = ast.Assign(targets=[stmt.target], value=stmt.value)
    targets = [names(t) for t in stmt.targets] if isinstance(stmt, ast.Assign) else [None]
    if None in targets:
        raise ConfigError(f"{where}: a config file holds only `key = value` assignments "
                          f"(and `import {', '.join(sorted(_MODULES))}`), not `{ast.unparse(stmt)}`")
    value = _evaluate(stmt.value, scope, modules, where, made)
    pairs = []
    for target in targets:
        if isinstance(target, str):
            pairs.append((target, value))
        elif isinstance(value, (tuple, list)) and len(value) == len(target):
            pairs += zip(target, value)
        else:
            raise ConfigError(f"{where}: {len(target)} keys, but the value is {value!r}")
    return pairs


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # ({[1]: 2}, ------1)
        return text  # a bare string, as nanoGPT takes --dataset=shakespeare


def _coerce(key: str, value, default, source: str, also: type | None = None):
    """`value` in the type of `default` or `also` (ints widen to floats). A None default takes
    None or a value of `also` (anything, where `also` does not say); another key takes None only
    where `also` is type(None)."""
    if type(value) is int and abs(value) > sys.float_info.max:  # (float() and math.isfinite raise on it)
        raise ConfigError(f"{source}: {key} must be a number a float can hold, got an integer of "
                          f"{value.bit_length()} bits")
    if default is None and (also is None or value is None):
        return value
    if type(value) in (type(default), also):
        return value
    if float in (type(default), also) and type(value) is int:
        return float(value)
    if int in (type(default), also) and type(value) is float and value.is_integer():
        return int(value)  # max_iters = 5e3
    if default is None:
        raise ConfigError(f"{source}: {key} must be {also.__name__} or None, got {value!r}")
    types = type(default).__name__ + (f" or {also.__name__}" if also else "")
    raise ConfigError(f"{source}: {key} must be {types} like its default {default!r}, got {value!r}")


def parse_args(argv: list[str], defaults: dict, also: dict[str, type] | None = None,
               implied=None, files_set_others: bool = False, files_skip: Mapping[str, str] | None = None
               ) -> list[tuple[str, object]]:
    """The (key, value) assignments of the config files and --key=value arguments of `argv`, in
    order, each checked against `defaults`; `also` names the keys that take a second type;
    `implied(key, value)` gives the keys an assignment sets with it, right after it (a preset's
    architecture: the keys after it, and a config file's expressions after it, see its values).
    files_set_others: a config file's keys outside `defaults` are passed over (a training config
    read for its out_dir, as nanoGPT's sample.py execs one), where otherwise they are an error;
    files_skip: keys a config file sets that are passed over too, each with why (a training
    config's init_from, where its run started, is not the checkpoint it wrote): said on stderr."""
    assignments, current = [], dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise ConfigError(f"expected a config file (.py) or --key=value, got {arg!r}")
            items = read_config_file(arg, current, implied)
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            value = _parse_value(text)
            if isinstance(defaults.get(key), str) and not isinstance(value, (str, (also or {}).get(key, str))):
                value = text  # a string key takes the text as typed: --wandb_run_name=2024, --start=1984
            items = [(key, value, arg), *((k, v, arg) for k, v in _implied(implied, key, value, arg))]
        for key, value, source in items:
            if key in (files_skip or {}) and not arg.startswith("--"):
                print(f"{source}: {key} = {value!r} passed over: {files_skip[key]}", file=sys.stderr)
                continue
            if key not in defaults:
                # A key close to a known one is a typo (temprature), even where a file's other
                # keys are passed over: none of train.py's keys is that close to gpt.sample's.
                near = difflib.get_close_matches(key, defaults, n=1, cutoff=MISSPELT)
                if files_set_others and not arg.startswith("--") and not near:
                    continue
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
            current[key] = _coerce(key, value, defaults[key], source, (also or {}).get(key))
            assignments.append((key, current[key]))
    return assignments
