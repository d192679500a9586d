"""Benchmarks, hardware peaks and FLOPs accounting for tritongpt."""
import argparse


def described(doc: str) -> str:
    """A command's --help description: its module docstring's first paragraph (its first line
    alone cut sentences short)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def positive(convert):
    """An argparse type: `convert` of the text (int, float), refused unless above 0 (a count of
    0 steps, GPUs or tokens divided by zero or planned nonsense further on)."""
    def parse(text: str):
        value = convert(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    parse.__name__ = convert.__name__  # argparse names the type in its "invalid int value" errors
    return parse
