"""Repeat-factor sampling for class imbalance (Gupta et al., LVIS, 2019): images holding rare classes are seen
more often in each epoch.

Each class ``c`` has the fraction ``f_c`` of training images that hold it and a repeat factor
``r_c = max(1, sqrt(t / f_c))`` for the threshold ``t``; an image repeats ``r_i = max(r_c)`` over its classes
(1 without objects). Written here because torch has no such sampler and detectron2's (the reference) is an
infinite stream, not an epoch that Lightning's schedule, validation cadence and DDP ranks can count on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def repeat_factors(image_labels: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """The repeat factor of each image from the labels of its objects (LVIS: ``max(1, sqrt(t / f_c))``)."""
    if not threshold > 0:
        raise ValueError(f"dataset.repeat_threshold must be > 0, got {threshold}")
    num_images = len(image_labels)
    present = [np.unique(np.asarray(labels, np.int64)) for labels in image_labels]
    classes, images_with = np.unique(np.concatenate([*present, np.zeros(0, np.int64)]), return_counts=True)
    class_factor = dict(
        zip(
            classes.tolist(),
            np.maximum(1.0, np.sqrt(threshold / (images_with / num_images))).tolist(),
            strict=True,
        )
    )
    return np.array([max((class_factor[c] for c in labels.tolist()), default=1.0) for labels in present])


class RepeatFactorSampler(DistributedSampler):
    """An epoch in which image ``i`` appears ``floor(r_i)`` or ``ceil(r_i)`` times, ``r_i`` on average.

    The fractional parts are drawn by systematic sampling over a shuffled order, so each image gets its
    extra copy with probability ``frac(r_i)`` and every epoch has the same length (padded with the epoch's
    first indices up to a multiple of the ranks, as torch's DistributedSampler pads). The order depends on
    ``seed`` and the epoch only (``set_epoch``, which Lightning calls): the same on every rank, which each
    take every ``num_replicas``-th entry, so each copy of an image is seen by exactly one rank.
    """

    def __init__(
        self,
        dataset: Dataset,
        factors: np.ndarray,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.factors = np.asarray(factors, np.float64)
        if len(self.factors) != len(dataset) or (self.factors < 1).any():  # type: ignore[arg-type]
            raise ValueError("repeat factors must be >= 1, one per image of the dataset")
        # Systematic sampling gives floor or ceil of the expected total: the epoch holds the ceil.
        self.total_size = math.ceil(math.ceil(self.factors.sum() - 1e-9) / num_replicas) * num_replicas
        self.num_samples = self.total_size // num_replicas

    def epoch_indices(self) -> torch.Tensor:
        """Every rank's indices of the current epoch, in order (rank ``k`` takes ``[k::num_replicas]``)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.factors), generator=generator)
        factors = torch.from_numpy(self.factors)[order]
        whole = factors.floor()
        # One uniform offset, then a point every 1.0 along the cumulative fractional parts.
        cumulative = torch.cumsum(factors - whole, 0)
        offset = torch.rand(1, generator=generator, dtype=torch.float64)
        extra = torch.floor(cumulative - offset + 1) - torch.floor(
            cumulative - (factors - whole) - offset + 1
        )
        copies = torch.repeat_interleave(order, (whole + extra).long())
        copies = copies[torch.randperm(len(copies), generator=generator)]
        padding = self.total_size - len(copies)
        return torch.cat([copies, copies[:padding]]) if padding > 0 else copies[: self.total_size]

    def __iter__(self):  # noqa: ANN204 (torch's Sampler signature)
        return iter(self.epoch_indices()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
