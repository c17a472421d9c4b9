"""Every rank of a job must train on the same recipe and the same manifests: checked once, right after the
rendezvous, before any data is read or a model built (:func:`check_same_inputs`).

Each rank resolves its own copy of the recipe (its command line, its recipe file, its node's copy of the files the
recipe names) and reads its own copy of the manifests, and only rank 0's are recorded (``recipe.yaml``, the ledger's
fingerprints). A rank that differs (a ``--set`` given to one rank only, a node's stale copy of a recipe or a manifest)
would otherwise train silently otherwise than the record says (another learning rate on its ZeRO partition, an
overlapping shard of another manifest) or wait for ever in a collective the others never enter (another
``train.log_every``, batch or manifest length). Rank 0 sends what it resolved (the recipe as ``recipe.yaml``
records it, and the fingerprints of its manifests, as the ledger takes them: ``common.data.fingerprint``); every rank
compares its own, and every rank learns what differed where, so that all of them stop with the same one line naming
the ranks, their hosts and the keys or files that differ (:class:`RanksDisagree`).

The run directory too must be one folder that every rank sees (:func:`check_same_run_dir`): rank 0 writes the
checkpoints' shared files and measures the files the others write into it, so ranks given other folders (ranks of
two jobs joined on one rendezvous port, a ``--run-dir`` evaluated per task, a node-local disk) trained until the
first checkpoint and lost every step since the start."""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import yaml

from common.config.recipe import parse_yaml, to_dict
from common.data.fingerprint import fingerprint, key_for
from common.training.run_recipe import flat_keys

__all__ = ["RanksDisagree", "resolved_inputs", "check_same_inputs", "check_same_run_dir"]

_SHOWN_KEYS = 4  # per rank, in the one line
_SHOWN_RANKS = 3


class RanksDisagree(ValueError):
    """The ranks of one job resolved different recipes or read different manifests."""


def _manifests(recipe) -> list[str]:
    """The manifest paths a recipe names, as its loaders open them: ``data.train`` / ``data.valid`` (relative to
    the working folder), and a fine-tuning task's ``train`` / ``valid`` / ``test`` / ``folds`` (under its
    ``data_root``, :meth:`finetune.tasks.TaskSpec.path`), with its class list."""
    data, task = recipe.data, getattr(recipe, "task", None)
    paths = [m.path if hasattr(m, "path") else m for m in data.train or []] + list(data.valid or [])
    if task is not None:
        paths += [task.path(str(p)) for key in ("train", "valid", "test", "folds")
                  for p in getattr(task, key, None) or []]
        paths += [task.path(task.classes)] if getattr(task, "classes", "") else []  # the class list, as a manifest
    return list(dict.fromkeys(str(p) for p in paths if p))


def _fingerprint(path: str) -> dict | None:
    """The manifest's fingerprint as the ledger takes it; None where this rank cannot read it (the run says why
    later, on every rank that cannot)."""
    try:
        return fingerprint(path)
    except (OSError, ValueError):
        return None


def resolved_inputs(recipe) -> dict:
    """What this rank resolved: its host, the recipe's keys as ``recipe.yaml`` records them (flat) and its
    manifests' fingerprints."""
    data = parse_yaml(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    return {"host": socket.gethostname(), "recipe": flat_keys(data),
            "manifests": {path: _fingerprint(path) for path in _manifests(recipe)}}


def _short(value) -> str:
    text = repr(value) if isinstance(value, str) and not value.strip() else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(mine: dict, main: dict) -> list[str]:
    """What this rank's :func:`resolved_inputs` have otherwise than rank 0's, in words ("optim.lr 0.05 where rank 0
    has 0.001"); empty where nothing differs."""
    out = []
    ours, theirs = mine["recipe"], main["recipe"]
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key, KeyError) != theirs.get(key, KeyError):
            here = _short(ours[key]) if key in ours else "nothing"
            there = _short(theirs[key]) if key in theirs else "nothing"
            out.append(f"{key} {here} where rank 0 has {there}")
    for path in sorted(set(mine["manifests"]) | set(main["manifests"])):
        a, b = mine["manifests"].get(path), main["manifests"].get(path)
        if a is None and b is None:
            continue
        if a is None or b is None:
            out.append(f"manifest {path} {'missing' if a is None else 'present'} where rank 0 has it "
                       f"{'present' if a is None else 'missing'}")
            continue
        key = key_for(a, b)
        if a.get(key) != b.get(key):
            out.append(f"manifest {path} {a.get('bytes')} bytes (sha256 {str(a.get('sha256'))[:12]}) where rank 0 "
                       f"has {b.get('bytes')} bytes (sha256 {str(b.get('sha256'))[:12]})")
    return out


