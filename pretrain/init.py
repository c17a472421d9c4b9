"""Where continued pretraining starts: ``pretrain/run.py --init``.

SSAST pretraining can continue from weights trained elsewhere: an official SSAST pretraining checkpoint
(``module.v.*`` with its pretext heads ``module.cpredlayer.*``, ``module.gpredlayer.*`` and
``module.mask_embed``), this package's pretraining run or export (its pretext heads are exported with the
encoder), an official AST checkpoint or timm ImageNet ViT / DeiT weights (the encoder only). The file is
read as fine-tuning reads ``--init`` (:func:`common.phases.init.load_init`).

The recipe's ``model`` section says which transformer is trained; the init must hold the same one (width,
depth, MLP width, qkv bias, prefix tokens; an official ``.pth`` does not store its attention heads, so the
recipe's are used). Its grid-dependent weights are fitted to the first phase as fine-tuning fits them
(:func:`common.phases.transition.initial_model`): the positional embedding to the phase's grid (official files by
their code's rule, ``cut``, at full resolution and then as a phase change to a compressed first phase; ImageNet
weights by that rule on the phase's grid; this package's exports by ``transfer.pos_embed``;
``transfer.init_pos_embed`` overrides), the patch kernel PI-resized where the patch shape differs. The
pretext heads are kept where the file has them and their sizes fit (resized like a patch-phase change where
the patch shape differs), started afresh otherwise. Every decision is one log line and goes into the
ledger's ``init`` entry, with the size and SHA-256 of the file(s) read (``common.phases.init.init_digest``). A
resumed run reads its checkpoints, not ``--init``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config.recipe import RecipeError
from common.models.ast.encoder import EncoderConfig
from common.models.exports import read_weights, resolve_model_file
from common.models.weights import EncoderWeights
from common.phases.init import (
    CUT_AT_FULL,
    init_digest,
    init_family,
    init_patch_mode,
    init_pos_mode,
    load_init,
)
from pretrain.ssast import adapt_heads

__all__ = ["PretrainStart", "HEADS", "load_start", "pretext_heads"]

log = logging.getLogger(__name__)

# the pretext parts of an SSAST model besides its encoder, as pretrain.ssast.SSASTModel names them
HEADS = {"cpredlayer": "the MPC head", "gpredlayer": "the MPG head", "mask_embed": "the mask embedding"}
_TRANSFORMER = ("embed_dim", "depth", "mlp_ratio", "qkv_bias", "num_prefix_tokens")
_KINDS = {"ssast": "SSAST-pretrained", "ast": "AST (trained on labelled audio)", "imagenet": "ImageNet ViT / DeiT"}
_FORMATS = {"official": "official checkpoint", "export": "this package's export", "imagenet": "timm weights",
            "hf": "Hugging Face AST directory"}


@dataclass
class PretrainStart:
    """The weights a pretraining run starts from, fitted to its first phase.

    Attributes:
        weights: the encoder weights (its config's attention heads are the recipe's).
        heads: the pretext parts kept (``SSASTModel`` state-dict keys, fitted to the first phase).
        pos_mode: how the positional embedding is fitted (``cut`` or ``bilinear``).
        record: the ledger's ``init`` entry.
        lines: the decisions, one line each (logged by a run, printed by a plan).
    """

    weights: EncoderWeights
    heads: dict[str, torch.Tensor]
    pos_mode: str
    record: dict
    lines: list[str] = field(default_factory=list)


def _file(init: EncoderWeights, arg: str) -> str:
    return str(init.meta.get("file") or arg)


def pretext_heads(path: str, init: EncoderWeights) -> dict[str, torch.Tensor]:
    """The pretext parts a file holds (``SSASTModel`` names; empty when it has none): an official SSAST
    ``.pth``'s ``module.cpredlayer.*`` / ``module.gpredlayer.*`` / ``module.mask_embed``, or the tensors
    beside the encoder in this package's pretraining export."""
    source = init.meta.get("source")
    if source == "export":
        prefix = init.meta.get("encoder_prefix", "")
        if not prefix:
            return {}
        tensors, _ = read_weights(resolve_model_file(path))
    elif source == "official":
        tensors = torch.load(resolve_model_file(path), map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(tensors.get(wrapper), dict):
                tensors = tensors[wrapper]
        tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
    else:
        return {}
    return {k: v for k, v in tensors.items() if k.split(".")[0] in HEADS and isinstance(v, torch.Tensor)}


def _check_transformer(init: EncoderWeights, base: EncoderConfig, file: str) -> EncoderConfig:
    """The init's config with the recipe's attention heads where the file does not store them.

    Raises:
        RecipeError: naming the file and what differs, with the ``--set`` that matches the recipe to it.
    """
    if init.arch != "ast" or not isinstance(init.config, EncoderConfig):
        raise RecipeError(f"--init {file}: not a usable start: it holds an {init.arch} model (HTS-AT, a Swin "
                          f"transformer); SSAST pretraining continues a ViT encoder (an SSAST / AST checkpoint, "
                          f"ImageNet ViT / DeiT weights, or this package's pretraining run or export)")
    cfg = init.config
    changed = [n for n in _TRANSFORMER if getattr(cfg, n) != getattr(base, n)]
    stored_heads = init.meta.get("source") in ("export", "hf")
    if stored_heads and cfg.num_heads != base.num_heads:
        changed.append("num_heads")
    if changed:
        have = ", ".join(f"{n} {getattr(cfg, n)}" for n in changed)
        want = ", ".join(f"{n} {getattr(base, n)}" for n in changed)
        if {"mlp_ratio", "qkv_bias"} & set(changed):
            hint = "; this package's ViTs have an MLP 4 x as wide as the embedding, with a qkv bias"
        else:
            sets = [f"model.{n}={getattr(cfg, n)}" for n in ("embed_dim", "depth", "num_heads")
                    if {"embed_dim", "depth", "num_heads"} & set(changed)]
            sets += [f"model.num_prefix_tokens={cfg.num_prefix_tokens}"] if "num_prefix_tokens" in changed else []
            hint = "; train the file's transformer with " + " ".join(f"--set {s}" for s in sets)
        raise RecipeError(f"--init {file}: not a usable start: the file's encoder has {have}, the recipe's model "
                          f"{want}{hint}")
    return cfg if stored_heads else cfg.replace(num_heads=base.num_heads)


def _fit_heads(heads: dict[str, torch.Tensor], src: EncoderConfig, first: EncoderConfig, kind: str,
               ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Keep, resize or drop each pretext part: ``(kept tensors, {part: decision}, log lines)``."""
    dim, area = first.embed_dim, src.patch_area
    kept: dict[str, torch.Tensor] = {}
    decisions, lines = {}, []
    for part, words in HEADS.items():
        tensors = {k: v for k, v in heads.items() if k.split(".")[0] == part}
        expected = ({"mask_embed": (1, 1, dim)} if part == "mask_embed" else
                    {f"{part}.0.weight": (dim, dim), f"{part}.0.bias": (dim,), f"{part}.2.weight": (area, dim),
                     f"{part}.2.bias": (area,)})
        if not tensors:
            why = {"imagenet": "an ImageNet start has no pretext task",
                   "ast": "a model trained on labelled audio has no pretext heads"}.get(
                kind, "the file holds none (an export written before pretraining exports carried them)")
            decisions[part] = "fresh"
            lines.append(f"init: {part} ({words}) starts afresh: {why}")
            continue
        wrong = [f"{k} {tuple(tensors[k].shape) if k in tensors else 'missing'} (expected {s})"
                 for k, s in expected.items() if k not in tensors or tuple(tensors[k].shape) != s]
        if wrong:
            decisions[part] = "fresh"
            lines.append(f"init: {part} ({words}) starts afresh: the file's does not fit its {src.fshape}x"
                         f"{src.tshape} patches and width {dim}: {'; '.join(wrong[:2])}")
            continue
        mine = {k: tensors[k].detach().float() for k in expected}
        kept.update(mine)
        if part != "mask_embed" and (src.fshape, src.tshape) != (first.fshape, first.tshape):
            kept.update(adapt_heads(mine, src, first))
            decisions[part] = f"kept, resized {src.fshape}x{src.tshape} -> {first.fshape}x{first.tshape}"
            lines.append(f"init: {part} ({words}) kept from the file, its outputs resized from {src.fshape}x"
                         f"{src.tshape} to {first.fshape}x{first.tshape} patches as at a patch-phase change")
        else:
            decisions[part] = "kept"
            lines.append(f"init: {part} ({words}) kept from the file")
    return kept, decisions, lines


def load_start(arg: str, recipe) -> PretrainStart:
    """Read ``--init`` ``arg`` and fit it to ``recipe``'s (a :class:`pretrain.recipe.PretrainRecipe`) first
    phase.

    Raises:
        FileNotFoundError: the file (or the run's final export) is not there.
        RecipeError: it is not a usable start (one line naming the file and the reason).
    """
    try:
        init = load_init(arg)
    except ValueError as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise RecipeError(f"--init {arg}: not a usable start: {first}") from None
    if init is None:
        raise RecipeError("--init none: leave --init out to pretrain from scratch")
    file = _file(init, arg)
    base, first = recipe.base, recipe.encoder_configs()[0]
    guessed = getattr(init.config, "num_heads", None)  # official files and timm weights do not store it
    cfg = _check_transformer(init, base, file)
    init = init._replace(config=cfg)
    kind = init_family(init)
    fmt = init.meta.get("source", "?")
    pos_mode = init_pos_mode(init, recipe.transfer.pos_embed, recipe.transfer.init_pos_embed,
                             not recipe.phases[0].as_compression().is_full_resolution)
    patch_mode = init_patch_mode(init, recipe.phases[0])
    lines = [f"init: {file} ({_KINDS.get(kind, kind)}, {_FORMATS.get(fmt, fmt)}): the encoder starts from its "
             f"weights"]
    if fmt not in ("export", "hf") and guessed != base.num_heads:
        lines.append(f"init: the file does not store its number of attention heads; the recipe's {base.num_heads} "
                     f"are used")
    rule = "transfer.init_pos_embed" if recipe.transfer.init_pos_embed != "auto" else \
        "the rule of the file's code" if pos_mode in ("cut", CUT_AT_FULL) else "transfer.pos_embed"
    if cfg.grid == first.grid:
        lines.append(f"init: positional embedding kept: the file's grid {cfg.grid[0]}x{cfg.grid[1]} is the first "
                     f"phase's")
    elif pos_mode == CUT_AT_FULL:
        full = base.grid
        lines.append(f"init: positional embedding {cfg.grid[0]}x{cfg.grid[1]} -> {full[0]}x{full[1]} at full "
                     f"resolution (cut: {rule}), then -> {first.grid[0]}x{first.grid[1]} for the first phase "
                     f"({recipe.transfer.pos_embed}, as a phase change)")
    else:
        lines.append(f"init: positional embedding {cfg.grid[0]}x{cfg.grid[1]} -> {first.grid[0]}x{first.grid[1]} "
                     f"for the first phase ({pos_mode}: {rule})")
    same_patch = (cfg.fshape, cfg.tshape) == (first.fshape, first.tshape)
    if same_patch:
        lines.append(f"init: patch embedding kept: {cfg.fshape}x{cfg.tshape} patches, as the first phase's")
    else:
        lines.append(f"init: patch embedding {cfg.fshape}x{cfg.tshape} -> {first.fshape}x{first.tshape} "
                     f"({patch_mode}-resized, as fine-tuning does)")
    heads, decisions, head_lines = _fit_heads(pretext_heads(arg, init), cfg, first, kind)
    lines += head_lines
    weights = init_digest(arg)  # which weights, by content: the file may be written again after the run started
    record = {"source": str(arg), "file": file, "size": weights["size"], "sha256": weights["sha256"],
              "kind": kind, "format": fmt,
              "pos_embed": {"from": list(cfg.grid), "to": list(first.grid),
                            "mode": None if cfg.grid == first.grid else pos_mode},
              "patch_embed": {"from": [cfg.fshape, cfg.tshape], "to": [first.fshape, first.tshape],
                              "mode": None if same_patch else patch_mode},
              "heads": decisions,
              "kept": sorted(p for p, d in decisions.items() if d != "fresh"),
              "fresh": sorted(p for p, d in decisions.items() if d == "fresh")}
    return PretrainStart(init, heads, pos_mode, record, lines)


def missing_line(arg: str, err: Exception) -> str:
    """The plan's line for an ``--init`` that is not there yet."""
    hint = ""
    path = Path(arg)
    if path.parent.name == "pretrain" and (Path("recipes") / f"{path.name}.yaml").is_file():
        hint = f" (the pretraining run `python pretrain/run.py --recipe recipes/{path.name}.yaml` writes it)"
    return f"--init: {err}{hint}"
