"""Hugging Face ``transformers`` AST directories, read: start fine-tuning or pretraining from one.

Writing one (and classifying with ``transformers``) is :mod:`common.models.hf_export`.

    c2f-hf export runs/finetune/esc50-baseline/fold1 --out esc50_ast_hf     # -> ASTForAudioClassification
    c2f-hf export runs/pretrain/ssast_fshift4 --out ssast_hf                # -> ASTModel (encoder)
    python finetune/run.py --init esc50_ast_hf --task esc50                          # start from an HF directory

An HF AST directory holds ``config.json`` (an ``ASTConfig``), the weights (``model.safetensors``, or
``pytorch_model.bin``, possibly sharded with an index) and ``preprocessor_config.json`` (an
``ASTFeatureExtractor``). What the format can hold, from the ``transformers`` AST modelling and
feature-extraction code (``modeling_audio_spectrogram_transformer.py`` and
``feature_extraction_audio_spectrogram_transformer.py``):

- exactly two prefix tokens (cls + distillation) and a pooled output ``(cls + dist) / 2`` after the final
  LayerNorm: this package's ``prefix`` pooling; a mean-pooled classifier cannot be written exactly;
- a square ``patch_size x patch_size`` kernel with ``frequency_stride`` / ``time_stride``, a fixed
  ``max_length`` and no interpolation of the positional embedding at run time;
- one front end: Kaldi fbank (25 ms windows, 10 ms shift, Hanning, ``num_mel_bins``), zero-padded or cut
  to ``max_length`` frames, then ``(fbank - mean) / (2 * std)``: exactly this package's full-resolution
  front end, with the normalisation statistics copied as they are. A phase on compressed input (frame
  shift x C, pooling, wide patches) has another front end and is not exported;
- one LayerNorm epsilon (``layer_norm_eps``). The exported config says 1e-6, this package's transformer
  blocks' value; the classification head's LayerNorm uses PyTorch's default 1e-5 here, so HF's head
  normalises with 1e-6 instead: a relative difference of about 5e-6 / variance, far below the 1e-4 that
  the exactness test allows (docs/faithfulness.md). Imported models keep this package's
  1e-6 in the blocks (published MIT models say 1e-12).

Weights are written under the key names that ``save_pretrained`` writes (``encoder.layer.N.attention.
attention.query`` ...: the names of every published AST checkpoint, which ``transformers`` 4 and 5 both
load); reading also accepts the in-memory names of ``transformers`` 5 (``layers.N.attention.q_proj`` ...).
Reading a directory needs only ``safetensors`` / ``torch``; writing one, and :func:`classify`, need
``transformers`` (``pip install 'coarse2fine-ast[hf]'``), imported only inside those functions.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from common.audio.fbank import NORM_STATS, NormStats
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.exports import unreadable
from common.system.paths import is_plain_name

__all__ = [
    "INSTALL_HINT",
    "TransformersMissing",
    "HFFormatError",
    "FrontEnd",
    "ASTWeights",
    "is_hf_directory",
    "weight_files",
    "read_hf_directory",
    "hf_classifier_export",
    "kept_head",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'coarse2fine-ast[hf]' (in a checkout: pip install -e '.[hf]'; or: pip install transformers)"
MODEL_TYPE = "audio-spectrogram-transformer"
CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS_FILE = "model.safetensors"
BASE_PREFIX = "audio_spectrogram_transformer."
LAYER_NORM_EPS = 1e-6  # timm's transformer blocks, as built by common.models.ast.encoder.ASTEncoder
HF_FRAME_SHIFT_MS = 10.0  # ASTFeatureExtractor calls torchaudio's kaldi.fbank with its default framing
HF_FRAME_LENGTH_MS = 25.0
# ASTConfig's defaults, for config.json files that leave a field out (transformers' ASTConfig)
CONFIG_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                   "hidden_act": "gelu", "layer_norm_eps": 1e-12, "patch_size": 16, "qkv_bias": True,
                   "frequency_stride": 10, "time_stride": 10, "max_length": 1024, "num_mel_bins": 128}
# ASTFeatureExtractor's defaults, likewise
PREPROCESSOR_DEFAULTS = {"sampling_rate": 16000, "num_mel_bins": 128, "max_length": 1024, "mean": -4.2677393,
                         "std": 4.5689974, "do_normalize": True, "padding_value": 0.0}


class TransformersMissing(RuntimeError):
    """``transformers`` is needed (writing an HF directory, the HF pipeline) but not installed."""


class HFFormatError(ValueError):
    """A model the Hugging Face AST format cannot hold, or an HF directory this package cannot read."""


def _transformers():
    try:
        # lazy: transformers is the optional [hf] extra
        import transformers
    except ImportError as err:
        raise TransformersMissing(f"this needs Hugging Face transformers, which is not installed: {INSTALL_HINT}") \
            from err
    return transformers


@dataclass(frozen=True)
class FrontEnd:
    """What ``ASTFeatureExtractor`` computes, in its own terms (``preprocessor_config.json``).

    Args:
        sample_rate: Hz; 25 ms / 10 ms Kaldi framing is implied.
        num_mel_bins: mel filters.
        max_length: frames the fbank is zero-padded or cut to.
        mean, std: normalisation ``(fbank - mean) / (2 * std)``.
        norm: how this package names the statistics (a ``NORM_STATS`` name or a stats JSON file), if known.
    """

    sample_rate: int
    num_mel_bins: int
    max_length: int
    mean: float
    std: float
    norm: str | None = None


@dataclass(frozen=True)
class ASTWeights:
    """An AST in this package's terms, whatever it was read from.

    Args:
        cfg: the encoder geometry.
        encoder: :class:`common.models.ast.encoder.ASTEncoder` state dict.
        head: the classifier head (``nn.Sequential(LayerNorm, Linear)``: keys ``0.*`` and ``1.*``), or None.
        pool: the head's pooling (``prefix`` or ``mean``).
        classes: class ids in output order (None without a head).
        names: display names of the classes (missing ids display as themselves).
        loss: ``bce`` (sigmoid scores, multi-label) or ``ce`` (softmax).
        front_end: the features the model expects, None where unknown.
        source: where it was read from, for messages.
        own_export: written by this package (:func:`export_hf`: its ``config.json`` has a ``coarse2fine`` key),
            not, e.g., MIT's AST checkpoints converted by Hugging Face.
        provenance: what the weights were before the format (``objective: ssast`` for an SSAST encoder,
            ``source: official`` for an official SSAST / AST checkpoint), kept under ``coarse2fine`` so that an
            ``--init`` from the directory is fitted, pooled and given recipes as its origin is.
    """

    cfg: EncoderConfig
    encoder: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] | None = None
    pool: str = "prefix"
    classes: list[str] | None = None
    names: dict[str, str] = field(default_factory=dict)
    loss: str = "ce"
    front_end: FrontEnd | None = None
    source: str = ""
    own_export: bool = False
    provenance: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str] | None:
        """The display names in output order (HF's ``id2label``)."""
        return None if self.classes is None else [self.names.get(c, c) for c in self.classes]


# ------------------------------------------------------------------------------------------- reading
def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model directory (a folder with ``config.json``)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HFFormatError(f"{path} is not a readable JSON file: {err}") from err
    if not isinstance(data, dict):
        raise HFFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files an HF directory's weights are read from: ``model.safetensors`` or ``pytorch_model.bin``, or the
    index of a sharded one followed by its shards (what :func:`read_hf_directory` reads besides the JSON files;
    ``common.phases.init.init_digest`` hashes them)."""
    path = Path(path)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            weight_map = _read_json(path / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFFormatError(f"{path / index} has no weight_map")
            for key, shard in weight_map.items():  # a shard is a file beside the index, never a path elsewhere
                if not isinstance(shard, str) or not is_plain_name(shard):
                    raise HFFormatError(f"{path / index}: weight_map[{json.dumps(key)}] is {json.dumps(shard)}, not "
                                        f"the name of a file in {path}")
            return [path / index, *(path / shard for shard in sorted(set(weight_map.values())))]
    raise HFFormatError(f"{path} holds no weights (model.safetensors or pytorch_model.bin, optionally sharded)")


def _read_hf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory: safetensors or ``pytorch_model.bin`` (``weights_only``), sharded or not."""
    def load(file: Path) -> dict[str, torch.Tensor]:
        if not file.is_file():
            raise HFFormatError(f"{path}: weight file {file.name} is missing")
        if file.suffix == ".safetensors":
            try:
                return load_file(str(file))
            except Exception as err:  # noqa: BLE001 - SafetensorError, OSError
                raise HFFormatError(str(unreadable(file, err))) from err
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling / zip errors
            raise HFFormatError(f"{file} cannot be loaded with torch.load(weights_only=True): {err}") from err
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise HFFormatError(f"{file} does not hold a state dict of tensors")
        return state

    state = {}
    for file in weight_files(path):
        if not file.name.endswith(".index.json"):
            state.update(load(file))
    return state


_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
# per-layer HF module names (as saved, and as transformers 5 holds them in memory) -> this package's
_LAYER_NAMES = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
    "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
}
_TOP_NAMES = {"embeddings.position_embeddings": "pos_embed", "embeddings.patch_embeddings.projection.weight":
              "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
              "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HEAD_NAMES = {"classifier.layernorm.weight": "0.weight", "classifier.layernorm.bias": "0.bias",
               "classifier.dense.weight": "1.weight", "classifier.dense.bias": "1.bias"}


