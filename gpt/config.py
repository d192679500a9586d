"""nanoGPT's configurator without exec: `[config.py] [--key=value ...]` over a dict of defaults.

A config file is plain assignments (`batch_size = 12`, `gradient_accumulation_steps = 5 * 8`,
`wandb_run_name = 'gpt2-' + '124M'`): literals, arithmetic and names assigned earlier in the same
file. Anything else (imports, calls) is refused with the line it is on, since reading a config must
never run code. Unknown keys are errors that name the key; values keep their default's type.
"""
import ast
import operator
from pathlib import Path

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}


class ConfigError(ValueError):
    pass


def _evaluate(node: ast.AST, names: dict, where: str):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_evaluate(e, names, where) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        return {_evaluate(k, names, where): _evaluate(v, names, where) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, names, where), _evaluate(node.right, names, where))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, names, where))
    raise ConfigError(f"{where}: only literals, arithmetic and earlier keys are allowed, "
                      f"not `{ast.unparse(node)}`")


def read_config_file(path: str | Path) -> dict:
    """The assignments of a config file, in order."""
    text = Path(path).read_text(encoding="utf-8")
    values: dict = {}
    for stmt in ast.parse(text, filename=str(path)).body:
        where = f"{path}:{stmt.lineno}"
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a bare string
        if not (isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets)):
            raise ConfigError(f"{where}: a config file holds only `key = value` assignments, "
                              f"not `{ast.unparse(stmt)}`")
        value = _evaluate(stmt.value, values, where)
        for target in stmt.targets:
            values[target.id] = value
    return values


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string, as nanoGPT takes --dataset=shakespeare


def _coerce(key: str, value, default, source: str):
    """`value` in the type of `default` (ints widen to floats; None defaults take anything)."""
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    raise ConfigError(f"{source}: {key} must be {type(default).__name__} like its default "
                      f"{default!r}, got {value!r}")


def parse_args(argv: list[str], defaults: dict) -> list[tuple[str, object]]:
    """The (key, value) assignments of the config files and --key=value arguments of `argv`, in
    order, each checked against `defaults`."""
    assignments = []
    for arg in argv:
        if not arg.startswith("--"):
            if not arg.endswith(".py"):
                raise ConfigError(f"expected a config file (.py) or --key=value, got {arg!r}")
            items, source = read_config_file(arg).items(), arg
        else:
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            items, source = [(key, _parse_value(text))], arg
        for key, value in items:
            if key not in defaults:
                raise ConfigError(f"{source}: unknown config key {key!r}")
            assignments.append((key, _coerce(key, value, defaults[key], source)))
    return assignments
