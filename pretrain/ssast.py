"""SSAST objectives: masked patch classification (InfoNCE) and generation (MSE), as a trainer Objective.

Per clip, M of the N patch embeddings are replaced by a learned mask embedding *before* the positions
are added (so masked tokens still know where they are); the encoder runs over all tokens; two heads
(Linear-ReLU-Linear, sized from the patch area, not SSAST's hard-coded 256) read the masked outputs:

- MPC (discriminative): logits ``[M targets x M predictions]`` between the raw normalised patches of the
  same clip and the predictions; InfoNCE over the diagonal. ``nce_softmax: targets`` normalises over the
  targets for each prediction (SSAST paper Eq. 1); ``predictions`` over the predictions for each target
  (what the official code does, SSAST issue #13). Accuracy: for each prediction, the argmax over targets of
  the softmax the NCE takes (the official code's, which normalises each target's row first), chance 1/M.
- MPG (generative): MSE between predicted and raw patches.

Joint loss ``nce + mpg_weight * mse`` (10 in SSAST), by default with two forward passes and two masks as
the official trainer; ``separate_passes: false`` shares one pass (half the compute, not SSAST).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from common.audio.augment import SpecAugmentConfig
from common.audio.pipeline import FeaturePipeline
from common.data.clips import Batch
from common.models.arch import architecture_for
from common.models.ast.encoder import ASTEncoder, EncoderConfig
from common.models.ast.resize import resample_patch_kernel
from common.models.exports import save_weights
from common.models.flops import train_step_flops
from common.models.memory import MemoryEstimate, estimate_training_memory
from common.system.distributed import Dist
from pretrain.mask_draws import MaskDraws, clip_seed
from pretrain.masking import MASKINGS, mask_count, sample_mask

__all__ = ["SSASTConfig", "SSASTModel", "SSASTObjective"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSASTConfig:
    """The pretext tasks.

    Args:
        mask_ratio: share of patches masked, constant across phases (400 / 512 in SSAST).
        eval_mask_ratio: share of patches the validation masks (its accuracy's scale: chance is one over their
            number); the official validation masks 400 of 512 whatever the training mask (``validatemask``),
            the same share of a coarse phase's grid here; None: the training ratio.
        masking: ``auto``, ``uniform``, ``cluster`` or ``cluster_ssast`` (see ``pretrain.masking``).
        cluster_min, cluster_max: cluster sides for ``cluster`` (SSAST: 3 to 5).
        nce_softmax: ``targets`` (paper Eq. 1) or ``predictions`` (the official code).
        mpg_weight: weight of the generative MSE in the joint loss.
        separate_passes: one forward pass (and mask) per objective, as the official trainer.
    """

    mask_ratio: float = 400 / 512
    eval_mask_ratio: float | None = 400 / 512
    masking: Literal["auto", "uniform", "cluster", "cluster_ssast"] = "auto"
    cluster_min: int = 3
    cluster_max: int = 5
    nce_softmax: Literal["targets", "predictions"] = "targets"
    mpg_weight: float = 10.0
    separate_passes: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.eval_mask_ratio is not None and not 0 < self.eval_mask_ratio < 1:
            raise ValueError(f"eval_mask_ratio must be in (0, 1) or null (the training ratio), got "
                             f"{self.eval_mask_ratio}")
        if self.masking not in MASKINGS:
            raise ValueError(f"unknown masking {self.masking!r}")
        if not 1 <= self.cluster_min <= self.cluster_max:
            raise ValueError("need 1 <= cluster_min <= cluster_max")
        if not 0 <= self.mpg_weight < math.inf:  # also NaN
            raise ValueError(f"mpg_weight must be >= 0 and finite, got {self.mpg_weight}")

    @property
    def eval_ratio(self) -> float:
        """The share of patches the validation masks (``eval_mask_ratio``, or the training ratio)."""
        return self.eval_mask_ratio if self.eval_mask_ratio is not None else self.mask_ratio


def _head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


def _fp32(device: torch.device):
    """A context without autocast on ``device`` (nothing to disable where autocast does not exist, e.g.
    the meta device FLOPs are counted on)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [B, M]`` of ``x [B, N, C]`` -> ``[B, M, C]``."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class SSASTModel(nn.Module):
    """Encoder + mask embedding + MPC / MPG heads (parameter names as the official checkpoints)."""

    def __init__(self, encoder: ASTEncoder, cfg: SSASTConfig) -> None:
        super().__init__()
        if not isinstance(encoder, ASTEncoder):
            raise ValueError(f"SSAST masked-patch pretraining needs a ViT encoder (model.arch: ast), got "
                             f"{type(encoder).__name__}")
        self.encoder = encoder
        self.cfg = cfg
        dim, area = encoder.cfg.embed_dim, encoder.cfg.patch_area
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.xavier_normal_(self.mask_embed)
        self.cpredlayer = _head(dim, area)
        self.gpredlayer = _head(dim, area)
        self.mask_count = mask_count(encoder.cfg.num_patches, cfg.mask_ratio)
        self.eval_mask_count = mask_count(encoder.cfg.num_patches, cfg.eval_ratio)

    def sample_mask(self, batch: int, generator: torch.Generator | None, device, count: int | None = None
                    ) -> torch.Tensor:
        """Sorted indices ``[batch, count]`` (default: the training mask's count) of patches to mask."""
        cfg = self.cfg
        idx = sample_mask(batch, self.encoder.cfg.grid, count or self.mask_count, cfg.masking, generator,
                          (cfg.cluster_min, cfg.cluster_max))
        return idx.to(device)

    def validation_masks(self, ids: Sequence[str], seed: int, device) -> list[torch.Tensor]:
        """The masks of a validation batch of clips ``ids`` (one per pass), of ``eval_mask_count`` patches each:
        each clip's drawn by a generator of its own, seeded by ``seed`` and the clip's id, so that a clip is scored
        with the same masks whatever clips share its batch, however many ranks validate and whatever the batch
        size (drawn a batch at a time, they moved the masked-patch accuracy by 0.18-0.24 between eval batch sizes
        on one set of weights, and a score with them)."""
        passes = 2 if self.cfg.separate_passes else 1
        masks: list[list[torch.Tensor]] = [[] for _ in range(passes)]
        for clip in ids:
            generator = torch.Generator().manual_seed(clip_seed(seed, clip))
            for drawn in masks:
                drawn.append(self.sample_mask(1, generator, "cpu", self.eval_mask_count))
        return [torch.cat(drawn).to(device) for drawn in masks]

    def encode_masked(self, x: torch.Tensor, idx: torch.Tensor, *more: torch.Tensor):
        """Encoder outputs ``[B, M, D]`` at the masked positions ``idx`` (mask embedding in their place).

        With ``more`` masks, a tuple of one output per mask, computed in one encoder pass over a batch of
        ``(1 + len(more)) x B`` clips: the numbers of separate passes (each clip's tokens attend only to
        themselves), with half the kernel launches, which is what a GPU step over few tokens (a coarse
        phase) waits on.
        """
        tokens = self.encoder.embed_patches(x)
        if more:
            idx = torch.cat([idx, *more])
            tokens = tokens.repeat(1 + len(more), 1, 1)
        fill = self.mask_embed.to(tokens.dtype).expand(tokens.shape[0], idx.shape[1], -1)
        tokens = tokens.scatter(1, idx.unsqueeze(-1).expand_as(fill), fill)
        hidden = _gather(self.encoder.forward_tokens(tokens)[:, self.encoder.num_prefix_tokens:], idx)
        return hidden.chunk(1 + len(more)) if more else hidden

    def mpc_logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[B, M targets, M predictions]`` similarities, in float32 whatever the autocast around it.

        The head runs under the caller's autocast; the ``M x M`` products do not: under bf16 autocast a
        matmul of ``.float()`` tensors is computed in bf16 again (8 bits of mantissa), which blurs the
        logits of 400 near-identical candidates that the softmax and the accuracy compare.
        """
        pred = self.cpredlayer(hidden)
        with _fp32(hidden.device):
            return targets.float() @ pred.float().transpose(1, 2)

    def mpc(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE and accuracy between predictions from ``hidden`` and ``targets`` (both ``[B, M, .]``),
        computed in float32 with autocast disabled."""
        logits = self.mpc_logits(hidden, targets)
        with _fp32(logits.device):
            dim = 1 if self.cfg.nce_softmax == "targets" else 2
            nce = -torch.diagonal(F.log_softmax(logits, dim=dim), dim1=1, dim2=2).mean()
            labels = torch.arange(logits.shape[1], device=logits.device)
            # the official accuracy: argmax over targets of the softmax over predictions when the NCE normalises
            # over predictions (a different argmax than the raw logits'); over targets the softmax changes none
            scores = F.softmax(logits, dim=2) if dim == 2 else logits
            acc = (scores.argmax(dim=1) == labels).float().mean()
        return nce, acc

    def mpg(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MSE between the predicted and the raw patches, in float32 with autocast disabled."""
        pred = self.gpredlayer(hidden)
        with _fp32(hidden.device):
            return F.mse_loss(pred.float(), targets.float())

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                masks: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Joint SSAST loss of a normalised fbank batch ``[B, T, F]``; ``masks``: the mask indices already drawn
        (one per pass, on the device: ``pretrain.mask_draws``), else drawn here from ``generator``."""
        patches = self.encoder.unfold_patches(x).detach()  # raw targets [B, N, fshape * tshape]
        masks = list(masks) if masks is not None else []
        idx = masks.pop(0) if masks else self.sample_mask(x.shape[0], generator, x.device)
        if self.cfg.separate_passes:  # a mask per objective, both passes batched into one (encode_masked)
            idx_g = masks.pop(0) if masks else self.sample_mask(x.shape[0], generator, x.device)
            hidden, hidden_g = self.encode_masked(x, idx, idx_g)
        else:
            idx_g, hidden = idx, self.encode_masked(x, idx)
            hidden_g = hidden
        nce, acc = self.mpc(hidden, _gather(patches, idx))
        mse = self.mpg(hidden_g, _gather(patches, idx_g))
        return {"loss": nce + self.cfg.mpg_weight * mse, "nce": nce.detach(), "mse": mse.detach(),
                "acc": acc.detach()}


def adapt_heads(state: dict, old: EncoderConfig, new: EncoderConfig) -> dict:
    """Resize the heads' outputs when the patch shape changes (``patch`` phases): each output unit is a
    patch cell, so the output weights and biases are resized like a patch image (new prediction =
    bilinear resize of the old one)."""
    shape_old, shape_new = (old.fshape, old.tshape), (new.fshape, new.tshape)
    if shape_old == shape_new:
        return state
    out = dict(state)
    for head in ("cpredlayer", "gpredlayer"):
        if f"{head}.2.weight" not in out:  # a state with one head (an init that has only that one)
            continue
        weight, bias = out[f"{head}.2.weight"], out[f"{head}.2.bias"]  # [P, D], [P]
        as_kernel = weight.T.reshape(weight.shape[1], 1, *shape_old)
        out[f"{head}.2.weight"] = resample_patch_kernel(as_kernel, shape_new, "bilinear", what=None).reshape(
            weight.shape[1], -1).T.contiguous()
        out[f"{head}.2.bias"] = resample_patch_kernel(bias.reshape(1, 1, *shape_old), shape_new, "bilinear",
                                                      what=None).reshape(-1)
        log.info("resized %s's outputs (one per patch cell) %dx%d -> %dx%d (bilinear, whatever patch_transfer is)",
                 head, *shape_old, *shape_new)
    return out


class SSASTObjective:
    """SSAST pretraining as a :class:`common.training.objective.Objective`."""

    specaug = SpecAugmentConfig()  # SSAST pretrains without SpecAugment or mixup
    score_name = "acc"
    classes = None

    def __init__(self, cfg: SSASTConfig, initial_heads: dict[str, torch.Tensor] | None = None) -> None:
        self.cfg = cfg
        self.initial_heads = dict(initial_heads or {})  # pretext parts of --init, fitted to the first phase

    def load_initial_heads(self, model: SSASTModel) -> None:
        """Put the pretext parts ``--init`` brought (``pretrain.init``) into the first phase's model; the
        others keep their fresh initialisation."""
        if not self.initial_heads:
            return
        own = model.state_dict()
        wrong = [k for k, v in self.initial_heads.items() if k not in own or own[k].shape != v.shape]
        if wrong:
            raise ValueError(f"the initial pretext heads do not fit the first phase's model: {wrong[:3]}")
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.initial_heads.items()}, strict=False)

    def build_model(self, geometry: EncoderConfig) -> SSASTModel:
        return SSASTModel(architecture_for(geometry).build_encoder(geometry), self.cfg)

    def adapt_state(self, state: dict, old: EncoderConfig, new: EncoderConfig) -> dict:
        return adapt_heads(state, old, new)

    def train_step(self, model, batch: Batch, pipeline: FeaturePipeline, generator: torch.Generator):
        """One training forward; the masks come from :class:`pretrain.mask_draws.MaskDraws` (drawn a batch ahead,
        seeded by the batch's position and ``generator``'s seed, the run's seed and rank)."""
        x = pipeline(batch.waveforms, batch.lengths)
        masks = self._draws(getattr(model, "module", model), generator).take(batch.epoch, batch.index, len(x),
                                                                             x.device)
        out = model(x, generator, masks=masks)
        return out["loss"], {k: out[k] for k in ("nce", "mse", "acc")}

    def _draws(self, model: SSASTModel, generator: torch.Generator) -> MaskDraws:
        """The mask draws of ``model``'s grid (a phase change starts new ones)."""
        cfg, grid = self.cfg, tuple(model.encoder.cfg.grid)
        key = (grid, model.mask_count, generator.initial_seed())
        if getattr(self, "_mask_key", None) != key:
            if getattr(self, "_mask_draws", None) is not None:
                self._mask_draws.close()
            pin = torch.cuda.is_available() and next(model.parameters()).is_cuda
            self._mask_draws = MaskDraws(grid, model.mask_count, cfg.masking, (cfg.cluster_min, cfg.cluster_max),
                                         2 if cfg.separate_passes else 1, generator.initial_seed(), pin)
            self._mask_key = key
        return self._mask_draws

    def close(self) -> None:
        """End the mask drawing thread (the run's end; a later run of this objective starts another)."""
        if getattr(self, "_mask_draws", None) is not None:
            self._mask_draws.close()
        self._mask_draws = self._mask_key = None

    def evaluate(self, model, batches: Iterator[Batch], pipeline: FeaturePipeline, dist: Dist,
                 generator: torch.Generator) -> dict[str, float]:
        # nce, mse, acc (clip-weighted sums), clips; then per batch b of n_b clips and accuracy a_b: n_b^2,
        # n_b^2 a_b, n_b^2 a_b^2 and the batch count (the accuracy's spread between batches: its noise)
        sums = torch.zeros(8, dtype=torch.float64, device=dist.device)
        for batch in batches:
            if not len(batch):
                continue
            x = pipeline(batch.waveforms.to(dist.device), batch.lengths.to(dist.device))
            inner = getattr(model, "module", model)
            out = model(x, masks=inner.validation_masks(batch.ids, generator.initial_seed(), x.device))
            n, a = len(batch), out["acc"].item()
            sums += torch.tensor([out["nce"].item() * n, out["mse"].item() * n, a * n, n, n * n, n * n * a,
                                  n * n * a * a, 1], dtype=torch.float64, device=dist.device)
        sums = dist.all_reduce_sum(sums)
        if sums[3] == 0:
            raise ValueError("validation produced no usable clip")
        nce, mse, acc = (sums[:3] / sums[3]).tolist()
        metrics = {"acc": acc, "nce": nce, "mse": mse, "loss": nce + self.cfg.mpg_weight * mse}
        clips, n2, n2a, n2a2, count = sums[3:].tolist()
        if count >= 2:  # the standard error of a mean over batches (clusters of clips), for common.phases.criteria
            spread = max(0.0, n2a2 - 2 * acc * n2a + acc * acc * n2)  # sum over batches of n_b^2 (a_b - acc)^2
            metrics["acc_se"] = (count / (count - 1) * spread) ** 0.5 / clips
        return metrics

    def _meta_step(self, cfg: EncoderConfig):
        def step(model: SSASTModel, n: int) -> torch.Tensor:
            return model(torch.randn(n, cfg.input_tdim, cfg.num_mel_bins))["loss"]

        return step

    def flops_per_sample(self, cfg: EncoderConfig) -> int:
        return train_step_flops(lambda: self.build_model(cfg), self._meta_step(cfg))

    def memory_estimate(self, cfg: EncoderConfig, batch: int, **setting) -> MemoryEstimate:
        """Bytes per rank to train at geometry ``cfg`` and micro-batch ``batch`` (``setting``: see
        :func:`common.models.memory.estimate_training_memory`)."""
        return estimate_training_memory(lambda: self.build_model(cfg), self._meta_step(cfg), batch, **setting)

    def score_settings(self, cfg: EncoderConfig) -> dict:
        """The masked-patch accuracy is an argmax over the masked patches (chance 1 / their number): how many are
        masked of how many, how they are drawn, and which softmax it takes the argmax of set its scale."""
        c = self.cfg
        return {"masked": mask_count(cfg.num_patches, c.eval_ratio), "patches": cfg.num_patches,
                "masking": c.masking, "cluster": [c.cluster_min, c.cluster_max], "nce_softmax": c.nce_softmax}

    def export(self, model: SSASTModel, path: Path, meta: dict) -> None:
        """The encoder (under ``encoder.``, which every reader of an export takes) with the pretext heads and
        the mask embedding beside it, so that pretraining can continue from the file (``--init``)."""
        save_weights(path, model.state_dict(), {"encoder_config": model.encoder.cfg.to_dict(),
                                                "encoder_prefix": "encoder.", **meta, "objective": "ssast"})
