"""Smoke tests of the benchmark suite at tiny sizes, and checks that both sides of each comparison do the
same work. No thresholds and no timing assertions: targets are judged by reading the suite's JSON."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssd_lightning.benchmark import cli, main, throughput
from ssd_lightning.benchmark.external import merge_overrides, parse_data_output
from ssd_lightning.benchmark.report import Result, Target
from ssd_lightning.benchmark.suites import (
    DETECTION,
    FastPath,
    Settings,
    background_margin,
    build_model_pair,
    detections_agreement,
    fast_path_ladder,
)
from ssd_lightning.benchmark.throughput import ThroughputMonitor
from ssd_lightning.benchmark.timing import Stats, measure
from ssd_lightning.benchmark.workloads import random_targets, to_pixels
from ssd_lightning.loss import MultiBoxLoss

TINY = ["--device", "cpu", "--warmup", "0", "--repeats", "2", "--number", "1"]


def run_suite(tmp_path: Path, *argv: str) -> dict:
    assert main([*argv, *TINY, "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob(f"*_{argv[0]}_cpu.json")
    return json.loads(path.read_text())


def assert_timed(side: dict, images: int) -> None:
    assert side["repeats"] == 2
    assert 0 < side["min_ms"] <= side["median_ms"] <= side["max_ms"]
    assert side["images_per_s"] == pytest.approx(1e3 * images / side["median_ms"])


def assert_machine(document: dict) -> None:
    machine = document["machine"]
    assert machine["device"] == "cpu"
    for key in ("torch", "torchvision", "python", "cpu_count", "device_name", "wall_time_s"):
        assert machine[key], key


def test_loss_benchmark_times_both_sides_on_equal_losses(tmp_path):
    document = run_suite(tmp_path, "loss", "--batch", "2")
    assert_machine(document)
    (result,) = document["results"]
    assert result["benchmark"] == "loss"
    assert result["config"]["batch"] == 2
    assert result["extra"]["priors"] == 8732
    assert_timed(result["ours"], 2)
    assert_timed(result["theirs"], 2)
    assert result["ratio"] == pytest.approx(result["ours"]["median_ms"] / result["theirs"]["median_ms"])
    assert result["targets"][0]["met"] == (result["ratio"] <= 0.5)
    # Same matching, encoding and mining: torchvision's loss values are ours.
    assert result["extra"]["max_relative_loss_difference"] < 1e-4


def test_postprocess_benchmark_gives_the_same_detections(tmp_path):
    document = run_suite(tmp_path, "postprocess", "--batch", "2")
    (result,) = document["results"]
    assert_timed(result["ours"], 2)
    assert_timed(result["theirs"], 2)
    extra = result["extra"]
    assert extra["candidates_per_image"] > 0
    assert extra["images_with_same_detection_count"] == 2
    assert extra["max_score_difference"] < 1e-5
    assert extra["max_box_difference_px"] < 1e-2


def test_network_benchmarks_of_the_compact_model(tmp_path):
    train = run_suite(tmp_path / "train", "train-step", "--arch", "compact", "--size", "128", "--batch", "2")
    (step,) = train["results"]
    assert step["config"]["arch"] == "compact"
    assert_timed(step["ours"], 2)
    assert step["theirs"] is None and step["ratio"] is None
    assert "compact" in step["extra"]["torchvision"]
    assert torch.isfinite(torch.tensor(step["extra"]["last_loss_ours"]))

    infer = run_suite(tmp_path / "infer", "inference", "--arch", "compact", "--size", "128", "--batch", "3")
    latency, throughput = infer["results"]
    assert (latency["benchmark"], latency["config"]["batch"]) == ("inference-latency", 1)
    assert (throughput["benchmark"], throughput["config"]["batch"]) == ("inference-throughput", 3)
    assert_timed(latency["ours"], 1)
    assert_timed(throughput["ours"], 3)
    assert 0 < throughput["extra"]["candidates_per_image"] <= 20 * DETECTION.pre_nms_top_k


def test_torchvision_network_does_our_work():
    """With its weights and default boxes, our SSD300 gives torchvision's training loss and detections."""
    settings = Settings(device=torch.device("cpu"))
    pair = build_model_pair(settings, 300, FastPath())
    assert pair.reference is not None
    images = torch.randn(1, 3, 300, 300, generator=torch.Generator().manual_seed(1))
    targets = random_targets(1, settings.num_classes, torch.Generator().manual_seed(2))
    with torch.no_grad():
        loc, conf = pair.ours(images)
        ours = sum(MultiBoxLoss(settings.num_classes)(loc, conf, pair.ours.priors, targets))
        theirs = pair.reference.training_loss(pair.their_network, images, to_pixels(targets, 300))
        assert float(ours) == pytest.approx(float(theirs), rel=1e-4)

        pair.ours.eval()
        pair.reference.model.eval()
        agreement = detections_agreement(pair, images, loc, conf)
    assert agreement["images_with_same_detection_count"] == 1
    assert agreement["detections_per_image_ours"] > 0
    assert agreement["max_box_difference_px"] < 1e-2


def test_background_margin_hits_the_wanted_candidate_count():
    conf = torch.randn(2, 500, 5, generator=torch.Generator().manual_seed(0))
    margin = background_margin(conf, 100.0, 0.01, 400)
    shifted = conf.clone()
    shifted[..., 0] += margin
    kept = (shifted.softmax(-1)[..., 1:] > 0.01).sum() / 2
    assert 90 <= float(kept) <= 110


