"""Rank-aware logging: console + ``train.log`` on rank 0, TensorBoard scalars, a progress bar.

Only rank 0 writes files and draws the bar; other ranks log warnings and errors only.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm.auto import tqdm

from common import ROOT_HANDLERS_AT_IMPORT
from common.system.disk import NoSpace, free_bytes, out_of_space
from common.system.paths import open_nofollow

__all__ = ["setup_logging", "BarSafeHandler", "Scalars", "progress", "log_traceback", "library_chatter",
           "process_logging", "logging_for_workers", "join_logging"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# the tracebacks of the errors a command reports in one line: into train.log only (not the console)
_TRACEBACKS = logging.getLogger("c2f.tracebacks")
_TRACEBACKS.propagate = False
_TRACEBACKS.setLevel(logging.DEBUG)


def log_traceback(text: str) -> None:
    """Write an error's traceback into the run's ``train.log`` (rank 0; dropped where there is none)."""
    _TRACEBACKS.debug("%s", text)


class BarSafeHandler(logging.StreamHandler):
    """A console handler that writes through ``tqdm.write``: a log line clears the progress bars on its
    stream, is written on a line of its own, and the bars are drawn again below it.

    Without a stream it writes to whatever ``sys.stderr`` is when a line is logged (a redirection or a
    capture that replaced it since the handler was made, as in a notebook or a test runner)."""

    def __init__(self, stream=None) -> None:
        super().__init__(stream)
        self._follow = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._follow:
                self.stream = sys.stderr
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception as err:  # noqa: BLE001 - logging must not raise
            if isinstance(err.__context__, KeyboardInterrupt):  # a Ctrl-C that tqdm's lock release replaced
                raise err.__context__ from None
            self.handleError(record)


def library_chatter(record: logging.LogRecord) -> bool:
    """False for the notices libraries send to the root logger below a warning (Lhotse's "Using audioread",
    "The user overrided tolerance ..."), which a console at INFO would print in the middle of a command's own
    lines; their warnings pass."""
    return record.levelno >= logging.WARNING or record.name != "root" or "site-packages" not in record.pathname


def _basic_config(handler: logging.Handler) -> bool:
    """Whether ``handler`` is the one ``logging.basicConfig`` puts on the root logger, as a library's module-level
    ``logging.warning`` does where nothing configured logging yet (Lhotse's, when it cannot make ``~/.lhotse``):
    beside the console's, it printed every line twice, and the libraries' notices unfiltered. One the root logger
    had before the package was imported is the user's, and kept."""
    formatter = handler.formatter
    return (type(handler) is logging.StreamHandler and handler.stream is sys.stderr and formatter is not None
            and formatter._fmt == logging.BASIC_FORMAT and handler not in ROOT_HANDLERS_AT_IMPORT)


NOISY = ("DeepSpeed", "lhotse", "torch.distributed", "urllib3")  # libraries a command's console holds at warnings


def setup_logging(run_dir: Path | None, rank: int = 0, level: int = logging.INFO, console_format: str | None = None
                  ) -> None:
    """Console logging for every rank (warnings only off rank 0) and ``run_dir/train.log`` on rank 0;
    ``console_format``: the console's line format (default: time, level, logger and message)."""
    root = logging.getLogger()
    for logger in (root, _TRACEBACKS):
        for handler in list(logger.handlers):
            if getattr(handler, "_c2f", False) or (logger is root and _basic_config(handler)):
                logger.removeHandler(handler)
                if getattr(handler, "_c2f", False):
                    handler.close()
    if not _TRACEBACKS.handlers:
        _TRACEBACKS.addHandler(logging.NullHandler())  # no run directory: dropped (not logging's last resort)
    fmt = console_format or FORMAT
    root.addHandler(_console(f"[rank {rank}] {fmt}" if rank else fmt))
    root.setLevel(level if rank == 0 else logging.WARNING)
    if rank == 0 and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file = _log_file(Path(run_dir) / "train.log")
        root.addHandler(file)
        _TRACEBACKS.addHandler(file)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)



