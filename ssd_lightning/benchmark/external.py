"""Benchmarks that run other parts of the project in a child process: the data pipeline's own benchmark
(`ssd_lightning.data.benchmark`) and a real `train.py` run on coco128.

Child processes keep their settings (the data benchmark pins torch to one thread) out of this process,
and a crash in them becomes a reported failure instead of ending the suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from ssd_lightning.benchmark.report import Result

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TRAIN_MODULE = "ssd_lightning.cli.train"
DATA_MODULE = "ssd_lightning.data.benchmark"


def coco128_root(explicit: Path | None = None) -> Path:
    """The coco128 folder: `explicit`, else $SSD_COCO128, else ../shared/data/coco128 beside the project."""
    if explicit is not None:
        return explicit
    env = os.environ.get("SSD_COCO128")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data" / "coco128"


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, cwd=PROJECT_ROOT, env=env
    )


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# Lines printed by ssd_lightning.data.benchmark.
_PER_WORKER = re.compile(r"([\d.]+) images/s per worker by CPU time .*?([\d.]+) by wall clock")
_LOADER = re.compile(r"DataLoader, (\d+) workers: ([\d.]+) images/s total")


def parse_data_output(text: str) -> dict[str, float]:
    """The figures of the data benchmark's report (an empty dict when it printed none we know)."""
    metrics: dict[str, float] = {}
    if match := _PER_WORKER.search(text):
        metrics["images_per_s_per_worker_cpu_time"] = float(match.group(1))
        metrics["images_per_s_per_worker_wall"] = float(match.group(2))
    if match := _LOADER.search(text):
        metrics["loader_workers"] = int(match.group(1))
        metrics["loader_images_per_s"] = float(match.group(2))
    return metrics


def data_benchmark(root: Path | None, passes: int, workers: int, size: int, timeout_s: float) -> Result:
    """Images/s per worker of decode + full SSD train augmentation on coco128 (and through a DataLoader
    with `workers` processes), as measured by the data package's own benchmark."""
    config: dict[str, Any] = {"size": size, "passes": passes, "workers": workers}
    if not _module_exists(DATA_MODULE):
        return Result("data", config, skipped=f"{DATA_MODULE} is not there yet (issue 3)")
    dataset_root = root or coco128_root() / "coco"
    if not dataset_root.is_dir():
        return Result("data", config, skipped=f"no dataset at {dataset_root} (set --root or SSD_COCO128)")
    command = [sys.executable, "-m", DATA_MODULE, "--root", str(dataset_root), "--size", str(size)]
    command += ["--passes", str(passes), "--workers", str(workers)]
    config.update(root=str(dataset_root), command=" ".join(command[1:]))
    done = _run(command, timeout_s)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        return Result(
            "data", config, skipped=f"data benchmark failed ({done.returncode}): {_tail(output, 5)}"
        )
    metrics = parse_data_output(done.stdout)
    if not metrics:
        return Result(
            "data", config, skipped=f"could not read the data benchmark's figures: {_tail(output, 5)}"
        )
    return Result("data", config, metrics=metrics, extra={"output": _tail(done.stdout)})


