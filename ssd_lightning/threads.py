"""Torch's intra-op threads for code made of many small CPU ops."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch CPU ops on one intra-op thread, restoring the setting afterwards.

    Many ops on small tensors (matching detections, measuring prior coverage) gain nothing from extra
    threads but their wake-up latency, which grows huge when data workers or other ranks hold the cores
    (evaluation of 5000 images x 200 detections on a busy 2-core machine: 0.5 s on one thread, 5-20 s on two).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
