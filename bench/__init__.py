"""Benchmarks, hardware peaks and FLOPs accounting for tritongpt."""
import argparse
import json
import math
import os
from pathlib import Path


def described(doc: str) -> str:
    """A command's --help description: its module docstring's first paragraph (its first line
    alone cut sentences short)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; `align` one letter a column, l or r (default: the first left, the rest
    right, numbers). A | in a cell (an error's text) is escaped, not a column's end."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    escaped = [[cell.replace("|", "\\|") for cell in row] for row in rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *escaped])


def shown(value, spec: str) -> str:
    """A measured number formatted by `spec` (".1%", ".2f"), or "n/a" where there is none (an MFU
    without a known peak, a time that was not taken)."""
    return "n/a" if value is None else format(value, spec)


def positive(convert):
    """An argparse type: `convert` of the text (int, float), refused unless above 0 (a count of
    0 steps, GPUs or tokens divided by zero or planned nonsense further on)."""
    def parse(text: str):
        value = convert(text)
        # (an infinite peak planned infinite tokens/s; an int past a float's range fails isfinite)
        if not 0 < value < (2 ** 63 if isinstance(value, int) else math.inf):
            raise argparse.ArgumentTypeError(f"must be above 0 and finite, got {text}")
        return value
    parse.__name__ = convert.__name__  # argparse names the type in its "invalid int value" errors
    return parse


def not_negative(text: str) -> int:
    """An argparse type: a count that may be 0 (steps of a kind to take or not)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


not_negative.__name__ = "int"


def listed(text: str) -> list[str]:
    """An argparse type: a comma-separated list, each item once (a repeat would be measured, or
    trained, twice: minutes of a GPU session again, or two runs in one folder), empty ones
    dropped (a trailing comma), refused if that leaves none."""
    items = list(dict.fromkeys(item for item in text.split(",") if item))
    if not items:
        raise argparse.ArgumentTypeError(f"names nothing, got {text!r}")
    return items


def result_file(text: str) -> Path:
    """An argparse type: the path a benchmark writes its result to (write_json). One it could not
    write (a folder, a path under a file, in a read-only folder) is refused before the minutes of
    measuring, not after them."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: name a file")
    folder = next(p for p in path.absolute().parents if p.exists())  # the rest write_json makes
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"no folder for {text}: {folder} is a file")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text} cannot be written here")
    return path


def write_json(path: Path, data) -> None:
    """A result file, its folders made first; rewritten whole after each measurement, so that a
    run cut short keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def fill_unset(args: argparse.Namespace, settings: dict) -> None:
    """A train.py config file's settings (bench.plan.training_file) as the command's defaults:
    each one the command has an option for and its command line left unset."""
    for key, value in settings.items():
        if key in vars(args) and getattr(args, key) is None:
            setattr(args, key, value)