def _from_hf_state(state: dict[str, torch.Tensor], cfg: EncoderConfig, source: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """HF AST tensors -> ``(encoder state dict, head state dict or None)``; unknown or missing keys are errors."""
    encoder: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    tokens: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        name = key[len(BASE_PREFIX):] if key.startswith(BASE_PREFIX) else key
        if name in _TOP_NAMES:
            encoder[_TOP_NAMES[name]] = value
        elif name in ("embeddings.cls_token", "embeddings.distillation_token"):
            tokens[name] = value
        elif name in _HEAD_NAMES:
            head[_HEAD_NAMES[name]] = value
        elif (m := _LAYER_KEY.match(name)) and m.group(2) in _LAYER_NAMES:
            layer, ours, kind = int(m.group(1)), _LAYER_NAMES[m.group(2)], m.group(3)
            if ours in ("q", "k", "v"):
                qkv.setdefault((layer, kind), {})[ours] = value
            else:
                encoder[f"blocks.{layer}.{ours}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise HFFormatError(f"{source}: tensors that are not part of an AST: {sorted(unknown)[:6]}")
    if len(tokens) != 2:
        raise HFFormatError(f"{source}: an HF AST has a cls and a distillation token; found {sorted(tokens)}")
    encoder["prefix_tokens"] = torch.cat([tokens["embeddings.cls_token"], tokens["embeddings.distillation_token"]],
                                         dim=1)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise HFFormatError(f"{source}: layer {layer} has attention {kind} for {sorted(parts)} only")
        encoder[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)

    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in ASTEncoder(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(encoder))
    extra = sorted(set(encoder) - set(expected))
    if missing or extra:
        raise HFFormatError(f"{source}: the weights do not match config.json's {cfg.depth} layers / "
                            f"{cfg.embed_dim} hidden size: missing {missing[:5]}, unexpected {extra[:5]}")
    wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in encoder.items()
             if tuple(v.shape) != expected[k]]
    if wrong:
        raise HFFormatError(f"{source}: tensor shapes do not match config.json's geometry ({_geometry(cfg)}): "
                            f"{'; '.join(wrong[:3])}")
    if head and set(head) != set(_HEAD_NAMES.values()):
        raise HFFormatError(f"{source}: incomplete classifier head (found {sorted(head)})")
    return encoder, head or None


def _geometry(cfg: EncoderConfig) -> str:
    return (f"{cfg.num_mel_bins} mel bins x {cfg.input_tdim} frames, patch {cfg.fshape}x{cfg.tshape}, "
            f"stride {cfg.fstride}x{cfg.tstride}, grid {cfg.grid[0]}x{cfg.grid[1]}")


def _config_to_encoder(config: dict, source: str) -> tuple[EncoderConfig, float]:
    """``config.json`` -> ``(EncoderConfig, layer_norm_eps)``."""
    if config.get("model_type") != MODEL_TYPE:
        raise HFFormatError(f"{source} is a Hugging Face {config.get('model_type')!r} model, not an audio spectrogram "
                            f"transformer ({MODEL_TYPE!r})")
    c = {**CONFIG_DEFAULTS, **{k: v for k, v in config.items() if k in CONFIG_DEFAULTS}}
    patch = c["patch_size"]
    if isinstance(patch, (list, tuple)):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise HFFormatError(f"{source}: patch_size {patch} is not square (ASTPatchEmbeddings uses a square kernel)")
        patch = patch[0]
    c["patch_size"] = patch
    if c["hidden_act"] != "gelu":
        raise HFFormatError(f"{source}: hidden_act {c['hidden_act']!r}; this package's blocks use exact GELU ('gelu')")
    size = {k: _typed(c, k, int, source) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_mel_bins", "max_length",
                                                   "patch_size", "frequency_stride", "time_stride")}
    hidden, qkv_bias = size["hidden_size"], _typed(c, "qkv_bias", bool, source)
    try:
        cfg = EncoderConfig(embed_dim=hidden, depth=size["num_hidden_layers"],
                            num_heads=size["num_attention_heads"], mlp_ratio=size["intermediate_size"] / hidden,
                            qkv_bias=qkv_bias, num_mel_bins=size["num_mel_bins"],
                            input_tdim=size["max_length"], fshape=size["patch_size"], tshape=size["patch_size"],
                            fstride=size["frequency_stride"], tstride=size["time_stride"], num_prefix_tokens=2)
    except ValueError as err:
        raise HFFormatError(f"{source}: {err}") from err
    return cfg, _typed(c, "layer_norm_eps", float, source)


