"""The merge across ranks: statistics over every rank's samples from every rank's small records.

Under ``torch.distributed`` with ``global_stats=True``, a logged step gathers each rank's records and
vectors (Σ_n δ_n and the units' activity per layer) in one collective, and :func:`merge_ranks` turns them
into the global batch's statistics on the host (numpy).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .records import COUNT, DEAD, DEAD_GEN, DELTA_NORM, FRO, GEN, SAMPLE_MAX, SAMPLE_MEAN


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(snapshot: Tensor, vectors: Tensor, world_size: int) -> tuple[Tensor, Tensor]:
    """Every rank's records (shape (ranks, *snapshot.shape)) and vectors: the one collective of a logged step."""
    import torch.distributed as dist

    flat = torch.cat([snapshot.flatten(), vectors])
    gathered = flat.new_empty(world_size * flat.numel())
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (renamed in torch 2.13)
    all_gather(gathered, flat)
    gathered = gathered.view(world_size, flat.numel())
    rows = snapshot.numel()
    return gathered[:, :rows].reshape(world_size, *snapshot.shape), gathered[:, rows:]


def merge_ranks(records, vectors, gen, vector_at, out):
    """Statistics over every rank's samples, from every rank's records: the global batch's, as if the
    loss averaged over ranks (DistributedDataParallel's gradient): δ_n on rank r is δ_rn / ranks."""
    ranks = records.shape[0]
    rows = records[:, :-1]
    reached = (rows[:, :, GEN] == gen).all(0)
    merged = np.full(rows.shape[1:], np.nan)
    count = rows[:, :, COUNT].sum(0)
    merged[:, COUNT] = count
    merged[:, SAMPLE_MEAN] = (rows[:, :, SAMPLE_MEAN] * rows[:, :, COUNT]).sum(0) / np.maximum(count, 1) / ranks
    merged[:, SAMPLE_MAX] = rows[:, :, SAMPLE_MAX].max(0) / ranks
    merged[:, FRO] = np.sqrt((rows[:, :, FRO] ** 2).sum(0)) / ranks
    merged[:, DEAD_GEN] = np.where((rows[:, :, DEAD_GEN] == gen).all(0), gen, -1)
    for row, (start, width) in enumerate(zip(vector_at, out)):
        bias_sum = vectors[:, start : start + width].sum(0) / ranks
        merged[row, DELTA_NORM] = np.linalg.norm(bias_sum)
        alive = vectors[:, start + width : start + 2 * width].max(0)
        merged[row, DEAD] = float((alive != 0).sum())  # units active for some sample of some rank
    merged[:, GEN] = np.where(reached, gen, -1)
    return merged, reached
