"""Names, paths and files that come from a user's input (a task file, a manifest, a folder received from someone).

- A name that must stay one folder's entry (:func:`is_plain_name`, :func:`check_plain_name`): a downloaded task
  file cannot move a run directory elsewhere, a shard named by an index read from a folder stays in it.
- Files the package writes in place, without a temporary file renamed over them (a lock file it truncates, logs
  and lists it appends to), are opened without following a symbolic link (:func:`open_nofollow`,
  :func:`append_text`): a link planted in a run directory (``train.log -> ~/.bashrc``, ``run.lock -> a file to
  truncate``) is refused in one line (:class:`LinkRefused`) rather than replaced: the link may be the user's own
  (a log kept elsewhere), and refusing writes nothing and deletes nothing. Files written atomically
  (``common.system.atomic``) replace a link by their rename, as they should.
- Text from a manifest (a clip's path, a decoder's reason) written into a line-based file or a log line has its
  control characters escaped (:func:`escape_controls`), so that it stays one line (one TSV row, one log line)
  and cannot forge another; :func:`unescape_controls` reads it back unchanged.
"""

from __future__ import annotations

import errno
import os
import re
import unicodedata
from pathlib import Path

__all__ = ["is_plain_name", "check_plain_name", "LinkRefused", "open_nofollow", "append_text", "read_text_nofollow",
           "refuse_link", "escape_controls", "unescape_controls"]


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is one plain path component: a non-empty string, not ``.`` or ``..``, with no folder
    separator (``/``, ``\\``) and no control character (NUL, a newline: a run directory's name in every log line),
    so ``folder / name`` stays an entry of ``folder``."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..")
            and not any(c in name for c in "/\\") and not any(ord(c) < 32 or ord(c) == 127 for c in name))


def check_plain_name(name: object, key: str, why: str) -> None:
    """Raise ``ValueError("KEY: ...")`` unless ``name`` is one plain path component (:func:`is_plain_name`);
    ``why`` says what the name becomes (e.g. the run directory named after it)."""
    if not is_plain_name(name):
        raise ValueError(f"{key}: {name!r} must be one plain name (not empty, '.' or '..'; no '/', backslash or "
                         f"control character): {why}")


class LinkRefused(OSError, ValueError):
    """A file the package writes in place is a symbolic link. An ``OSError`` (what opening it raised: the callers
    that go on without a file they cannot write, as a log, go on) and a ``ValueError`` (a command refuses it as bad
    input, exit status 2, in one line)."""


def _refusal(path: os.PathLike | str, what: str) -> LinkRefused:
    return LinkRefused(f"{path} is a symbolic link: {what} is never written through one (it could truncate or append "
                       f"to the file the link points to); replace the link with a copy of that file (cp "
                       f"--remove-destination \"$(readlink -f {path})\" {path}), or remove it, and run again")


def refuse_link(path: os.PathLike | str, what: str = "this file") -> None:
    """Raise :class:`LinkRefused` when ``path`` is a symbolic link (dangling or not)."""
    if os.path.islink(path):
        raise _refusal(path, what)


def open_nofollow(path: os.PathLike | str, flags: int, mode: int = 0o666, what: str = "this file") -> int:
    """``os.open(path, flags | O_NOFOLLOW, mode)``: a symbolic link at ``path`` (the last component; folders above
    it may be links) raises :class:`LinkRefused` naming it and ``what`` it is, instead of opening what it points to
    (or creating that file, for a dangling link with ``O_CREAT``)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):  # EMLINK: FreeBSD's word for it
            raise _refusal(path, what) from None
        raise


def append_text(path: os.PathLike | str, text: str, what: str = "this file") -> None:
    """Append ``text`` (UTF-8) to ``path``, created with the umask's mode if missing, never through a symbolic link
    (:func:`open_nofollow`)."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666, what)
    with open(fd, "a", encoding="utf-8", errors="backslashreplace") as handle:
        handle.write(text)


def read_text_nofollow(path: os.PathLike | str, what: str = "this file") -> str:
    """The text (UTF-8) of ``path``, which must not be a symbolic link (a list the package reads back and then
    rewrites: read through a link, the file it points to would be copied into the run directory)."""
    with open(open_nofollow(Path(path), os.O_RDONLY, 0, what), encoding="utf-8", errors="surrogateescape") as handle:
        return handle.read()


# a backslash, and every character that ends a line for str.splitlines() or a terminal or is not printable as it is:
# C0 and C1 controls and DEL (category Cc), the line and paragraph separators, lone surrogates (not UTF-8)
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPES = {escaped[1]: char for char, escaped in _ESCAPES.items()}  # "n" -> newline, ...
_UNESCAPE = re.compile(r"\\(\\|t|n|r|x[0-9a-f]{2}|u[0-9a-f]{4})")


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if unicodedata.category(char) in ("Cc", "Zl", "Zp", "Cs"):
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
    return char


def escape_controls(text: str) -> str:
    """``text`` on one line, with nothing a terminal acts on: a backslash as ``\\\\``, tab, newline and carriage
    return as ``\\t``, ``\\n``, ``\\r``, other control characters (C0, DEL, C1), the Unicode line and paragraph
    separators and lone surrogates as ``\\xNN`` / ``\\uNNNN``. Text without them (and without a backslash) is
    returned as it is; :func:`unescape_controls` gives ``text`` back."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(c) for c in text)


def unescape_controls(text: str) -> str:
    """The text :func:`escape_controls` escaped (a backslash followed by anything else stays as it is: a list
    written before escaping reads back as written)."""
    def one(match: re.Match) -> str:
        code = match.group(1)
        return _UNESCAPES.get(code) or chr(int(code[1:], 16))

    return _UNESCAPE.sub(one, text) if "\\" in text else text
