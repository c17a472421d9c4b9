"""HTS-AT (Chen et al., ICASSP 2022) as a second architecture for coarse-to-fine training.

Everything the trainer asks an architecture, in one place (the official code is
RetroCirce/HTS-Audio-Transformer; :mod:`common.models.htsat.official` loads its checkpoints):

- :class:`HTSATConfig`: the typed, frozen model config (``to_dict`` / ``from_dict``, errors name the key);
- :func:`geometry`: how a :class:`~common.audio.compression.Compression` maps onto HTS-AT's folded image and
  Swin windows (a ``ValueError`` naming method and factor where it cannot);
- :class:`HTSATFrontEnd`: waveforms at 32 kHz -> model input, with SpecAugment stripes from a generator;
- :class:`HTSAT`: the model for a geometry; ``forward`` returns ``clipwise_output`` / ``framewise_output``
  logits and ``latent_output``;
- :func:`adapt_state_dict` / :func:`adapt_model`: the weights carried to the next phase's geometry;
- :func:`train_flops`: counted training FLOPs per clip;
- :func:`load_official_checkpoint`: an official Lightning ``.ckpt`` -> config + our state dict;
- :func:`convert_imagenet_swin`: ImageNet Swin weights (the official start, Swin-T/C24) -> the backbone's
  start, whose tables :func:`fit_tables` fits to the model's windows;
- :func:`class_names`: AudioSet's 527 names for an official AudioSet head, numbered labels otherwise.
"""

from common.models.htsat.adapt import BIAS_TRANSFERS, adapt_model, adapt_state_dict, fit_tables, resize_bias_table
from common.models.htsat.config import HTSATConfig
from common.models.htsat.flops import train_flops
from common.models.htsat.frontend import HTSATFrontEnd, SpecAugmentStripes, mel_filterbank
from common.models.htsat.geometry import BlockLayout, Geometry, geometry, stage_layout
from common.models.htsat.imagenet import convert_imagenet_swin, looks_imagenet_swin
from common.models.htsat.labels import audioset_labels, class_names
from common.models.htsat.model import HEAD_PREFIXES, HTSAT, fold, unfold
from common.models.htsat.official import (
    config_from_official,
    convert_official,
    load_official_checkpoint,
    looks_official,
)

__all__ = [
    "HTSATConfig", "Geometry", "BlockLayout", "geometry", "stage_layout", "HTSATFrontEnd", "SpecAugmentStripes",
    "mel_filterbank", "HTSAT", "HEAD_PREFIXES", "fold", "unfold", "BIAS_TRANSFERS", "resize_bias_table",
    "adapt_state_dict", "fit_tables", "adapt_model", "train_flops", "convert_imagenet_swin", "looks_imagenet_swin", "config_from_official", "convert_official",
    "load_official_checkpoint", "looks_official", "audioset_labels", "class_names",
]