def check_same_inputs(dist, recipe) -> None:
    """Compare every rank's resolved recipe and manifests with rank 0's (collective: one broadcast, one gather);
    nothing on one rank.

    Raises:
        RanksDisagree: on every rank where any rank differs, naming the ranks, their hosts and what differs.
    """
    if dist.world_size == 1:
        return
    mine = resolved_inputs(recipe)
    main = dist.broadcast_object(mine if dist.is_main else None)
    found = dist.gather_objects((mine["host"], _differences(mine, main)))
    differ = [(rank, host, diff) for rank, (host, diff) in enumerate(found) if diff]
    if not differ:
        return
    parts = []
    for rank, host, diff in differ[:_SHOWN_RANKS]:
        more = f" (and {len(diff) - _SHOWN_KEYS} more)" if len(diff) > _SHOWN_KEYS else ""
        parts.append(f"rank {rank} (host {host}) resolves {', '.join(diff[:_SHOWN_KEYS])}{more}")
    if len(differ) > _SHOWN_RANKS:
        parts.append(f"{len(differ) - _SHOWN_RANKS} more rank(s) differ")
    raise RanksDisagree(f"{'; '.join(parts)} (rank 0 on host {main['host']}): every rank must see the same recipe "
                        f"and manifests (a --set given to some ranks only, or a node's stale copy of a file?); "
                        f"nothing was trained")


MARK = ".c2f-ranks-"  # the name of the file rank 0 writes for the others to find (a random suffix)
STALE_MARK_S = 600  # a mark older than this was left by a killed job


def check_same_run_dir(dist, run_dir: Path, wait_s: float = 10.0) -> None:
    """Check that every rank sees the run directory rank 0 uses (collective; nothing on one rank): rank 0 writes a
    file of a random name into it, every other rank looks for that file in its own ``run_dir`` (for up to
    ``wait_s`` seconds: a network file system shows a new file late), and rank 0 removes it.

    Raises:
        RanksDisagree: on every rank, naming the ranks that do not see it, their hosts and run directories.
    """
    if dist.world_size == 1:
        return
    run_dir = Path(run_dir)
    mark = failed = None
    try:
        if dist.is_main:
            try:
                for stale in run_dir.glob(f"{MARK}*"):  # a killed job's (a mark lives seconds; a file system
                    if time.time() - stale.stat().st_mtime > STALE_MARK_S:  # without locks may hold a live one)
                        stale.unlink(missing_ok=True)
                mark = run_dir / f"{MARK}{secrets.token_hex(8)}"
                mark.write_text(f"{socket.gethostname()} {os.getpid()}\n")
            except OSError as err:  # said by every rank, not only this one (the others would wait in the broadcast)
                failed = err
        name, main_dir, why = dist.broadcast_object(
            (None if mark is None else mark.name, str(run_dir.absolute()), None if failed is None else str(failed))
            if dist.is_main else None)
        if failed is not None:
            raise failed
        if why is not None:
            raise RanksDisagree(f"rank 0 cannot write into its run directory {main_dir} ({why}); nothing was trained")
        seen, deadline = os.path.isfile(run_dir / name), time.monotonic() + wait_s  # False where unsearchable
        while not seen and time.monotonic() < deadline:
            time.sleep(0.2)
            seen = os.path.isfile(run_dir / name)
        found = dist.gather_objects((socket.gethostname(), str(run_dir.absolute()), seen))
    finally:
        if mark is not None:
            mark.unlink(missing_ok=True)
    blind = [(rank, host, where) for rank, (host, where, seen) in enumerate(found) if not seen]
    if not blind:
        return
    ranks = "; ".join(f"rank {rank} (host {host}, --run-dir {where})" for rank, host, where in blind[:_SHOWN_RANKS])
    more = f" and {len(blind) - _SHOWN_RANKS} more" if len(blind) > _SHOWN_RANKS else ""
    raise RanksDisagree(f"{ranks}{more} cannot see the file rank 0 (host {found[0][0]}) wrote into its run directory "
                        f"{main_dir}: every rank must be given one folder that all of them see (on several nodes, a "
                        f"shared file system); ranks given other folders are ranks of another job on the same "
                        f"rendezvous port (MASTER_PORT) or a --run-dir evaluated per task; nothing was trained")
