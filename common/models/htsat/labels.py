"""Class names for HTS-AT outputs: AudioSet's 527 display names, or numbered labels.

``audioset_labels.csv`` (next to this module) is AudioSet's ``class_labels_indices.csv`` (columns
``index,mid,display_name``; Gemmeke et al. 2017, research.google.com/audioset: the ontology's ids and
names, CC BY-SA 4.0; see NOTICE), as shipped with the official HTS-AT code
(RetroCirce/HTS-Audio-Transformer ``class_label_indice.csv`` @ 2e29471).
Official HTS-AT AudioSet checkpoints order their 527 outputs by its ``index`` column. It is read with
the same parser as the AudioSet corpus (:func:`common.data.corpora.audioset.read_classes_csv`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from common.data.corpora.audioset import read_classes_csv

__all__ = ["AUDIOSET_LABELS_CSV", "audioset_labels", "class_names"]

AUDIOSET_LABELS_CSV = Path(__file__).with_name("audioset_labels.csv")


@lru_cache(maxsize=1)
def audioset_labels() -> tuple[tuple[str, str], ...]:
    """AudioSet's classes in output order: ``((mid, display_name), ...)``, 527 entries."""
    mids, names = read_classes_csv(AUDIOSET_LABELS_CSV)
    return tuple((mid, names[mid]) for mid in mids)


def class_names(num_classes: int) -> tuple[list[str], dict[str, str]]:
    """Class ids and display names for a head of ``num_classes`` outputs with no class list of its own.

    Args:
        num_classes: the model's outputs.

    Returns:
        ``(ids, {id: display name})``: AudioSet's mids and names for 527 outputs (an official AudioSet
        checkpoint), else ``class_0 .. class_{K-1}`` naming themselves.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if num_classes == len(audioset_labels()):
        labels = audioset_labels()
        return [mid for mid, _ in labels], dict(labels)
    ids = [f"class_{i}" for i in range(num_classes)]
    return ids, {i: i for i in ids}