def _console(fmt: str) -> BarSafeHandler:
    console = BarSafeHandler()
    console.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    console._c2f = True  # type: ignore[attr-defined]
    console.addFilter(library_chatter)
    return console


def _log_file(path: Path, delay: bool = False) -> _LogFile:
    file = _LogFile(path, delay=delay)
    file.setFormatter(logging.Formatter(FORMAT))
    file._c2f = True  # type: ignore[attr-defined]
    return file


_HANDED_BY: int | None = None  # the process whose logging_for_workers ran here (a forked worker inherits it)


def logging_for_workers() -> dict:
    """How this process logs, for its worker processes to log the same way (:func:`join_logging`): the root
    logger's level, the console's line format and the ``train.log`` files it writes."""
    global _HANDED_BY
    _HANDED_BY = os.getpid()
    root = logging.getLogger()
    console = next((h for h in root.handlers if isinstance(h, BarSafeHandler) and getattr(h, "_c2f", False)), None)
    return {"pid": _HANDED_BY, "level": root.level, "console": console.formatter._fmt if console is not None else None,
            "files": [h.baseFilename for h in root.handlers if isinstance(h, _LogFile)]}


def join_logging(state: dict | None) -> None:
    """In a worker process (a loader's, an export's): log as its parent does (``state``: the parent's
    :func:`logging_for_workers`). A forked worker inherited its parent's handlers and keeps them; a spawned one
    (macOS's start method, and Python 3.14's forkserver on Linux) is a fresh interpreter, whose lines went to
    logging's last resort (no time, level or logger; no INFO) and never into the run's ``train.log``. A spawned
    worker whose script set up a console of its own at its top level (run again there) keeps it as the console."""
    root = logging.getLogger()
    if state is None or _HANDED_BY == state["pid"]:  # forked from the process that handed it: its handlers are here
        return
    for handler in [h for h in root.handlers if _basic_config(h)]:
        root.removeHandler(handler)
    if not root.handlers:
        root.addHandler(_console(state["console"] or FORMAT))
    for path in state["files"]:
        root.addHandler(_log_file(Path(path), delay=True))  # opened at its first line (O_APPEND: whole lines)
    root.setLevel(state["level"])
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def process_logging() -> Iterator[None]:
    """Give the process's logging back as the block found it: the root logger's handlers and level, and the levels of
    the libraries a command quiets (:func:`setup_logging` sets them for a run). A command called from Python (a
    notebook, a sweep, the demo) left its console handler, the INFO level and its open ``train.log`` behind: the
    caller's later lines went into the finished run's log, and printed twice beside the caller's own handler."""
    root = logging.getLogger()
    loggers = (root, _TRACEBACKS)
    handlers = {logger: list(logger.handlers) for logger in loggers}
    levels = {name: logging.getLogger(name).level for name in ("", *NOISY)}
    try:
        yield
    finally:
        for logger in loggers:
            for handler in [h for h in logger.handlers if h not in handlers[logger]]:
                logger.removeHandler(handler)
                if getattr(handler, "_c2f", False):
                    handler.close()
            for handler in handlers[logger]:
                if handler not in logger.handlers:
                    logger.addHandler(handler)  # one the run set aside (a basicConfig handler: the caller's)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def detach_run_logs() -> None:
    """Stop writing into the last run's ``train.log`` (a process that runs several, as the demo or a notebook does:
    a run that fails before it logs into its own directory must not log into the previous one's)."""
    for logger in (logging.getLogger(), _TRACEBACKS):
        for handler in [h for h in logger.handlers if isinstance(h, _LogFile)]:
            logger.removeHandler(handler)
            handler.close()


class _LogFile(logging.FileHandler):
    """``train.log``: a line that cannot be written (a full disk, a folder that is gone) is said once on the
    console, instead of a traceback per log line; the console keeps every line.

    The file is opened without following a symbolic link: a ``train.log`` that is one (planted in a run directory
    received from someone, pointing at ``~/.bashrc``) is refused when the run sets up its logging, in one line
    (``common.system.paths.LinkRefused``), not appended through."""
    def _open(self):
        fd = open_nofollow(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666, "a run's train.log")
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)
        except OSError:  # reopening a closed file whose folder is gone: FileHandler.emit raises it unhandled
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if not getattr(self, "_failed", False):
            self._failed = True
            sys.stderr.write(f"warning: cannot write {self.baseFilename} ({sys.exc_info()[1]}); log lines go to the "
                             f"console only\n")


