"""Benchmark suite: our loss, post-processing, training step, inference, data pipeline and end-to-end
training, each timed side by side with torchvision's `ssd300_vgg16` doing the same work.

Run `python -m ssd_lightning.benchmark --help`; results go to experiments/benchmarks/ as JSON.
"""

from ssd_lightning.benchmark.cli import main
from ssd_lightning.benchmark.report import Result, Target
from ssd_lightning.benchmark.timing import Stats, measure

__all__ = ["Result", "Stats", "Target", "main", "measure"]