_KINDS = {int: "a positive integer", float: "a number", bool: "true or false", dict: "a JSON object"}


def _typed(values: dict, key: str, kind: type, source: str):
    """``values[key]`` if it is of ``kind`` (``int``: positive; ``float``: any number; ``dict``: an object), as
    JSON gives it (true is no number here).

    Raises:
        HFFormatError: naming ``source`` (the JSON file) and the key, instead of a TypeError or ZeroDivisionError
            where the value is used (``hidden_size: null``, ``0``, ``"abc"``, ``num_hidden_layers: [1]``).
    """
    value = values[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {int: number and isinstance(value, int) and value > 0, float: number, bool: isinstance(value, bool),
          dict: isinstance(value, dict)}[kind]
    if not ok:
        raise HFFormatError(f"{source}: {key} must be {_KINDS[kind]}, got {json.dumps(value)}")
    return float(value) if kind is float else value


def _norm_name(mean: float, std: float) -> str | None:
    """The ``NORM_STATS`` name of exactly these statistics, if there is one."""
    return next((name for name, s in NORM_STATS.items() if s.mean == mean and s.std == std), None)


def _read_front_end(path: Path) -> FrontEnd | None:
    file = path / PREPROCESSOR_FILE
    if not file.is_file():
        return None
    p = {**PREPROCESSOR_DEFAULTS, **_read_json(file)}
    kind = p.get("feature_extractor_type", "ASTFeatureExtractor")
    if kind != "ASTFeatureExtractor":
        raise HFFormatError(f"{file}: feature_extractor_type {kind!r}; only ASTFeatureExtractor is supported")
    if not _typed(p, "do_normalize", bool, str(file)) or _typed(p, "padding_value", float, str(file)) != 0.0:
        raise HFFormatError(f"{file}: do_normalize={p['do_normalize']}, padding_value={p['padding_value']}; this "
                            f"package's front end normalises and pads with 0")
    mean, std = _typed(p, "mean", float, str(file)), _typed(p, "std", float, str(file))
    try:
        NormStats(mean, std)  # validates
    except ValueError as err:
        raise HFFormatError(f"{file}: {err}") from None
    rate, bins, frames = (_typed(p, k, int, str(file)) for k in ("sampling_rate", "num_mel_bins", "max_length"))
    return FrontEnd(rate, bins, frames, mean, std, _norm_name(mean, std) or str(file))


def read_hf_directory(path: str | os.PathLike) -> ASTWeights:
    """Read a Hugging Face AST directory (``ASTModel`` or ``ASTForAudioClassification``).

    Args:
        path: a folder with ``config.json``, the weights and, optionally, ``preprocessor_config.json``.

    Returns:
        The model in this package's terms: the encoder (cls and distillation tokens as the two prefix
        tokens; query / key / value fused into ``qkv``), the head if there is one (``prefix`` pooling:
        HF pools ``(cls + dist) / 2``), the labels (``id2label``; the class ids written by :func:`export_hf`
        when present), the loss (``bce`` for ``problem_type: multi_label_classification``) and the front end.

    Raises:
        HFFormatError: not an AST, an activation other than GELU, weights that do not match the config.
    """
    path = Path(path)
    if not is_hf_directory(path):
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no {CONFIG_FILE})")
    config = _read_json(path / CONFIG_FILE)
    cfg, eps = _config_to_encoder(config, str(path / CONFIG_FILE))
    encoder, head = _from_hf_state(_read_hf_tensors(path), cfg, str(path))
    if eps != LAYER_NORM_EPS:
        log.info("%s: layer_norm_eps %g; this package's blocks use %g (outputs differ by ~1e-6 relative)", path, eps,
                 LAYER_NORM_EPS)
    classes, names = None, {}
    if head is not None:
        n = head["1.weight"].shape[0]
        if config.get("id2label") is not None:
            _typed(config, "id2label", dict, str(path / CONFIG_FILE))
        id2label = {str(k): str(v) for k, v in (config.get("id2label") or {}).items()}
        if not id2label:
            id2label = {str(i): f"LABEL_{i}" for i in range(n)}  # what ASTConfig would say
        if set(id2label) != {str(i) for i in range(n)}:
            raise HFFormatError(f"{path / CONFIG_FILE}: id2label has keys {sorted(id2label)[:5]}..., the classifier "
                                f"has {n} outputs (keys 0..{n - 1} expected)")
        labels = [id2label[str(i)] for i in range(n)]
        if config.get("coarse2fine") is not None:
            _typed(config, "coarse2fine", dict, str(path / CONFIG_FILE))
        ids = (config.get("coarse2fine") or {}).get("classes")
        classes = [str(c) for c in ids] if isinstance(ids, list) and len(ids) == n else labels
        names = dict(zip(classes, labels))
    loss = _hf_loss(config.get("problem_type"), None if head is None else len(classes), path)
    ours = config.get("coarse2fine") if isinstance(config.get("coarse2fine"), dict) else {}
    return ASTWeights(cfg, encoder, head, "prefix", classes, names, loss, _read_front_end(path), str(path),
                      "coarse2fine" in config, provenance(ours))