class Scalars:
    """TensorBoard scalars under ``run_dir/tb`` (rank 0; a no-op elsewhere). The writer opens at the first
    scalar: a resumed run first says where it resumes (:meth:`resumed_at`)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.folder = Path(run_dir) / "tb"
        self.purge_step: int | None = None

    def resumed_at(self, step: int) -> None:
        """The run resumes after step ``step`` (a checkpoint's; -1: it starts from nothing): what an earlier launch
        logged past it (steps a crash or a non-finite loss undid, trained again from here) is hidden from
        TensorBoard, so each curve is the run's one history. A validation taken at the checkpoint's own step is
        logged again at that step only where the resumed run does it again (it was cut short, or the checkpoint was
        written before checkpoints recorded a finished validation): the same values, the same point twice."""
        self.purge_step = step + 1
        if self.writer is not None:  # opened already: open again, purging
            self.close()
            self.writer = None

    def _open(self):
        if self.writer is None and self.enabled:
            # lazy: TensorBoard's writer imports torch; the commands log through this module (--help loads no torch)
            from torch.utils.tensorboard import SummaryWriter

            _after_newest_event_file(self.folder)
            self.writer = SummaryWriter(str(self.folder), purge_step=self.purge_step)
        return self.writer

    @contextmanager
    def _writing(self):
        """TensorBoard's writer thread reports a failed write without the file's name: add it."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            if isinstance(err, NoSpace) or not out_of_space(err, self.folder):
                raise
            raise NoSpace(self.folder, None, free_bytes(self.folder), "TensorBoard's event file") from err

    def log(self, values: dict[str, float], step: int) -> None:
        if self._open() is None:
            return
        with self._writing():
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            with self._writing():
                self.writer.flush()

    def close(self) -> None:
        """Close the writer; a failure to flush it is raised only when no other error is on its way."""
        if self.writer is not None:
            on_its_way = sys.exc_info()[1]  # called from a `finally` while an error propagates
            try:
                with self._writing():
                    self.writer.close()
            except OSError:
                if on_its_way is None:
                    raise


def _after_newest_event_file(folder: Path) -> None:
    """Wait, if need be, for the second after the newest event file's in ``folder``. TensorBoard reads a folder's
    event files in the order of their names, ``events.out.tfevents.<second>.<host>.<pid>.<count>``: a writer that
    the same process opened within the same second (a run resumed at once, in a notebook or the tests) could sort
    before the one it follows (its count going from 99 to 100), and TensorBoard then dropped the earlier file's
    events as out of order."""
    seconds = [int(part[3]) for part in (p.name.split(".") for p in folder.glob("events.out.tfevents.*"))
               if len(part) > 3 and part[3].isdigit()]
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if wait > 0:
            time.sleep(wait)


def progress(total: int | None, initial: int, desc: str, enabled: bool, unit: str = "step"):
    """A tqdm bar (count, total, rate and the time left when ``total`` is known) on rank 0 when stderr is a
    terminal or a Jupyter kernel's (``tqdm.auto``: a widget where ipywidgets is installed); log lines carry the
    progress elsewhere (a file, a pipe), and :class:`BarSafeHandler` keeps them off the bar.

    Args:
        total: the count at the end (None: unknown; the bar then counts without a time left).
        initial: the count already done (a resumed phase).
        desc: what is counted, at the start of the bar.
        enabled: False draws nothing (ranks other than 0).
        unit: the name of one count.
    """
    shown = sys.stderr.isatty() or "ipykernel" in sys.modules  # a notebook's stderr is no terminal
    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and shown),
                file=sys.stderr, dynamic_ncols=True, leave=True, smoothing=0.1, unit=unit)