def test_measure_interleaves_and_counts_calls():
    calls: list[str] = []
    stats = measure(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        torch.device("cpu"),
        warmup=1,
        repeats=3,
        number=2,
    )
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:] == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]  # order rotates
    assert stats["a"].repeats == 3 and stats["a"].number == 2
    with pytest.raises(ValueError, match="repeats"):
        measure({"a": lambda: None}, torch.device("cpu"), repeats=0)


def _stats(median_s: float) -> Stats:
    return Stats(median_s, median_s, median_s, median_s, median_s, repeats=1, number=1, warmup=0)


def test_targets_are_judged_from_the_ratio_and_only_where_they_apply():
    result = Result("loss", {}, ours=_stats(0.4), theirs=_stats(1.0), images_per_call=8)
    assert result.ratio == pytest.approx(0.4)
    assert result.target_met(Target("", "max_ratio", 0.5)) is True
    assert result.target_met(Target("", "min_speedup", 3.0)) is False  # 2.5x
    assert result.target_met(Target("", "min_images_per_s", 20.0)) is True  # 8 / 0.4 s
    assert result.target_met(Target("", "max_latency_ms", 100.0)) is False  # 400 ms
    assert result.target_met(Target("", "max_ratio", 0.5, applies=False)) is None
    with pytest.raises(ValueError, match="unknown target kind"):
        Target("", "fastest", 1.0)


def test_data_benchmark_output_is_parsed():
    text = (
        "coco: 128 images, decode + SSD augmentation at 300px, one thread, 2 passes: 191.7 images/s per "
        "worker by CPU time (5.22 ms/image), 186.5 by wall clock\n"
        "DataLoader, 4 workers: 612.0 images/s total, 153.0 per worker\n"
    )
    assert parse_data_output(text) == {
        "images_per_s_per_worker_cpu_time": 191.7,
        "images_per_s_per_worker_wall": 186.5,
        "loader_workers": 4,
        "loader_images_per_s": 612.0,
    }
    assert parse_data_output("Traceback ...") == {}


def test_train_overrides_replace_the_defaults_they_name():
    merged = merge_overrides(
        ["model=ssd300", "++trainer.limit_val_batches=0", "test=false"], ["model=compact"]
    )
    assert merged == ["++trainer.limit_val_batches=0", "test=false", "model=compact"]
    assert merge_overrides(["trainer.max_steps=5"], ["+trainer.max_steps=9"]) == ["+trainer.max_steps=9"]


def test_throughput_monitor_splits_data_wait_and_compute(tmp_path, monkeypatch):
    clock = iter([0.0, 1.0, 1.5, 2.0, 2.25, 3.0, 3.5, 4.0])  # start/end of four steps
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    monitor = ThroughputMonitor(str(tmp_path / "throughput.json"), skip_steps=1)
    batch = (torch.zeros(4, 3, 8, 8), [])
    for index in range(4):
        monitor.on_train_batch_start(None, None, batch, index)
        monitor.on_train_batch_end(None, None, None, batch, index)
    summary = monitor.summary()
    # Steps 2-4 are timed: waits 0.5, 0.25, 0.5; compute 0.5, 0.75, 0.5; 12 images in 3 s.
    assert summary["timed_steps"] == 3
    assert summary["images_per_s"] == pytest.approx(4.0)
    assert summary["data_wait_fraction"] == pytest.approx(1.25 / 3.0)
    assert summary["compute_ms_median"] == pytest.approx(500.0)


def test_all_runs_every_knob_on_cuda_and_small_fp32_on_cpu(monkeypatch):
    """`all` composes the suite without running it: benchmark functions are replaced by recorders."""
    calls: list[tuple[str, dict]] = []

    def recorder(name):
        def record(*args, **kwargs):
            calls.append((name, {"args": args, **kwargs}))
            return Result(name, {})

        return record

    for name in ("loss_benchmark", "postprocess_benchmark", "train_step_benchmark", "inference_benchmark"):
        monkeypatch.setattr(cli, name, recorder(name))
    monkeypatch.setattr(cli.external, "data_benchmark", recorder("data"))
    monkeypatch.setattr(cli.external, "end_to_end_benchmark", recorder("end_to_end"))
    args = cli.build_parser().parse_args(["all"])

    cli.run_all(args, torch.device("cuda"))
    steps = [c["args"] for name, c in calls if name == "train_step_benchmark"]
    ladder = fast_path_ladder(training=True)
    assert [(s[1], s[3]) for s in steps] == [(300, f) for f in ladder] + [(512, f) for f in ladder] + [
        (300, replace(ladder[-1], reference="eager"))
    ]
    assert all(s[0].device.type == "cuda" and s[2] == 32 for s in steps)
    names = [name for name, _ in calls]
    assert names.count("loss_benchmark") == 3 and names.count("postprocess_benchmark") == 2
    assert names.count("inference_benchmark") == 2 * len(fast_path_ladder(training=False))
    assert names[-2:] == ["data", "end_to_end"]

    calls.clear()
    cli.run_all(args, torch.device("cpu"))
    steps = [c["args"] for name, c in calls if name == "train_step_benchmark"]
    assert [(s[1], s[2], s[3]) for s in steps] == [(300, 2, FastPath()), (512, 2, FastPath())]
    assert "end_to_end" not in [name for name, _ in calls]
