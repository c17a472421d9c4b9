"""One checkpoint's files: what a checkpoint folder holds, and how a resume verifies and loads them.

A checkpoint folder holds DeepSpeed's files (module, optimizer, LR schedule), every rank's random states
(``rng_rank{r}.pt``) and ``trainer_state.json``, written last by rank 0 with the size and SHA-256 of every other
file (:func:`measure`). A resume takes a checkpoint only when :func:`damage` finds nothing wrong with it: its
state file parses, every file has the size and SHA-256 it was written with, every ``.pt`` file unpickles with
``weights_only=True``.

Nothing a resume loads can run code: DeepSpeed's loaders (its checkpoint engine, the ZeRO optimizer
states, the universal conversion and loading) call ``torch.load(weights_only=False)``; while a checkpoint is
loaded into an engine, every ``torch.load`` of the process is made ``weights_only=True``, with only the few
DeepSpeed classes its files hold allowed besides tensors (:func:`weights_only_loads`). A file that needs
anything else is refused (:class:`UnsafeCheckpointFile`), before and during loading. The digests detect a file
damaged or replaced behind the state file's back; they are no defence against someone who can write the run
directory (they can rewrite ``trainer_state.json`` too): ``weights_only`` is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from common.training.ledger import Ledger
from common.training.train_state import TrainState

__all__ = ["STATE_FILE", "DIGESTS", "MODEL_FILE", "NoUsableCheckpoint", "UnsafeCheckpointFile", "safe_load",
           "weights_only_loads", "measure", "damage"]

STATE_FILE = "trainer_state.json"
DIGESTS = "sha256"  # trainer_state.json's {file name: SHA-256} (checkpoints written before it have sizes only)
# DeepSpeed's file with the module weights (ZeRO stage <= 2 keeps the whole module in rank 0's file)
MODEL_FILE = "mp_rank_00_model_states.pt"


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none can be resumed from."""


class UnsafeCheckpointFile(NoUsableCheckpoint):
    """A checkpoint file that does not unpickle with ``weights_only=True`` (nothing in it was run).

    Attributes:
        reason: which file, and what torch refused in it.
    """

    def __init__(self, path, err: Exception) -> None:
        self.reason = f"{path} cannot be loaded with weights_only=True ({_unpickling_reason(err)})"
        super().__init__(f"{self.reason}: it was not written by this package's training (replaced?), and nothing "
                         f"in it was run. Move its checkpoint folder aside to resume from an older one, or start over "
                         f"with --restart")


