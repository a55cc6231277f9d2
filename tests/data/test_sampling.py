"""Repeat-factor sampling: the LVIS factors by hand, epochs of one length that follow the seed and the epoch,
each copy of an image on one DDP rank; the DataModule option."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from ssd_lightning.cli.build import instantiate_datamodule
from ssd_lightning.data import DetectionDataModule
from ssd_lightning.data.sampling import RepeatFactorSampler, repeat_factors

# 10 images: class 1 in all of them, class 2 in image 0 only, class 3 in images 1 and 2; image 9 empty.
LABELS = [np.array([1, 2, 2]), np.array([1, 3]), np.array([3, 1])] + [np.array([1])] * 6 + [np.array([], int)]


def test_factors_by_hand() -> None:
    # f_1 = 9/10, f_2 = 1/10, f_3 = 2/10; t = 0.4: r_1 = max(1, sqrt(0.4/0.9)) = 1, r_2 = sqrt(4) = 2,
    # r_3 = sqrt(2); an image takes its rarest class's factor, an empty image 1.
    factors = repeat_factors(LABELS, threshold=0.4)
    expected = [2.0, math.sqrt(2), math.sqrt(2)] + [1.0] * 7
    np.testing.assert_allclose(factors, expected)
    # a threshold below every class's frequency repeats nothing
    np.testing.assert_allclose(repeat_factors(LABELS, threshold=0.05), np.ones(10))
    with pytest.raises(ValueError, match="repeat_threshold must be > 0"):
        repeat_factors(LABELS, threshold=0)


def _counts(sampler: RepeatFactorSampler) -> Counter:
    return Counter(sampler.epoch_indices().tolist())


def test_each_epoch_repeats_rare_images_and_follows_seed_and_epoch() -> None:
    factors = repeat_factors(LABELS, threshold=0.4)
    sampler = RepeatFactorSampler(list(range(10)), factors, seed=3)
    # sum of factors = 2 + 2 sqrt(2) + 7 = 11.83: every epoch holds 12 entries (the ceil)
    assert len(sampler) == 12
    totals = Counter()
    for epoch in range(400):
        sampler.set_epoch(epoch)
        counts = _counts(sampler)
        assert sum(counts.values()) == 12
        # each image floor(r) or ceil(r) times, but for at most one padding entry (11 drawn for 12 places)
        assert all(counts[i] >= math.floor(factors[i]) for i in range(10))  # nothing is left out
        assert sum(max(0, counts[i] - math.ceil(factors[i])) for i in range(10)) <= 1
        assert counts[0] >= 2  # a whole factor repeats exactly
        totals.update(counts)
    # the fractional part is drawn, 0.414 on average (padding adds the odd entry to the first indices)
    assert totals[1] / 400 == pytest.approx(math.sqrt(2), abs=0.08)
    assert totals[2] / 400 == pytest.approx(math.sqrt(2), abs=0.08)
    sampler.set_epoch(5)
    again = RepeatFactorSampler(list(range(10)), factors, seed=3)
    again.set_epoch(5)
    assert sampler.epoch_indices().tolist() == again.epoch_indices().tolist()
    again.set_epoch(6)
    assert sampler.epoch_indices().tolist() != again.epoch_indices().tolist()


def test_ranks_split_each_epoch_without_overlap() -> None:
    factors = repeat_factors(LABELS, threshold=0.4)
    whole = RepeatFactorSampler(list(range(10)), factors, num_replicas=4, rank=0, seed=1)
    whole.set_epoch(2)
    order = whole.epoch_indices().tolist()
    assert len(order) == 12 and len(whole) == 3  # 12 is a multiple of 4: 3 each
    shares = []
    for rank in range(4):
        sampler = RepeatFactorSampler(list(range(10)), factors, num_replicas=4, rank=rank, seed=1)
        sampler.set_epoch(2)
        shares.append(list(sampler))
    assert all(len(share) == 3 for share in shares)
    # the ranks' shares are the one epoch order dealt out: every copy on exactly one rank
    assert sorted(sum(shares, [])) == sorted(order)
    assert [shares[i % 4][i // 4] for i in range(12)] == order


def test_the_datamodule_option(tmp_path) -> None:
    with pytest.raises(ValueError, match="dataset.sampler must be null or repeat_factor"):
        DetectionDataModule(format="shapes", root=str(tmp_path), batch_size=2, sampler="balanced")
    with pytest.raises(ValueError, match="dataset.repeat_threshold must be > 0"):
        DetectionDataModule(format="shapes", root=str(tmp_path), batch_size=2, repeat_threshold=0)


def test_the_training_loader_repeats_images_of_rare_classes(compose_cfg, shapes_overrides) -> None:
    cfg = compose_cfg(
        *shapes_overrides,
        "dataset.sampler=repeat_factor",
        "dataset.repeat_threshold=0.9",
        "dataset.batch_size=4",
        "dataset.num_workers=0",
        "model.image_size=64",
    )
    datamodule = instantiate_datamodule(cfg)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert isinstance(loader.sampler, RepeatFactorSampler)
    records = datamodule.datasets["train"].records
    expected = repeat_factors([r.labels for r in records], 0.9)
    assert expected.max() > 1  # some shape is in fewer than 90% of the 16 images
    assert len(loader.sampler) == math.ceil(expected.sum() - 1e-9) > len(records)
    assert sum(len(batch[1]) for batch in loader) == len(loader.sampler)
