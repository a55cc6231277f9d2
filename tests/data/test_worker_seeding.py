"""DataLoader workers draw their own augmentations, whatever wraps the dataset."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ssd_lightning.data import VOCDetection, build_train_transform, collate_detection, seed_worker

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _dataset(root: Path) -> VOCDetection:
    transform = build_train_transform(32, MEAN, STD)
    transform.reseed(5)  # as DetectionDataModule.setup does
    return VOCDetection(root, [(2007, "train")], ["dog", "cat"], transform=transform)


def _epochs(dataset: Dataset, epochs: int = 2, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per epoch, the images of a 2-worker, non-persistent DataLoader, one per batch, in order."""
    torch.manual_seed(seed)  # what seed_everything does: fixes every epoch's worker seeds
    loader = DataLoader(
        dataset,
        batch_size=1,
        num_workers=2,
        persistent_workers=False,
        collate_fn=collate_detection,
        worker_init_fn=functools.partial(seed_worker, rank=0),
    )
    return [[images[0] for images, _ in loader] for _ in range(epochs)]


@pytest.mark.parametrize("wrap", ["subset", "concat"])
def test_wrapped_datasets_get_distinct_augmentations_per_worker_and_epoch(
    make_voc: Callable[..., Path], wrap: str
) -> None:
    dataset = _dataset(make_voc())
    # The same image four times: workers 0 and 1 each augment it twice per epoch.
    wrapped = (
        Subset(dataset, [0, 0, 0, 0]) if wrap == "subset" else ConcatDataset([Subset(dataset, [0, 0])] * 2)
    )
    first, second = _epochs(wrapped)
    assert not torch.equal(first[0], first[1])  # worker 0's first image vs worker 1's first image
    assert not torch.equal(first[2], first[3])
    assert not any(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # epoch 2 repeats nothing
    again = _epochs(wrapped)
    assert all(torch.equal(a, b) for a, b in zip(first + second, again[0] + again[1], strict=True))
