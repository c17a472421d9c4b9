"""Bad audio: counted, named, judged; never replaced with silence.

A clip whose file is missing, cannot be decoded, is empty or truncated, or holds non-finite samples or samples far
outside [-1, 1] (``common.data.integrity.sample_problem``) is left out
of its batch, and named with its reason in ``Batch.bad``; :class:`BadAudioTracker` counts them per split
(training and validation), lists each once in the run's ``bad_audio.tsv``, and stops the run with
:class:`TooMuchBadAudio` past a configurable fraction or when no clip of a split can be used; on several ranks
it judges the counts of all ranks together, at points every rank reaches together (epoch and pass ends; the
trainer's log windows, checkpoints, validations).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from common.data.clips import Batch
from common.data.decode import audio_file_problem
from common.data.integrity import FAR_OUTSIDE
from common.system.atomic import atomic_write_text
from common.system.paths import append_text, escape_controls, read_text_nofollow, unescape_controls

__all__ = ["TooMuchBadAudio", "BadAudioTracker"]

log = logging.getLogger(__name__)


MISSING = "missing"  # the kind of load_clip's reason for a file that is not there (common.data.decode)


class TooMuchBadAudio(RuntimeError):
    """More than the allowed fraction of clips could not be used."""


class _BadAudioList:
    """A run's ``bad_audio.tsv``: one line per bad clip and split (``split, path, reason``), however many
    epochs skip it. Clips already listed by an earlier invocation (a resumed run) are read back;
    :meth:`recheck` drops those that read fine now.

    A path or reason from a manifest may hold a tab or a newline: the columns are written with their control
    characters escaped (``common.system.paths.escape_controls``: ``\\t``, ``\\n``, ``\\\\`` for a
    backslash), so each clip stays one row, and read back unescaped (the same path). The file is appended to and
    read without following a symbolic link: one planted there is refused (``LinkRefused``, one line), never
    appended through or copied into the list."""

    HEADER = "split\tpath\treason"
    # reasons that compare a file with its manifest (another sampling rate, fewer samples than it says): a file
    # read alone cannot show them gone, so they stay listed (the clip is still read whenever it is met)
    AGAINST_MANIFEST = re.compile(r"changed since its manifest was written|truncated \(\d+ of \d+ samples\)|"
                                  r"unreadable \(AudioLoadingError: The number of declared samples")

    def __init__(self, path: str | os.PathLike | None, write: bool = True) -> None:
        self.path = Path(path) if path else None
        self.write = write  # False: another process (rank 0) keeps the file; this one only remembers
        self._listed: set[tuple[str, str]] | None = None

    def _rows(self) -> list[tuple[str, str, str]]:
        rows = []
        if self.write and self.path is not None and (self.path.is_file() or self.path.is_symlink()):
            for line in read_text_nofollow(self.path, "a run's bad_audio.tsv").splitlines():
                cols = [unescape_controls(col) for col in line.split("\t")]
                if line == self.HEADER or len(cols) < 2:
                    continue
                rows.append((cols[0], cols[1], cols[2]) if len(cols) >= 3 else ("train", cols[0], cols[1]))  # older
        return rows

    @staticmethod
    def _row(split: str, path: str, reason: str) -> str:
        return "\t".join(escape_controls(col) for col in (split, path, reason))

    def _read(self) -> set[tuple[str, str]]:
        return {(split, path) for split, path, _ in self._rows()}

    def recheck(self) -> tuple[list[str], int]:
        """Check the listed files again and rewrite the list with those still bad (their reason of now);
        a clip dropped here is listed again if it turns out bad later. Entries that name no file (a clip of a
        Shar shard) stay. Returns the paths dropped and the number still listed."""
        rows = self._rows()
        if not rows:
            return [], 0

        kept, dropped, problems = [], [], {}
        for split, path, reason in rows:
            if path not in problems:
                problems[path] = audio_file_problem(path) if os.path.exists(path) or reason.startswith("missing") \
                    else reason
            problem = problems[path]
            if problem is None and self.AGAINST_MANIFEST.match(reason):  # only its manifest could clear it
                problem = reason
            if problem is None:
                dropped.append(path)
            else:
                kept.append(self._row(split, path, problem))
        atomic_write_text(self.path, "\n".join([self.HEADER, *kept]) + "\n")
        self._listed = self._read()
        return sorted(set(dropped)), len(kept)

    def add(self, split: str, path: str, reason: str) -> bool:
        """List a bad clip; False if it was listed before."""
        if self._listed is None:
            self._listed = self._read()
        if (split, path) in self._listed:
            return False
        self._listed.add((split, path))
        if self.write and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.is_file() or self.path.stat().st_size == 0
            append_text(self.path, (self.HEADER + "\n" if new else "") + self._row(split, path, reason) + "\n",
                        "a run's bad_audio.tsv")
        return True


class BadAudioTracker:
    """Counts the clips of a split seen and left out; lists each bad one once; stops the run past ``max_fraction``.

    Every skip is counted (a clip that is bad in every epoch counts in every epoch, so the share is that
    of the data); the console warning and the line in ``log_path`` come once per clip and split per run.
    Clips resampled up to a higher rate (``Batch.upsampled``) are counted too, and said once per run (all
    splits together): :meth:`take_upsampled` hands the new counts to the trainer's ledger.

    Args:
        max_fraction: largest tolerated share of bad clips.
        min_clips: the share is checked once this many clips were seen (and at every epoch end), so that
            two bad clips in the first batch do not stop a run.
        log_path: the run's TSV file (``split``, ``path``, ``reason``; a header line first), written by rank 0
            of ``dist``.
        split: the split counted (``train``; :meth:`for_split` makes trackers of the others).
        source: the manifests the clips come from, named when none of them can be used.
        dist: a :class:`common.system.distributed.Dist` of several ranks: the judgement is collective (below);
            None: this process's clips alone.

    On several ranks (``dist``) each rank counts its own clips and the decision is taken on the totals of
    every rank, so that all ranks stop together with the same message instead of one rank stopping while
    the others wait for it in a collective. The counts are summed (:meth:`settle`) only where every rank
    takes the decision at the same point: :meth:`check`, which the loader calls at each epoch end and at the
    end of a pass (every rank has the same number of batches: :func:`common.data.shards.equal_shards`), and which
    the trainer calls at its log windows, before each checkpoint and after each validation; between those points a
    rank's clips are counted but not judged (no collective per batch). Rank 0 writes ``bad_audio.tsv``
    (``log_path``) and lists the other ranks' bad clips there when it learns of them.
    """
    def __init__(self, max_fraction: float = 0.02, min_clips: int = 200, log_path: str | None = None,
                 split: str = "train", source: Sequence[str] | str = (), dist=None) -> None:
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction = max_fraction
        self.min_clips = min_clips
        self.log_path = Path(log_path) if log_path else None
        self.split = split
        self.source = [source] if isinstance(source, str) and source else [str(s) for s in source]
        self.seen = 0
        self.bad = 0
        self.reasons: Counter = Counter()
        self._list = _BadAudioList(self.log_path, write=dist is None or dist.is_main)
        self._splits: dict[str, BadAudioTracker] = {}
        self._saved_splits: dict[str, dict] = {}
        self.upsampled: Counter = Counter()  # (clip rate, target rate) -> clips, this split, the whole run
        self._untaken: Counter = Counter()  # what take_upsampled has not handed out yet
        self._said = [False]  # the resampling warning, shared with the other splits' trackers
        self.dist = dist
        self._since = Counter()  # this rank's seen / bad / reasons since the last settle (several ranks)
        self._new: list[tuple[str, str]] = []  # this rank's bad clips listed since the last settle

    def for_split(self, split: str, source: Sequence[str] | str = (), max_fraction: float | None = None,
                  dist=None) -> "BadAudioTracker":
        """The tracker of another split (``valid``): same file and threshold (unless ``max_fraction``), its own
        counts (kept in this tracker's :meth:`state_dict`), judged over the ranks of ``dist`` (None: this
        process alone, e.g. a test split that rank 0 scores). The same object is returned for the same split."""
        if split == self.split:
            return self
        tracker = self._splits.get(split)
        if dist is not None and tracker is not None:
            tracker.dist = dist
        if tracker is None:
            tracker = BadAudioTracker(self.max_fraction if max_fraction is None else max_fraction, self.min_clips,
                                      None, split, source, dist)
            tracker.log_path, tracker._list, tracker._said = self.log_path, self._list, self._said
            if split in self._saved_splits:
                tracker.load_state_dict(self._saved_splits.pop(split))
            self._splits[split] = tracker
        elif source:
            tracker.source = [source] if isinstance(source, str) else [str(s) for s in source]
        return tracker

    @property
    def collective(self) -> bool:
        """Judged over several ranks (see the class docstring)."""
        return self.dist is not None and self.dist.world_size > 1

    def update(self, batch: Batch) -> None:
        """Count a batch's clips and list its bad ones; alone (not :attr:`collective`), judge once ``min_clips``
        clips were seen."""
        self.seen += len(batch) + len(batch.bad)
        self._since["seen"] += len(batch) + len(batch.bad)
        for path, reason in batch.bad:
            self.bad += 1
            self.reasons[reason.split(" (")[0]] += 1
            self._since["bad"] += 1
            self._since["reason:" + reason.split(" (")[0]] += 1
            if self._list.add(self.split, path, reason):
                if self.collective:
                    self._new.append((path, reason))
                if not self.collective or self.dist.is_main:  # rank 0 says the others' clips when it lists them
                    log.warning("skipped bad audio (%s) %s: %s", self.split, escape_controls(path),
                                escape_controls(reason))
        if batch.upsampled:
            self.upsampled.update(batch.upsampled)
            self._untaken.update(batch.upsampled)
            if not self._said[0]:
                self._said[0] = True
                rates = ", ".join(f"{n} at {a} Hz" for (a, _), n in sorted(batch.upsampled.items()))
                low = min(a for a, _ in batch.upsampled)
                counted = "; ledger.json counts them (upsampled)" if self.log_path is not None else ""  # a run's
                log.warning("resampling clips up to the model's %d Hz (%s of the first %d %s clips): they hold nothing "
                            "above %g Hz, so the model's upper frequency bins stay empty for them%s",
                            next(iter(batch.upsampled))[1], rates, self.seen, self.split, low / 2, counted)
        if not self.collective and self.seen >= self.min_clips:
            self.check()

    def settle(self) -> None:
        """Several ranks: add the other ranks' counts since the last call to this rank's, so that every rank
        holds the totals of all (collective: every rank calls it at the same point); rank 0 lists the other
        ranks' new bad clips in ``bad_audio.tsv``. One small all-reduce, and a gather only when some rank met
        a bad clip. Alone: nothing to do."""
        if not self.collective:
            self._since.clear()
            return
        dist = self.dist
        own = self._since
        totals = dist.all_reduce_sum(torch.tensor([own["seen"], own["bad"]], dtype=torch.int64,
                                                  device=dist.device)).tolist()
        self.seen += totals[0] - own["seen"]
        self.bad += totals[1] - own["bad"]
        if totals[1]:
            parts = dist.gather_objects(({k[7:]: n for k, n in own.items() if k.startswith("reason:")}, self._new))
            for rank, (reasons, rows) in enumerate(parts):
                if rank == dist.rank:
                    continue
                self.reasons.update(reasons)
                for path, reason in rows if dist.is_main else ():
                    if self._list.add(self.split, path, reason):
                        log.warning("skipped bad audio (%s, rank %d) %s: %s", self.split, rank, escape_controls(path),
                                    escape_controls(reason))
        self._since = Counter()
        self._new = []

    def counts(self) -> dict[str, dict]:
        """The run's counts so far, ``{split: {"seen", "bad", "reasons"}}``: this tracker's split and its other
        splits' (those kept from a checkpoint too), every time a clip was met; on several ranks, every rank's
        (collective: every rank calls it at the same point, as the trainer does before each ledger write)."""
        for tracker in (self, *(self._splits[name] for name in sorted(self._splits))):
            tracker.settle()
        state = self.state_dict()
        return {self.split: {"seen": state["seen"], "bad": state["bad"], "reasons": state["reasons"]},
                **{name: {key: split[key] for key in ("seen", "bad", "reasons")}
                   for name, split in sorted(state["splits"].items())}}

    def take_upsampled(self, dist=None) -> dict[str, dict[tuple[int, int], int]]:
        """The clips resampled up since the last call, per split (this tracker's and its other splits'), and
        forget them: ``{split: {(clip rate, target rate): clips}}``.

        Args:
            dist: a :class:`common.system.distributed.Dist`: the counts of every rank's tracker, summed (collective:
                every rank calls it at the same point); None: this tracker's only.
        """
        out: dict[str, Counter] = {}
        for tracker in (self, *self._splits.values()):
            if tracker._untaken:
                out[tracker.split] = Counter(tracker._untaken)
                tracker._untaken.clear()
        if dist is not None and dist.world_size > 1:
            total: dict[str, Counter] = {}
            for counts in dist.gather_objects({split: dict(c) for split, c in out.items()}):
                for split, pairs in counts.items():
                    total.setdefault(split, Counter()).update(pairs)
            out = total
        return {split: dict(pairs) for split, pairs in out.items()}

    def check(self, whole: bool = True) -> None:
        """Stop with :class:`TooMuchBadAudio` when no clip was usable or more than ``max_fraction`` were bad.

        Args:
            whole: a whole epoch or pass was seen: judged however few clips it had; False: judged only once
                ``min_clips`` clips were seen.

        Collective when :attr:`collective` (the totals of every rank are judged: :meth:`settle`).
        """
        self.settle()
        if not whole and self.seen < self.min_clips:
            return
        where = f"; the list is in {self.log_path}" if self.log_path else ""
        if self.seen and self.bad == self.seen:
            source = f" of {', '.join(self.source)}" if self.source else ""
            raise TooMuchBadAudio(
                f"none of the {self.seen} {self.split} clips{source} could be used ({dict(self.reasons)}){where}"
                f"{self._moved()}"
            )
        if self.seen and self.bad / self.seen > self.max_fraction:
            split = "" if self.split == "train" else f" ({self.split})"
            raise TooMuchBadAudio(
                f"{self.bad} of {self.seen} clips ({self.bad / self.seen:.1%}) could not be used{split}, more than "
                f"max_bad_fraction={self.max_fraction:.1%} ({dict(self.reasons)}){where}. {self._mend()} and run "
                f"the same command again, or tolerate more with --set data.max_bad_fraction=F (a resumed run may "
                f"change it; recorded in ledger.json)"
            )

    def _mend(self) -> str:
        """What to do about the files: restore them, or, where most were refused for samples far outside [-1, 1]
        (a corpus stored as float at integer scale), rescale them."""
        if self.reasons.get(FAR_OUTSIDE, 0) * 2 > self.bad:
            return ("Rescale the files to float audio at full scale (integer PCM stored as float: divide by 32768, "
                    "then prepare the corpus again)")
        return f"Restore the files{self._moved()}"

    def _moved(self) -> str:
        """Where most bad clips are missing files: the likeliest cause, a corpus moved (or not mounted) since its
        manifests were written, which hold absolute paths."""
        if self.reasons.get(MISSING, 0) * 2 <= self.bad:
            return ""
        return ("; most are missing: was the corpus moved, or is its disk not mounted, since its manifests were "
                "written? They hold absolute paths: prepare it again where it is now (c2f-corpora prepare)")

    def recheck_listed(self) -> None:
        """At the start of an invocation: the clips an earlier attempt listed that read fine now (files that
        came back) leave ``bad_audio.tsv``, so that it lists what is bad now (the counts keep the run's history);
        the log says how many are still listed."""
        dropped, kept = self._list.recheck()
        if dropped:
            log.warning("%s: %d clip(s) listed by an earlier attempt read fine now and are no longer listed (%s%s); "
                        "%d still are", self.log_path, len(dropped), ", ".join(map(escape_controls, dropped[:3])),
                        ", ..." if len(dropped) > 3 else "", kept)
        elif kept:  # skipped again without a line each (said when first met): this invocation's log says it once
            log.info("%s: %d clip(s) an earlier attempt could not read are listed there; each is skipped again "
                     "when met", self.log_path, kept)

    def state_dict(self) -> dict:
        """The counts (on several ranks, the totals of all as of the last :meth:`settle`: the trainer settles
        before each checkpoint, which rank 0 writes), the other splits' and the clips resampled up."""
        splits = {**self._saved_splits, **{name: t.state_dict() for name, t in self._splits.items()}}
        return {"seen": self.seen, "bad": self.bad, "reasons": dict(self.reasons), "splits": splits,
                "upsampled": [[a, b, n] for (a, b), n in sorted(self.upsampled.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.bad, self.reasons = state["seen"], state["bad"], Counter(state["reasons"])
        self._since, self._new = Counter(), []
        self.upsampled = Counter({(a, b): n for a, b, n in state.get("upsampled", [])})
        self._said[0] = self._said[0] or bool(self.upsampled)  # said when the run first met them
        self._saved_splits = dict(state.get("splits", {}))
        for name in list(self._saved_splits):
            if name in self._splits:
                self._splits[name].load_state_dict(self._saved_splits.pop(name))