def _deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into this package's checkpoints besides tensors and containers (the
    ZeRO optimizer states: the loss scaler, the ZeRO stage, parameter fragment addresses)."""
    # lazy: importing DeepSpeed takes seconds; --help and --dry-run do not need it
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


# what torch appends to every weights_only error (its link to the docs)
_TORCH_DOCS = "\n\nCheck the documentation of torch.load"
_TORCH_FAILED = "Weights only load failed."


def _unpickling_reason(err: Exception) -> str:
    """What torch's (long) weights_only error says was refused, in one line: its unpickler's own message, which
    torch (2.6 to 2.11 at least) puts after ``WeightsUnpickler error:`` for a global not allowed
    (``Unsupported global: GLOBAL io.open``) or an unknown opcode (``Unsupported operand 149``), alone after a blank
    line for a global of a blocked module (``os.system``: ``Trying to load unsupported GLOBAL posix.system whose
    module posix is blocked``), and on its first line for a module to import first; else its first line."""
    text = str(err).split(_TORCH_DOCS, 1)[0]
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" was not an allowed global")[0]
    elif text.startswith(_TORCH_FAILED):
        paragraphs = [p for p in text.split("\n\n") if p.strip()]
        text = paragraphs[-1] if len(paragraphs) > 1 else text[len(_TORCH_FAILED):]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(err).__name__


def safe_load(path, *args, **kwargs):
    """``torch.load(path, ..., weights_only=True)`` allowing DeepSpeed's checkpoint classes, whatever
    ``weights_only`` the caller passes.

    Raises:
        UnsafeCheckpointFile: the file needs other globals (a crafted or foreign file).
    """
    with torch.serialization.safe_globals(_deepspeed_globals()):
        try:
            return torch.serialization.load(path, *args, **{**kwargs, "weights_only": True})
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointFile(path, err) from None


@contextlib.contextmanager
def weights_only_loads():
    """Within the block, every ``torch.load`` of this process is :func:`safe_load`, whatever its caller asks
    (DeepSpeed's checkpoint loaders pass ``weights_only=False``)."""
    previous, torch.load = torch.load, safe_load
    try:
        yield
    finally:
        torch.load = previous


def _sha256(path: Path) -> str:
    return measure(path)[1]


def measure(path: Path, flush: bool = False) -> tuple[int, str]:
    """A file's size and SHA-256, both read through one open handle (``fstat``: the size of what is read);
    ``flush``: its data forced to disk first (``fsync``), so that the digest a checkpoint publishes is of what a
    host crash leaves on disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if flush:
            try:
                os.fsync(handle.fileno())
            except OSError:  # a file system that cannot: as written
                pass
        size = os.fstat(handle.fileno()).st_size
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return size, digest.hexdigest()


def _shape(state: dict) -> str | None:
    """What is wrong with the shape of a parsed ``trainer_state.json`` (what a resume reads of it), or None."""
    files, digests = state.get("files", {}), state.get(DIGESTS)
    if not isinstance(files, dict) or not all(isinstance(size, int) and not isinstance(size, bool)
                                              for size in files.values()):
        return f"files is a {type(files).__name__}, not a mapping of file names to sizes" \
            if not isinstance(files, dict) else "files holds a size that is not a whole number"
    if digests is not None and (not isinstance(digests, dict) or
                                not all(isinstance(d, str) for d in digests.values())):
        return f"{DIGESTS} is a {type(digests).__name__}, not a mapping of file names to digests" \
            if not isinstance(digests, dict) else f"{DIGESTS} holds a digest that is not a string"
    try:
        TrainState.from_dict(state["state"])
    except ValueError as err:
        return str(err)
    if "ledger" not in state:
        return "it holds no ledger"
    try:
        Ledger.from_dict(state["ledger"])
    except ValueError as err:
        return f"its ledger: {err}"
    for key in ("tracker", "schedule"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            return f"its {key} is a {type(state[key]).__name__}, not a mapping"
    return None


def damage(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be resumed from, or None if it is intact."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        return f"{state_file.name} is missing"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        return f"{state_file} is unreadable ({err})"
    if not isinstance(state, dict) or "state" not in state:
        return f"{state_file} holds no trainer state"
    shape = _shape(state)
    if shape is not None:
        return f"{state_file} is not a trainer state of this package ({shape})"
    files, digests = state.get("files", {}), state.get(DIGESTS)
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
        if digests is not None and digests.get(name) != _sha256(path):
            return f"{path} is not the file that was written (its SHA-256 differs: damaged or replaced)"
    if not (folder / MODEL_FILE).is_file():
        return f"{folder / MODEL_FILE} is missing"
    for path in sorted(folder.glob("*.pt")):
        if digests is not None and path.name not in files:
            return f"{path} was not written with the checkpoint"
        if digests is None:  # written before digests: the archive's own checksums
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (OSError, zipfile.BadZipFile) as err:
                return f"{path} is damaged ({err})"
            if bad is not None:
                return f"{path} is damaged (entry {bad} fails its checksum)"
        try:
            safe_load(path, map_location="cpu", mmap=True)  # unpickles; the tensors stay on disk
        except UnsafeCheckpointFile as err:
            return err.reason
        except Exception as err:  # noqa: BLE001 - zip, mmap and unpickling errors: the file is unusable
            return f"{path} cannot be loaded ({type(err).__name__}: {err})"
    return None
