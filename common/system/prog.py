"""What a command's usage and errors show: the program name, the console script's (``c2f-pretrain``) when it was
launched as one, else the command that runs it from a checkout (``pretrain/run.py``, ``python -m ...``); and the
whole numbers its options take (:func:`whole_number`, :func:`whole_numbers` for a comma-separated list), said the
same way by every command; and the one line of an ``error:`` (:func:`error_line`)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

__all__ = ["prog", "whole_number", "whole_numbers", "error_line", "DEVICE_HELP"]

# the --device option of the commands that run a model outside training (common.cli.command_device reads it)
DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available, its first device)"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # C0, DEL, C1 and the Unicode line separators


def error_line(message: str) -> str:
    """``message`` as one line: a newline or another control character in it (a value or a path as the user wrote
    it) is written as its escape (``\\n``), so that an ``error:`` line stays one line that a log search finds."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)


def prog(default: str) -> str:
    """``c2f-NAME`` when the process runs that console script, else ``default``."""
    name = Path(sys.argv[0] if sys.argv and sys.argv[0] else "").name
    return name if name.startswith("c2f-") else default


def whole_number(least: int, said: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``least``; text that is not one, or a number below ``least``, is
    refused as ``a whole number <said>, got '<text>'`` (argparse puts the option before it)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"a whole number {said}, got {text!r}")
        return value

    return parse


def whole_numbers(least: int, said: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated whole numbers, each >= ``least`` (``4,2``), as a tuple; a list with a part
    that is not one, or is below ``least``, is refused as ``comma-separated whole numbers <said>, got '<text>'``."""
    one = whole_number(least, said)

    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(one(part) for part in text.split(","))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"comma-separated whole numbers {said}, got {text!r}") from None

    return parse