AUDIOSET_CLASSES = 527


def provenance(meta: dict) -> dict:
    """What :attr:`ASTWeights.provenance` keeps of a file's metadata (or of a directory's ``coarse2fine``): what
    changes how an ``--init`` is used, an SSAST encoder's objective and an official checkpoint's source."""
    kept = {"objective": "ssast", "source": "official"}
    return {key: value for key, value in kept.items() if meta.get(key) == value}


def _hf_loss(problem_type: str | None, outputs: int | None, path) -> str:
    """``bce`` (sigmoid scores, multi-label) or ``ce`` (softmax) for an HF classifier. A config without
    ``problem_type`` (the MIT AST AudioSet checkpoints have none) is read as multi-label when it has AudioSet's
    527 outputs, which AST trains with BCE and scores with sigmoids (softmax scores would change every class's
    ranking of the clips, and so the mAP), else as single-label."""
    if problem_type is not None or outputs is None:
        return "bce" if problem_type == "multi_label_classification" else "ce"
    if outputs == AUDIOSET_CLASSES:
        log.info("%s: config.json has no problem_type; its %d outputs are AudioSet's classes, trained multi-label: "
                 "scored with sigmoids (BCE)", path, outputs)
        return "bce"
    log.info("%s: config.json has no problem_type: scored as single-label (softmax)", path)
    return "ce"


