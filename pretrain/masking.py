"""Which patches SSAST masks: vectorised over the batch, returned as sorted indices ``[B, M]``.

- ``uniform``: M patches drawn uniformly without replacement (SSAST's frame models).
- ``cluster``: square clusters of 3x3 to 5x5 patches (size drawn per clip) are laid on the token grid one
  after the other until M patches are covered; the last cluster is covered partly, at random (the patches of
  one cluster are taken in random order). Cluster
  corners range over positions that let a cluster hang over every edge, so every patch is about equally
  likely to be masked (edge rows and columns within about 1.5 % of the others, as the partly covered last
  cluster falls; the official generator's rows range from 0.41 to 0.89); SSAST's patch models use clustered
  masking.
- ``cluster_ssast``: SSAST's own generator, biases included (``gen_maskid_patch`` in its
  ``src/models/ast_models.py``): clusters grow
  right and down from a random token id and wrap across rows, id 0 is never masked, clusters are added
  until more than M ids are covered, and the M *lowest* ids are kept (so low mel bins are masked about
  half as often). For reproducing the official numbers only.

Indices, not boolean masks, so that shapes stay static (and FLOPs can be counted on the meta device).
"""

from __future__ import annotations

import math

import torch

__all__ = ["MASKINGS", "mask_count", "sample_mask"]

MASKINGS = ("auto", "uniform", "cluster", "cluster_ssast")


def mask_count(num_patches: int, ratio: float) -> int:
    """Patches to mask for a grid of ``num_patches``: the ratio is what stays constant across phases
    (SSAST: 400 of 512 = 0.78125 -> 100 of 128 at C = 4)."""
    count = round(ratio * num_patches)
    if not 1 <= count < num_patches:
        raise ValueError(f"mask ratio {ratio} masks {count} of {num_patches} patches; it must mask at least one "
                         f"and leave at least one unmasked")
    return count


def _rand(shape, generator):
    return torch.rand(shape, generator=generator) if generator is not None else torch.rand(shape)


def _randint(low: int, high: int, shape, generator):
    return torch.randint(low, high, shape, generator=generator) if generator is not None else \
        torch.randint(low, high, shape)


def _uniform(batch: int, n: int, count: int, generator) -> torch.Tensor:
    return _rand((batch, n), generator).topk(count, dim=1, largest=False).indices


_MAX_ROUNDS = 1000  # rounds of clusters before a clip still short is filled at random (never seen: 1 is nearly always)


def _cluster_cover(batch: int, grid: tuple[int, int], count: int, generator, sizes: tuple[int, int]) -> torch.Tensor:
    """``[B, N]``: for each patch, the first of the clip's clusters that covers it. Clusters are laid until every
    clip has at least ``count`` patches covered (a round of clusters more when a clip falls short)."""
    f_dim, t_dim = grid
    n = f_dim * t_dim
    k = 3 * math.ceil(count / sizes[0] ** 2) + 8  # enough clusters to cover M patches with overlaps, nearly always
    c = _randint(sizes[0], sizes[1] + 1, (batch, 1), generator)  # cluster side per clip
    fi = torch.arange(n) // t_dim
    ti = torch.arange(n) % t_dim
    none = _MAX_ROUNDS * k  # "no cluster covers this patch": after every cluster that may be laid
    first = torch.full((batch, n), none, dtype=torch.long)
    for laid in range(0, none, k):
        f0 = (_rand((batch, k), generator) * (f_dim + c - 1)).floor().long() - (c - 1)
        t0 = (_rand((batch, k), generator) * (t_dim + c - 1)).floor().long() - (c - 1)
        covered = ((fi >= f0[..., None]) & (fi < (f0 + c)[..., None]) &
                   (ti >= t0[..., None]) & (ti < (t0 + c)[..., None]))  # [B, k, N]
        here = torch.where(covered.any(1), laid + covered.float().argmax(1), torch.full_like(first, none))
        first = torch.minimum(first, here)
        if first.is_meta or bool(((first < none).sum(1) >= count).all()):  # meta: FLOPs counted, nothing drawn
            break
    return first


def _cluster(batch: int, grid: tuple[int, int], count: int, generator, sizes: tuple[int, int]) -> torch.Tensor:
    first = _cluster_cover(batch, grid, count, generator, sizes)
    score = first + 0.5 * _rand((batch, grid[0] * grid[1]), generator)  # random order inside a cluster
    return score.topk(count, dim=1, largest=False).indices


def _cluster_ssast(batch: int, grid: tuple[int, int], count: int, generator) -> torch.Tensor:
    f_dim, t_dim = grid
    n = f_dim * t_dim
    k = 6 * math.ceil(count / 9) + 32
    c = _randint(3, 6, (batch, 1, 1), generator)
    start = _randint(0, n, (batch, k, 1), generator)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    offsets = (i * t_dim + j).reshape(1, 1, 25)
    ok = (i.reshape(1, 1, 25) < c) & (j.reshape(1, 1, 25) < c)
    ids = start + offsets  # [B, k, 25], wrapping across rows as the official loop does
    ok = ok & (ids > 0) & (ids < n)
    order = torch.arange(k).reshape(1, k, 1).expand_as(ids)
    first = torch.full((batch, n), k, dtype=torch.long)
    first.scatter_reduce_(1, ids.clamp(0, n - 1).reshape(batch, -1),
                          torch.where(ok, order, torch.full_like(order, k)).reshape(batch, -1), reduce="amin")
    # stop at the first cluster after which more than M ids are covered ...
    counts = torch.zeros(batch, k + 1, dtype=torch.long).scatter_add_(1, first, torch.ones_like(first))[:, :k]
    stop = torch.searchsorted(counts.cumsum(1), torch.full((batch, 1), count + 1))  # [B, 1]
    # ... and keep the M lowest ids of those covered (uncovered ids only if the clusters ran out)
    score = torch.where((first <= stop) & (first < k), torch.arange(n), n + torch.arange(n))
    return score.topk(count, dim=1, largest=False).indices


def sample_mask(batch: int, grid: tuple[int, int], count: int, method: str = "auto",
                generator: torch.Generator | None = None, cluster_sizes: tuple[int, int] = (3, 5)) -> torch.Tensor:
    """Sorted indices ``[B, count]`` of the patches to mask, on the CPU (``generator`` is a CPU generator).

    Args:
        batch: clips in the batch.
        grid: the token grid ``(f_dim, t_dim)``.
        count: patches to mask per clip.
        method: one of :data:`MASKINGS`; ``auto`` is ``cluster`` when the grid has several frequency rows
            (patch models) and ``uniform`` for frame models (one row), SSAST's rule.
        cluster_sizes: smallest and largest cluster side for ``cluster``.
    """
    if method not in MASKINGS:
        raise ValueError(f"unknown masking {method!r}; choose one of {list(MASKINGS)}")
    n = grid[0] * grid[1]
    if not 1 <= count < n:
        raise ValueError(f"cannot mask {count} of {n} patches")
    if method == "auto":
        method = "cluster" if grid[0] > 1 else "uniform"
    if method == "uniform":
        idx = _uniform(batch, n, count, generator)
    elif method == "cluster":
        idx = _cluster(batch, grid, count, generator, cluster_sizes)
    else:
        idx = _cluster_ssast(batch, grid, count, generator)
    return idx.sort(dim=1).values
