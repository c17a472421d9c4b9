"""Names and paths that come from a user's files (a task file, a manifest): a name that must stay one folder's
entry, so that a downloaded task file cannot move a run directory elsewhere."""

from __future__ import annotations

__all__ = ["is_plain_name", "check_plain_name"]


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is one plain path component: a non-empty string, not ``.`` or ``..``, with no folder
    separator (``/``, ``\\``) and no NUL, so ``folder / name`` stays an entry of ``folder``."""
    return (isinstance(name, str) and bool(name) and name not in (".", "..")
            and not any(c in name for c in "/\\\0"))


def check_plain_name(name: object, key: str, why: str) -> None:
    """Raise ``ValueError("KEY: ...")`` unless ``name`` is one plain path component (:func:`is_plain_name`);
    ``why`` says what the name becomes (e.g. the run directory named after it)."""
    if not is_plain_name(name):
        raise ValueError(f"{key}: {name!r} must be one plain name (not empty, '.' or '..'; no '/', backslash or NUL): "
                         f"{why}")