def hf_classifier_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """An HF AST directory as ``(tensors, metadata)`` laid out like a classifier export of this package
    (what :func:`finetune.classifier.load_classifier` reads); an ``ASTModel`` comes without ``classifier``."""
    model = read_hf_directory(path)
    tensors = {f"encoder.{k}": v for k, v in model.encoder.items()}
    meta = {"encoder_config": model.cfg.to_dict(), "encoder_prefix": "encoder.", "source": "hf", "init": str(path)}
    if model.head is None:
        return tensors, meta
    fe = model.front_end
    if fe is None:
        raise HFFormatError(f"{path} has no {PREPROCESSOR_FILE}: the features the model expects (sampling rate, "
                            f"normalisation) are unknown")
    tensors.update({f"head.{k}": v for k, v in model.head.items()})
    meta.update({
        "classifier": {"classes": model.classes, "pool": "prefix"},
        "audio": {"sample_rate": fe.sample_rate, "num_mel_bins": fe.num_mel_bins, "frame_shift_ms": HF_FRAME_SHIFT_MS,
                  "frame_length_ms": HF_FRAME_LENGTH_MS, "target_frames": fe.max_length, "norm": fe.norm},
        "phase": {"compression": "none", "factor": 1}, "objective": "classification", "loss": model.loss,
        "metric": "mAP" if model.loss == "bce" else "acc", "class_names": model.names,
    })
    return tensors, meta