class GpuSampler:
    """GPU utilisation (%) sampled by `nvidia-smi` every `interval_ms` while the run lasts (if available)."""

    def __init__(self, interval_ms: int = 500) -> None:
        self.interval_ms = interval_ms
        self.samples: list[float] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        executable = shutil.which("nvidia-smi")
        if executable is None:
            return self
        self._process = subprocess.Popen(
            [
                executable,
                "--query-gpu=utilization.gpu",
                "--format=csv,noheader,nounits",
                f"-lms={self.interval_ms}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            first = line.split(",")[0].strip()  # first GPU
            if first.isdigit():
                self.samples.append(float(first))

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def summary(self) -> dict[str, float | int]:
        """Mean and median utilisation once the GPU got busy (the start-up samples at 0% are left out)."""
        busy_from = next((i for i, value in enumerate(self.samples) if value > 0), len(self.samples))
        busy = self.samples[busy_from:]
        if not busy:
            return {"gpu_util_samples": len(self.samples)}
        return {
            "gpu_util_mean": statistics.fmean(busy),
            "gpu_util_median": statistics.median(busy),
            "gpu_util_samples": len(busy),
        }


def default_train_overrides(coco: Path, device: torch.device, steps: int, workers: int) -> list[str]:
    """SSD300 on coco128 with real data loading, no validation, checkpoints, logger or progress bar."""
    overrides = [
        "model=ssd300",
        "++model.backbone_weights=null",  # no download: speed does not depend on the starting weights
        "dataset=coco",
        f"dataset.root={coco}",
        "dataset.val_split=train2017",
        f"dataset.num_workers={workers}",
        f"trainer.max_steps={steps}",
        "++trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "callbacks=none",  # the default logger is none too
        "test=false",
        "optimized_metric=null",
    ]
    if device.type == "cuda":
        overrides += ["trainer=gpu", "trainer.precision=bf16-mixed"]
    else:
        overrides += ["trainer.accelerator=cpu", "trainer.devices=1"]
    return overrides


def merge_overrides(defaults: list[str], overrides: list[str]) -> list[str]:
    """`defaults` with each key that `overrides` sets replaced (Hydra refuses a key given twice)."""

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    given = {key(o) for o in overrides}
    return [d for d in defaults if key(d) not in given] + list(overrides)


def end_to_end_benchmark(
    overrides: list[str],
    steps: int,
    skip_steps: int,
    device: torch.device,
    timeout_s: float,
    coco128: Path | None = None,
    workers: int | None = None,
) -> Result:
    """Images/s of a real `train.py` run (SSD300 on coco128 unless `overrides` say otherwise), with the
    step time split into waiting for data and the rest, and GPU utilisation when nvidia-smi is there."""
    config: dict[str, Any] = {"steps": steps, "skip_steps": skip_steps}
    if not _module_exists(TRAIN_MODULE):
        return Result("end-to-end", config, skipped=f"{TRAIN_MODULE} is not there yet (issue 4)")
    coco = coco128_root(coco128) / "coco"
    if not coco.is_dir() and not any(o.startswith("dataset.root=") for o in overrides):
        return Result("end-to-end", config, skipped=f"coco128 not found at {coco} (--coco128 or SSD_COCO128)")
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) - 2))
    with tempfile.TemporaryDirectory(prefix="ssd_e2e_") as scratch:
        report = Path(scratch) / "throughput.json"
        command = [sys.executable, "-m", TRAIN_MODULE]
        command += merge_overrides(default_train_overrides(coco, device, steps, workers), overrides)
        command += [
            f"hydra.run.dir={scratch}/run",
            "+callbacks.benchmark_throughput._target_=ssd_lightning.benchmark.throughput.ThroughputMonitor",
            f"+callbacks.benchmark_throughput.output={report}",
            f"+callbacks.benchmark_throughput.skip_steps={skip_steps}",
        ]
        config["command"] = " ".join(command[1:]).replace(scratch, "<tmp>")
        started = time.perf_counter()
        with GpuSampler() as sampler:
            done = _run(command, timeout_s)
        config["wall_time_s"] = round(time.perf_counter() - started, 1)
        output = done.stdout + done.stderr
        if done.returncode != 0 or not report.is_file():
            reason = (
                f"train.py failed ({done.returncode})" if done.returncode else "train.py wrote no throughput"
            )
            return Result("end-to-end", config, skipped=f"{reason}: {_tail(output, 8)}")
        metrics = json.loads(report.read_text())
    if not metrics.get("timed_steps"):
        return Result(
            "end-to-end", config, skipped=f"no step after the first {skip_steps} was timed: {metrics}"
        )
    metrics.update(sampler.summary())
    return Result("end-to-end", config, metrics=metrics, extra={"output": _tail(output, 15)})
