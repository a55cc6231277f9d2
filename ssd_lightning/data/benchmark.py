"""Throughput of the training data pipeline: decode + full SSD augmentation + to uint8 tensor.

    python -m ssd_lightning.data.benchmark --root ../shared/data/coco128/coco [--size 300] [--passes 5]

Runs the pipeline in this one process with OpenCV and torch limited to one thread, which is what a
single DataLoader worker does, and prints images/s per worker. ``--workers N`` also times a real
DataLoader with N worker processes (total images/s and per worker).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import cv2
import torch
from torch.utils.data import DataLoader

from .base import DetectionDataset
from .coco import COCODetection
from .datamodule import collate_detection, seed_worker
from .transforms import build_train_transform
from .voc import VOC_CLASSES, VOCDetection

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def images_per_second(dataset: DetectionDataset, passes: int) -> tuple[float, float]:
    """Items of ``dataset`` per wall-clock second and per CPU second of this process (after a warm-up pass).

    With one thread the CPU-time rate is what a worker with a core to itself achieves, even on a busy
    machine where the wall-clock rate is lower.
    """
    for index in range(len(dataset)):
        dataset[index]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for index in range(len(dataset)):
            dataset[index]
    count = passes * len(dataset)
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def loader_images_per_second(
    dataset: DetectionDataset, workers: int, passes: int, batch_size: int = 32
) -> float:
    """Images per second through a DataLoader with ``workers`` processes (first pass not timed)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate_detection,
        worker_init_fn=seed_worker,
        persistent_workers=True,
    )
    for _ in loader:
        pass
    start = time.perf_counter()
    count = 0
    for _ in range(passes):
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - start)


def _report(args: argparse.Namespace) -> None:
    # uint8 out, as the data module's workers give it (normalising happens on the device)
    transform = build_train_transform(args.size, IMAGENET_MEAN, IMAGENET_STD, normalize=False)
    transform.reseed(0)
    if args.format == "coco":
        dataset: DetectionDataset = COCODetection(
            args.root, args.split or "train2017", transform=transform, keep_difficult=False
        )
    else:
        year, image_set = (args.split or "2007/trainval").split("/")
        dataset = VOCDetection(
            args.root, [(year, image_set)], VOC_CLASSES, transform=transform, keep_difficult=False
        )
    wall_rate, cpu_rate = images_per_second(dataset, args.passes)
    print(
        f"{dataset.name}: {len(dataset)} images, decode + SSD augmentation at {args.size}px, one thread, "
        f"{args.passes} passes: {cpu_rate:.1f} images/s per worker by CPU time "
        f"({1000 / cpu_rate:.2f} ms/image), {wall_rate:.1f} by wall clock"
    )
    if args.workers > 0:
        total = loader_images_per_second(dataset, args.workers, args.passes)
        print(
            f"DataLoader, {args.workers} workers: {total:.1f} images/s total, "
            f"{total / args.workers:.1f} per worker"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", required=True, help="dataset root (COCO: holds annotations/; VOC: VOCdevkit)"
    )
    parser.add_argument("--format", choices=("coco", "voc"), default="coco")
    parser.add_argument(
        "--split", default=None, help="COCO split (train2017) or VOC 'year/set' (2007/trainval)"
    )
    parser.add_argument("--size", type=int, default=300, help="model input size")
    parser.add_argument("--passes", type=int, default=5, help="timed passes over the dataset")
    parser.add_argument(
        "--workers", type=int, default=0, help="also time a DataLoader with this many workers"
    )
    args = parser.parse_args(argv)

    threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)  # a DataLoader worker is one process doing one image at a time
    torch.set_num_threads(1)
    try:
        _report(args)
    finally:
        cv2.setNumThreads(threads[0])
        torch.set_num_threads(threads[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