def kept_head(init: str | os.PathLike, classes: Sequence[str], names: dict[str, str], pool: str
              ) -> dict[str, torch.Tensor]:
    """The classifier head of an HF AST directory, for ``finetune/run.py --keep-head``.

    Args:
        init: the ``--init`` directory.
        classes, names: the task's class ids (in output order) and display names.
        pool: the recipe's ``head.pool``; must be ``prefix`` (the pooling the HF head was trained on).

    Returns:
        The head's state dict (keys of ``nn.Sequential(LayerNorm, Linear)``), rows in the task's order.

    Raises:
        ValueError: not an HF classification directory, mean pooling, or labels that differ from the task's
            (the message names the difference).
    """
    if not is_hf_directory(init):
        raise ValueError(f"--keep-head: --init {init} is not a Hugging Face AST directory (only their heads are kept)")
    model = read_hf_directory(init)
    if model.head is None:
        raise ValueError(f"--keep-head: {init} is an ASTModel without a classification head")
    if pool != "prefix":
        raise ValueError(f"--keep-head: the kept head was trained on HF's (cls + dist) / 2 pooling, but head.pool is "
                         f"{pool!r}; add --set head.pool=prefix")
    task_ids, task_names = list(classes), [names.get(c, c) for c in classes]
    if model.classes in (task_ids, task_names) or model.labels in (task_ids, task_names):
        return dict(model.head)
    theirs = model.labels
    ours = task_names if set(task_names) & set(theirs) else task_ids
    only_task, only_model = [c for c in ours if c not in theirs], [c for c in theirs if c not in ours]
    if only_task or only_model:
        detail = (f"{len(only_task)} task classes are not model labels ({', '.join(only_task[:5])}); "
                  f"{len(only_model)} model labels are not task classes ({', '.join(only_model[:5])})")
    else:
        i = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        detail = f"same labels in another order (position {i}: task {ours[i]!r}, model {theirs[i]!r})"
    raise ValueError(f"--keep-head: the task's classes differ from {init}'s labels: {detail}; drop --keep-head to "
                     f"train a new head")
